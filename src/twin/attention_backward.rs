//! CPU twin of the fused attention backward (`kernels/attention_bwd.cu`), in f32 with the
//! kernels' block loops, ranges and rounding points:
//!
//! - D_i = Σ dO_i∘O_i from O as stored (rounded to the dtype);
//! - dK/dV program per (batch, K/V head, key block of `block_k` keys): K/V rows outside the keys
//!   any query of the sequence sees are read as zero; it walks the query heads of the GQA group,
//!   and for each the query tiles (`block_q` rows) from the first query whose band reaches the
//!   block's first visible key to the last whose band reaches its last; whole tiles inside the
//!   band run unmasked, the others assign P = dS = 0 outside it;
//! - P = exp2(c·s − LSE·log2 e) with LSE = −inf read as +inf; dS = P(dP − D); P and dS are
//!   rounded to the dtype before they multiply dO, Q and K (the tensor cores take f16/bf16);
//! - dQ either by a second program per query block over the key tiles of its band
//!   ([`Mode::Deterministic`]) or summed into an f32 accumulator by the dK/dV programs
//!   ([`Mode::Atomic`]), then scaled and rounded;
//! - dK = scale·Σ dSᵀQ and dQ = scale·Σ dS·K are scaled once, at the end;
//! - head dims 129–256 ([`backward_split`], [`Columns`]): each program owns one block of 128
//!   columns of dK/dV (dQ), recomputes Sᵀ and dPᵀ over all columns, and reads the B operands
//!   of its accumulating GEMMs from its own columns; programs are enumerated by the kernels'
//!   flattened grid index ([`dkdv_program`], [`dq_program`]).
//!
//! Block-sparse layouts: [`backward_sparse`] (the same arithmetic over the kept blocks only).
//!
//! Inputs follow [`crate::reference::attention`] (BHSD, values already rounded to the dtype);
//! `o` and `lse` are the forward's ([`crate::twin::attention::forward`]).

use crate::dtype::DType;
use crate::reference::attention::{Options, Shape};
use crate::sparse::{BlockKind, BlockLayout, ElementMask};
use crate::{Error, Result};

/// Tile sizes of the kernels (the built kernels use 64 and 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Query rows per tile of the dK/dV program and per dQ program.
    pub block_q: usize,
    /// Keys per dK/dV program and per tile of the dQ program.
    pub block_k: usize,
}

/// How dQ is summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A second pass per query block over its key tiles: a fixed order.
    Deterministic,
    /// Added by the dK/dV programs into an f32 accumulator (atomics on the GPU).
    Atomic,
}

/// dQ, dK, dV rounded to the dtype, BHSD like Q, K, V.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Tiles the programs computed (for checking that masked-out tiles are skipped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Visits {
    /// (key block, query head, query tile) triples of the dK/dV programs (per column block).
    pub dkdv_tiles: usize,
    /// (query block, key tile) pairs of the dQ programs (deterministic mode; per column block).
    pub dq_tiles: usize,
}

/// The kernels' band of one sequence: keep j iff j < key_len, i + lo ≤ j ≤ i + hi, with the
/// open sides clamped as `dense_band` (attention_common.cuh) clamps them.
struct Band {
    lo: i64,
    hi: i64,
    key_len: i64,
}

