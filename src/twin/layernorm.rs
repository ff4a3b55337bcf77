//! CPU twin of `kernels/layernorm.cu`: the kernels' own block loops, thread-to-pack ownership,
//! warp-shuffle and per-warp reductions, partial-sum layouts and reduction orders, run on the
//! CPU in f32. Held to [`crate::reference::layernorm`] by `tests/layernorm_twin.rs` on machines
//! without a GPU, it proves the index arithmetic of every launch path; the GPU tests then only
//! confirm the hardware agrees. (The GPU may contract a·b+c into one FMA where this twin rounds
//! twice, so results agree to rounding, not bitwise.)

use crate::dtype::DType;

/// How a kernel is launched, as the planner in `ops::layernorm` chooses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Elements per pack: 16 bytes' worth when rows are aligned, else 1.
    pub vec: usize,
    /// Threads per row group (a power of two ≥ 32).
    pub threads_per_row: usize,
    /// Row groups per block.
    pub rows_per_block: usize,
    /// Blocks in the grid (the grid strides over the rows).
    pub grid: usize,
}

/// How the backward forms its dγ/dβ partial sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partials {
    /// Per thread across its group's rows, then the block's groups added in group order
    /// through shared memory laid out pack-major (register path).
    PerBlock,
    /// The column kernel: blocks of 32 packs × 8 row phases over chunks of `rows_per_chunk`.
    Columns { rows_per_chunk: usize },
}

const WARP: usize = 32;

/// `warp_sum`: the butterfly of `__shfl_xor_sync` with offsets 16, 8, 4, 2, 1; every lane
/// ends with the same value, summed in the kernel's order.
fn warp_sum(lanes: &mut [f32]) {
    let mut offset = WARP / 2;
    while offset > 0 {
        let before = lanes.to_vec();
        for (lane, v) in lanes.iter_mut().enumerate() {
            *v = before[lane] + before[lane ^ offset];
        }
        offset /= 2;
    }
}

/// `group_sum` over one row group's per-thread values: warp sums, then the group's warp slots
/// added in warp order.
fn group_sum(values: &[f32]) -> f32 {
    let mut warps: Vec<f32> = Vec::new();
    for chunk in values.chunks(WARP) {
        let mut lanes = chunk.to_vec();
        warp_sum(&mut lanes);
        warps.push(lanes[0]);
    }
    let mut s = warps[0];
    for w in &warps[1..] {
        s += w;
    }
    s
}

/// Columns of pack `i`: `i·vec .. i·vec + vec`. Thread `t` of a group owns packs
/// `t, t + tpr, t + 2·tpr, …` below `nvec`, in that order.
fn owned_packs(t: usize, tpr: usize, nvec: usize) -> impl Iterator<Item = usize> {
    (t..nvec).step_by(tpr)
}

/// Rows group `g` of block `b` visits.
fn group_rows(l: &Launch, b: usize, g: usize, rows: usize) -> impl Iterator<Item = usize> {
    let start = b * l.rows_per_block + g;
    (start..rows).step_by(l.grid * l.rows_per_block)
}

/// Forward outputs of the twin (y in the dtype's values, mean and rstd in f32).
#[derive(Clone, Debug)]
pub struct Forward {
    pub y: Vec<f32>,
    pub residual_out: Option<Vec<f32>>,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// The forward kernels (register and generic paths share this arithmetic and order).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    l: &Launch,
    dtype: DType,
    x: &[f32],
    residual: Option<&[f32]>,
    hidden: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) -> Forward {
    let rows = x.len() / hidden;
    let nvec = hidden / l.vec;
    let inv_n = 1.0f32 / hidden as f32;
    let mut out = Forward {
        y: vec![f32::NAN; x.len()],
        residual_out: residual.map(|_| vec![f32::NAN; x.len()]),
        mean: vec![f32::NAN; rows],
        rstd: vec![f32::NAN; rows],
    };
    for b in 0..l.grid {
        for g in 0..l.rows_per_block {
            for row in group_rows(l, b, g, rows) {
                let base = row * hidden;
                // s = x (+ residual, rounded to the dtype), as each thread holds it.
                let s: Vec<f32> = (0..hidden)
                    .map(|j| match residual {
                        Some(r) => dtype.round(x[base + j] + r[base + j]),
                        None => x[base + j],
                    })
                    .collect();
                if let Some(ro) = out.residual_out.as_mut() {
                    ro[base..base + hidden].copy_from_slice(&s);
                }
                let per_thread = |f: &dyn Fn(f32) -> f32| -> Vec<f32> {
                    (0..l.threads_per_row)
                        .map(|t| {
                            let mut acc = 0.0f32;
                            for i in owned_packs(t, l.threads_per_row, nvec) {
                                for e in 0..l.vec {
                                    acc += f(s[i * l.vec + e]);
                                }
                            }
                            acc
                        })
                        .collect()
                };
                let mean = group_sum(&per_thread(&|v| v)) * inv_n;
                let var = group_sum(&per_thread(&|v| (v - mean) * (v - mean))) * inv_n;
                let rstd = 1.0 / (var + eps).sqrt();
                for t in 0..l.threads_per_row {
                    for i in owned_packs(t, l.threads_per_row, nvec) {
                        for e in 0..l.vec {
                            let j = i * l.vec + e;
                            let mut o = (s[j] - mean) * rstd;
                            if let Some(g) = gamma {
                                o *= g[j];
                            }
                            if let Some(bt) = beta {
                                o += bt[j];
                            }
                            out.y[base + j] = dtype.round(o);
                        }
                    }
                }
                out.mean[row] = mean;
                out.rstd[row] = rstd;
            }
        }
    }
    out
}

