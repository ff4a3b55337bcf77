//! The two fused ops of the recurrent models, in f32 on host slices: one GRU step after its
//! two GEMMs, and Bahdanau's additive attention (scores, masked softmax and context in one
//! pass), and one LSTM step after its two GEMMs. [`super::TrainBackend`]'s `gru_cell*`,
//! `lstm_cell*` and `additive_attention*` run these by default (through a host copy), which is
//! what the CPU backend uses; the CUDA backend overrides them with fused kernels. The f64
//! references they are tested against are in [`crate::reference::seq2seq`].
//!
//! # GRU step (PyTorch's `nn.GRU` equations)
//!
//! With gi = x·W_ihᵀ + b_ih and gh = h·W_hhᵀ + b_hh, both `[batch, 3H]` in the blocks
//! (r, z, n):
//!
//! ```text
//! r = σ(gi_r + gh_r)      z = σ(gi_z + gh_z)      n = tanh(gi_n + r∘gh_n)
//! h' = (1 − z)∘n + z∘h
//! ```
//!
//! The backward from dh': dn = dh'∘(1 − z), dz = dh'∘(h − n), dh = dh'∘z (the direct path);
//! through the nonlinearities dn̂ = dn∘(1 − n²), dr̂ = dn̂∘gh_n∘r(1 − r), dẑ = dz∘z(1 − z);
//! then dgi = (dr̂, dẑ, dn̂) and dgh = (dr̂, dẑ, dn̂∘r). The cache keeps r, z, n and gh_n
//! (`[batch, 4H]`), everything the backward reads besides h.
//!
//! A row whose `active` flag is false (a padded time step of a shorter sequence) keeps its
//! state, h' = h, and passes dh' straight back with zero gate gradients.
//!
//! # Additive attention (Bahdanau et al. 2015)
//!
//! For each sequence b, query q_b `[A]` (W·s + b_W, computed by the caller), keys k_bj = U·h_bj
//! `[A]` (computed once per sequence), values h_bj `[D]`, j < key_lens[b]:
//!
//! ```text
//! t_bj = tanh(q_b + k_bj)   e_bj = v·t_bj   α_b = softmax_j(e_b)   c_b = Σ_j α_bj·h_bj
//! ```
//!
//! Backward from dc: dα_j = dc·h_j, de_j = α_j(dα_j − Σ_k α_k·dα_k), dh_j = α_j·dc,
//! dv = Σ_j de_j·t_j, du_j = de_j·v∘(1 − t_j²), dk_j = du_j, dq = Σ_j du_j. The tanh is
//! recomputed rather than stored (B·L·A values per decoder step). Padded keys get α = 0 and
//! no gradient; a sequence with no keys gets a zero context.

use crate::error::{Error, Result};

/// Gradients of one GRU step: the two pre-activation inputs and the direct part of dh.
pub struct GruCellGrads<T> {
    /// dL/dgi `[batch, 3H]` (also dL/db_ih's rows).
    pub dgi: T,
    /// dL/dgh `[batch, 3H]`.
    pub dgh: T,
    /// dL/dh through h' = … + z∘h only `[batch, H]` (add dgh·W_hh for the full dL/dh).
    pub dh: T,
}

