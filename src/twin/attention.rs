//! CPU twin of the fused attention forward (FlashAttention-2 schedule), in f32 with the
//! kernel's exact algorithm, for the dense kernel of issue 3 to be written against:
//!
//! - one query block of `block_q` rows per (batch, head, block) program; key tiles of
//!   `block_k` keys, walked in order;
//! - key tiles holding no key any row of the block may see (beyond the causal diagonal, outside
//!   the sliding window) are skipped (never computed): the block's tiles are
//!   [`KeyBand::key_tiles`](crate::key_band::KeyBand::key_tiles); tiles that straddle the diagonal, a window edge or the end of the
//!   keys are masked element by element by assignment to −inf, the rest
//!   ([`KeyBand::tile_is_full`](crate::key_band::KeyBand::tile_is_full)) run unmasked;
//! - online softmax in the exp2 domain on raw scores: running max m (raw units), running sum l,
//!   unnormalised O; `mu = 0` when the running max is still −inf, so −inf − −inf never happens;
//! - P is rounded to the input dtype before P·V (the tensor cores take f16/bf16), while l sums
//!   the f32 P, as the kernel does;
//! - V rows outside the block's admissible keys
//!   ([`KeyBand::keys_of_rows`](crate::key_band::KeyBand::keys_of_rows)) are read as zero,
//!   so NaN in keys that no query of the block may see cannot reach the output through 0·NaN;
//! - finalisation: O /= l, LSE = scale·m + ln l; a row with l = 0 gives O = 0 and LSE = −inf.
//!
//! Inputs follow [`crate::reference::attention`] (BHSD, values already rounded to the dtype).

use crate::dtype::DType;
use crate::reference::attention::{Options, Shape};

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
    /// Tiles never computed because the causal or window mask (or, in the sparse twin, the
    /// layout) removes them entirely.
    pub skipped: usize,
}

/// One query block's running state: the online softmax of rows `row0 .. row0 + rows`.
pub(crate) struct BlockState {
    row0: usize,
    rows: usize,
    dim_v: usize,
    /// Running max of the raw scores (−inf until a key is seen).
    m: Vec<f32>,
    /// Running sum of exp2(c·(s − m)).
    l: Vec<f32>,
    /// Unnormalised O, `rows × dim_v`.
    acc: Vec<f32>,
}

/// One (batch, query head) program's operands: its Q rows, and its K/V head.
pub(crate) struct HeadOperands<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub dim_qk: usize,
}

impl<'a> HeadOperands<'a> {
    /// The operands of batch entry `b`, query head `h` in the BHSD inputs of `s`.
    pub fn new(q: &'a [f32], k: &'a [f32], v: &'a [f32], s: &Shape, b: usize, h: usize) -> Self {
        let hk = h / (s.heads_q / s.heads_kv);
        let q0 = (b * s.heads_q + h) * s.len_q * s.dim_qk;
        let k0 = (b * s.heads_kv + hk) * s.len_k * s.dim_qk;
        let v0 = (b * s.heads_kv + hk) * s.len_k * s.dim_v;
        HeadOperands {
            q: &q[q0..q0 + s.len_q * s.dim_qk],
            k: &k[k0..k0 + s.len_k * s.dim_qk],
            v: &v[v0..v0 + s.len_k * s.dim_v],
            dim_qk: s.dim_qk,
        }
    }
}

impl BlockState {
    pub fn new(row0: usize, rows: usize, dim_v: usize) -> Self {
        BlockState {
            row0,
            rows,
            dim_v,
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            acc: vec![0.0; rows * dim_v],
        }
    }

