//! CPU twin of split-KV decoding (Flash-Decoding), for the decode kernel of issue 6: the keys
//! of each query row are cut into `splits` contiguous runs of whole key tiles; each split runs
//! the online softmax over its run and writes its own normalised O_s (f32) and LSE_s, an empty
//! split writing O_s = 0 and LSE_s = −inf; a second pass merges the splits in split order:
//!
//! ```text
//! M = max_s LSE_s;  Mg = (M == −inf) ? 0 : M;  Σ = Σ_s exp(LSE_s − Mg)
//! LSE = (Σ > 0) ? Mg + ln Σ : −inf;  O = (LSE == −inf) ? 0 : Σ_s exp(LSE_s − LSE)·O_s
//! ```
//!
//! (../shared/attention-kernel-notes.md §6.) Inputs follow [`crate::reference::attention`].

use crate::reference::attention::{Options, Shape};

/// One split's result for one query row.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// Normalised by the split's own sum; 0 for an empty split.
    pub o: Vec<f32>,
    /// ln Σ exp(scale·s) over the split's admissible keys; −inf for an empty split.
    pub lse: f32,
}

/// Merges the splits of one row in split order (the formula in the module docs).
pub fn merge(parts: &[Partial], dim_v: usize) -> (Vec<f32>, f32) {
    let m = parts
        .iter()
        .map(|p| p.lse)
        .fold(f32::NEG_INFINITY, f32::max);
    let mg = if m == f32::NEG_INFINITY { 0.0 } else { m };
    let sum: f32 = parts.iter().map(|p| (p.lse - mg).exp()).sum();
    if sum <= 0.0 {
        return (vec![0.0; dim_v], f32::NEG_INFINITY);
    }
    let lse = mg + sum.ln();
    let mut o = vec![0.0f32; dim_v];
    for p in parts {
        let w = (p.lse - lse).exp();
        for (acc, &x) in o.iter_mut().zip(&p.o) {
            *acc += w * x;
        }
    }
    (o, lse)
}

/// Key range `[start, end)` of split `s` of `splits` over `n_keys` keys in tiles of `block_k`:
/// whole tiles, ceil(tiles / splits) per split, the last splits possibly empty.
pub fn split_range(
    s: usize,
    splits: usize,
    n_keys: usize,
    block_k: usize,
) -> std::ops::Range<usize> {
    let tiles = n_keys.div_ceil(block_k);
    let per_split = tiles.div_ceil(splits.max(1));
    let start = (s * per_split * block_k).min(n_keys);
    let end = ((s + 1) * per_split * block_k).min(n_keys);
    start..end
}

/// Attention through `splits` splits and a merge; returns O and LSE in f32 (BHSD, as the
/// reference).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    opts: &Options,
    splits: usize,
    block_k: usize,
) -> (Vec<f32>, Vec<f32>) {
    let s = shape;
    let group = s.heads_q / s.heads_kv;
    let scale = opts.scale as f32;
    let mut o = vec![f32::NAN; s.o_len()];
    let mut lse = vec![f32::NAN; s.lse_len()];
    for b in 0..s.batch {
        let band = opts.key_band(s, b);
        for h in 0..s.heads_q {
            let hk = h / group;
            for i in 0..s.len_q {
                let admissible = band.keys(i);
                let qi = &q[((b * s.heads_q + h) * s.len_q + i) * s.dim_qk..][..s.dim_qk];
                let parts: Vec<Partial> = (0..splits)
                    .map(|sp| {
                        let r = split_range(sp, splits, s.len_k, block_k);
                        let keys = r.start.max(admissible.start)..r.end.min(admissible.end);
                        // Online softmax over the split's keys, in f32.
                        let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
                        let mut acc = vec![0.0f32; s.dim_v];
                        for j in keys {
                            let kj =
                                &k[((b * s.heads_kv + hk) * s.len_k + j) * s.dim_qk..][..s.dim_qk];
                            let score = scale * qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f32>();
                            let m_new = m.max(score);
                            let alpha = (m - m_new).exp();
                            let p = (score - m_new).exp();
                            l = l * alpha + p;
                            let vj =
                                &v[((b * s.heads_kv + hk) * s.len_k + j) * s.dim_v..][..s.dim_v];
                            for (a, &x) in acc.iter_mut().zip(vj) {
                                *a = *a * alpha + p * x;
                            }
                            m = m_new;
                        }
                        if l > 0.0 {
                            Partial {
                                o: acc.iter().map(|a| a / l).collect(),
                                lse: m + l.ln(),
                            }
                        } else {
                            Partial {
                                o: vec![0.0; s.dim_v],
                                lse: f32::NEG_INFINITY,
                            }
                        }
                    })
                    .collect();
                let (oi, li) = merge(&parts, s.dim_v);
                let row = (b * s.heads_q + h) * s.len_q + i;
                o[row * s.dim_v..(row + 1) * s.dim_v].copy_from_slice(&oi);
                lse[row] = li;
            }
        }
    }
    (o, lse)
}
