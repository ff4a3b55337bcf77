//! The gradients of scaled dot-product attention in f64: given dO = ∂L/∂O, the reference
//! returns dQ, dK and dV for every option of [`crate::reference::attention`] (GQA/MQA, both
//! causal alignments, sliding windows, key padding, packed variable-length batches, arbitrary
//! element masks such as block-sparse layouts).
//!
//! With s_ij = scale·q_i·k_j over the admissible keys of row i, P = softmax_j(s) and O = P·V:
//!
//! ```text
//! dV_j  = Σ_i P_ij dO_i                      dP_ij = dO_i·v_j
//! D_i   = Σ_j P_ij dP_ij  (= dO_i·O_i)       dS_ij = P_ij (dP_ij − D_i)
//! dQ_i  = scale Σ_j dS_ij k_j                dK_j  = scale Σ_i dS_ij q_i
//! ```
//!
//! Masked pairs contribute nothing (their P is 0 and their K/V rows are never read), so a fully
//! masked row has dQ = 0 and adds nothing to dK/dV. Key/value head `hk` collects the sums over
//! every query head of its group (h / (Hq / Hkv) = hk). The forward is recomputed here in f64;
//! no LSE or O from elsewhere is used.
//!
//! Layouts are those of the forward reference: BHSD for [`backward`] and [`backward_masked`]
//! (dO like O, dQ like Q, dK like K, dV like V), THD for [`backward_varlen`].

use super::attention::{Options, Shape};

/// dQ, dK, dV in the layouts of Q, K and V.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// The gradients of [`super::attention::forward`] for output gradient `d_o`.
///
/// Panics if the slices do not match `shape` (callers are tests and checks).
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
) -> Grads {
    backward_masked(q, k, v, d_o, shape, opts, &|_, _, _, _| true)
}

