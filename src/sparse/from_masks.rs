//! Layouts from explicit masks: compressed rows, a dense boolean block mask, or a per-element
//! predicate. Blocks given at block level are full (key-tail partial where they reach past the
//! keys); a predicate's blocks are classified element by element.

use super::classify::Builder;
use super::layout::{BlockLayout, LayoutHeads};
use crate::error::SparseLayoutError;
use crate::{Error, Result};

impl BlockLayout {
    /// A layout from compressed rows: `row_offsets` has `heads.stored() · q_blocks + 1`
    /// entries starting at 0 and never decreasing, ending at `col_indices.len()`; each row's
    /// key blocks are strictly ascending and below `k_blocks`. Kept blocks carry no element
    /// mask but the key tail.
    pub fn from_csr(
        len_q: usize,
        len_k: usize,
        block_size: usize,
        heads: LayoutHeads,
        row_offsets: &[usize],
        col_indices: &[usize],
    ) -> Result<Self> {
        let mut b = Builder::new(len_q, len_k, block_size, heads)?;
        let (nq, nk) = (b.layout().q_blocks(), b.layout().k_blocks());
        let rows = heads.stored() * nq;
        let bad = |reason: String| -> Error { SparseLayoutError::RowOffsets { reason }.into() };
        if row_offsets.len() != rows + 1 {
            return Err(bad(format!(
                "{} entries, expected {} ({} heads × {nq} query blocks + 1)",
                row_offsets.len(),
                rows + 1,
                heads.stored()
            )));
        }
        if row_offsets[0] != 0 {
            return Err(bad(format!("first offset is {}, not 0", row_offsets[0])));
        }
        if let Some(r) = (0..rows).find(|&r| row_offsets[r + 1] < row_offsets[r]) {
            return Err(bad(format!(
                "offset {} = {} is below offset {r} = {}",
                r + 1,
                row_offsets[r + 1],
                row_offsets[r]
            )));
        }
        if row_offsets[rows] != col_indices.len() {
            return Err(bad(format!(
                "last offset is {}, but there are {} column indices",
                row_offsets[rows],
                col_indices.len()
            )));
        }
        for r in 0..rows {
            let (head, q_block) = (r / nq.max(1), r % nq.max(1));
            let cols = &col_indices[row_offsets[r]..row_offsets[r + 1]];
            for (at, &kb) in cols.iter().enumerate() {
                if kb >= nk {
                    return Err(SparseLayoutError::OutOfRange {
                        head,
                        q_block,
                        k_block: kb,
                        k_blocks: nk,
                    }
                    .into());
                }
                if at > 0 && cols[at - 1] == kb {
                    return Err(SparseLayoutError::Duplicate {
                        head,
                        q_block,
                        k_block: kb,
                    }
                    .into());
                }
                if at > 0 && cols[at - 1] > kb {
                    return Err(SparseLayoutError::Unsorted {
                        head,
                        q_block,
                        prev: cols[at - 1],
                        next: kb,
                    }
                    .into());
                }
                b.push_whole(q_block, kb);
            }
            b.end_row();
        }
        Ok(b.finish())
    }

    /// A layout from a dense block mask `heads.stored() × q_blocks × k_blocks`, row-major,
    /// `true` = kept. Kept blocks carry no element mask but the key tail.
    pub fn from_block_mask(
        len_q: usize,
        len_k: usize,
        block_size: usize,
        heads: LayoutHeads,
        mask: &[bool],
    ) -> Result<Self> {
        let mut b = Builder::new(len_q, len_k, block_size, heads)?;
        let (nq, nk) = (b.layout().q_blocks(), b.layout().k_blocks());
        let want = heads.stored() * nq * nk;
        if mask.len() != want {
            return Err(Error::shape(
                "block mask",
                format!("[{}, {nq}, {nk}] ({want} entries)", heads.stored()),
                &[mask.len()],
            ));
        }
        for h in 0..heads.stored() {
            for qb in 0..nq {
                for kb in 0..nk {
                    if mask[(h * nq + qb) * nk + kb] {
                        b.push_whole(qb, kb);
                    }
                }
                b.end_row();
            }
        }
        Ok(b.finish())
    }

    /// A layout shared by all heads from a per-element predicate: query `i` sees key `j` iff
    /// `keep(i, j)`. Blocks with no kept element are dropped, blocks with every element kept
    /// are full, the rest carry the predicate as a bitmask.
    pub fn from_predicate(
        len_q: usize,
        len_k: usize,
        block_size: usize,
        keep: impl Fn(usize, usize) -> bool,
    ) -> Result<Self> {
        Self::from_predicate_per_head(len_q, len_k, block_size, LayoutHeads::Shared, |_, i, j| {
            keep(i, j)
        })
    }

    /// [`Self::from_predicate`] with `keep(head, i, j)` for each stored head.
    pub fn from_predicate_per_head(
        len_q: usize,
        len_k: usize,
        block_size: usize,
        heads: LayoutHeads,
        keep: impl Fn(usize, usize, usize) -> bool,
    ) -> Result<Self> {
        let mut b = Builder::new(len_q, len_k, block_size, heads)?;
        let (nq, nk) = (b.layout().q_blocks(), b.layout().k_blocks());
        for h in 0..heads.stored() {
            for qb in 0..nq {
                for kb in 0..nk {
                    b.push_predicate(qb, kb, &|i, j| keep(h, i, j));
                }
                b.end_row();
            }
        }
        Ok(b.finish())
    }
}
