//! Read bandwidth of this machine's memory, the ceiling of batch-1 decoding on the CPU (every
//! weight is read once per token, so tokens/s × weight bytes can never exceed it).
//!
//! Sums a buffer (default 1 GiB of f32, far larger than any cache) with 1 thread and with
//! every thread (each thread reads its own contiguous share), best of `--repeats` passes, and
//! prints GB/s (10⁹ bytes/s). `--json` prints one JSON object instead (what
//! `scripts/bench-generate.py` reads).
//!
//! Twice: from an ordinary allocation (4 KiB pages) and from an anonymous mapping advised for
//! transparent huge pages (2 MiB), as the CPU backend's weights are where the kernel allows
//! (`src/runtime/host_memory.rs`). The figures without a suffix are the better of the two, so
//! the decoding benchmark compares its weight stream against the faster way to read memory.
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

/// [`sum`] over f32 values stored as native-endian bytes (the mapping's view).
fn sum_bytes(bytes: &[u8]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = bytes.chunks_exact(4 * LANES);
    let rest: f32 = (chunks.remainder().chunks_exact(4))
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .sum();
    for c in chunks {
        for (a, b) in acc.iter_mut().zip(c.chunks_exact(4)) {
            *a += f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Best GB/s of `repeats` passes of `sum` over `buf` split into `threads` contiguous shares
/// (each a multiple of `unit` elements), and the last pass's total.
fn best_gbs<T: Sync>(
    buf: &[T],
    unit: usize,
    sum: fn(&[T]) -> f32,
    threads: usize,
    repeats: usize,
) -> (f64, f32) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap_or_else(|e| usage(&format!("no thread pool: {e}")));
    let share = buf.len().div_ceil(threads).next_multiple_of(unit);
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
    let (one_4k, s1) = best_gbs(&buf, 1, sum, 1, repeats);
    let (every_4k, s2) = best_gbs(&buf, 1, sum, all, repeats);
    drop(buf);
    let mut map = memmap2::MmapMut::map_anon(n * 4)
        .unwrap_or_else(|e| usage(&format!("cannot map {mib} MiB: {e}")));
    // Advice before the first write, so the pages are faulted in as huge pages; a kernel
    // without them leaves 4 KiB pages (then both measurements read the same kind of memory).
    let huge_advised = map.advise(memmap2::Advice::HugePage).is_ok();
    for (i, b) in map.chunks_exact_mut(4).enumerate() {
        b.copy_from_slice(&((i % 1024) as f32 * 1e-3).to_ne_bytes());
    }
    let (one_huge, s3) = best_gbs(&map, 4 * LANES, sum_bytes, 1, repeats);
    let (every_huge, s4) = best_gbs(&map, 4 * LANES, sum_bytes, all, repeats);
    let (one, every) = (one_4k.max(one_huge), every_4k.max(every_huge));
    if json {
        println!(
            "{{\"mib\": {mib}, \"repeats\": {repeats}, \"threads\": {all}, \
             \"gbs_1_thread\": {one:.2}, \"gbs_all_threads\": {every:.2}, \
             \"gbs_1_thread_4k\": {one_4k:.2}, \"gbs_all_threads_4k\": {every_4k:.2}, \
             \"gbs_1_thread_huge\": {one_huge:.2}, \"gbs_all_threads_huge\": {every_huge:.2}, \
             \"huge_advised\": {huge_advised}}}"
        );
    } else {
        println!(
            "read bandwidth over {mib} MiB, best of {repeats}: 4 KiB pages {one_4k:.1} GB/s on \
             1 thread, {every_4k:.1} GB/s on {all} threads; huge pages{} {one_huge:.1} and \
             {every_huge:.1} GB/s (checksums {s1:.3e}, {s2:.3e}, {s3:.3e}, {s4:.3e})",
            if huge_advised {
                ""
            } else {
                " (advice refused)"
            }
        );
    }
}
