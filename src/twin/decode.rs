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
//! (docs/kernels/attention-forward.md, split-KV.) Inputs follow [`crate::reference::attention`].

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

// The kernel's geometry and the split planner are shared with the op (crate::decode_plan).
pub use crate::decode_plan::{
    plan_splits, Geometry, MAX_SPLITS, MIN_KEYS_PER_SPLIT, SPLIT_TILE, THREADS,
};

/// Sum over a key group's `n` threads by xor butterflies, as `group_sum` in the kernel: every
/// thread ends with the same value.
fn group_sum(parts: &mut [f32]) -> f32 {
    let n = parts.len();
    let mut off = n / 2;
    while off > 0 {
        let prev = parts.to_vec();
        for (t, p) in parts.iter_mut().enumerate() {
            *p = prev[t] + prev[t ^ off];
        }
        off /= 2;
    }
    parts[0]
}

/// The kernel's `group_reduce_scatter` over a key group's lanes: `parts[t][i]` is lane t's
/// partial of score i (n scores, n ≤ lanes, powers of two). Each step halves the scores a lane
/// carries: at offset `off` a lane keeps the half its `off` bit selects, adds the partner's
/// value of the same scores, and sends the other half; once one score is left, butterflies.
/// Returns each lane's value: the full sum of score t / (lanes / n).
pub fn group_reduce_scatter(parts: &[Vec<f32>]) -> Vec<f32> {
    let lanes = parts.len();
    let mut x = parts.to_vec();
    let (mut half, mut off) = (parts.first().map_or(0, Vec::len) / 2, lanes / 2);
    while half >= 1 {
        let prev = x.clone();
        for (t, xt) in x.iter_mut().enumerate() {
            let upper = t & off != 0;
            for i in 0..half {
                let (kept, partner_sent) = if upper {
                    (prev[t][i + half], prev[t ^ off][i + half])
                } else {
                    (prev[t][i], prev[t ^ off][i])
                };
                xt[i] = kept + partner_sent;
            }
        }
        half /= 2;
        off /= 2;
    }
    let mut v: Vec<f32> = x.iter().map(|xt| xt[0]).collect();
    while off > 0 {
        let prev = v.clone();
        for (t, vt) in v.iter_mut().enumerate() {
            *vt = prev[t] + prev[t ^ off];
        }
        off /= 2;
    }
    v
}

