//! Attention backward benchmark on the forward benchmark's shapes ([`super::attention::shapes`]:
//! B·L = 16k tokens, hidden 2048, D ∈ {64, 128}) plus D = 256 at L = 1024 and 4096 (the tiles
//! whose gradient columns are split across CTAs), BHSD, causal (top-left) and not. FLOPs are
//! 2.5× the forward's (five GEMMs of its two), the FlashAttention convention; the deterministic
//! mode's recomputed S and dP are not credited. O and LSE come from one forward per shape; dO is
//! random.

use super::attention::{flops, shapes, Row};
use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::attention::{self as attn, CausalAlign, Kernel};
use crate::ops::attention_backward::{self as bwd, Mode};
use std::sync::Arc;

/// The forward's shapes, then head dim 256 (hidden / 256 heads) at one length (quick) or two.
fn backward_shapes(quick: bool) -> Vec<(usize, usize, usize, usize)> {
    let mut out = shapes(quick);
    let (tokens, hidden, lens): (usize, usize, &[usize]) = if quick {
        (2048, 512, &[512])
    } else {
        (16384, 2048, &[1024, 4096])
    };
    for &len in lens {
        out.push((tokens / len, hidden / 256, len, 256));
    }
    out
}

/// Longest sequence the exact path is timed at (it is a reference path).
const EXACT_MAX_LEN: usize = 1024;

/// Times the deterministic (kernel "tensor_cores") and fast ("tensor_cores_fast") tensor-core
/// modes for f16/bf16, and the exact path ("exact").
pub fn run(gpu: &Arc<Gpu>, dtypes: &[DType], quick: bool) -> Result<Vec<Row>> {
    let (warmup, iters) = if quick { (1, 3) } else { (2, 10) };
    let mut out = Vec::new();
    for &dt in dtypes {
        for (batch, heads, len, dim) in backward_shapes(quick) {
            let shape = [batch, heads, len, dim];
            let q = gpu.random(dt, &shape, 11, 0.0, 1.0)?;
            let k = gpu.random(dt, &shape, 12, 0.0, 1.0)?;
            let v = gpu.random(dt, &shape, 13, 0.0, 1.0)?;
            let d_o = gpu.random(dt, &shape, 14, 0.0, 1.0)?;
            let (mut dq, mut dk, mut dv) = (
                gpu.full(dt, &shape, 0.0)?,
                gpu.full(dt, &shape, 0.0)?,
                gpu.full(dt, &shape, 0.0)?,
            );
            for causal in [false, true] {
                let fwd_opts = attn::Options {
                    causal: causal.then_some(CausalAlign::TopLeft),
                    ..attn::Options::default()
                };
                let (o, lse) = attn::forward(&q, &k, &v, &fwd_opts)?;
                let mut impls = Vec::new();
                if dt != DType::F32 && dim <= bwd::TC_MAX_HEAD_DIM {
                    impls.push(("tensor_cores", Kernel::TensorCore, Mode::Deterministic));
                    impls.push(("tensor_cores_fast", Kernel::TensorCore, Mode::Fast));
                }
                if len <= EXACT_MAX_LEN || quick {
                    impls.push(("exact", Kernel::Exact, Mode::Deterministic));
                }
                for (name, kernel, mode) in impls {
                    let opts = bwd::Options {
                        forward: attn::Options { kernel, ..fwd_opts },
                        mode,
                    };
                    let us = super::time_us(gpu, warmup, iters, || {
                        bwd::backward_into(
                            gpu,
                            &q.view(),
                            &k.view(),
                            &v.view(),
                            &o.view(),
                            &lse.view(),
                            &d_o.view(),
                            &mut dq.view_mut(),
                            &mut dk.view_mut(),
                            &mut dv.view_mut(),
                            &opts,
                        )
                    })?;
                    let f = 2.5 * flops(batch, heads, len, dim, causal);
                    out.push(Row {
                        op: "backward",
                        kernel: name,
                        dtype: dt,
                        batch,
                        heads,
                        len,
                        dim,
                        causal,
                        flops: f,
                        time_us: us,
                        tflops: f / (us * 1e-6) / 1e12,
                    });
                }
            }
        }
    }
    Ok(out)
}