/// Gradients of additive attention.
pub struct AdditiveGrads<T> {
    pub dq: T,
    pub dkeys: T,
    pub dv: T,
    pub dvalues: T,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Checks the sizes of a recurrent step with `gates` gate blocks (3 for the GRU, 4 for the
/// LSTM): h `[batch, H]`, gi and gh `[batch, gates·H]`, one `active` flag per row; returns
/// (batch, H).
fn step_dims(
    gates: usize,
    gi: &[usize],
    gh: &[usize],
    h: &[usize],
    active: Option<&[bool]>,
) -> Result<(usize, usize)> {
    let (batch, hidden) = match h {
        [b, w] if *w > 0 => (*b, *w),
        s => return Err(Error::shape("h", "[batch, hidden ≥ 1]", s)),
    };
    let want = [batch, gates * hidden];
    if gi != want {
        return Err(Error::shape("gi", format!("{want:?}"), gi));
    }
    if gh != want {
        return Err(Error::shape("gh", format!("{want:?}"), gh));
    }
    check_active(active, batch)?;
    Ok((batch, hidden))
}

/// One `active` flag per row, when given.
fn check_active(active: Option<&[bool]>, batch: usize) -> Result<()> {
    match active {
        Some(a) if a.len() != batch => {
            Err(Error::shape("active", format!("[{batch}]"), &[a.len()]))
        }
        _ => Ok(()),
    }
}

/// Checks the sizes of a GRU step; returns (batch, H).
pub fn gru_dims(
    gi: &[usize],
    gh: &[usize],
    h: &[usize],
    active: Option<&[bool]>,
) -> Result<(usize, usize)> {
    step_dims(3, gi, gh, h, active)
}

/// One GRU step: returns h' `[batch·H]` and the cache `[batch·4H]` (r, z, n, gh_n).
pub fn gru_cell(
    gi: &[f32],
    gh: &[f32],
    h: &[f32],
    batch: usize,
    hidden: usize,
    active: Option<&[bool]>,
) -> (Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut out = vec![0f32; batch * hd];
    let mut cache = vec![0f32; batch * 4 * hd];
    for b in 0..batch {
        let (gi, gh) = (&gi[b * 3 * hd..][..3 * hd], &gh[b * 3 * hd..][..3 * hd]);
        let hb = &h[b * hd..][..hd];
        let ob = &mut out[b * hd..][..hd];
        if active.is_some_and(|a| !a[b]) {
            ob.copy_from_slice(hb);
            continue;
        }
        let cb = &mut cache[b * 4 * hd..][..4 * hd];
        for u in 0..hd {
            let r = sigmoid(gi[u] + gh[u]);
            let z = sigmoid(gi[hd + u] + gh[hd + u]);
            let ghn = gh[2 * hd + u];
            let n = (gi[2 * hd + u] + r * ghn).tanh();
            ob[u] = n + z * (hb[u] - n);
            cb[u] = r;
            cb[hd + u] = z;
            cb[2 * hd + u] = n;
            cb[3 * hd + u] = ghn;
        }
    }
    (out, cache)
}

/// The backward of [`gru_cell`]: (dgi, dgh, dh direct) from the cache, h and dh'.
pub fn gru_cell_backward(
    cache: &[f32],
    h: &[f32],
    dout: &[f32],
    batch: usize,
    hidden: usize,
    active: Option<&[bool]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut dgi = vec![0f32; batch * 3 * hd];
    let mut dgh = vec![0f32; batch * 3 * hd];
    let mut dh = vec![0f32; batch * hd];
    for b in 0..batch {
        let d = &dout[b * hd..][..hd];
        let dhb = &mut dh[b * hd..][..hd];
        if active.is_some_and(|a| !a[b]) {
            dhb.copy_from_slice(d);
            continue;
        }
        let c = &cache[b * 4 * hd..][..4 * hd];
        let hb = &h[b * hd..][..hd];
        let (gi, gh) = (
            &mut dgi[b * 3 * hd..][..3 * hd],
            &mut dgh[b * 3 * hd..][..3 * hd],
        );
        for u in 0..hd {
            let (r, z, n, ghn) = (c[u], c[hd + u], c[2 * hd + u], c[3 * hd + u]);
            let dn = d[u] * (1.0 - z) * (1.0 - n * n);
            let dz = d[u] * (hb[u] - n) * z * (1.0 - z);
            let dr = dn * ghn * r * (1.0 - r);
            dhb[u] = d[u] * z;
            gi[u] = dr;
            gi[hd + u] = dz;
            gi[2 * hd + u] = dn;
            gh[u] = dr;
            gh[hd + u] = dz;
            gh[2 * hd + u] = dn * r;
        }
    }
    (dgi, dgh, dh)
}

/// Sizes of one additive-attention call, checked: batch, keys per sequence, A, D.
#[derive(Clone, Copy, Debug)]
pub struct AdditiveDims {
    pub batch: usize,
    pub len_k: usize,
    pub dim_a: usize,
    pub dim_v: usize,
}

impl AdditiveDims {
    /// From the shapes of q `[batch, A]`, keys `[batch·L, A]`, v `[A]`, values `[batch·L, D]`.
    pub fn check(
        q: &[usize],
        keys: &[usize],
        v: &[usize],
        values: &[usize],
        key_lens: Option<&[usize]>,
    ) -> Result<Self> {
        let (batch, dim_a) = match q {
            [b, a] if *b > 0 && *a > 0 => (*b, *a),
            s => return Err(Error::shape("q", "[batch ≥ 1, A ≥ 1]", s)),
        };
        let len_k = match keys {
            [r, a] if *a == dim_a && r % batch == 0 => r / batch,
            s => return Err(Error::shape("keys", format!("[{batch}·len_k, {dim_a}]"), s)),
        };
        if v != [dim_a] {
            return Err(Error::shape("v", format!("[{dim_a}]"), v));
        }
        let dim_v = match values {
            [r, d] if *r == batch * len_k => *d,
            s => return Err(Error::shape("values", format!("[{}, D]", batch * len_k), s)),
        };
        if let Some(l) = key_lens {
            if l.len() != batch {
                return Err(Error::shape("key_lens", format!("[{batch}]"), &[l.len()]));
            }
            if let Some(&bad) = l.iter().find(|&&n| n > len_k) {
                return Err(Error::invalid(
                    "key_lens",
                    format!("{bad} keys in a sequence of {len_k}"),
                ));
            }
        }
        Ok(AdditiveDims {
            batch,
            len_k,
            dim_a,
            dim_v,
        })
    }

    fn keys_of(&self, key_lens: Option<&[usize]>, b: usize) -> usize {
        key_lens.map_or(self.len_k, |l| l[b])
    }
}

/// e_bj = v·tanh(q_b + k_bj) for the valid keys of sequence b, with the tanh values when
/// `t_out` is given (`[len, A]`).
fn scores(
    q: &[f32],
    keys: &[f32],
    v: &[f32],
    d: &AdditiveDims,
    b: usize,
    len: usize,
    mut t_out: Option<&mut [f32]>,
) -> Vec<f32> {
    let a = d.dim_a;
    let qb = &q[b * a..][..a];
    (0..len)
        .map(|j| {
            let kj = &keys[(b * d.len_k + j) * a..][..a];
            let mut e = 0f32;
            for c in 0..a {
                let t = (qb[c] + kj[c]).tanh();
                if let Some(t_out) = t_out.as_deref_mut() {
                    t_out[j * a + c] = t;
                }
                e += v[c] * t;
            }
            e
        })
        .collect()
}

/// Additive attention forward: context `[batch·D]` and α `[batch·L]` (0 at padded keys).
pub fn additive_attention(
    q: &[f32],
    keys: &[f32],
    v: &[f32],
    values: &[f32],
    d: &AdditiveDims,
    key_lens: Option<&[usize]>,
) -> (Vec<f32>, Vec<f32>) {
    let mut ctx = vec![0f32; d.batch * d.dim_v];
    let mut alpha = vec![0f32; d.batch * d.len_k];
    for b in 0..d.batch {
        let len = d.keys_of(key_lens, b);
        if len == 0 {
            continue;
        }
        let e = scores(q, keys, v, d, b, len, None);
        let max = e.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f32 = e.iter().map(|&x| (x - max).exp()).sum();
        let ab = &mut alpha[b * d.len_k..][..len];
        for (a, &x) in ab.iter_mut().zip(&e) {
            *a = (x - max).exp() / sum;
        }
        let cb = &mut ctx[b * d.dim_v..][..d.dim_v];
        for (j, &a) in ab.iter().enumerate() {
            let hj = &values[(b * d.len_k + j) * d.dim_v..][..d.dim_v];
            for (c, &h) in cb.iter_mut().zip(hj) {
                *c += a * h;
            }
        }
    }
    (ctx, alpha)
}

/// Additive attention backward from dc `[batch·D]`: (dq, dkeys, dv, dvalues).
#[allow(clippy::too_many_arguments)]
pub fn additive_attention_backward(
    q: &[f32],
    keys: &[f32],
    v: &[f32],
    values: &[f32],
    alpha: &[f32],
    dctx: &[f32],
    d: &AdditiveDims,
    key_lens: Option<&[usize]>,
) -> [Vec<f32>; 4] {
    let (a, dv_) = (d.dim_a, d.dim_v);
    let mut dq = vec![0f32; d.batch * a];
    let mut dkeys = vec![0f32; d.batch * d.len_k * a];
    let mut dv = vec![0f32; a];
    let mut dvalues = vec![0f32; d.batch * d.len_k * dv_];
    for b in 0..d.batch {
        let len = d.keys_of(key_lens, b);
        if len == 0 {
            continue;
        }
        let mut t = vec![0f32; len * a];
        scores(q, keys, v, d, b, len, Some(&mut t));
        let ab = &alpha[b * d.len_k..][..len];
        let dc = &dctx[b * dv_..][..dv_];
        let dalpha: Vec<f32> = (0..len)
            .map(|j| {
                let hj = &values[(b * d.len_k + j) * dv_..][..dv_];
                hj.iter().zip(dc).map(|(h, g)| h * g).sum()
            })
            .collect();
        let mean: f32 = ab.iter().zip(&dalpha).map(|(x, y)| x * y).sum();
        for j in 0..len {
            let dhj = &mut dvalues[(b * d.len_k + j) * dv_..][..dv_];
            for (o, &g) in dhj.iter_mut().zip(dc) {
                *o = ab[j] * g;
            }
            let de = ab[j] * (dalpha[j] - mean);
            let tj = &t[j * a..][..a];
            let dkj = &mut dkeys[(b * d.len_k + j) * a..][..a];
            let dqb = &mut dq[b * a..][..a];
            for c in 0..a {
                dv[c] += de * tj[c];
                let du = de * v[c] * (1.0 - tj[c] * tj[c]);
                dkj[c] = du;
                dqb[c] += du;
            }
        }
    }
    [dq, dkeys, dv, dvalues]
}

// ---------------------------------------------------------------------------------------
// LSTM step (PyTorch's `nn.LSTM` / `nn.LSTMCell` equations).
//
// With gi = x·W_ihᵀ + b_ih and gh = h·W_hhᵀ + b_hh, both `[batch, 4H]` in the blocks
// (i, f, g, o) and a = gi + gh:
//
//     i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
//     c' = f∘c + i∘g            h' = o∘tanh(c')
//
// The backward from dh' and dc' (the next step's): with t = tanh(c'),
// dĉ = dc' + dh'∘o∘(1 − t²) (the total gradient of c'), then
// da_i = dĉ∘g∘i(1 − i), da_f = dĉ∘c∘f(1 − f), da_g = dĉ∘i∘(1 − g²),
// da_o = dh'∘t∘o(1 − o), and dc = dĉ∘f. The two GEMM inputs get the same gradient
// (dgi = dgh = da); h reaches the step only through gh, so its gradient is da·W_hh (the
// caller's GEMM). The cache keeps i, f, g, o and t (`[batch, 5H]`), everything the backward
// reads besides c. An inactive row keeps (h, c) and passes (dh', dc') straight back.

/// Gradients of one LSTM step.
pub struct LstmCellGrads<T> {
    /// dL/dgi = dL/dgh `[batch, 4H]` (the pre-activations' gradient).
    pub dgates: T,
    /// dL/dh through an inactive row's copy only `[batch, H]` (add dgates·W_hh for the rest).
    pub dh: T,
    /// dL/dc `[batch, H]`.
    pub dc: T,
}

/// Checks the sizes of an LSTM step; returns (batch, H).
pub fn lstm_dims(
    gi: &[usize],
    gh: &[usize],
    h: &[usize],
    c: &[usize],
    active: Option<&[bool]>,
) -> Result<(usize, usize)> {
    let (batch, hidden) = step_dims(4, gi, gh, h, active)?;
    if c != [batch, hidden] {
        return Err(Error::shape("c", format!("[{batch}, {hidden}]"), c));
    }
    Ok((batch, hidden))
}

/// One LSTM step: returns h' and c' (`[batch·H]` each) and the cache `[batch·5H]`
/// (i, f, g, o, tanh c').
pub fn lstm_cell(
    gi: &[f32],
    gh: &[f32],
    h: &[f32],
    c: &[f32],
    batch: usize,
    hidden: usize,
    active: Option<&[bool]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut h_out = vec![0f32; batch * hd];
    let mut c_out = vec![0f32; batch * hd];
    let mut cache = vec![0f32; batch * 5 * hd];
    for b in 0..batch {
        let (gi, gh) = (&gi[b * 4 * hd..][..4 * hd], &gh[b * 4 * hd..][..4 * hd]);
        let (hb, cb) = (&h[b * hd..][..hd], &c[b * hd..][..hd]);
        if active.is_some_and(|a| !a[b]) {
            h_out[b * hd..][..hd].copy_from_slice(hb);
            c_out[b * hd..][..hd].copy_from_slice(cb);
            continue;
        }
        let k = &mut cache[b * 5 * hd..][..5 * hd];
        for u in 0..hd {
            let i = sigmoid(gi[u] + gh[u]);
            let f = sigmoid(gi[hd + u] + gh[hd + u]);
            let g = (gi[2 * hd + u] + gh[2 * hd + u]).tanh();
            let o = sigmoid(gi[3 * hd + u] + gh[3 * hd + u]);
            let c_new = f * cb[u] + i * g;
            let t = c_new.tanh();
            c_out[b * hd + u] = c_new;
            h_out[b * hd + u] = o * t;
            k[u] = i;
            k[hd + u] = f;
            k[2 * hd + u] = g;
            k[3 * hd + u] = o;
            k[4 * hd + u] = t;
        }
    }
    (h_out, c_out, cache)
}

/// The backward of [`lstm_cell`]: (dgates, dh direct, dc) from the cache, c, dh' and dc'.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_backward(
    cache: &[f32],
    c: &[f32],
    dh_out: &[f32],
    dc_out: &[f32],
    batch: usize,
    hidden: usize,
    active: Option<&[bool]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = hidden;
    let mut dgates = vec![0f32; batch * 4 * hd];
    let mut dh = vec![0f32; batch * hd];
    let mut dc = vec![0f32; batch * hd];
    for b in 0..batch {
        let (dho, dco) = (&dh_out[b * hd..][..hd], &dc_out[b * hd..][..hd]);
        if active.is_some_and(|a| !a[b]) {
            dh[b * hd..][..hd].copy_from_slice(dho);
            dc[b * hd..][..hd].copy_from_slice(dco);
            continue;
        }
        let k = &cache[b * 5 * hd..][..5 * hd];
        let da = &mut dgates[b * 4 * hd..][..4 * hd];
        for u in 0..hd {
            let (i, f, g, o, t) = (k[u], k[hd + u], k[2 * hd + u], k[3 * hd + u], k[4 * hd + u]);
            let dct = dco[u] + dho[u] * o * (1.0 - t * t);
            da[u] = dct * g * i * (1.0 - i);
            da[hd + u] = dct * c[b * hd + u] * f * (1.0 - f);
            da[2 * hd + u] = dct * i * (1.0 - g * g);
            da[3 * hd + u] = dho[u] * t * o * (1.0 - o);
            dc[b * hd + u] = dct * f;
        }
    }
    (dgates, dh, dc)
}

/// Checks the sizes of an LSTM step's backward: cache `[batch, 5H]`, c, dh', dc' `[batch, H]`;
/// returns (batch, H).
pub fn lstm_backward_dims(
    cache: &[usize],
    c: &[usize],
    dh_out: &[usize],
    dc_out: &[usize],
    active: Option<&[bool]>,
) -> Result<(usize, usize)> {
    let (batch, hidden) = match c {
        [b, w] if *w > 0 => (*b, *w),
        s => return Err(Error::shape("c", "[batch, hidden ≥ 1]", s)),
    };
    if cache != [batch, 5 * hidden] {
        return Err(Error::shape(
            "cache",
            format!("[{batch}, {}]", 5 * hidden),
            cache,
        ));
    }
    for (name, s) in [("dh_out", dh_out), ("dc_out", dc_out)] {
        if s != [batch, hidden] {
            return Err(Error::shape(name, format!("[{batch}, {hidden}]"), s));
        }
    }
    check_active(active, batch)?;
    Ok((batch, hidden))
}

/// One LSTM step on backend tensors: [`super::TrainBackend::lstm_cell`] (whose default runs
/// [`lstm_cell`] through a host copy). gi, gh `[batch, 4H]`, h, c `[batch, H]`; returns h', c'
/// and the cache `[batch, 5H]`.
pub fn lstm_step<B: super::TrainBackend>(
    be: &B,
    gi: &B::Tensor,
    gh: &B::Tensor,
    h: &B::Tensor,
    c: &B::Tensor,
    active: Option<&[bool]>,
) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
    be.lstm_cell(gi, gh, h, c, active)
}

/// The backward of [`lstm_step`] from its cache, c, dL/dh' and dL/dc'
/// ([`super::TrainBackend::lstm_cell_backward`]).
pub fn lstm_step_backward<B: super::TrainBackend>(
    be: &B,
    cache: &B::Tensor,
    c: &B::Tensor,
    dh_out: &B::Tensor,
    dc_out: &B::Tensor,
    active: Option<&[bool]>,
) -> Result<LstmCellGrads<B::Tensor>> {
    be.lstm_cell_backward(cache, c, dh_out, dc_out, active)
}