impl Band {
    fn new(opts: &Options, s: &Shape, b: usize) -> Band {
        let kb = opts.key_band(s, b);
        let (len_q, key_len) = (s.len_q as i64, kb.key_len as i64);
        Band {
            lo: kb.lo.unwrap_or(i64::MIN).max(-len_q - 1),
            hi: kb.hi.unwrap_or(i64::MAX).min(key_len),
            key_len,
        }
    }
    fn keeps(&self, i: i64, j: i64) -> bool {
        j < self.key_len && j >= i + self.lo && j <= i + self.hi
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn lse_log2(lse: f32) -> f32 {
    if lse == f32::NEG_INFINITY {
        f32::INFINITY
    } else {
        lse * std::f32::consts::LOG2_E
    }
}

/// How the programs split the columns of dK, dV and dQ. The kernels for head dims up to 128
/// keep every column of a key's dK/dV (a query row's dQ) in one program; those for head dims
/// 129–256 give each program one block of `width` columns (`CUATTN_ATTN_BWD_COLS` = 128),
/// recomputing Sᵀ and dPᵀ over all columns in each.
///
/// - dK/dV grid: key block × column block × K/V head × batch, key blocks fastest, with
///   ⌈max(D, Dv)/width⌉ column blocks ([`dkdv_column_blocks`]); only the wider side has a
///   second block, so with D ≤ 128 < Dv the second block adds to dV only (and to nothing of
///   dK or dQ), and the other way round;
/// - dQ grid (deterministic mode): query block × column block × query head × batch, with
///   ⌈D/width⌉ column blocks ([`dq_column_blocks`]);
/// - column block c accumulates and writes columns [c·width, c·width + width) of each gradient
///   (cut at D or Dv), with the B operands of its accumulating GEMMs (dO and Q for dV and dK,
///   K for dQ) read from the same columns; the Sᵀ/dPᵀ (S/dP) products always run over all
///   columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    /// Columns per program (≥ 1); `usize::MAX`: no split.
    pub width: usize,
    /// An indexing bug to inject (tests prove the comparison catches it); `None` in the kernels.
    pub fault: Option<ColumnFault>,
}

/// Indexing bugs of a column split that the twin can reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnFault {
    /// Every column block reads its B operands from column 0 (the block's offset left out of
    /// the `ldmatrix.trans` addresses) while writing its own columns.
    OperandsFromColumnZero,
    /// The block's offset also applied to the Sᵀ/dPᵀ k-loop, so the scores of block c > 0
    /// miss the columns before c·width.
    KLoopOffset,
}

/// Columns per program of the head-dim-256 kernels (`CUATTN_ATTN_BWD_COLS`).
pub const KERNEL_COLUMNS: usize = 128;

impl Columns {
    /// One program per key block (query block) holds every column: the kernels up to HD 128.
    pub const WHOLE: Columns = Columns {
        width: usize::MAX,
        fault: None,
    };

    /// Blocks of `width` columns, without faults.
    pub fn blocks(width: usize) -> Columns {
        Columns {
            width: width.max(1),
            fault: None,
        }
    }

    /// The split the kernels use for `shape`: blocks of [`KERNEL_COLUMNS`] when D or Dv is
    /// above 128 (the HD 256 kernels), none otherwise.
    pub fn kernel(shape: &Shape) -> Columns {
        if shape.dim_qk.max(shape.dim_v) > KERNEL_COLUMNS {
            Columns::blocks(KERNEL_COLUMNS)
        } else {
            Columns::WHOLE
        }
    }
}

/// Column blocks of the dK/dV grid: ⌈max(D, Dv)/width⌉ (at least 1).
pub fn dkdv_column_blocks(dim_qk: usize, dim_v: usize, cols: Columns) -> usize {
    dim_qk.max(dim_v).max(1).div_ceil(cols.width)
}

/// Column blocks of the deterministic dQ grid: ⌈D/width⌉ (at least 1).
pub fn dq_column_blocks(dim_qk: usize, cols: Columns) -> usize {
    dim_qk.max(1).div_ceil(cols.width)
}

/// One CTA of a backward grid, from its flattened index (`blockIdx.x`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// Key block (dK/dV grid) or query block (dQ grid).
    pub block: usize,
    /// Column block.
    pub col: usize,
    /// K/V head (dK/dV grid) or query head (dQ grid).
    pub head: usize,
    pub batch: usize,
}

/// The dK/dV kernel's decomposition: key blocks fastest, then column blocks, K/V heads, batch.
pub fn dkdv_program(flat: usize, k_blocks: usize, col_blocks: usize, heads_kv: usize) -> Program {
    Program {
        block: flat % k_blocks,
        col: (flat / k_blocks) % col_blocks,
        head: (flat / (k_blocks * col_blocks)) % heads_kv,
        batch: flat / (k_blocks * col_blocks * heads_kv),
    }
}

/// The dQ kernel's decomposition: query blocks fastest (heaviest, i.e. last, first), then
/// column blocks, query heads, batch.
pub fn dq_program(flat: usize, q_blocks: usize, col_blocks: usize, heads_q: usize) -> Program {
    Program {
        block: q_blocks - 1 - flat % q_blocks,
        col: (flat / q_blocks) % col_blocks,
        head: (flat / (q_blocks * col_blocks)) % heads_q,
        batch: flat / (q_blocks * col_blocks * heads_q),
    }
}