    /// Folds key tile `key0 .. key0 + block_k` into the state. `keep`: the element mask of a
    /// masked tile (masked scores are assigned −inf without reading K); `None` for a tile that
    /// runs unmasked, whose keys must all be valid. `read_v(j)`: whether V row `j` is loaded;
    /// rows not loaded act as zero, as the kernel zero-fills rows no query of the block sees.
    #[allow(clippy::too_many_arguments)]
    pub fn fold_tile(
        &mut self,
        ops: &HeadOperands,
        key0: usize,
        block_k: usize,
        c: f32,
        dtype: DType,
        keep: Option<&dyn Fn(usize, usize) -> bool>,
        read_v: &dyn Fn(usize) -> bool,
    ) {
        let (d, dv) = (ops.dim_qk, self.dim_v);
        let mut st = vec![f32::NEG_INFINITY; block_k];
        for r in 0..self.rows {
            let i = self.row0 + r;
            // Scores of this tile (raw, f32), masked by assignment.
            for (jj, sc) in st.iter_mut().enumerate() {
                let j = key0 + jj;
                *sc = f32::NEG_INFINITY;
                if keep.is_some_and(|keep| !keep(i, j)) {
                    continue;
                }
                let qi = &ops.q[i * d..(i + 1) * d];
                let kj = &ops.k[j * d..(j + 1) * d];
                *sc = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
            }
            let mt = st.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let m_new = self.m[r].max(mt);
            let mu = if m_new == f32::NEG_INFINITY {
                0.0
            } else {
                m_new
            };
            let alpha = (c * (self.m[r] - mu)).exp2();
            self.l[r] *= alpha;
            let acc = &mut self.acc[r * dv..(r + 1) * dv];
            acc.iter_mut().for_each(|a| *a *= alpha);
            for (jj, &sc) in st.iter().enumerate() {
                let p = (sc * c - mu * c).exp2();
                self.l[r] += p;
                let j = key0 + jj;
                if !read_v(j) {
                    continue; // V row read as zero: p·0 adds nothing
                }
                let p_in = dtype.round(p);
                let vj = &ops.v[j * dv..(j + 1) * dv];
                for (a, &vv) in acc.iter_mut().zip(vj) {
                    *a += p_in * vv;
                }
            }
            self.m[r] = m_new;
        }
    }

    /// O /= l, LSE = scale·m + ln l; a row with l = 0 gives O = 0 and LSE = −inf. `o` and
    /// `lse` are the head's rows (`len_q × dim_v` and `len_q`).
    pub fn finish(&self, scale: f32, dtype: DType, o: &mut [f32], lse: &mut [f32]) {
        let dv = self.dim_v;
        for r in 0..self.rows {
            let i = self.row0 + r;
            let o_row = &mut o[i * dv..(i + 1) * dv];
            if self.l[r] > 0.0 {
                let inv = 1.0 / self.l[r];
                for (o, a) in o_row.iter_mut().zip(&self.acc[r * dv..(r + 1) * dv]) {
                    *o = dtype.round(a * inv);
                }
                lse[i] = scale * self.m[r] + self.l[r].ln();
            } else {
                o_row.iter_mut().for_each(|o| *o = 0.0);
                lse[i] = f32::NEG_INFINITY;
            }
        }
    }
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
    let scale = opts.scale as f32;
    let c = scale * std::f32::consts::LOG2_E; // exp(scale·x) = 2^(c·x)
    let mut out = Output {
        o: vec![f32::NAN; s.o_len()],
        lse: vec![f32::NAN; s.lse_len()],
    };
    let mut counts = TileCounts::default();

    for b in 0..s.batch {
        let band = opts.key_band(s, b);
        let n_tiles = band.key_len.div_ceil(bn);
        for h in 0..s.heads_q {
            let ops = HeadOperands::new(q, k, v, s, b, h);
            let o_head = (b * s.heads_q + h) * s.len_q;
            for mb in 0..s.len_q.div_ceil(bm) {
                let rows = mb * bm..(s.len_q).min((mb + 1) * bm);
                // Tiles holding no key any row of the block sees are skipped; V rows outside
                // the block's keys are zero.
                let tiles = band.key_tiles(rows.clone(), bn);
                let kv = band.keys_of_rows(rows.clone());
                counts.skipped += n_tiles - tiles.len();

                let mut state = BlockState::new(rows.start, rows.len(), s.dim_v);
                for n in tiles {
                    let masked = !band.tile_is_full(rows.clone(), n, bn);
                    if masked {
                        counts.masked += 1;
                    } else {
                        counts.full += 1;
                    }
                    let keep = |i: usize, j: usize| band.admits(i, j);
                    state.fold_tile(
                        &ops,
                        n * bn,
                        bn,
                        c,
                        dtype,
                        masked.then_some(&keep as &dyn Fn(usize, usize) -> bool),
                        &|j| kv.contains(&j),
                    );
                }
                state.finish(
                    scale,
                    dtype,
                    &mut out.o[o_head * s.dim_v..(o_head + s.len_q) * s.dim_v],
                    &mut out.lse[o_head..o_head + s.len_q],
                );
            }
        }
    }
    (out, counts)
}
