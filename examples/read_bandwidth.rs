//! Read bandwidth of this machine's memory, the ceiling of batch-1 decoding on the CPU (every
//! weight is read once per token, so tokens/s × weight bytes can never exceed it).
//!
//! Sums a buffer (default 1 GiB of f32, far larger than any cache) with 1 thread and with
//! every thread (each thread reads its own contiguous share), best of `--repeats` passes, and
//! prints GB/s (10⁹ bytes/s). `--json` prints one JSON object instead (what
//! `scripts/bench-generate.py` reads).
//!
//! ```text
//! cargo run --release --example read_bandwidth -- [--mib 1024] [--repeats 5] [--json]
//! ```

use rayon::prelude::*;
use std::time::Instant;

/// f32 lanes summed independently: enough partial sums that the adds do not wait on each
/// other and the loop vectorizes, so the loop is bound by the memory reads alone.
const LANES: usize = 32;

fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Best GB/s of `repeats` passes over `buf` split into `threads` contiguous shares.
fn best_gbs(buf: &[f32], threads: usize, repeats: usize) -> (f64, f32) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap_or_else(|e| usage(&format!("no thread pool: {e}")));
    let share = buf.len().div_ceil(threads);
    let mut best = f64::MAX;
    let mut total = 0.0;
    for _ in 0..repeats {
        let t = Instant::now();
        total = pool.install(|| buf.par_chunks(share).map(sum).sum::<f32>());
        best = best.min(t.elapsed().as_secs_f64());
    }
    (std::mem::size_of_val(buf) as f64 / best / 1e9, total)
}

fn usage(problem: &str) -> ! {
    eprintln!("read_bandwidth: {problem} (arguments: --mib N, --repeats N, --json)");
    std::process::exit(2)
}

fn main() {
    let mut mib = 1024usize;
    let mut repeats = 5usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .unwrap_or_else(|| usage(&format!("{name} needs a positive integer")))
        };
        match a.as_str() {
            "--mib" => mib = value("--mib"),
            "--repeats" => repeats = value("--repeats"),
            "--json" => json = true,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let Some(n) = mib.checked_mul(1 << 18) else {
        usage("--mib is too large")
    };
    // Every page written before timing (no first-touch faults inside the passes); values
    // that are not all equal, so the sums are not foldable.
    let buf: Vec<f32> = (0..n).map(|i| (i % 1024) as f32 * 1e-3).collect();
    let all = rayon::current_num_threads();
    let (one, s1) = best_gbs(&buf, 1, repeats);
    let (every, s2) = best_gbs(&buf, all, repeats);
    if json {
        println!(
            "{{\"mib\": {mib}, \"repeats\": {repeats}, \"threads\": {all}, \
             \"gbs_1_thread\": {one:.2}, \"gbs_all_threads\": {every:.2}}}"
        );
    } else {
        println!(
            "read bandwidth over {mib} MiB, best of {repeats}: {one:.1} GB/s on 1 thread, \
             {every:.1} GB/s on {all} threads (checksums {s1:.3e}, {s2:.3e})"
        );
    }
}
