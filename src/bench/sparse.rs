//! Block-sparse attention benchmark: time against the fraction of blocks kept (1% to 100%) at
//! L = 4k, 16k and 32k (B = 1, H = 16, D = 128, bf16, blocks of 128 as FlexAttention's
//! default), beside our dense kernel on the same inputs. The layout is a random block mask that
//! `scripts/torch_baseline.py sparse` rebuilds bit for bit (see [`keeps_block`]) to time
//! PyTorch FlexAttention with the same blocks. FLOPs count kept blocks only:
//! 4·B·H·kept·128²·D (a kept block is fully computed).

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::attention::{self as attn, Options};
use crate::ops::sparse_attention::{self as sparse, DeviceBlockLayout};
use crate::sparse::{BlockLayout, LayoutHeads};
use serde::Serialize;
use std::sync::Arc;

/// One benchmark row; `cuattn bench sparse --json` prints a list of these.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub op: &'static str,
    /// "sparse" (ours, block-sparse) or "dense" (ours, the dense kernel: the 100% reference).
    pub kernel: &'static str,
    pub dtype: DType,
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub dim: usize,
    pub block: usize,
    /// Requested fraction of blocks kept, and the mask's seed (for the torch side).
    pub density: f64,
    pub seed: u64,
    pub kept_blocks: usize,
    pub kept_fraction: f64,
    pub flops: f64,
    pub time_us: f64,
    pub tflops: f64,
    /// Dense time / this row's time at the same shape.
    pub speedup_vs_dense: f64,
}

pub const BLOCK: usize = 128;
pub const DENSITIES: [f64; 7] = [0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// One step of splitmix64 from state `x` (its standard output for state 0 is 0xE220A8397B1DCDAF).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether the random mask keeps block (qb, kb): splitmix64 of (qb << 32 | kb) ^ seed, its top
/// 53 bits as a fraction, below `density`. `scripts/torch_baseline.py` re-implements it.
pub fn keeps_block(qb: u64, kb: u64, seed: u64, density: f64) -> bool {
    let z = splitmix64(((qb << 32) | kb) ^ seed);
    ((z >> 11) as f64 / (1u64 << 53) as f64) < density
}

/// The random block mask layout for one (len, density, seed).
pub fn layout(len: usize, density: f64, seed: u64) -> Result<BlockLayout> {
    layout_of(len, BLOCK, density, seed)
}

/// The random block mask layout in blocks of `block`.
fn layout_of(len: usize, block: usize, density: f64, seed: u64) -> Result<BlockLayout> {
    let n = len.div_ceil(block);
    let mask: Vec<bool> = (0..n * n)
        .map(|x| keeps_block((x / n) as u64, (x % n) as u64, seed, density))
        .collect();
    BlockLayout::from_block_mask(len, len, block, LayoutHeads::Shared, &mask)
}

/// Blocks of the backward benchmark: the tensor-core backward's tile.
pub const BACKWARD_BLOCK: usize = crate::ops::attention_backward::SPARSE_TC_BLOCK_SIZE;

/// The backward (`cuattn bench sparse-backward`): the dense backward, then the sparse one in both
/// modes at every density of [`DENSITIES`] (random block masks in blocks of
/// [`BACKWARD_BLOCK`]), same inputs, bf16, D = 128. FLOPs are 2.5× the forward's over the kept
/// blocks (the dense row: over all blocks); kernel names "dense", "sparse" (deterministic) and
/// "sparse_fast". O and LSE come from the forward of the same layout.
pub fn run_backward(gpu: &Arc<Gpu>, quick: bool) -> Result<Vec<Row>> {
    use crate::ops::attention_backward::{self as bwd, Mode};
    let (lens, heads, iters): (&[usize], usize, usize) = if quick {
        (&[1024, 2048], 4, 3)
    } else {
        (&[4096, 16384], 16, 10)
    };
    let (dim, dt, bs) = (128, DType::BF16, BACKWARD_BLOCK);
    let mut out = Vec::new();
    for &len in lens {
        let shape = [1, heads, len, dim];
        let q = gpu.random(dt, &shape, 21, 0.0, 1.0)?;
        let k = gpu.random(dt, &shape, 22, 0.0, 1.0)?;
        let v = gpu.random(dt, &shape, 23, 0.0, 1.0)?;
        let d_o = gpu.random(dt, &shape, 24, 0.0, 1.0)?;
        let (mut dq, mut dk, mut dv) = (
            gpu.full(dt, &shape, 0.0)?,
            gpu.full(dt, &shape, 0.0)?,
            gpu.full(dt, &shape, 0.0)?,
        );
        let n = len.div_ceil(bs);
        let row = |kernel, density, seed, kept: usize, us: f64, dense_us: f64| {
            let flops = 2.5 * 4.0 * heads as f64 * (kept * bs * bs * dim) as f64;
            Row {
                op: "sparse_backward",
                kernel,
                dtype: dt,
                batch: 1,
                heads,
                len,
                dim,
                block: bs,
                density,
                seed,
                kept_blocks: kept,
                kept_fraction: kept as f64 / (n * n) as f64,
                flops,
                time_us: us,
                tflops: flops / (us * 1e-6) / 1e12,
                speedup_vs_dense: dense_us / us,
            }
        };
        let dense_opts = bwd::Options::default();
        let (o, lse) = attn::forward(&q, &k, &v, &dense_opts.forward)?;
        let dense_us = super::time_us(gpu, 1, iters, || {
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
                &dense_opts,
            )
        })?;
        out.push(row("dense", 1.0, 0, n * n, dense_us, dense_us));
        for (i, &density) in DENSITIES.iter().enumerate() {
            let seed = 0x5eed_0000 + i as u64;
            let l = layout_of(len, bs, density, seed)?;
            let dl = DeviceBlockLayout::upload(gpu, &l)?;
            let (o, lse) = sparse::forward(&q, &k, &v, &dl, &Options::default())?;
            for (kernel, mode) in [("sparse", Mode::Deterministic), ("sparse_fast", Mode::Fast)] {
                let opts = bwd::Options {
                    mode,
                    ..bwd::Options::default()
                };
                let us = super::time_us(gpu, 1, iters, || {
                    sparse::backward_into(
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
                        &dl,
                        &opts,
                    )
                })?;
                out.push(row(kernel, density, seed, l.kept_blocks(), us, dense_us));
            }
        }
    }
    Ok(out)
}

