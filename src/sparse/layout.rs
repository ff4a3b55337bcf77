//! The block-sparse layout type: which key blocks each query block keeps, and how the kept
//! blocks are masked inside.
//!
//! Queries and keys are cut into square blocks of `block_size` tokens (the kernel's tile); the
//! last block of either side may be short. For each query block the layout lists the key blocks
//! it keeps, sorted ascending, as compressed rows (CSR): row `(head, q_block)` is
//! `col_indices[row_offsets[r] .. row_offsets[r + 1]]` with `r = head · q_blocks + q_block`.
//! A layout is shared by all heads (one set of rows) or has one set per query head.
//!
//! Each kept block is [`BlockKind::Full`] — every query of the block sees every key of it, so
//! the kernel runs it without element masking — or [`BlockKind::Partial`], with the
//! [`ElementMask`] that says which elements survive. Keys at or past `len_k` are masked in
//! every partial block (a block that reaches past `len_k` is never full); query rows past
//! `len_q` do not exist and are ignored when classifying.

use std::ops::Range;

use crate::attention_types::Shape;
use crate::error::SparseLayoutError;
use crate::Result;

/// Block sizes a layout may have. The tensor-core kernels read blocks of 64 (and the forward
/// 128 up to head dim 128); every other size runs on them re-blocked to 64
/// ([`BlockLayout::reblocked`]), the exact kernels take each as it is.
pub const SUPPORTED_BLOCK_SIZES: [usize; 4] = [16, 32, 64, 128];

/// The kernel's tile, and the block size to use unless there is a reason not to.
pub const DEFAULT_BLOCK_SIZE: usize = 64;

/// Whether the layout is shared by all query heads or given per query head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutHeads {
    Shared,
    /// One set of rows for each of this many query heads.
    PerHead(usize),
}

impl LayoutHeads {
    /// How many sets of rows the layout stores.
    pub fn stored(self) -> usize {
        match self {
            LayoutHeads::Shared => 1,
            LayoutHeads::PerHead(n) => n,
        }
    }
}

/// How a kept block is masked inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// No element masked: every query row sees every key of the block.
    Full,
    /// Some elements masked, as described.
    Partial(ElementMask),
}

/// The element mask of a partial block. Indices `i` (query) and `j` (key) are positions in the
/// sequence, not in the block. On top of each, keys `j ≥ len_k` are always masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementMask {
    /// Only the key tail: the block reaches past `len_k`.
    KeyTail,
    /// A diagonal band: keep `i + lo ≤ j ≤ i + hi`. Causal masks are bands with `hi` the
    /// diagonal offset (0 top-left) and `lo = −(len_q + len_k + 1)` (no lower bound); a
    /// sliding window sets both. Unbounded sides are stored as `∓(len_q + len_k + 1)`.
    Band { lo: i64, hi: i64 },
    /// An explicit bitmask: block `index` of [`BlockLayout::bits`], `block_size` rows of
    /// [`BlockLayout::words_per_row`] u64 words, bit `c % 64` of word `c / 64` of row `r`
    /// set iff query `q_block·block_size + r` keeps key `k_block·block_size + c`.
    Bits { index: usize },
}

/// A block-sparse attention layout (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub(super) len_q: usize,
    pub(super) len_k: usize,
    pub(super) block_size: usize,
    pub(super) heads: LayoutHeads,
    pub(super) row_offsets: Vec<usize>,
    pub(super) col_indices: Vec<usize>,
    /// Parallel to `col_indices`.
    pub(super) kinds: Vec<BlockKind>,
    /// Bitmasks of the [`ElementMask::Bits`] blocks, `block_size · words_per_row` words each.
    pub(super) bits: Vec<u64>,
}

/// Errors unless `block_size` is one of [`SUPPORTED_BLOCK_SIZES`].
pub fn check_block_size(block_size: usize) -> Result<()> {
    if SUPPORTED_BLOCK_SIZES.contains(&block_size) {
        Ok(())
    } else {
        Err(SparseLayoutError::BlockSize {
            got: block_size,
            supported: SUPPORTED_BLOCK_SIZES.to_vec(),
        }
        .into())
    }
}

/// The layout's arrays as the kernel reads them: 32-bit, one entry per kept block in
/// `col_indices` order for the per-block arrays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLayout {
    pub block_size: i32,
    pub q_blocks: i32,
    pub k_blocks: i32,
    /// 1 for a shared layout (every query head reads head 0's rows), else the query heads.
    pub stored_heads: i32,
    /// `stored_heads · q_blocks + 1` entries.
    pub row_offsets: Vec<i32>,
    pub col_indices: Vec<i32>,
    /// Per kept block: [`DeviceLayout::FULL`], [`DeviceLayout::KEY_TAIL`],
    /// [`DeviceLayout::BAND`] or [`DeviceLayout::BITS`].
    pub mask_kind: Vec<i32>,
    /// Per kept block: the band's `lo` and `hi` for a band, else 0.
    pub band_lo: Vec<i32>,
    pub band_hi: Vec<i32>,
    /// Per kept block: the bitmask's index for a bitmask block, else −1.
    pub bits_index: Vec<i32>,
    /// The bitmasks, as in [`ElementMask::Bits`].
    pub bits: Vec<u64>,
}

