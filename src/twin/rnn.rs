//! CPU twin of `kernels/rnn_ops.cu`: the GRU and LSTM steps' grid-stride loops and the additive-attention
//! block (warp-per-key dot products with butterfly sums, block reductions, the column loops),
//! with the kernels' ownership, order and zero-filling, in f32. `tests/rnn_twin.rs` holds them
//! to [`crate::reference::seq2seq`] (forward) and to the host ops of
//! [`crate::runtime::train::rnn_ops`] (backward). Outputs start as NaN, so an element a
//! kernel's loop would leave unwritten shows.

use super::training::{block_sum, warp_sum};
use crate::runtime::train::rnn_ops::AdditiveDims;

const WARP: usize = 32;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + libm::expf(-x))
}

/// The thread indices a 1-D grid-stride loop of `grid` blocks of `block` threads visits in
/// order: every thread's first index, then every thread's second, ...
fn grid_stride(n: usize, grid: usize, block: usize) -> impl Iterator<Item = usize> {
    let stride = grid * block;
    (0..stride).flat_map(move |tid| (tid..n).step_by(stride))
}

/// `gru_fwd`: (h', cache) for `batch` rows of `hidden` units.
#[allow(clippy::too_many_arguments)]
pub fn gru_forward(
    gi: &[f32],
    gh: &[f32],
    h: &[f32],
    active: Option<&[bool]>,
    batch: usize,
    hidden: usize,
    grid: usize,
    block: usize,
) -> (Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut out = vec![f32::NAN; batch * hd];
    let mut cache = vec![f32::NAN; batch * 4 * hd];
    for i in grid_stride(batch * hd, grid, block) {
        let (b, u) = (i / hd, i % hd);
        let (g, c) = (b * 3 * hd + u, b * 4 * hd + u);
        if active.is_some_and(|a| !a[b]) {
            out[i] = h[i];
            for k in 0..4 {
                cache[c + k * hd] = 0.0;
            }
            continue;
        }
        let r = sigmoid(gi[g] + gh[g]);
        let z = sigmoid(gi[g + hd] + gh[g + hd]);
        let ghn = gh[g + 2 * hd];
        let n = libm::tanhf(gi[g + 2 * hd] + r * ghn);
        out[i] = n + z * (h[i] - n);
        cache[c] = r;
        cache[c + hd] = z;
        cache[c + 2 * hd] = n;
        cache[c + 3 * hd] = ghn;
    }
    (out, cache)
}

/// `gru_bwd`: (dgi, dgh, dh direct).
#[allow(clippy::too_many_arguments)]
pub fn gru_backward(
    cache: &[f32],
    h: &[f32],
    dout: &[f32],
    active: Option<&[bool]>,
    batch: usize,
    hidden: usize,
    grid: usize,
    block: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut dgi = vec![f32::NAN; batch * 3 * hd];
    let mut dgh = vec![f32::NAN; batch * 3 * hd];
    let mut dh = vec![f32::NAN; batch * hd];
    for i in grid_stride(batch * hd, grid, block) {
        let (b, u) = (i / hd, i % hd);
        let (g, c) = (b * 3 * hd + u, b * 4 * hd + u);
        if active.is_some_and(|a| !a[b]) {
            dh[i] = dout[i];
            for k in 0..3 {
                dgi[g + k * hd] = 0.0;
                dgh[g + k * hd] = 0.0;
            }
            continue;
        }
        let (r, z, n, ghn) = (
            cache[c],
            cache[c + hd],
            cache[c + 2 * hd],
            cache[c + 3 * hd],
        );
        let d = dout[i];
        let dn = d * (1.0 - z) * (1.0 - n * n);
        let dz = d * (h[i] - n) * z * (1.0 - z);
        let dr = dn * ghn * r * (1.0 - r);
        dh[i] = d * z;
        dgi[g] = dr;
        dgi[g + hd] = dz;
        dgi[g + 2 * hd] = dn;
        dgh[g] = dr;
        dgh[g + hd] = dz;
        dgh[g + 2 * hd] = dn * r;
    }
    (dgi, dgh, dh)
}