/// Columns [c0, c0 + n) of a gradient of `dim` columns that column block `col` owns, and where
/// its B operands start (c0 in the kernels).
struct ColumnBlock {
    c0: usize,
    n: usize,
    operand0: usize,
    /// First column of the Sᵀ/dPᵀ k-loop (0 in the kernels).
    k0: usize,
}

impl Columns {
    fn block(&self, col: usize, dim: usize) -> ColumnBlock {
        // A block past the gradient's columns owns none (c0 clamped so slices stay in range).
        let c0 = col.saturating_mul(self.width).min(dim);
        ColumnBlock {
            c0,
            n: dim.saturating_sub(c0).min(self.width),
            operand0: if self.fault == Some(ColumnFault::OperandsFromColumnZero) {
                0
            } else {
                c0
            },
            k0: if self.fault == Some(ColumnFault::KLoopOffset) {
                c0.min(dim)
            } else {
                0
            },
        }
    }
}

/// Column `c` of a row as a shared-memory tile holds it: zero past the row's length (the tiles
/// are padded to the head-dim tile with zeros).
fn col(row: &[f32], c: usize) -> f32 {
    row.get(c).copied().unwrap_or(0.0)
}

/// The twin's backward with the kernels' tiles and no column split (head dims up to 128, or
/// any head dim as one program per block). `o` (rounded to `dtype`) and `lse` are the forward's
/// outputs for the same inputs and options.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
    tiling: Tiling,
    mode: Mode,
    dtype: DType,
) -> (Grads, Visits) {
    backward_split(
        q,
        k,
        v,
        o,
        lse,
        d_o,
        shape,
        opts,
        tiling,
        Columns::WHOLE,
        mode,
        dtype,
    )
}