impl DeviceLayout {
    pub const FULL: i32 = 0;
    pub const KEY_TAIL: i32 = 1;
    pub const BAND: i32 = 2;
    pub const BITS: i32 = 3;
}

fn to_i32(what: &'static str, value: i64) -> Result<i32> {
    i32::try_from(value).map_err(|_| SparseLayoutError::IndexOverflow { what, value }.into())
}

impl BlockLayout {
    pub fn len_q(&self) -> usize {
        self.len_q
    }
    pub fn len_k(&self) -> usize {
        self.len_k
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn heads(&self) -> LayoutHeads {
        self.heads
    }
    pub fn q_blocks(&self) -> usize {
        self.len_q.div_ceil(self.block_size)
    }
    pub fn k_blocks(&self) -> usize {
        self.len_k.div_ceil(self.block_size)
    }
    /// u64 words per row of a bitmask block.
    pub fn words_per_row(&self) -> usize {
        self.block_size.div_ceil(64)
    }
    /// The compressed-row offsets (see the module docs).
    pub fn row_offsets(&self) -> &[usize] {
        &self.row_offsets
    }
    /// The kept key blocks of every row, concatenated.
    pub fn col_indices(&self) -> &[usize] {
        &self.col_indices
    }
    /// The kind of every kept block, parallel to [`Self::col_indices`].
    pub fn kinds(&self) -> &[BlockKind] {
        &self.kinds
    }
    /// The bitmasks of the [`ElementMask::Bits`] blocks.
    pub fn bits(&self) -> &[u64] {
        &self.bits
    }

    /// The stored set of rows query head `h` reads (0 for a shared layout).
    pub fn head_of(&self, h: usize) -> usize {
        match self.heads {
            LayoutHeads::Shared => 0,
            LayoutHeads::PerHead(_) => h,
        }
    }

    /// Kept key blocks of stored head `head`, query block `q_block`, and their kinds.
    pub fn row(&self, head: usize, q_block: usize) -> (&[usize], &[BlockKind]) {
        let r = head * self.q_blocks() + q_block;
        let span = self.row_offsets[r]..self.row_offsets[r + 1];
        (&self.col_indices[span.clone()], &self.kinds[span])
    }

    /// The kind of block (`q_block`, `k_block`) of stored head `head`; `None` if not kept.
    pub fn block(&self, head: usize, q_block: usize, k_block: usize) -> Option<BlockKind> {
        let (cols, kinds) = self.row(head, q_block);
        cols.binary_search(&k_block).ok().map(|at| kinds[at])
    }

    /// Number of kept blocks over all stored heads.
    pub fn kept_blocks(&self) -> usize {
        self.col_indices.len()
    }

    /// Number of kept blocks of stored head `head`.
    pub fn kept_blocks_of_head(&self, head: usize) -> usize {
        let n = self.q_blocks();
        self.row_offsets[(head + 1) * n] - self.row_offsets[head * n]
    }

    /// Kept blocks over all blocks (of every stored head): the fraction of the dense work left.
    pub fn density(&self) -> f64 {
        let all = self.heads.stored() * self.q_blocks() * self.k_blocks();
        if all == 0 {
            0.0
        } else {
            self.kept_blocks() as f64 / all as f64
        }
    }

    /// Query rows of block `q_block` (the last block may be short).
    pub fn q_rows(&self, q_block: usize) -> Range<usize> {
        q_block * self.block_size..self.len_q.min((q_block + 1) * self.block_size)
    }

    /// Keys of block `k_block`, not cut at `len_k`.
    pub fn k_cols(&self, k_block: usize) -> Range<usize> {
        k_block * self.block_size..(k_block + 1) * self.block_size
    }

    /// Whether the element mask of a block of kind `kind` at (`q_block`, `k_block`) keeps
    /// query `i`, key `j` (positions in the sequence, inside the block).
    pub fn kind_admits(
        &self,
        kind: BlockKind,
        q_block: usize,
        k_block: usize,
        i: usize,
        j: usize,
    ) -> bool {
        if j >= self.len_k {
            return false;
        }
        match kind {
            BlockKind::Full | BlockKind::Partial(ElementMask::KeyTail) => true,
            BlockKind::Partial(ElementMask::Band { lo, hi }) => {
                let (i, j) = (i as i64, j as i64);
                i + lo <= j && j <= i + hi
            }
            BlockKind::Partial(ElementMask::Bits { index }) => {
                let (r, c) = (i - q_block * self.block_size, j - k_block * self.block_size);
                let words = self.words_per_row();
                let word = self.bits[(index * self.block_size + r) * words + c / 64];
                word >> (c % 64) & 1 == 1
            }
        }
    }

    /// Whether query `i` of stored head `head` sees key `j` under this layout.
    pub fn admits(&self, head: usize, i: usize, j: usize) -> bool {
        if i >= self.len_q || j >= self.len_k {
            return false;
        }
        let (qb, kb) = (i / self.block_size, j / self.block_size);
        self.block(head, qb, kb)
            .is_some_and(|kind| self.kind_admits(kind, qb, kb, i, j))
    }

    /// The element mask of stored head `head`: `len_q × len_k`, row-major, `true` = kept.
    pub fn expand(&self, head: usize) -> Vec<bool> {
        let mut mask = vec![false; self.len_q * self.len_k];
        for qb in 0..self.q_blocks() {
            let (cols, kinds) = self.row(head, qb);
            for (&kb, &kind) in cols.iter().zip(kinds) {
                for i in self.q_rows(qb) {
                    for j in self.k_cols(kb).start..self.len_k.min(self.k_cols(kb).end) {
                        mask[i * self.len_k + j] = self.kind_admits(kind, qb, kb, i, j);
                    }
                }
            }
        }
        mask
    }

    /// The block mask: `stored heads × q_blocks × k_blocks`, row-major, `true` = kept.
    pub fn block_mask(&self) -> Vec<bool> {
        let (nq, nk) = (self.q_blocks(), self.k_blocks());
        let mut mask = vec![false; self.heads.stored() * nq * nk];
        for h in 0..self.heads.stored() {
            for qb in 0..nq {
                for &kb in self.row(h, qb).0 {
                    mask[(h * nq + qb) * nk + kb] = true;
                }
            }
        }
        mask
    }

    /// Errors unless the layout fits a call of `shape` run with square tiles of `block_size`:
    /// the same block size, the same query and key lengths, and a head count of 1 (shared) or
    /// the call's query heads.
    pub fn check_call(&self, shape: &Shape, block_size: usize) -> Result<()> {
        if self.block_size != block_size {
            return Err(SparseLayoutError::BlockSize {
                got: self.block_size,
                supported: vec![block_size],
            }
            .into());
        }
        let mismatch = |what, layout, call| -> Result<()> {
            if layout == call {
                Ok(())
            } else {
                Err(SparseLayoutError::ShapeMismatch { what, layout, call }.into())
            }
        };
        mismatch("len_q", self.len_q, shape.len_q)?;
        mismatch("len_k", self.len_k, shape.len_k)?;
        if let LayoutHeads::PerHead(n) = self.heads {
            mismatch("heads", n, shape.heads_q)?;
        }
        Ok(())
    }

    /// The arrays the kernel reads (see [`DeviceLayout`]); errors if an index or band bound
    /// does not fit in i32.
    pub fn to_device(&self) -> Result<DeviceLayout> {
        let n = self.kept_blocks();
        let mut d = DeviceLayout {
            block_size: to_i32("block_size", self.block_size as i64)?,
            q_blocks: to_i32("q_blocks", self.q_blocks() as i64)?,
            k_blocks: to_i32("k_blocks", self.k_blocks() as i64)?,
            stored_heads: to_i32("stored heads", self.heads.stored() as i64)?,
            row_offsets: Vec::with_capacity(self.row_offsets.len()),
            col_indices: Vec::with_capacity(n),
            mask_kind: Vec::with_capacity(n),
            band_lo: Vec::with_capacity(n),
            band_hi: Vec::with_capacity(n),
            bits_index: Vec::with_capacity(n),
            bits: self.bits.clone(),
        };
        for &o in &self.row_offsets {
            d.row_offsets.push(to_i32("row offset", o as i64)?);
        }
        for (&kb, &kind) in self.col_indices.iter().zip(&self.kinds) {
            d.col_indices.push(to_i32("key block", kb as i64)?);
            let (code, lo, hi, bits) = match kind {
                BlockKind::Full => (DeviceLayout::FULL, 0, 0, -1),
                BlockKind::Partial(ElementMask::KeyTail) => (DeviceLayout::KEY_TAIL, 0, 0, -1),
                BlockKind::Partial(ElementMask::Band { lo, hi }) => (
                    DeviceLayout::BAND,
                    to_i32("band lo", lo)?,
                    to_i32("band hi", hi)?,
                    -1,
                ),
                BlockKind::Partial(ElementMask::Bits { index }) => (
                    DeviceLayout::BITS,
                    0,
                    0,
                    to_i32("bitmask index", index as i64)?,
                ),
            };
            d.mask_kind.push(code);
            d.band_lo.push(lo);
            d.band_hi.push(hi);
            d.bits_index.push(bits);
        }
        Ok(d)
    }
}