/// `lstm_fwd`: (h', c', cache `[batch, 5H]`) for `batch` rows of `hidden` units.
#[allow(clippy::too_many_arguments)]
pub fn lstm_forward(
    gi: &[f32],
    gh: &[f32],
    h: &[f32],
    c: &[f32],
    active: Option<&[bool]>,
    batch: usize,
    hidden: usize,
    grid: usize,
    block: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut h_out = vec![f32::NAN; batch * hd];
    let mut c_out = vec![f32::NAN; batch * hd];
    let mut cache = vec![f32::NAN; batch * 5 * hd];
    for k in grid_stride(batch * hd, grid, block) {
        let b = k / hd;
        let (g, q) = (b * 4 * hd + k % hd, b * 5 * hd + k % hd);
        if active.is_some_and(|a| !a[b]) {
            h_out[k] = h[k];
            c_out[k] = c[k];
            for j in 0..5 {
                cache[q + j * hd] = 0.0;
            }
            continue;
        }
        let i = sigmoid(gi[g] + gh[g]);
        let f = sigmoid(gi[g + hd] + gh[g + hd]);
        let gg = libm::tanhf(gi[g + 2 * hd] + gh[g + 2 * hd]);
        let o = sigmoid(gi[g + 3 * hd] + gh[g + 3 * hd]);
        let cn = f * c[k] + i * gg;
        let t = libm::tanhf(cn);
        c_out[k] = cn;
        h_out[k] = o * t;
        cache[q] = i;
        cache[q + hd] = f;
        cache[q + 2 * hd] = gg;
        cache[q + 3 * hd] = o;
        cache[q + 4 * hd] = t;
    }
    (h_out, c_out, cache)
}

/// `lstm_bwd`: (dgates `[batch, 4H]`, dh, dc) from the cache, c, dh' and dc'.
#[allow(clippy::too_many_arguments)]
pub fn lstm_backward(
    cache: &[f32],
    c: &[f32],
    dh_out: &[f32],
    dc_out: &[f32],
    active: Option<&[bool]>,
    batch: usize,
    hidden: usize,
    grid: usize,
    block: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut dgates = vec![f32::NAN; batch * 4 * hd];
    let mut dh = vec![f32::NAN; batch * hd];
    let mut dc = vec![f32::NAN; batch * hd];
    for k in grid_stride(batch * hd, grid, block) {
        let b = k / hd;
        let (g, q) = (b * 4 * hd + k % hd, b * 5 * hd + k % hd);
        if active.is_some_and(|a| !a[b]) {
            dh[k] = dh_out[k];
            dc[k] = dc_out[k];
            for j in 0..4 {
                dgates[g + j * hd] = 0.0;
            }
            continue;
        }
        let (i, f, gg, o, t) = (
            cache[q],
            cache[q + hd],
            cache[q + 2 * hd],
            cache[q + 3 * hd],
            cache[q + 4 * hd],
        );
        let dct = dc_out[k] + dh_out[k] * o * (1.0 - t * t);
        dgates[g] = dct * gg * i * (1.0 - i);
        dgates[g + hd] = dct * c[k] * f * (1.0 - f);
        dgates[g + 2 * hd] = dct * i * (1.0 - gg * gg);
        dgates[g + 3 * hd] = dh_out[k] * t * o * (1.0 - o);
        dc[k] = dct * f;
        dh[k] = 0.0;
    }
    (dgates, dh, dc)
}

/// `keys_of`: valid keys of sequence b (the device lengths clamped to [0, len_k]).
fn keys_of(d: &AdditiveDims, key_lens: Option<&[i32]>, b: usize) -> usize {
    key_lens.map_or(d.len_k, |l| l[b].clamp(0, d.len_k as i32) as usize)
}

/// `warp_per_row_dots`: out[j] = Σ_c f(c, a_c, rows_jc) for j < len, warp w owning rows
/// w, w + warps, ..., lane l the columns l, l + 32, ..., then the butterfly.
fn warp_per_row_dots(
    a: &[f32],
    rows: &[f32],
    width: usize,
    len: usize,
    warps: usize,
    out: &mut [f32],
    f: impl Fn(usize, f32, f32) -> f32,
) {
    for w in 0..warps {
        for j in (w..len).step_by(warps) {
            let row = &rows[j * width..][..width];
            let mut lanes = [0f32; WARP];
            for (l, s) in lanes.iter_mut().enumerate() {
                for c in (l..width).step_by(WARP) {
                    *s += f(c, a[c], row[c]);
                }
            }
            warp_sum(&mut lanes);
            out[j] = lanes[0];
        }
    }
}

/// Per-thread partials of a block loop `for j = t; j < len; j += threads`.
fn thread_partials(threads: usize, len: usize, f: impl Fn(usize) -> f32, init: f32) -> Vec<f32> {
    (0..threads)
        .map(|t| {
            (t..len)
                .step_by(threads)
                .map(&f)
                .fold(init, |acc, x| acc + x)
        })
        .collect()
}