/// The twin's backward with the columns of dK, dV and dQ split as `cols` says (the HD 256
/// kernels: [`Columns::kernel`]). The programs run in the order of their flattened grid index
/// and each does exactly its CTA's work: [`dkdv_program`] and [`dq_program`] give the
/// decomposition, [`Columns`] the column rules. Visits count tiles per program (so a split
/// counts each tile once per column block).
#[allow(clippy::too_many_arguments)]
pub fn backward_split(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
    tiling: Tiling,
    cols: Columns,
    mode: Mode,
    dtype: DType,
) -> (Grads, Visits) {
    let s = shape;
    let (bm, bn) = (tiling.block_q, tiling.block_k);
    let (d, dvn) = (s.dim_qk, s.dim_v);
    let scale = opts.scale as f32;
    let c = scale * std::f32::consts::LOG2_E;
    let group = s.heads_q / s.heads_kv;
    let mut visits = Visits::default();
    let mut g = Grads {
        dq: vec![f32::NAN; s.q_len()],
        dk: vec![f32::NAN; s.k_len()],
        dv: vec![f32::NAN; s.v_len()],
    };
    // D per (b, h, i), in the LSE layout.
    let delta: Vec<f32> = (0..s.lse_len())
        .map(|r| dot(&d_o[r * dvn..(r + 1) * dvn], &o[r * dvn..(r + 1) * dvn]))
        .collect();
    let mut dq_acc = vec![0.0f32; s.q_len()];
    let zeros = vec![0.0f32; d.max(dvn)];
    let len_q = s.len_q as i64;

    // ---- dK/dV (and in atomic mode dQ) programs ----
    let k_blocks = s.len_k.div_ceil(bn);
    let dkdv_cols = dkdv_column_blocks(d, dvn, cols);
    for flat in 0..k_blocks * dkdv_cols * s.heads_kv * s.batch {
        let pr = dkdv_program(flat, k_blocks, dkdv_cols, s.heads_kv);
        let (b, hk) = (pr.batch, pr.head);
        let (ck, cv) = (cols.block(pr.col, d), cols.block(pr.col, dvn));
        let band = Band::new(opts, s, b);
        let kv_lo = band.lo.max(0);
        let kv_hi = band.key_len.min(len_q + band.hi);
        let k_head = &k[(b * s.heads_kv + hk) * s.len_k * d..][..s.len_k * d];
        let v_head = &v[(b * s.heads_kv + hk) * s.len_k * dvn..][..s.len_k * dvn];
        // K/V row j as the dK/dV program loads it.
        let k_row = |j: i64| {
            if j >= kv_lo && j < kv_hi {
                &k_head[j as usize * d..(j as usize + 1) * d]
            } else {
                &zeros[..d]
            }
        };
        let v_row = |j: i64| {
            if j >= kv_lo && j < kv_hi {
                &v_head[j as usize * dvn..(j as usize + 1) * dvn]
            } else {
                &zeros[..dvn]
            }
        };
        let key0 = (pr.block * bn) as i64;
        let k_last = (key0 + bn as i64).min(kv_hi) - 1;
        let first = key0.max(kv_lo);
        let (mut m_begin, mut m_end) = (0, 0);
        if k_last >= first {
            let q_begin = (first - band.hi).max(0);
            let q_end = len_q.min(k_last - band.lo + 1);
            if q_end > q_begin {
                m_begin = q_begin / bm as i64;
                m_end = (q_end + bm as i64 - 1) / bm as i64;
            }
        }
        // The program's accumulators: its columns of dK and dV for its bn keys.
        let mut dk = vec![0.0f32; bn * ck.n];
        let mut dv = vec![0.0f32; bn * cv.n];
        for gi in 0..group {
            let h = hk * group + gi;
            let r0 = (b * s.heads_q + h) * s.len_q;
            for m in m_begin..m_end {
                visits.dkdv_tiles += 1;
                let q0 = m * bm as i64;
                let full = key0 + bn as i64 <= band.key_len
                    && q0 + bm as i64 <= len_q
                    && key0 >= q0 + bm as i64 - 1 + band.lo
                    && key0 + bn as i64 - 1 <= q0 + band.hi;
                for kk in 0..bn {
                    let key = key0 + kk as i64;
                    for qc in 0..bm {
                        let i = q0 + qc as i64;
                        let keep = full || (i < len_q && band.keeps(i, key));
                        if !keep {
                            continue; // P = dS = 0
                        }
                        let r = r0 + i as usize;
                        let (qi, doi) = (&q[r * d..(r + 1) * d], &d_o[r * dvn..(r + 1) * dvn]);
                        let (kj, vj) = (k_row(key), v_row(key));
                        // Sᵀ and dPᵀ over every column (from k0: only a fault moves it).
                        let p = (dot(&qi[ck.k0..], &kj[ck.k0..]) * c - lse_log2(lse[r])).exp2();
                        let ds = p * (dot(&doi[cv.k0..], &vj[cv.k0..]) - delta[r]);
                        let (p_in, ds_in) = (dtype.round(p), dtype.round(ds));
                        for (x, a) in dv[kk * cv.n..(kk + 1) * cv.n].iter_mut().enumerate() {
                            *a += p_in * col(doi, cv.operand0 + x);
                        }
                        for (x, a) in dk[kk * ck.n..(kk + 1) * ck.n].iter_mut().enumerate() {
                            *a += ds_in * col(qi, ck.operand0 + x);
                        }
                        if mode == Mode::Atomic {
                            for (x, a) in dq_acc[r * d + ck.c0..][..ck.n].iter_mut().enumerate() {
                                *a += ds_in * col(kj, ck.operand0 + x);
                            }
                        }
                    }
                }
            }
        }
        for kk in 0..bn.min(s.len_k - key0 as usize) {
            let j = key0 as usize + kk;
            let kr = ((b * s.heads_kv + hk) * s.len_k + j) * d + ck.c0;
            let vr = ((b * s.heads_kv + hk) * s.len_k + j) * dvn + cv.c0;
            for (out, &a) in g.dk[kr..kr + ck.n]
                .iter_mut()
                .zip(&dk[kk * ck.n..(kk + 1) * ck.n])
            {
                *out = dtype.round(a * scale);
            }
            for (out, &a) in g.dv[vr..vr + cv.n]
                .iter_mut()
                .zip(&dv[kk * cv.n..(kk + 1) * cv.n])
            {
                *out = dtype.round(a);
            }
        }
    }
    if mode == Mode::Atomic {
        for (out, &a) in g.dq.iter_mut().zip(&dq_acc) {
            *out = dtype.round(a * scale);
        }
        return (g, visits);
    }

    // ---- Deterministic dQ programs: per query block, the key tiles of its band ----
    let q_blocks = s.len_q.div_ceil(bm);
    let dq_cols = dq_column_blocks(d, cols);
    for flat in 0..q_blocks * dq_cols * s.heads_q * s.batch {
        let pr = dq_program(flat, q_blocks, dq_cols, s.heads_q);
        let (b, h) = (pr.batch, pr.head);
        let (ck, cv) = (cols.block(pr.col, d), cols.block(pr.col, dvn));
        let band = Band::new(opts, s, b);
        let hk = h / group;
        let r0 = (b * s.heads_q + h) * s.len_q;
        let k_head = &k[(b * s.heads_kv + hk) * s.len_k * d..][..s.len_k * d];
        let v_head = &v[(b * s.heads_kv + hk) * s.len_k * dvn..][..s.len_k * dvn];
        let q0 = (pr.block * bm) as i64;
        let q_last = len_q.min(q0 + bm as i64) - 1;
        let kb = (q0 + band.lo).max(0);
        let ke = band.key_len.min(q_last + band.hi + 1);
        let tiles = if ke > kb {
            kb / bn as i64..(ke + bn as i64 - 1) / bn as i64
        } else {
            0..0
        };
        let mut dq = vec![0.0f32; bm * ck.n];
        for n in tiles {
            visits.dq_tiles += 1;
            let key0 = n * bn as i64;
            let full = q_last + band.lo <= key0
                && key0 + bn as i64 - 1 <= q0 + band.hi
                && key0 + bn as i64 <= band.key_len;
            for row in 0..bm {
                let i = q0 + row as i64;
                if i >= len_q {
                    continue; // computed on the GPU (P = 0 there), never written
                }
                let r = r0 + i as usize;
                let (qi, doi) = (&q[r * d..(r + 1) * d], &d_o[r * dvn..(r + 1) * dvn]);
                for kk in 0..bn {
                    let j = key0 + kk as i64;
                    if !(full || band.keeps(i, j)) {
                        continue;
                    }
                    let loaded = j >= kb && j < ke;
                    let kj = if loaded {
                        &k_head[j as usize * d..][..d]
                    } else {
                        &zeros[..d]
                    };
                    let vj = if loaded {
                        &v_head[j as usize * dvn..][..dvn]
                    } else {
                        &zeros[..dvn]
                    };
                    let p = (dot(&qi[ck.k0..], &kj[ck.k0..]) * c - lse_log2(lse[r])).exp2();
                    let ds = dtype.round(p * (dot(&doi[cv.k0..], &vj[cv.k0..]) - delta[r]));
                    for (x, a) in dq[row * ck.n..(row + 1) * ck.n].iter_mut().enumerate() {
                        *a += ds * col(kj, ck.operand0 + x);
                    }
                }
            }
        }
        for row in 0..bm.min(s.len_q - q0 as usize) {
            let r = r0 + q0 as usize + row;
            for (out, &a) in g.dq[r * d + ck.c0..][..ck.n]
                .iter_mut()
                .zip(&dq[row * ck.n..(row + 1) * ck.n])
            {
                *out = dtype.round(a * scale);
            }
        }
    }
    (g, visits)
}