/// The gradients of [`super::attention::forward_masked`]: `keep(b, h, i, j)` removes pairs on
/// top of `opts`' masks.
#[allow(clippy::too_many_arguments)]
pub fn backward_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
    keep: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Grads {
    let s = shape;
    assert_eq!(q.len(), s.q_len(), "q length");
    assert_eq!(k.len(), s.k_len(), "k length");
    assert_eq!(v.len(), s.v_len(), "v length");
    assert_eq!(d_o.len(), s.o_len(), "dO length");
    assert!(
        s.heads_kv > 0 && s.heads_q.is_multiple_of(s.heads_kv),
        "Hq must be a multiple of Hkv"
    );
    let group = s.heads_q / s.heads_kv;
    let (d, dv) = (s.dim_qk, s.dim_v);
    let mut g = Grads {
        dq: vec![0.0; s.q_len()],
        dk: vec![0.0; s.k_len()],
        dv: vec![0.0; s.v_len()],
    };
    let mut p = vec![0.0f64; s.len_k];
    let mut dp = vec![0.0f64; s.len_k];
    let mut keys = Vec::with_capacity(s.len_k);
    for b in 0..s.batch {
        let band = opts.key_band(s, b);
        for h in 0..s.heads_q {
            let hk = h / group;
            let q_base = ((b * s.heads_q + h) * s.len_q) * d;
            let k_base = ((b * s.heads_kv + hk) * s.len_k) * d;
            let v_base = ((b * s.heads_kv + hk) * s.len_k) * dv;
            let o_base = ((b * s.heads_q + h) * s.len_q) * dv;
            for i in 0..s.len_q {
                keys.clear();
                keys.extend(band.keys(i).filter(|&j| keep(b, h, i, j)));
                if keys.is_empty() {
                    continue; // fully masked: no gradient anywhere
                }
                let qi = &q[q_base + i * d..q_base + (i + 1) * d];
                let doi = &d_o[o_base + i * dv..o_base + (i + 1) * dv];
                let mut max = f64::NEG_INFINITY;
                for &j in &keys {
                    let kj = &k[k_base + j * d..k_base + (j + 1) * d];
                    p[j] = opts.scale * dot(qi, kj);
                    max = max.max(p[j]);
                }
                let mut sum = 0.0;
                for &j in &keys {
                    p[j] = (p[j] - max).exp();
                    sum += p[j];
                }
                let mut delta = 0.0;
                for &j in &keys {
                    p[j] /= sum;
                    dp[j] = dot(doi, &v[v_base + j * dv..v_base + (j + 1) * dv]);
                    delta += p[j] * dp[j];
                }
                for &j in &keys {
                    let ds = p[j] * (dp[j] - delta) * opts.scale;
                    let dv_row = &mut g.dv[v_base + j * dv..v_base + (j + 1) * dv];
                    for (a, &x) in dv_row.iter_mut().zip(doi) {
                        *a += p[j] * x as f64;
                    }
                    let kj = &k[k_base + j * d..k_base + (j + 1) * d];
                    let dq_row = &mut g.dq[q_base + i * d..q_base + (i + 1) * d];
                    for (a, &x) in dq_row.iter_mut().zip(kj) {
                        *a += ds * x as f64;
                    }
                    let dk_row = &mut g.dk[k_base + j * d..k_base + (j + 1) * d];
                    for (a, &x) in dk_row.iter_mut().zip(qi) {
                        *a += ds * x as f64;
                    }
                }
            }
        }
    }
    g
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The gradients of [`super::attention::forward_varlen`] (packed THD layouts: dQ/dO rows as
/// Q/O, dK/dV rows as K/V).
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    cu_q: &[usize],
    cu_k: &[usize],
    heads_q: usize,
    heads_kv: usize,
    dim_qk: usize,
    dim_v: usize,
    opts: &Options,
) -> Grads {
    assert_eq!(cu_q.len(), cu_k.len(), "one offset list per side");
    let total_q = *cu_q.last().unwrap_or(&0);
    let total_k = *cu_k.last().unwrap_or(&0);
    assert_eq!(d_o.len(), total_q * heads_q * dim_v, "dO length");
    let mut g = Grads {
        dq: vec![0.0; total_q * heads_q * dim_qk],
        dk: vec![0.0; total_k * heads_kv * dim_qk],
        dv: vec![0.0; total_k * heads_kv * dim_v],
    };
    let opts = Options {
        key_lens: None,
        ..opts.clone()
    };
    // THD rows r0..r1 of all heads as BHSD [1, heads, r1 - r0, d], and back.
    let gather = |src: &[f32], r0: usize, r1: usize, heads: usize, d: usize| -> Vec<f32> {
        let mut dst = Vec::with_capacity((r1 - r0) * heads * d);
        for h in 0..heads {
            for r in r0..r1 {
                let at = (r * heads + h) * d;
                dst.extend_from_slice(&src[at..at + d]);
            }
        }
        dst
    };
    let scatter = |dst: &mut [f64], src: &[f64], r0: usize, r1: usize, heads: usize, d: usize| {
        for h in 0..heads {
            for (i, r) in (r0..r1).enumerate() {
                let from = (h * (r1 - r0) + i) * d;
                let to = (r * heads + h) * d;
                dst[to..to + d].copy_from_slice(&src[from..from + d]);
            }
        }
    };
    for b in 0..cu_q.len().saturating_sub(1) {
        let (q0, q1, k0, k1) = (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]);
        let shape = Shape::new(1, heads_q, heads_kv, q1 - q0, k1 - k0, dim_qk, dim_v);
        let seq = backward(
            &gather(q, q0, q1, heads_q, dim_qk),
            &gather(k, k0, k1, heads_kv, dim_qk),
            &gather(v, k0, k1, heads_kv, dim_v),
            &gather(d_o, q0, q1, heads_q, dim_v),
            &shape,
            &opts,
        );
        scatter(&mut g.dq, &seq.dq, q0, q1, heads_q, dim_qk);
        scatter(&mut g.dk, &seq.dk, k0, k1, heads_kv, dim_qk);
        scatter(&mut g.dv, &seq.dv, k0, k1, heads_kv, dim_v);
    }
    g
}