/// Backward outputs of the twin.
#[derive(Clone, Debug)]
pub struct Backward {
    pub dx: Vec<f32>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// The backward kernels: stage 1 (dx, and per-block partials or the column kernel's
/// partials), then stage 2 summing the partial rows in order.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    l: &Launch,
    partials: Partials,
    dtype: DType,
    dy: &[f32],
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    mean: &[f32],
    rstd: &[f32],
) -> Backward {
    let rows = x.len() / hidden;
    let nvec = hidden / l.vec;
    let inv_n = 1.0f32 / hidden as f32;
    let gamma_at = |j: usize| gamma.map_or(1.0, |g| g[j]);
    let mut dx = vec![f32::NAN; x.len()];
    // Partial rows [num_partials][2][hidden] in column order, as stage 2 reads them.
    let mut partial_rows: Vec<Vec<f32>> = Vec::new();

    for b in 0..l.grid {
        // Shared memory of the register path: [group][2][VEC][nvec] (pack-major).
        let mut smem = vec![f32::NAN; l.rows_per_block * 2 * hidden];
        for g in 0..l.rows_per_block {
            // Per-thread registers dg[k][e], db[k][e], indexed here by column.
            let mut dg = vec![0.0f32; hidden];
            let mut db = vec![0.0f32; hidden];
            for row in group_rows(l, b, g, rows) {
                let base = row * hidden;
                let (m, r) = (mean[row], rstd[row]);
                let xhat = |j: usize| (x[base + j] - m) * r;
                let grad = |j: usize| dy[base + j] * gamma_at(j);
                let mut sum_g = vec![0.0f32; l.threads_per_row];
                let mut sum_gx = vec![0.0f32; l.threads_per_row];
                for t in 0..l.threads_per_row {
                    for i in owned_packs(t, l.threads_per_row, nvec) {
                        for e in 0..l.vec {
                            let j = i * l.vec + e;
                            sum_g[t] += grad(j);
                            sum_gx[t] += grad(j) * xhat(j);
                            dg[j] += dy[base + j] * xhat(j);
                            db[j] += dy[base + j];
                        }
                    }
                }
                let mean_g = group_sum(&sum_g) * inv_n;
                let mean_gx = group_sum(&sum_gx) * inv_n;
                for j in 0..hidden {
                    dx[base + j] = dtype.round(r * (grad(j) - mean_g - xhat(j) * mean_gx));
                }
            }
            for i in 0..nvec {
                for e in 0..l.vec {
                    smem[g * 2 * hidden + e * nvec + i] = dg[i * l.vec + e];
                    smem[g * 2 * hidden + hidden + e * nvec + i] = db[i * l.vec + e];
                }
            }
        }
        if partials == Partials::PerBlock {
            let mut row = vec![0.0f32; 2 * hidden];
            for c in 0..hidden {
                let at = (c % l.vec) * nvec + c / l.vec;
                let (mut sg, mut sb) = (0.0f32, 0.0f32);
                for g in 0..l.rows_per_block {
                    sg += smem[g * 2 * hidden + at];
                    sb += smem[g * 2 * hidden + hidden + at];
                }
                row[c] = sg;
                row[hidden + c] = sb;
            }
            partial_rows.push(row);
        }
    }

    if let Partials::Columns { rows_per_chunk } = partials {
        const COLS: usize = 32;
        const PHASES: usize = 8;
        for chunk_start in (0..rows).step_by(rows_per_chunk) {
            let chunk_end = rows.min(chunk_start + rows_per_chunk);
            let mut row = vec![f32::NAN; 2 * hidden];
            for bx in 0..nvec.div_ceil(COLS) {
                for tx in 0..COLS {
                    let i = bx * COLS + tx;
                    if i >= nvec {
                        continue;
                    }
                    for e in 0..l.vec {
                        let j = i * l.vec + e;
                        let (mut sg, mut sb) = (0.0f32, 0.0f32);
                        for ty in 0..PHASES {
                            let (mut pg, mut pb) = (0.0f32, 0.0f32);
                            for r in (chunk_start + ty..chunk_end).step_by(PHASES) {
                                let d = dy[r * hidden + j];
                                pg += d * (x[r * hidden + j] - mean[r]) * rstd[r];
                                pb += d;
                            }
                            sg += pg;
                            sb += pb;
                        }
                        row[j] = sg;
                        row[hidden + j] = sb;
                    }
                }
            }
            partial_rows.push(row);
        }
    }

    let mut out = Backward {
        dx,
        dgamma: vec![0.0; hidden],
        dbeta: vec![0.0; hidden],
    };
    for j in 0..hidden {
        let (mut sg, mut sb) = (0.0f32, 0.0f32);
        for p in &partial_rows {
            sg += p[j];
            sb += p[hidden + j];
        }
        out.dgamma[j] = dtype.round(sg);
        out.dbeta[j] = dtype.round(sb);
    }
    out
}
