//! CPU twin of the fused attention forward (FlashAttention-2 schedule), in f32 with the
//! kernel's exact algorithm, for the dense kernel of issue 3 to be written against:
//!
//! - one query block of `block_q` rows per (batch, head, block) program; key tiles of
//!   `block_k` keys, walked in order;
//! - causal tiles beyond the block's last admissible key are skipped (never computed), tiles
//!   that straddle the diagonal or the end of the keys are masked element by element by
//!   assignment to −inf, the rest run unmasked;
//! - online softmax in the exp2 domain on raw scores: running max m (raw units), running sum l,
//!   unnormalised O; `mu = 0` when the running max is still −inf, so −inf − −inf never happens;
//! - P is rounded to the input dtype before P·V (the tensor cores take f16/bf16), while l sums
//!   the f32 P, as the kernel does;
//! - V rows past the block's last admissible key are read as zero, so NaN in keys that no query
//!   of the block may see cannot reach the output through 0·NaN;
//! - finalisation: O /= l, LSE = scale·m + ln l; a row with l = 0 gives O = 0 and LSE = −inf.
//!
//! Inputs follow [`crate::reference::attention`] (BHSD, values already rounded to the dtype).

use crate::dtype::DType;
use crate::reference::attention::{CausalAlign, Options, Shape};

/// Tile sizes of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub block_q: usize,
    pub block_k: usize,
}

/// O (rounded to the dtype) and LSE (f32), BHSD as in the reference.
#[derive(Clone, Debug)]
pub struct Output {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// How many key tiles the programs computed, masked and skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TileCounts {
    /// Tiles computed without any element mask.
    pub full: usize,
    /// Tiles computed with the element mask (diagonal or key tail).
    pub masked: usize,
    /// Tiles never computed because the causal mask removes them entirely.
    pub skipped: usize,
}

/// ceil(a / b) for a possibly negative `a` and positive `b`.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1).div_euclid(b)
}

/// The twin's forward. Returns the outputs and the tile counts.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    opts: &Options,
    tiling: Tiling,
    dtype: DType,
) -> (Output, TileCounts) {
    let s = shape;
    let (bm, bn) = (tiling.block_q, tiling.block_k);
    let group = s.heads_q / s.heads_kv;
    let scale = opts.scale as f32;
    let c = scale * std::f32::consts::LOG2_E; // exp(scale·x) = 2^(c·x)
    let mut out = Output {
        o: vec![f32::NAN; s.o_len()],
        lse: vec![f32::NAN; s.lse_len()],
    };
    let mut counts = TileCounts::default();

    for b in 0..s.batch {
        let key_len = opts
            .key_lens
            .as_ref()
            .map_or(s.len_k, |l| l[b].min(s.len_k));
        let off: i64 = match opts.causal {
            Some(CausalAlign::BottomRight) => key_len as i64 - s.len_q as i64,
            _ => 0,
        };
        let n_tiles = key_len.div_ceil(bn) as i64;
        for h in 0..s.heads_q {
            let hk = h / group;
            let q_base = (b * s.heads_q + h) * s.len_q * s.dim_qk;
            let k_base = (b * s.heads_kv + hk) * s.len_k * s.dim_qk;
            let v_base = (b * s.heads_kv + hk) * s.len_k * s.dim_v;
            let o_base = (b * s.heads_q + h) * s.len_q * s.dim_v;
            let lse_base = (b * s.heads_q + h) * s.len_q;
            for mb in 0..s.len_q.div_ceil(bm) {
                let row0 = mb * bm;
                let rows = bm.min(s.len_q - row0);
                // Tiles past the block's last admissible key are skipped; V rows past it are zero.
                let (n_max, kv_end) = if opts.causal.is_some() {
                    let last_key_excl = (row0 + rows) as i64 + off; // last row's keys end here
                    let n_max = n_tiles
                        .min(ceil_div((row0 + bm) as i64 + off, bn as i64))
                        .max(0);
                    (
                        n_max as usize,
                        last_key_excl.clamp(0, key_len as i64) as usize,
                    )
                } else {
                    (n_tiles as usize, key_len)
                };
                counts.skipped += n_tiles as usize - n_max;

                let mut m = vec![f32::NEG_INFINITY; rows];
                let mut l = vec![0.0f32; rows];
                let mut acc = vec![0.0f32; rows * s.dim_v];
                for n in 0..n_max {
                    let key0 = n * bn;
                    let diag =
                        opts.causal.is_some() && ((n + 1) * bn) as i64 - 1 > row0 as i64 + off;
                    let tail = (n + 1) * bn > key_len;
                    if diag || tail {
                        counts.masked += 1;
                    } else {
                        counts.full += 1;
                    }
                    for r in 0..rows {
                        let i = row0 + r;
                        // Scores of this tile (raw, f32), masked by assignment.
                        let mut st = vec![f32::NEG_INFINITY; bn];
                        for (jj, sc) in st.iter_mut().enumerate() {
                            let j = key0 + jj;
                            let masked = j >= key_len
                                || (opts.causal.is_some() && j as i64 > i as i64 + off);
                            if (diag || tail) && masked {
                                continue;
                            }
                            let qi = &q[q_base + i * s.dim_qk..q_base + (i + 1) * s.dim_qk];
                            let kj = &k[k_base + j * s.dim_qk..k_base + (j + 1) * s.dim_qk];
                            *sc = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                        }
                        let mt = st.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let m_new = m[r].max(mt);
                        let mu = if m_new == f32::NEG_INFINITY {
                            0.0
                        } else {
                            m_new
                        };
                        let alpha = (c * (m[r] - mu)).exp2();
                        l[r] *= alpha;
                        acc[r * s.dim_v..(r + 1) * s.dim_v]
                            .iter_mut()
                            .for_each(|a| *a *= alpha);
                        for (jj, &sc) in st.iter().enumerate() {
                            let p = (sc * c - mu * c).exp2();
                            l[r] += p;
                            let j = key0 + jj;
                            if j >= kv_end {
                                continue; // V row read as zero: p·0 adds nothing
                            }
                            let p_in = dtype.round(p);
                            let vj = &v[v_base + j * s.dim_v..v_base + (j + 1) * s.dim_v];
                            for (a, &vv) in acc[r * s.dim_v..(r + 1) * s.dim_v].iter_mut().zip(vj) {
                                *a += p_in * vv;
                            }
                        }
                        m[r] = m_new;
                    }
                }
                for r in 0..rows {
                    let i = row0 + r;
                    let o_row = &mut out.o[o_base + i * s.dim_v..o_base + (i + 1) * s.dim_v];
                    if l[r] > 0.0 {
                        let inv = 1.0 / l[r];
                        for (o, a) in o_row.iter_mut().zip(&acc[r * s.dim_v..(r + 1) * s.dim_v]) {
                            *o = dtype.round(a * inv);
                        }
                        out.lse[lse_base + i] = scale * m[r] + l[r].ln();
                    } else {
                        o_row.iter_mut().for_each(|o| *o = 0.0);
                        out.lse[lse_base + i] = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
    (out, counts)
}
