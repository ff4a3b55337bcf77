//! Criterion benchmark of the LayerNorm kernels (forward, fused residual forward, backward) on
//! 256 MiB tensors. Each iteration synchronizes the stream, so criterion's wall clock covers
//! the kernel; `cuattn bench layernorm` times with CUDA events and reports % of copy bandwidth.
//! Without a GPU it prints SKIPPED and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "cuda")]
fn layernorm(c: &mut Criterion) {
    use criterion::Throughput;
    use cuattn::bench::layernorm::{backward_bytes, forward_bytes, shapes, Workload};
    use cuattn::ops::layernorm::Tuning;
    use cuattn::DType;

    let Some(gpu) = cuattn::check::gpu_or_skip("benches/layernorm") else {
        return;
    };
    let mut group = c.benchmark_group("layernorm");
    group.sample_size(20);
    let tuning = Tuning::default();
    for dt in [DType::BF16, DType::F32] {
        for (rows, hidden) in shapes(dt, false)
            .into_iter()
            .filter(|&(_, h)| h == 768 || h == 4096)
        {
            let mut w = Workload::new(&gpu, dt, rows, hidden).unwrap();
            let id = format!("{dt}/{rows}x{hidden}");
            let mut bench = |name: &str, bytes: u64, op: &mut dyn FnMut() -> cuattn::Result<()>| {
                group.throughput(Throughput::Bytes(bytes));
                group.bench_function(format!("{name}/{id}"), |b| {
                    b.iter(|| {
                        op().unwrap();
                        gpu.synchronize().unwrap();
                    })
                });
            };
            bench(
                "forward",
                forward_bytes(dt, rows, hidden, false),
                &mut || w.forward(&gpu, tuning),
            );
            bench("backward", backward_bytes(dt, rows, hidden), &mut || {
                w.backward(&gpu, tuning)
            });
            bench(
                "residual_forward",
                forward_bytes(dt, rows, hidden, true),
                &mut || w.residual_forward(&gpu, tuning),
            );
        }
    }
    group.finish();
}

#[cfg(not(feature = "cuda"))]
fn layernorm(_: &mut Criterion) {
    eprintln!("SKIPPED (no CUDA device): benches/layernorm: built without the `cuda` feature");
}

criterion_group!(benches, layernorm);
criterion_main!(benches);
