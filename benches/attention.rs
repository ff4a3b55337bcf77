//! Criterion benchmark of the fused attention forward (tensor cores, bf16) on the FA-paper
//! shapes at L = 1k and 8k, head dims 64 and 128, causal and not, and of block-sparse attention
//! at 10% of blocks kept. Each iteration synchronizes the stream; `cuattn bench attention|sparse`
//! time with CUDA events and print TFLOP/s. Without a GPU it prints SKIPPED and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "cuda")]
fn attention(c: &mut Criterion) {
    use criterion::Throughput;
    use cuattn::bench::attention::{flops, shapes};
    use cuattn::ops::attention::{self as attn, CausalAlign, Options};
    use cuattn::ops::sparse_attention::{self as sparse, DeviceBlockLayout};
    use cuattn::DType;

    let Some(gpu) = cuattn::check::gpu_or_skip("benches/attention") else {
        return;
    };
    let mut group = c.benchmark_group("attention");
    group.sample_size(20);
    let dt = DType::BF16;
    for (batch, heads, len, dim) in shapes(false)
        .into_iter()
        .filter(|&(_, _, l, _)| l == 1024 || l == 8192)
    {
        let shape = [batch, heads, len, dim];
        let q = gpu.random(dt, &shape, 1, 0.0, 1.0).unwrap();
        let k = gpu.random(dt, &shape, 2, 0.0, 1.0).unwrap();
        let v = gpu.random(dt, &shape, 3, 0.0, 1.0).unwrap();
        let mut o = gpu.full(dt, &shape, 0.0).unwrap();
        for causal in [false, true] {
            let opts = Options {
                causal: causal.then_some(CausalAlign::TopLeft),
                ..Options::default()
            };
            // Elements = FLOPs, so criterion's "elem/s" reads as FLOP/s.
            group.throughput(Throughput::Elements(
                flops(batch, heads, len, dim, causal) as u64
            ));
            let name = format!("{dt}/{batch}x{heads}x{len}/d{dim}/causal={causal}");
            group.bench_function(name, |b| {
                b.iter(|| {
                    attn::forward_into(
                        &gpu,
                        &q.view(),
                        &k.view(),
                        &v.view(),
                        &mut o.view_mut(),
                        None,
                        &opts,
                    )
                    .unwrap();
                    gpu.synchronize().unwrap();
                })
            });
        }
        if len == 8192 && dim == 128 {
            let layout = cuattn::bench::sparse::layout(len, 0.1, 7).unwrap();
            let dl = DeviceBlockLayout::upload(&gpu, &layout).unwrap();
            let name = format!("{dt}/{batch}x{heads}x{len}/d{dim}/sparse10%");
            group.bench_function(name, |b| {
                b.iter(|| {
                    sparse::forward_into(
                        &gpu,
                        &q.view(),
                        &k.view(),
                        &v.view(),
                        &mut o.view_mut(),
                        None,
                        &dl,
                        &Options::default(),
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
fn attention(_: &mut Criterion) {
    eprintln!("SKIPPED (no CUDA device): benches/attention: built without the `cuda` feature");
}

criterion_group!(benches, attention);
criterion_main!(benches);