/// The keys of block `k_block` (`bs` of them from `key0`) whose K/V rows a kernel loads for a
/// kept block of `kind` at query block `q_block`: those some query row of the block may keep,
/// as the kernels bound them (a band's keys `[q0 + lo, q_last + hi]`, a bitmask's union of rows,
/// every key of a full or key-tail block), all cut at `key_len`.
fn block_keys(
    layout: &BlockLayout,
    kind: BlockKind,
    q_block: usize,
    k_block: usize,
    key_len: usize,
) -> Vec<bool> {
    let bs = layout.block_size();
    let (q0, key0) = ((q_block * bs) as i64, (k_block * bs) as i64);
    let q_last = (layout.len_q() as i64).min(q0 + bs as i64) - 1;
    (0..bs)
        .map(|c| {
            let j = key0 + c as i64;
            j < key_len as i64
                && match kind {
                    BlockKind::Full | BlockKind::Partial(ElementMask::KeyTail) => true,
                    BlockKind::Partial(ElementMask::Band { lo, hi }) => {
                        j >= q0 + lo && j <= q_last + hi
                    }
                    BlockKind::Partial(ElementMask::Bits { index }) => {
                        let words = layout.words_per_row();
                        (0..bs).any(|r| {
                            layout.bits()[(index * bs + r) * words + c / 64] >> (c % 64) & 1 == 1
                        })
                    }
                }
        })
        .collect()
}