/// Times the sparse kernel at every density, and the dense kernel, per length.
pub fn run(gpu: &Arc<Gpu>, quick: bool) -> Result<Vec<Row>> {
    let (lens, heads, iters): (&[usize], usize, usize) = if quick {
        (&[1024, 2048], 4, 3)
    } else {
        (&[4096, 16384, 32768], 16, 10)
    };
    let (dim, dt) = (128, DType::BF16);
    let mut out = Vec::new();
    for &len in lens {
        let shape = [1, heads, len, dim];
        let q = gpu.random(dt, &shape, 21, 0.0, 1.0)?;
        let k = gpu.random(dt, &shape, 22, 0.0, 1.0)?;
        let v = gpu.random(dt, &shape, 23, 0.0, 1.0)?;
        let mut o = gpu.full(dt, &shape, 0.0)?;
        let mut lse = gpu.full(DType::F32, &[1, heads, len], 0.0)?;
        let (qv, kv, vv) = (q.view(), k.view(), v.view());
        let opts = Options::default();
        let dense_us = super::time_us(gpu, 1, iters, || {
            attn::forward_into(
                gpu,
                &qv,
                &kv,
                &vv,
                &mut o.view_mut(),
                Some(&mut lse.view_mut()),
                &opts,
            )
        })?;
        let n = len.div_ceil(BLOCK);
        let dense_flops = 4.0 * heads as f64 * (len * len * dim) as f64;
        out.push(Row {
            op: "sparse_forward",
            kernel: "dense",
            dtype: dt,
            batch: 1,
            heads,
            len,
            dim,
            block: BLOCK,
            density: 1.0,
            seed: 0,
            kept_blocks: n * n,
            kept_fraction: 1.0,
            flops: dense_flops,
            time_us: dense_us,
            tflops: dense_flops / (dense_us * 1e-6) / 1e12,
            speedup_vs_dense: 1.0,
        });
        for (i, &density) in DENSITIES.iter().enumerate() {
            let seed = 0x5eed_0000 + i as u64;
            let l = layout(len, density, seed)?;
            let dl = DeviceBlockLayout::upload(gpu, &l)?;
            let us = super::time_us(gpu, 1, iters, || {
                sparse::forward_into(
                    gpu,
                    &qv,
                    &kv,
                    &vv,
                    &mut o.view_mut(),
                    Some(&mut lse.view_mut()),
                    &dl,
                    &opts,
                )
            })?;
            let kept = l.kept_blocks();
            let flops = 4.0 * heads as f64 * (kept * BLOCK * BLOCK * dim) as f64;
            out.push(Row {
                op: "sparse_forward",
                kernel: "sparse",
                dtype: dt,
                batch: 1,
                heads,
                len,
                dim,
                block: BLOCK,
                density,
                seed,
                kept_blocks: kept,
                kept_fraction: kept as f64 / (n * n) as f64,
                flops,
                time_us: us,
                tflops: flops / (us * 1e-6) / 1e12,
                speedup_vs_dense: dense_us / us,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_random_mask_keeps_about_the_requested_fraction() {
        let n = 256u64;
        for density in [0.01, 0.1, 0.5] {
            let kept = (0..n * n)
                .filter(|&x| keeps_block(x / n, x % n, 7, density))
                .count() as f64;
            let frac = kept / (n * n) as f64;
            assert!((frac - density).abs() < 0.01, "{density}: {frac}");
        }
        assert!((0..n).all(|x| keeps_block(x, x, 1, 1.0)));
    }

    #[test]
    fn splitmix_matches_its_reference_values_and_the_python_rebuild() {
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        // scripts/torch_baseline.py: hex(splitmix64((3 << 32 | 5) ^ 0x5eed0002))
        assert_eq!(
            splitmix64((3 << 32 | 5) ^ 0x5eed_0002),
            0x4BE5_5E3F_F242_05D2
        );
    }
}
