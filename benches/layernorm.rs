//! Criterion benchmark of the LayerNorm kernels (forward, fused residual forward, backward) on
//! 256 MiB tensors. Each iteration synchronizes the stream, so criterion's wall clock covers
//! the kernel; `cuattn bench layernorm` times with CUDA events and reports % of copy bandwidth.
//! Without a GPU it prints SKIPPED and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "cuda")]
fn layernorm(c: &mut Criterion) {
    use criterion::Throughput;
    use cuattn::bench::layernorm::{backward_bytes, forward_bytes, shapes};
    use cuattn::ops::layernorm::{self as ln, Tuning};
    use cuattn::DType;

    let Some(gpu) = cuattn::check::gpu_or_skip("benches/layernorm") else {
        return;
    };
    let mut group = c.benchmark_group("layernorm");
    group.sample_size(20);
    for dt in [DType::BF16, DType::F32] {
        for (rows, hidden) in shapes(dt, false)
            .into_iter()
            .filter(|&(_, h)| h == 768 || h == 4096)
        {
            let shape = [rows, hidden];
            let x = gpu.random(dt, &shape, 1, 0.3, 2.0).unwrap();
            let res = gpu.random(dt, &shape, 2, 0.0, 1.0).unwrap();
            let dy = gpu.random(dt, &shape, 3, 0.0, 1.0).unwrap();
            let gamma = gpu.random(dt, &[hidden], 4, 1.0, 0.5).unwrap();
            let beta = gpu.random(dt, &[hidden], 5, 0.0, 1.0).unwrap();
            let mut y = gpu.full(dt, &shape, 0.0).unwrap();
            let mut s = gpu.full(dt, &shape, 0.0).unwrap();
            let mut dx = gpu.full(dt, &shape, 0.0).unwrap();
            let mut dgamma = gpu.full(dt, &[hidden], 0.0).unwrap();
            let mut dbeta = gpu.full(dt, &[hidden], 0.0).unwrap();
            let fwd = ln::forward(&x, Some(&gamma), Some(&beta), 1e-5).unwrap();
            let (xv, rv, dyv, gv, bv) =
                (x.view(), res.view(), dy.view(), gamma.view(), beta.view());
            let (mv, sv) = (fwd.mean.view(), fwd.rstd.view());
            let id = format!("{dt}/{rows}x{hidden}");

            group.throughput(Throughput::Bytes(forward_bytes(dt, rows, hidden, false)));
            group.bench_function(format!("forward/{id}"), |b| {
                b.iter(|| {
                    ln::forward_into(
                        &gpu,
                        &xv,
                        Some(&gv),
                        Some(&bv),
                        1e-5,
                        &mut y.view_mut(),
                        None,
                        None,
                        Tuning::default(),
                    )
                    .unwrap();
                    gpu.synchronize().unwrap();
                })
            });
            group.throughput(Throughput::Bytes(forward_bytes(dt, rows, hidden, true)));
            group.bench_function(format!("residual_forward/{id}"), |b| {
                b.iter(|| {
                    ln::add_forward_into(
                        &gpu,
                        &xv,
                        &rv,
                        Some(&gv),
                        Some(&bv),
                        1e-5,
                        &mut s.view_mut(),
                        &mut y.view_mut(),
                        None,
                        None,
                        Tuning::default(),
                    )
                    .unwrap();
                    gpu.synchronize().unwrap();
                })
            });
            group.throughput(Throughput::Bytes(backward_bytes(dt, rows, hidden)));
            group.bench_function(format!("backward/{id}"), |b| {
                b.iter(|| {
                    ln::backward_into(
                        &gpu,
                        &dyv,
                        &xv,
                        Some(&gv),
                        &mv,
                        &sv,
                        &mut dx.view_mut(),
                        Some(&mut dgamma.view_mut()),
                        Some(&mut dbeta.view_mut()),
                        None,
                        Tuning::default(),
                    )
                    .unwrap();
                    gpu.synchronize().unwrap();
                })
            });
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