/// The twin of the block-sparse backward with the layout's own blocks as tiles and no column
/// split: [`backward_sparse_tiled`] with `tile` = the layout's block size and
/// [`Columns::WHOLE`].
#[allow(clippy::too_many_arguments)]
pub fn backward_sparse(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
    layout: &BlockLayout,
    mode: Mode,
    dtype: DType,
) -> Result<(Grads, Visits)> {
    backward_sparse_tiled(
        q,
        k,
        v,
        o,
        lse,
        d_o,
        shape,
        opts,
        layout,
        layout.block_size(),
        Columns::WHOLE,
        mode,
        dtype,
    )
}

/// The kernels' tile of the block-sparse backward (`CUATTN_ATTN_BWD_SPARSE_BS`).
pub const KERNEL_SPARSE_TILE: usize = 64;

/// The twin of the block-sparse backward (`attention_bwd.cu`, SPARSE entries) as the kernels
/// run it: the layout is re-blocked to square tiles of `tile` ([`BlockLayout::reblocked`], what
/// the host does for a layout whose block size is not the kernels' [`KERNEL_SPARSE_TILE`]),
/// and the programs walk the re-blocked layout's kept tiles, in the order of their flattened
/// grid index, with the columns split as `cols` says (the HD 256 entries:
/// [`Columns::kernel`]):
///
/// - dK/dV program per (key tile, column block, K/V head, batch) ([`dkdv_program`]): a key
///   tile wholly past the sequence's key length writes zeros; otherwise the K/V rows loaded are
///   the keys some visited tile may keep ([`block_keys`], OR-ed over the column), the rest read
///   as zero; for each query head of the GQA group it walks the query tiles that keep the key
///   tile, in ascending order, from the re-blocked layout's transposed index
///   ([`BlockLayout::columns`]);
/// - dQ program per (query tile, column block, query head, batch) ([`dq_program`]) over the
///   row's kept key tiles, ascending (the forward's walk), skipping tiles past the key length;
/// - a full tile inside both lengths runs unmasked; every other tile keeps (i, j) iff
///   i < len_q, j < key_len and its element mask admits it ([`BlockLayout::kind_admits`]);
/// - column block c accumulates its columns of dK/dV (dQ) with the B operands from the same
///   columns, Sᵀ/dPᵀ over all columns (as [`backward_split`]);
/// - arithmetic and rounding points as in [`backward`].
///
/// `o` and `lse` are the sparse forward's ([`crate::twin::sparse_attention::forward`]).
/// Errors if the layout does not fit the call, `tile` is not a supported block size, or `opts`
/// carries a causal or window mask (a sparse call's masks are in its layout).
#[allow(clippy::too_many_arguments)]
pub fn backward_sparse_tiled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
    layout: &BlockLayout,
    tile: usize,
    cols: Columns,
    mode: Mode,
    dtype: DType,
) -> Result<(Grads, Visits)> {
    layout.check_call(shape, layout.block_size())?;
    if opts.causal.is_some() || opts.window.is_some() {
        return Err(Error::invalid(
            "opts",
            "a sparse call's causal and window masks belong in its layout",
        ));
    }
    let layout = &layout.reblocked(tile)?;
    let bs = tile;
    let s = shape;
    let index = layout.columns();
    let (d, dvn) = (s.dim_qk, s.dim_v);
    let scale = opts.scale as f32;
    let c = scale * std::f32::consts::LOG2_E;
    let group = s.heads_q / s.heads_kv;
    let mut visits = Visits::default();
    let mut g = Grads {
        dq: vec![f32::NAN; s.q_len()],
        dk: vec![f32::NAN; s.k_len()],
        dv: vec![f32::NAN; s.v_len()],
    };
    let delta: Vec<f32> = (0..s.lse_len())
        .map(|r| dot(&d_o[r * dvn..(r + 1) * dvn], &o[r * dvn..(r + 1) * dvn]))
        .collect();
    let mut dq_acc = vec![0.0f32; s.q_len()];
    let zeros = vec![0.0f32; d.max(dvn)];
    let len_q = s.len_q;
    let key_len_of = |b: usize| {
        opts.key_lens
            .as_ref()
            .map_or(s.len_k, |l| l[b].min(s.len_k))
    };
    // Whether (i, j) of kept tile `kind` at (qb, kb) is computed; `full`: unmasked tile.
    let keeps = |kind: BlockKind, qb: usize, kb: usize, full: bool, key_len: usize, i, j| {
        full || (i < len_q && j < key_len && layout.kind_admits(kind, qb, kb, i, j))
    };
    let is_full = |kind: BlockKind, qb: usize, kb: usize, key_len: usize| {
        kind == BlockKind::Full && (kb + 1) * bs <= key_len && (qb + 1) * bs <= len_q
    };

    // ---- dK/dV (and in atomic mode dQ) programs ----
    let k_tiles = layout.k_blocks();
    let dkdv_cols = dkdv_column_blocks(d, dvn, cols);
    for flat in 0..k_tiles * dkdv_cols * s.heads_kv * s.batch {
        let pr = dkdv_program(flat, k_tiles, dkdv_cols, s.heads_kv);
        let (b, hk, kb) = (pr.batch, pr.head, pr.block);
        let (ck, cv) = (cols.block(pr.col, d), cols.block(pr.col, dvn));
        let key_len = key_len_of(b);
        let k_head = &k[(b * s.heads_kv + hk) * s.len_k * d..][..s.len_k * d];
        let v_head = &v[(b * s.heads_kv + hk) * s.len_k * dvn..][..s.len_k * dvn];
        let key0 = kb * bs;
        // The program's accumulators: its columns of dK and dV for its bs keys.
        let mut dk = vec![0.0f32; bs * ck.n];
        let mut dv = vec![0.0f32; bs * cv.n];
        if key0 < key_len {
            let mut seen = vec![false; bs];
            for gi in 0..group {
                let head = layout.head_of(hk * group + gi);
                let (qbs, xs) = index.column(head, kb);
                for (&qb, &x) in qbs.iter().zip(xs) {
                    let keys = block_keys(layout, layout.kinds()[x], qb, kb, key_len);
                    seen.iter_mut().zip(keys).for_each(|(a, k)| *a |= k);
                }
            }
            let k_row = |kk: usize| {
                if seen[kk] {
                    &k_head[(key0 + kk) * d..(key0 + kk + 1) * d]
                } else {
                    &zeros[..d]
                }
            };
            let v_row = |kk: usize| {
                if seen[kk] {
                    &v_head[(key0 + kk) * dvn..(key0 + kk + 1) * dvn]
                } else {
                    &zeros[..dvn]
                }
            };
            for gi in 0..group {
                let h = hk * group + gi;
                let r0 = (b * s.heads_q + h) * s.len_q;
                let (qbs, xs) = index.column(layout.head_of(h), kb);
                for (&qb, &x) in qbs.iter().zip(xs) {
                    visits.dkdv_tiles += 1;
                    let kind = layout.kinds()[x];
                    let full = is_full(kind, qb, kb, key_len);
                    let q0 = qb * bs;
                    for kk in 0..bs {
                        for qc in 0..bs {
                            let i = q0 + qc;
                            if !keeps(kind, qb, kb, full, key_len, i, key0 + kk) {
                                continue; // P = dS = 0
                            }
                            let r = r0 + i;
                            let (qi, doi) = (&q[r * d..(r + 1) * d], &d_o[r * dvn..(r + 1) * dvn]);
                            let (kj, vj) = (k_row(kk), v_row(kk));
                            // Sᵀ and dPᵀ over every column (from k0: only a fault moves it).
                            let p = (dot(&qi[ck.k0..], &kj[ck.k0..]) * c - lse_log2(lse[r])).exp2();
                            let ds = p * (dot(&doi[cv.k0..], &vj[cv.k0..]) - delta[r]);
                            let (p_in, ds_in) = (dtype.round(p), dtype.round(ds));
                            for (x, a) in dv[kk * cv.n..(kk + 1) * cv.n].iter_mut().enumerate() {
                                *a += p_in * col(doi, cv.operand0 + x);
                            }
                            for (x, a) in dk[kk * ck.n..(kk + 1) * ck.n].iter_mut().enumerate() {
                                *a += ds_in * col(qi, ck.operand0 + x);
                            }
                            if mode == Mode::Atomic {
                                for (x, a) in dq_acc[r * d + ck.c0..][..ck.n].iter_mut().enumerate()
                                {
                                    *a += ds_in * col(kj, ck.operand0 + x);
                                }
                            }
                        }
                    }
                }
            }
        }
        for kk in 0..bs.min(s.len_k - key0) {
            let j = key0 + kk;
            let kr = ((b * s.heads_kv + hk) * s.len_k + j) * d + ck.c0;
            let vr = ((b * s.heads_kv + hk) * s.len_k + j) * dvn + cv.c0;
            for (out, &a) in g.dk[kr..kr + ck.n]
                .iter_mut()
                .zip(&dk[kk * ck.n..(kk + 1) * ck.n])
            {
                *out = dtype.round(a * scale);
            }
            for (out, &a) in g.dv[vr..vr + cv.n]
                .iter_mut()
                .zip(&dv[kk * cv.n..(kk + 1) * cv.n])
            {
                *out = dtype.round(a);
            }
        }
    }
    if mode == Mode::Atomic {
        for (out, &a) in g.dq.iter_mut().zip(&dq_acc) {
            *out = dtype.round(a * scale);
        }
        return Ok((g, visits));
    }

    // ---- Deterministic dQ programs: per query tile, its row's kept key tiles ----
    let q_tiles = layout.q_blocks();
    let dq_cols = dq_column_blocks(d, cols);
    for flat in 0..q_tiles * dq_cols * s.heads_q * s.batch {
        let pr = dq_program(flat, q_tiles, dq_cols, s.heads_q);
        let (b, h, qb) = (pr.batch, pr.head, pr.block);
        let (ck, cv) = (cols.block(pr.col, d), cols.block(pr.col, dvn));
        let key_len = key_len_of(b);
        let hk = h / group;
        let r0 = (b * s.heads_q + h) * s.len_q;
        let k_head = &k[(b * s.heads_kv + hk) * s.len_k * d..][..s.len_k * d];
        let v_head = &v[(b * s.heads_kv + hk) * s.len_k * dvn..][..s.len_k * dvn];
        let q0 = qb * bs;
        let mut dq = vec![0.0f32; bs * ck.n];
        let (kbs, kinds) = layout.row(layout.head_of(h), qb);
        for (&kb, &kind) in kbs.iter().zip(kinds) {
            let key0 = kb * bs;
            if key0 >= key_len {
                continue; // wholly in the key padding
            }
            visits.dq_tiles += 1;
            let seen = block_keys(layout, kind, qb, kb, key_len);
            let full = is_full(kind, qb, kb, key_len);
            for row in 0..bs.min(len_q - q0) {
                let i = q0 + row;
                let r = r0 + i;
                let (qi, doi) = (&q[r * d..(r + 1) * d], &d_o[r * dvn..(r + 1) * dvn]);
                for (kk, &loaded) in seen.iter().enumerate() {
                    let j = key0 + kk;
                    if !keeps(kind, qb, kb, full, key_len, i, j) {
                        continue;
                    }
                    let kj = if loaded {
                        &k_head[j * d..][..d]
                    } else {
                        &zeros[..d]
                    };
                    let vj = if loaded {
                        &v_head[j * dvn..][..dvn]
                    } else {
                        &zeros[..dvn]
                    };
                    let p = (dot(&qi[ck.k0..], &kj[ck.k0..]) * c - lse_log2(lse[r])).exp2();
                    let ds = dtype.round(p * (dot(&doi[cv.k0..], &vj[cv.k0..]) - delta[r]));
                    for (x, a) in dq[row * ck.n..(row + 1) * ck.n].iter_mut().enumerate() {
                        *a += ds * col(kj, ck.operand0 + x);
                    }
                }
            }
        }
        for row in 0..bs.min(len_q - q0) {
            let r = r0 + q0 + row;
            for (out, &a) in g.dq[r * d + ck.c0..][..ck.n]
                .iter_mut()
                .zip(&dq[row * ck.n..(row + 1) * ck.n])
            {
                *out = dtype.round(a * scale);
            }
        }
    }
    Ok((g, visits))
}
