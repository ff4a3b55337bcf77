//! CPU twin of `kernels/training_ops.cu` where the indexing is not elementwise: the column-sum
//! tiles (bias gradients, fused bias + GELU backward), the cross-entropy row block with its
//! online (max, sum) merges, the grouped embedding scatter-add, and the multi-tensor chunk walk
//! of AdamW and the gradient norm. Each runs the kernel's own loops, ownership and reduction
//! order in f32; `tests/training_twin.rs` holds them to [`crate::reference::training`].
//! (Dropout's twin is [`crate::rng::Dropout::apply`], bit-identical on f32.) Transcendentals
//! come from libm here and from CUDA's math library on the GPU, so results agree to rounding.

use crate::dtype::DType;
use crate::reference::training::{AdamWConfig, Gelu};
use crate::training::{Chunk, TokenGroups, COLSUM_COLS, COLSUM_ROWS, MT_CHUNK};

const WARP: usize = 32;

/// The kernels' f32 GELU derivative (`gelu_grad` in training_ops.cu).
pub fn gelu_grad_f32(u: f32, kind: Gelu) -> f32 {
    match kind {
        Gelu::Tanh => {
            let (k, c) = (0.797_884_6f32, 0.044715f32);
            let t = libm::tanhf(k * (u + c * u * u * u));
            0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * k * (1.0 + 3.0 * c * u * u)
        }
        Gelu::Erf => {
            let cdf = 0.5 * (1.0 + libm::erff(u * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = 0.398_942_3f32 * libm::expf(-0.5 * u * u);
            cdf + u * pdf
        }
    }
}

/// `warp_sum`: butterfly over offsets 16..1; every lane ends with the same value.
pub(crate) fn warp_sum(lanes: &mut [f32; WARP]) {
    let mut offset = WARP / 2;
    while offset > 0 {
        let before = *lanes;
        for (lane, v) in lanes.iter_mut().enumerate() {
            *v = before[lane] + before[lane ^ offset];
        }
        offset /= 2;
    }
}

/// `block_sum` (common.cuh) over one value per thread (`values.len()` a multiple of 32).
pub fn block_sum(values: &[f32]) -> f32 {
    let mut totals = [0.0f32; WARP];
    for (w, chunk) in values.chunks(WARP).enumerate() {
        let mut lanes = [0.0f32; WARP];
        lanes.copy_from_slice(chunk);
        warp_sum(&mut lanes);
        totals[w] = lanes[0];
    }
    warp_sum(&mut totals);
    totals[0]
}

/// The fused form's inputs: the GELU's input before the bias, the bias, the GELU.
#[derive(Clone, Copy, Debug)]
pub struct GeluInput<'a> {
    pub x: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub kind: Gelu,
}

/// Column sums of `dy` ([rows, cols], values already in their dtype), or with `gelu` given
/// the fused bias + GELU backward: g = dy·gelu'(x + bias) stored to dx in
/// `dtype`, summed. Returns (dx, sums) with the kernel's chunking: `rows_per_chunk` rows per
/// chunk, 8 row phases per block summed in order, chunks added in order.
pub fn colsum(
    dtype: DType,
    dy: &[f32],
    gelu: Option<GeluInput>,
    rows: usize,
    cols: usize,
    rows_per_chunk: usize,
) -> (Vec<f32>, Vec<f32>) {
    let chunks = rows.div_ceil(rows_per_chunk);
    let mut dx = vec![f32::NAN; if gelu.is_some() { rows * cols } else { 0 }];
    let mut partials = vec![f32::NAN; chunks * cols];
    for by in 0..chunks {
        for bx in 0..cols.div_ceil(COLSUM_COLS) {
            let (r0, r1) = (by * rows_per_chunk, rows.min((by + 1) * rows_per_chunk));
            let mut tile = [[0.0f32; COLSUM_COLS]; COLSUM_ROWS];
            for (ty, tile_row) in tile.iter_mut().enumerate() {
                for (tx, slot) in tile_row.iter_mut().enumerate() {
                    let c = bx * COLSUM_COLS + tx;
                    if c >= cols {
                        continue;
                    }
                    let mut acc = 0.0f32;
                    let mut r = r0 + ty;
                    while r < r1 {
                        let i = r * cols + c;
                        let mut g = dy[i];
                        if let Some(GeluInput { x, bias, kind }) = gelu {
                            let b = bias.map_or(0.0, |b| b[c]);
                            g *= gelu_grad_f32(x[i] + b, kind);
                            dx[i] = dtype.round(g);
                        }
                        acc += g;
                        r += COLSUM_ROWS;
                    }
                    *slot = acc;
                }
            }
            for tx in 0..COLSUM_COLS {
                let c = bx * COLSUM_COLS + tx;
                if c < cols {
                    let mut s = 0.0f32;
                    for row in &tile {
                        s += row[tx];
                    }
                    partials[by * cols + c] = s;
                }
            }
        }
    }
    let sums = (0..cols)
        .map(|c| {
            let mut s = 0.0f32;
            for k in 0..chunks {
                s += partials[k * cols + c];
            }
            s
        })
        .collect();
    (dx, sums)
}

/// Online softmax statistics (`MaxSum` in the kernel).
#[derive(Clone, Copy, Debug, PartialEq)]
struct MaxSum {
    m: f32,
    s: f32,
}

fn merge(a: MaxSum, b: MaxSum) -> MaxSum {
    let m = a.m.max(b.m);
    if m == f32::NEG_INFINITY {
        return MaxSum { m, s: 0.0 };
    }
    MaxSum {
        m,
        s: a.s * libm::expf(a.m - m) + b.s * libm::expf(b.m - m),
    }
}

fn warp_merge(lanes: &mut [MaxSum; WARP]) {
    let mut offset = WARP / 2;
    while offset > 0 {
        let before = *lanes;
        for (lane, v) in lanes.iter_mut().enumerate() {
            *v = merge(before[lane], before[lane ^ offset]);
        }
        offset /= 2;
    }
    debug_assert!(lanes.iter().all(|v| v == &lanes[0]), "merge is symmetric");
}

/// The cross-entropy kernel with `threads` threads per row block, then `sum_f32` over the row
/// losses (1024 threads) times `1/valid`: returns (mean loss, dlogits stored in `dtype`).
/// `grad_scale` is what the wrapper passes: upstream gradient / valid rows.
pub fn cross_entropy(
    dtype: DType,
    logits: &[f32],
    classes: usize,
    labels: &[i32],
    ignore_index: i32,
    smoothing: f32,
    threads: usize,
) -> (f32, Vec<f32>) {
    let rows = labels.len();
    let valid = labels.iter().filter(|&&l| l != ignore_index).count();
    let grad_scale = 1.0 / valid as f32;
    let mut row_loss = vec![f32::NAN; rows];
    let mut d = vec![f32::NAN; rows * classes];
    for r in 0..rows {
        let x = &logits[r * classes..][..classes];
        let label = labels[r];
        let ignored = label == ignore_index;
        let mut per_thread = vec![
            MaxSum {
                m: f32::NEG_INFINITY,
                s: 0.0
            };
            threads
        ];
        let mut sx = vec![0.0f32; threads];
        for t in 0..threads {
            let mut j = t;
            while j < classes {
                per_thread[t] = merge(per_thread[t], MaxSum { m: x[j], s: 1.0 });
                sx[t] += x[j];
                j += threads;
            }
        }
        let mut warp_ms = [MaxSum {
            m: f32::NEG_INFINITY,
            s: 0.0,
        }; WARP];
        let mut warp_sx = [0.0f32; WARP];
        for w in 0..threads / WARP {
            let mut lanes = [MaxSum { m: 0.0, s: 0.0 }; WARP];
            lanes.copy_from_slice(&per_thread[w * WARP..][..WARP]);
            warp_merge(&mut lanes);
            warp_ms[w] = lanes[0];
            let mut s = [0.0f32; WARP];
            s.copy_from_slice(&sx[w * WARP..][..WARP]);
            warp_sum(&mut s);
            warp_sx[w] = s[0];
        }
        warp_merge(&mut warp_ms);
        warp_sum(&mut warp_sx);
        let (ms, sx) = (warp_ms[0], warp_sx[0]);
        let lse = ms.m + libm::logf(ms.s);
        let (on, off) = (1.0 - smoothing, smoothing / classes as f32);
        row_loss[r] = if ignored {
            0.0
        } else {
            lse - on * x[label as usize] - off * sx
        };
        for j in 0..classes {
            let g = if ignored {
                0.0
            } else {
                let target = off + if j == label as usize { on } else { 0.0 };
                (libm::expf(x[j] - lse) - target) * grad_scale
            };
            d[r * classes + j] = dtype.round(g);
        }
    }
    (sum_f32(&row_loss, 1024) * grad_scale, d)
}

/// `sum_f32`: thread t sums values t, t + threads, ... in order, then `block_sum`.
pub fn sum_f32(values: &[f32], threads: usize) -> f32 {
    let per_thread: Vec<f32> = (0..threads)
        .map(|t| {
            let mut s = 0.0f32;
            let mut i = t;
            while i < values.len() {
                s += values[i];
                i += threads;
            }
            s
        })
        .collect();
    block_sum(&per_thread)
}

/// The grouped embedding backward: `dtable[rows[g]] += Σ_k dy[positions[k]]` in group order,
/// each sum in f32 and stored in `table_dtype`.
pub fn embedding_backward(
    table_dtype: DType,
    dy: &[f32],
    width: usize,
    groups: &TokenGroups,
    dtable: &mut [f32],
) {
    for g in 0..groups.rows.len() {
        let row = groups.rows[g] as usize;
        for c in 0..width {
            let mut s = 0.0f32;
            for k in groups.starts[g]..groups.starts[g + 1] {
                s += dy[groups.positions[k as usize] as usize * width + c];
            }
            let out = &mut dtable[row * width + c];
            *out = table_dtype.round(*out + s);
        }
    }
}

/// One tensor of a multi-tensor launch, on the host.
#[derive(Clone, Debug)]
pub struct HostParam {
    pub param: Vec<f32>,
    pub grad: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// The model copy (rounded to `model_dtype`), written by AdamW.
    pub model: Vec<f32>,
    pub weight_decay: bool,
    /// Whether the tensor's pointers allow 4-element vectors.
    pub vectorized: bool,
}

/// Elements of chunk `c` visited the kernel's way: 4-element packs from `begin` (vectorized
/// tensors), then a scalar tail; `visit` gets each element index once.
fn walk_chunk(c: Chunk, numel: usize, vectorized: bool, mut visit: impl FnMut(usize)) {
    let begin = c.index as usize * MT_CHUNK;
    let end = numel.min(begin + MT_CHUNK);
    let mut tail = begin;
    if vectorized {
        let packs = (end - begin) / 4;
        for k in 0..packs {
            for e in 0..4 {
                visit((begin / 4 + k) * 4 + e);
            }
        }
        tail = begin + packs * 4;
    }
    for i in tail..end {
        visit(i);
    }
}

/// AdamW over all tensors by chunk table, in f32, operation for operation as the kernel.
pub fn adamw(
    cfg: &AdamWConfig,
    step: u32,
    grad_scale: f32,
    model_dtype: DType,
    tensors: &mut [HostParam],
    chunks: &[Chunk],
) {
    let lr = cfg.lr as f32;
    let (beta1, beta2, eps) = (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32);
    let bc1 = (1.0 - cfg.beta1.powi(step as i32)) as f32;
    let bc2_sqrt = (1.0 - cfg.beta2.powi(step as i32)).sqrt() as f32;
    let step_size = lr / bc1;
    for &c in chunks {
        let t = &mut tensors[c.tensor as usize];
        let decay = if t.weight_decay {
            1.0 - lr * cfg.weight_decay as f32
        } else {
            1.0
        };
        let n = t.param.len();
        walk_chunk(c, n, t.vectorized, |i| {
            let g = t.grad[i] * grad_scale;
            let mut w = t.param[i] * decay;
            let m = t.exp_avg[i] + (1.0 - beta1) * (g - t.exp_avg[i]);
            let v = t.exp_avg_sq[i] * beta2 + (1.0 - beta2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            w += -step_size * (m / denom);
            t.param[i] = w;
            t.exp_avg[i] = m;
            t.exp_avg_sq[i] = v;
            t.model[i] = model_dtype.round(w);
        });
    }
}

/// The gradient norm kernels: per-chunk sums of squares (packs then tail per thread, then
/// `block_sum`), then `sum_f32` in chunk order. Returns (norm, clip coefficient).
pub fn grad_norm(grads: &[(&[f32], bool)], chunks: &[Chunk], max_norm: f32) -> (f32, f32) {
    let threads = crate::training::MT_THREADS;
    let partials: Vec<f32> = chunks
        .iter()
        .map(|&c| {
            let (g, vectorized) = grads[c.tensor as usize];
            let begin = c.index as usize * MT_CHUNK;
            let end = g.len().min(begin + MT_CHUNK);
            let mut acc = vec![0.0f32; threads];
            let mut tail = begin;
            if vectorized {
                let packs = (end - begin) / 4;
                for k in 0..packs {
                    for e in 0..4 {
                        let v = g[begin + 4 * k + e];
                        acc[k % threads] += v * v;
                    }
                }
                tail = begin + packs * 4;
            }
            for (k, &v) in g[tail..end].iter().enumerate() {
                acc[k % threads] += v * v;
            }
            block_sum(&acc)
        })
        .collect();
    let norm = sum_f32(&partials, 1024).sqrt();
    let coef = max_norm / (norm + 1e-6);
    (norm, if coef > 1.0 { 1.0 } else { coef })
}