/// Decode attention as kernels/decode.cu runs it: q [B, Hq, D], K and V [B, Hkv, capacity, D]
/// (BHSD, contiguous), sequence b attending to its first min(lens[b], capacity) cache rows.
/// Runs each block's key assignment, per-thread partial dot products, group butterflies (or
/// the reduce-scatter, whose sums are the butterflies' bit for bit), online softmax (exp2
/// domain, once per KPG keys; with `scatter_scores` one running sum per key slot), the
/// in-block group merge, and the split merge ([`merge`]; the kernel sums its Σ over lanes then a butterfly, the twin in order).
/// Returns O [B, Hq, D] and LSE [B, Hq] in f32.
#[allow(clippy::too_many_arguments)]
pub fn forward_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    lens: &[usize],
    scale: f32,
    splits: usize,
    geo: &Geometry,
) -> (Vec<f32>, Vec<f32>) {
    let s = shape;
    let (dim, cap) = (s.dim_qk, s.len_k);
    let group = s.heads_q / s.heads_kv;
    let (hd, tpk, vec, npk) = (
        geo.head_dim_tile,
        geo.threads_per_key,
        geo.vec,
        geo.packs_per_thread,
    );
    let c = scale * std::f32::consts::LOG2_E;
    let mut o = vec![f32::NAN; s.batch * s.heads_q * dim];
    let mut lse = vec![f32::NAN; s.batch * s.heads_q];
    for b in 0..s.batch {
        let len = lens[b].min(cap);
        for hk in 0..s.heads_kv {
            for chunk in 0..geo.head_chunks(group) {
                let h0 = hk * group + chunk * geo.heads_per_block;
                let nh = geo.heads_per_block.min(group - chunk * geo.heads_per_block);
                let mut parts: Vec<Vec<Partial>> = vec![Vec::new(); nh];
                for sp in 0..splits {
                    let r = split_range(sp, splits, len, SPLIT_TILE);
                    let qr: Vec<Vec<f32>> = (0..nh)
                        .map(|hh| {
                            let qh = &q[((b * s.heads_q + h0 + hh) * dim)..][..dim];
                            (0..hd)
                                .map(|d| if d < dim { c * qh[d] } else { 0.0 })
                                .collect()
                        })
                        .collect();
                    // Per group and head: m, l and O over the padded dims.
                    let mut m = vec![vec![f32::NEG_INFINITY; nh]; geo.groups];
                    let mut l = vec![vec![0.0f32; nh]; geo.groups];
                    // scatter_scores: the running sum of each (group, head, key slot).
                    let mut l_slot = vec![vec![vec![0.0f32; geo.keys_per_group]; nh]; geo.groups];
                    let mut acc = vec![vec![vec![0.0f32; hd]; nh]; geo.groups];
                    let row = |x: &[f32], j: usize| -> Vec<f32> {
                        let base = ((b * s.heads_kv + hk) * cap + j) * dim;
                        (0..hd)
                            .map(|d| if d < dim { x[base + d] } else { 0.0 })
                            .collect()
                    };
                    let mut base = r.start;
                    while base < r.end {
                        for g in 0..geo.groups {
                            let j0 = base + g * geo.keys_per_group;
                            let keys: Vec<Option<(Vec<f32>, Vec<f32>)>> = (0..geo.keys_per_group)
                                .map(|kk| {
                                    (j0 + kk < r.end).then(|| (row(k, j0 + kk), row(v, j0 + kk)))
                                })
                                .collect();
                            // Thread t's partials for head hh (zero q past nh) and key kk: its
                            // packs n, elements e, in order.
                            let partials = |hh: usize, kk: usize| -> Vec<f32> {
                                (0..tpk)
                                    .map(|t| {
                                        let mut pt = 0.0f32;
                                        for n in 0..npk {
                                            for e in 0..vec {
                                                let d = (t + n * tpk) * vec + e;
                                                let kd =
                                                    keys[kk].as_ref().map_or(0.0, |kv| kv.0[d]);
                                                let qd = qr.get(hh).map_or(0.0, |qh| qh[d]);
                                                pt = qd.mul_add(kd, pt);
                                            }
                                        }
                                        pt
                                    })
                                    .collect()
                            };
                            // scatter_scores: every (head, key) slot of the block's HPB heads,
                            // reduce-scattered lane by lane; slot i is read from lane i·REPL,
                            // as the kernel's broadcasts do.
                            let scattered: Vec<f32> = if geo.scatter_scores {
                                let kpg = geo.keys_per_group;
                                let slots = geo.heads_per_block * kpg;
                                let lane_parts: Vec<Vec<f32>> = {
                                    let per_slot: Vec<Vec<f32>> =
                                        (0..slots).map(|i| partials(i / kpg, i % kpg)).collect();
                                    (0..tpk)
                                        .map(|t| per_slot.iter().map(|ps| ps[t]).collect())
                                        .collect()
                                };
                                let lanes = group_reduce_scatter(&lane_parts);
                                (0..slots).map(|i| lanes[i * (tpk / slots)]).collect()
                            } else {
                                Vec::new()
                            };
                            for hh in 0..nh {
                                let mut sc = vec![f32::NEG_INFINITY; geo.keys_per_group];
                                let mut m_new = m[g][hh];
                                for (kk, key) in keys.iter().enumerate() {
                                    let dot = if geo.scatter_scores {
                                        scattered[hh * geo.keys_per_group + kk]
                                    } else {
                                        group_sum(&mut partials(hh, kk))
                                    };
                                    sc[kk] = if key.is_some() {
                                        dot
                                    } else {
                                        f32::NEG_INFINITY
                                    };
                                    m_new = m_new.max(sc[kk]);
                                }
                                let mu = if m_new == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    m_new
                                };
                                let alpha = (m[g][hh] - mu).exp2();
                                let p: Vec<f32> = sc.iter().map(|&x| (x - mu).exp2()).collect();
                                if geo.scatter_scores {
                                    for (ls, &pk) in l_slot[g][hh].iter_mut().zip(&p) {
                                        *ls = ls.mul_add(alpha, pk);
                                    }
                                } else {
                                    let psum = p.iter().fold(0.0f32, |a, &x| a + x);
                                    l[g][hh] = l[g][hh] * alpha + psum;
                                }
                                // The kernel skips this rescale while every alpha of the warp is
                                // 1; multiplying by 1 is exact, so the twin always rescales.
                                for (d, acc_d) in acc[g][hh].iter_mut().enumerate() {
                                    let mut a = *acc_d * alpha;
                                    for (kk, key) in keys.iter().enumerate() {
                                        let vd = key.as_ref().map_or(0.0, |kv| kv.1[d]);
                                        a = p[kk].mul_add(vd, a);
                                    }
                                    *acc_d = a;
                                }
                                m[g][hh] = m_new;
                            }
                        }
                        base += geo.block_keys();
                    }
                    // Merge the groups (fixed group order), as the end of the kernel's block.
                    if geo.scatter_scores {
                        for (lg, slots) in l.iter_mut().zip(&mut l_slot) {
                            for (lh, ls) in lg.iter_mut().zip(slots.iter_mut()) {
                                *lh = group_sum(ls);
                            }
                        }
                    }
                    for hh in 0..nh {
                        let mx = (0..geo.groups)
                            .map(|g| m[g][hh])
                            .fold(f32::NEG_INFINITY, f32::max);
                        let mu = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
                        let total = (0..geo.groups)
                            .fold(0.0f32, |a, g| a + (m[g][hh] - mu).exp2() * l[g][hh]);
                        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
                        let od: Vec<f32> = (0..dim)
                            .map(|d| {
                                let sum = (0..geo.groups).fold(0.0f32, |a, g| {
                                    a + acc[g][hh][d] * (m[g][hh] - mu).exp2()
                                });
                                sum * inv
                            })
                            .collect();
                        let part_lse = if total > 0.0 {
                            (mu + total.log2()) * std::f32::consts::LN_2
                        } else {
                            f32::NEG_INFINITY
                        };
                        parts[hh].push(Partial {
                            o: od,
                            lse: part_lse,
                        });
                    }
                }
                for (hh, ps) in parts.iter().enumerate() {
                    let row = b * s.heads_q + h0 + hh;
                    let (oi, li) = if splits == 1 {
                        (ps[0].o.clone(), ps[0].lse)
                    } else {
                        merge(ps, dim)
                    };
                    o[row * dim..(row + 1) * dim].copy_from_slice(&oi);
                    lse[row] = li;
                }
            }
        }
    }
    (o, lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn decode_reduce_scatter_gives_each_lane_the_butterfly_sum_of_its_score() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        for lanes in [8usize, 16, 32] {
            let mut n = 1;
            while n <= lanes {
                // Mixed magnitudes, so a different summation order would change bits.
                let parts: Vec<Vec<f32>> = (0..lanes)
                    .map(|_| {
                        (0..n)
                            .map(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-3..4)))
                            .collect()
                    })
                    .collect();
                let got = group_reduce_scatter(&parts);
                for (t, &g) in got.iter().enumerate() {
                    let score = t / (lanes / n);
                    let mut column: Vec<f32> = parts.iter().map(|p| p[score]).collect();
                    let want = group_sum(&mut column);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "lanes {lanes} scores {n} lane {t}"
                    );
                }
                n *= 2;
            }
        }
    }
}
