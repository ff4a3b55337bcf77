//! Attention forward benchmark in the FlashAttention papers' setting: 16k tokens per batch
//! (B·L = 16384), hidden 2048 (H = 2048 / D), D ∈ {64, 128}, L from 512 to 16k, causal
//! (top-left, as PyTorch's `is_causal=True`) and not, BHSD inputs. FLOPs follow the FA
//! convention: 4·B·H·L·L·D, halved when causal.

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::attention::{self as attn, CausalAlign, Kernel, Options};
use crate::ops::attention_unfused::Unfused;
use serde::Serialize;
use std::sync::Arc;

/// One benchmark row; `cuattn bench attention --json` prints a list of these.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub op: &'static str,
    pub kernel: &'static str,
    pub dtype: DType,
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub dim: usize,
    pub causal: bool,
    pub flops: f64,
    pub time_us: f64,
    pub tflops: f64,
}

/// (batch, heads, len, dim) of every benchmark shape.
pub fn shapes(quick: bool) -> Vec<(usize, usize, usize, usize)> {
    let (tokens, hidden, lens): (usize, usize, &[usize]) = if quick {
        (2048, 512, &[256, 512])
    } else {
        (16384, 2048, &[512, 1024, 2048, 4096, 8192, 16384])
    };
    let mut out = Vec::new();
    for dim in [64, 128] {
        for &len in lens {
            out.push((tokens / len, hidden / dim, len, dim));
        }
    }
    out
}

/// FA-convention FLOPs of one forward.
pub fn flops(batch: usize, heads: usize, len: usize, dim: usize, causal: bool) -> f64 {
    let f = 4.0 * batch as f64 * heads as f64 * len as f64 * len as f64 * dim as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

/// Longest sequence the exact (f32, no tensor cores) kernel is timed at: it is a reference
/// path, tens of times slower.
const EXACT_MAX_LEN: usize = 1024;

/// Which implementation a row timed.
#[derive(Clone, Copy, Debug)]
enum Impl {
    Fused(Kernel),
    /// cuBLAS QKᵀ, softmax kernel, cuBLAS PV ([`crate::ops::attention_unfused`]).
    Unfused,
}

/// Times every (dtype, shape, causal, kernel): the fused kernels, and the unfused cuBLAS
/// baseline (left out, with a note on stderr, when cuBLAS cannot be loaded).
pub fn run(gpu: &Arc<Gpu>, dtypes: &[DType], quick: bool) -> Result<Vec<Row>> {
    let (warmup, iters) = if quick { (1, 3) } else { (2, 10) };
    let mut unfused = match Unfused::new(gpu) {
        Ok(u) => Some(u),
        Err(e) => {
            eprintln!("bench attention: no unfused baseline rows: {e}");
            None
        }
    };
    let mut out = Vec::new();
    for &dt in dtypes {
        for (batch, heads, len, dim) in shapes(quick) {
            let shape = [batch, heads, len, dim];
            let q = gpu.random(dt, &shape, 11, 0.0, 1.0)?;
            let k = gpu.random(dt, &shape, 12, 0.0, 1.0)?;
            let v = gpu.random(dt, &shape, 13, 0.0, 1.0)?;
            let mut o = gpu.full(dt, &shape, 0.0)?;
            let mut lse = gpu.full(DType::F32, &[batch, heads, len], 0.0)?;
            let (qv, kv, vv) = (q.view(), k.view(), v.view());
            for causal in [false, true] {
                let mut impls = Vec::new();
                if dt != DType::F32 {
                    impls.push(("tensor_cores", Impl::Fused(Kernel::TensorCore)));
                    // The sm_90a kernel where it can run (H100/H200), beside the verified one.
                    if gpu.info().compute_capability == (9, 0) && (dim == 64 || dim == 128) {
                        impls.push(("hopper_wgmma", Impl::Fused(Kernel::Hopper)));
                    }
                }
                if len <= EXACT_MAX_LEN || quick {
                    impls.push(("exact", Impl::Fused(Kernel::Exact)));
                }
                if unfused.is_some() {
                    impls.push(("unfused_cublas", Impl::Unfused));
                }
                for (name, which) in impls {
                    let opts = Options {
                        causal: causal.then_some(CausalAlign::TopLeft),
                        kernel: match which {
                            Impl::Fused(k) => k,
                            Impl::Unfused => Kernel::Auto,
                        },
                        ..Options::default()
                    };
                    let us = super::time_us(gpu, warmup, iters, || {
                        let (mut ov, mut lv) = (o.view_mut(), lse.view_mut());
                        match (which, unfused.as_mut()) {
                            (Impl::Unfused, Some(u)) => {
                                u.forward_into(&qv, &kv, &vv, &mut ov, Some(&mut lv), &opts)
                            }
                            _ => attn::forward_into(
                                gpu,
                                &qv,
                                &kv,
                                &vv,
                                &mut ov,
                                Some(&mut lv),
                                &opts,
                            ),
                        }
                    })?;
                    let f = flops(batch, heads, len, dim, causal);
                    out.push(Row {
                        op: "forward",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_hold_16k_tokens_and_hidden_2048() {
        for (b, h, l, d) in shapes(false) {
            assert_eq!((b * l, h * d), (16384, 2048));
        }
        assert_eq!(flops(1, 1, 2, 3, false), 48.0);
        assert_eq!(flops(1, 1, 2, 3, true), 24.0);
    }
}