/// `additive_fwd` with `threads` per block: (ctx `[batch, D]`, α `[batch, len_k]`).
pub fn additive_forward(
    q: &[f32],
    keys: &[f32],
    v: &[f32],
    values: &[f32],
    d: &AdditiveDims,
    key_lens: Option<&[i32]>,
    threads: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (a_, dv, l_) = (d.dim_a, d.dim_v, d.len_k);
    let warps = threads / WARP;
    let mut ctx = vec![f32::NAN; d.batch * dv];
    let mut alpha = vec![f32::NAN; d.batch * l_];
    for b in 0..d.batch {
        let len = keys_of(d, key_lens, b);
        let qb = &q[b * a_..][..a_];
        let kb = &keys[b * l_ * a_..][..l_ * a_];
        let vb = &values[b * l_ * dv..][..l_ * dv];
        let mut e = vec![f32::NAN; l_];
        warp_per_row_dots(qb, kb, a_, len, warps, &mut e, |c, qc, kc| {
            v[c] * libm::tanhf(qc + kc)
        });
        let m = (0..threads)
            .map(|t| {
                (t..len)
                    .step_by(threads)
                    .fold(f32::NEG_INFINITY, |m, j| m.max(e[j]))
            })
            .fold(f32::NEG_INFINITY, f32::max);
        let s = block_sum(&thread_partials(
            threads,
            len,
            |j| libm::expf(e[j] - m),
            0.0,
        ));
        let inv = if len > 0 { 1.0 / s } else { 0.0 };
        for t in 0..threads {
            for j in (t..l_).step_by(threads) {
                let a = if j < len {
                    libm::expf(e[j] - m) * inv
                } else {
                    0.0
                };
                if j < len {
                    e[j] = a;
                }
                alpha[b * l_ + j] = a;
            }
        }
        for t in 0..threads {
            for c in (t..dv).step_by(threads) {
                let mut acc = 0f32;
                for (j, &ej) in e.iter().enumerate().take(len) {
                    acc += ej * vb[j * dv + c];
                }
                ctx[b * dv + c] = acc;
            }
        }
    }
    (ctx, alpha)
}

/// `additive_bwd` with `threads` per block: (dq, dkeys, dvalues, dv_part `[batch, A]`). The
/// caller sums dv_part over the batch in order, as the host does.
#[allow(clippy::too_many_arguments)]
pub fn additive_backward(
    q: &[f32],
    keys: &[f32],
    v: &[f32],
    values: &[f32],
    alpha: &[f32],
    dctx: &[f32],
    d: &AdditiveDims,
    key_lens: Option<&[i32]>,
    threads: usize,
) -> [Vec<f32>; 4] {
    let (a_, dv, l_) = (d.dim_a, d.dim_v, d.len_k);
    let warps = threads / WARP;
    let mut dq = vec![f32::NAN; d.batch * a_];
    let mut dkeys = vec![f32::NAN; d.batch * l_ * a_];
    let mut dvalues = vec![f32::NAN; d.batch * l_ * dv];
    let mut dv_part = vec![f32::NAN; d.batch * a_];
    for b in 0..d.batch {
        let len = keys_of(d, key_lens, b);
        let qb = &q[b * a_..][..a_];
        let kb = &keys[b * l_ * a_..][..l_ * a_];
        let vb = &values[b * l_ * dv..][..l_ * dv];
        let gb = &dctx[b * dv..][..dv];
        let mut de = vec![f32::NAN; l_];
        warp_per_row_dots(gb, vb, dv, len, warps, &mut de, |_, g, x| g * x);
        let al: Vec<f32> = (0..len).map(|j| alpha[b * l_ + j]).collect();
        let mean = block_sum(&thread_partials(threads, len, |j| al[j] * de[j], 0.0));
        for j in 0..len {
            de[j] = al[j] * (de[j] - mean);
        }
        for t in 0..threads {
            for i in (t..l_ * dv).step_by(threads) {
                let (j, c) = (i / dv, i % dv);
                dvalues[b * l_ * dv + i] = if j < len { al[j] * gb[c] } else { 0.0 };
            }
        }
        for t in 0..threads {
            for c in (t..a_).step_by(threads) {
                let (mut gq, mut gv) = (0f32, 0f32);
                for j in 0..l_ {
                    let mut du = 0f32;
                    if j < len {
                        let t = libm::tanhf(qb[c] + kb[j * a_ + c]);
                        du = de[j] * v[c] * (1.0 - t * t);
                        gq += du;
                        gv += de[j] * t;
                    }
                    dkeys[(b * l_ + j) * a_ + c] = du;
                }
                dq[b * a_ + c] = gq;
                dv_part[b * a_ + c] = gv;
            }
        }
    }
    [dq, dkeys, dvalues, dv_part]
}
