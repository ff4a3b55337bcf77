//! Building a layout row by row, deciding for each candidate block whether it is dropped (no
//! element survives), full, or partial and with which element mask.

use super::layout::{check_block_size, BlockKind, BlockLayout, ElementMask, LayoutHeads};
use crate::error::SparseLayoutError;
use crate::Result;

/// Accumulates the rows of a layout in order: head by head, query block by query block.
pub(super) struct Builder {
    layout: BlockLayout,
}

/// Whether a block reaches past the last key (its tail keys are masked).
fn reaches_past_keys(layout: &BlockLayout, k_block: usize) -> bool {
    layout.k_cols(k_block).end > layout.len_k
}

impl Builder {
    pub fn new(len_q: usize, len_k: usize, block_size: usize, heads: LayoutHeads) -> Result<Self> {
        check_block_size(block_size)?;
        if heads == LayoutHeads::PerHead(0) {
            return Err(SparseLayoutError::Pattern {
                param: "heads",
                reason: "a per-head layout needs at least one head".into(),
            }
            .into());
        }
        Ok(Builder {
            layout: BlockLayout {
                len_q,
                len_k,
                block_size,
                heads,
                row_offsets: vec![0],
                col_indices: Vec::new(),
                kinds: Vec::new(),
                bits: Vec::new(),
            },
        })
    }

    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Appends a kept block to the current row (callers push in ascending key-block order).
    pub fn push(&mut self, k_block: usize, kind: BlockKind) {
        self.layout.col_indices.push(k_block);
        self.layout.kinds.push(kind);
    }

    /// Closes the current row.
    pub fn end_row(&mut self) {
        self.layout.row_offsets.push(self.layout.col_indices.len());
    }

    /// Appends block (`q_block`, `k_block`) as far as the band `lo ≤ j − i ≤ hi` (`None`: no
    /// such bound) leaves anything of it: dropped if nothing, full if everything, else partial
    /// (key tail only, or the band).
    pub fn push_banded(
        &mut self,
        q_block: usize,
        k_block: usize,
        lo: Option<i64>,
        hi: Option<i64>,
    ) {
        let l = &self.layout;
        let rows = l.q_rows(q_block);
        let cols = l.k_cols(k_block);
        let valid_end = cols.end.min(l.len_k) as i64;
        let key0 = cols.start as i64;
        if rows.is_empty() || key0 >= valid_end {
            return;
        }
        let (first, last) = (rows.start as i64, rows.end as i64 - 1);
        // Keys of row i: [max(key0, i + lo), min(valid_end − 1, i + hi)]; both ends grow with
        // i, so some row keeps a key iff some row's run is non-empty, and every element is
        // kept iff the last row's start and the first row's end enclose the block.
        let start = |i: i64| lo.map_or(key0, |lo| key0.max(i + lo));
        let end = |i: i64| hi.map_or(valid_end - 1, |hi| (valid_end - 1).min(i + hi));
        if !(first..=last).any(|i| start(i) <= end(i)) {
            return;
        }
        let band_full = lo.is_none_or(|lo| last + lo <= key0)
            && hi.is_none_or(|hi| first + hi >= valid_end - 1);
        let kind = if !band_full {
            let far = (l.len_q + l.len_k + 1) as i64;
            BlockKind::Partial(ElementMask::Band {
                lo: lo.map_or(-far, |lo| lo.clamp(-far, far)),
                hi: hi.map_or(far, |hi| hi.clamp(-far, far)),
            })
        } else if reaches_past_keys(l, k_block) {
            BlockKind::Partial(ElementMask::KeyTail)
        } else {
            BlockKind::Full
        };
        self.push(k_block, kind);
    }

    /// Appends block (`q_block`, `k_block`) as far as `keep(i, j)` leaves anything of it:
    /// dropped if no valid element is kept, full if all are, key-tail partial if all are but
    /// the block reaches past the keys, else partial with an explicit bitmask.
    pub fn push_predicate(
        &mut self,
        q_block: usize,
        k_block: usize,
        keep: &dyn Fn(usize, usize) -> bool,
    ) {
        let l = &self.layout;
        let (bs, words) = (l.block_size, l.words_per_row());
        let rows = l.q_rows(q_block);
        let cols = l.k_cols(k_block);
        let valid = cols.start..cols.end.min(l.len_k);
        let mut block_bits = vec![0u64; bs * words];
        let (mut kept, mut all) = (0usize, 0usize);
        for i in rows.clone() {
            for j in valid.clone() {
                all += 1;
                if keep(i, j) {
                    kept += 1;
                    let (r, c) = (i - rows.start, j - cols.start);
                    block_bits[r * words + c / 64] |= 1u64 << (c % 64);
                }
            }
        }
        if kept == 0 {
            return;
        }
        let kind = if kept < all {
            let index = self.layout.bits.len() / (bs * words);
            self.layout.bits.extend_from_slice(&block_bits);
            BlockKind::Partial(ElementMask::Bits { index })
        } else if reaches_past_keys(l, k_block) {
            BlockKind::Partial(ElementMask::KeyTail)
        } else {
            BlockKind::Full
        };
        self.push(k_block, kind);
    }

    /// Appends a whole block with no element mask but the key tail (an empty block — past the
    /// keys — is dropped).
    pub fn push_whole(&mut self, q_block: usize, k_block: usize) {
        self.push_banded(q_block, k_block, None, None);
    }

    pub fn finish(self) -> BlockLayout {
        debug_assert_eq!(
            self.layout.row_offsets.len(),
            self.layout.heads.stored() * self.layout.q_blocks() + 1
        );
        self.layout
    }
}
