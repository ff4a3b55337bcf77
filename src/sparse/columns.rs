//! The transposed index of a layout (compressed columns, CSC): for each key block, the query
//! blocks that keep it. The backward's dK/dV pass owns a key block and must visit exactly
//! those query blocks; the layout itself lists key blocks per query block (CSR), so this index
//! is built once per layout on the host, in O(kept blocks), and uploaded with it.
//!
//! Column `(head, k_block)`, `c = head · k_blocks + k_block`, holds the entries
//! `col_offsets[c] .. col_offsets[c + 1]`; entry `e` names the query block `q_blocks[e]`
//! (ascending within a column) and `blocks[e]`, the kept block's position in the layout's
//! compressed rows, where its mask kind, band and bitmask are (one copy of those, shared by
//! both walks).
//!
//! Device bytes: 4·(stored heads · k_blocks + 1) for the offsets plus 8 per kept block
//! (a query block and a position, int32 each): [`ColumnIndex::device_bytes`].

use super::layout::BlockLayout;
use crate::error::SparseLayoutError;
use crate::Result;

/// A layout's compressed columns (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnIndex {
    k_blocks: usize,
    col_offsets: Vec<usize>,
    q_blocks: Vec<usize>,
    blocks: Vec<usize>,
}

impl ColumnIndex {
    /// The query blocks that keep key block `k_block` of stored head `head`, ascending, and
    /// the position of each kept block in the layout's rows.
    pub fn column(&self, head: usize, k_block: usize) -> (&[usize], &[usize]) {
        let c = head * self.k_blocks + k_block;
        let span = self.col_offsets[c]..self.col_offsets[c + 1];
        (&self.q_blocks[span.clone()], &self.blocks[span])
    }

    /// The offsets (`stored heads · k_blocks + 1` entries).
    pub fn col_offsets(&self) -> &[usize] {
        &self.col_offsets
    }

    /// Bytes of the three int32 arrays on the device.
    pub fn device_bytes(&self) -> usize {
        4 * (self.col_offsets.len() + self.q_blocks.len() + self.blocks.len())
    }

    /// The arrays as the kernel reads them (int32): offsets, query blocks, positions.
    pub fn to_device(&self) -> Result<[Vec<i32>; 3]> {
        let conv = |what: &'static str, v: &[usize]| -> Result<Vec<i32>> {
            v.iter()
                .map(|&x| {
                    i32::try_from(x).map_err(|_| {
                        SparseLayoutError::IndexOverflow {
                            what,
                            value: x as i64,
                        }
                        .into()
                    })
                })
                .collect()
        };
        Ok([
            conv("column offset", &self.col_offsets)?,
            conv("query block", &self.q_blocks)?,
            conv("kept block", &self.blocks)?,
        ])
    }
}

impl BlockLayout {
    /// The transposed index of this layout (see [`ColumnIndex`]), by a counting sort of the
    /// kept blocks over their columns: rows are visited in ascending query block, so each
    /// column comes out ascending.
    pub fn columns(&self) -> ColumnIndex {
        let (nq, nk) = (self.q_blocks(), self.k_blocks());
        let stored = self.heads.stored();
        let mut col_offsets = vec![0usize; stored * nk + 1];
        for h in 0..stored {
            for &kb in &self.col_indices[self.row_offsets[h * nq]..self.row_offsets[(h + 1) * nq]] {
                col_offsets[h * nk + kb + 1] += 1;
            }
        }
        for c in 0..stored * nk {
            col_offsets[c + 1] += col_offsets[c];
        }
        let mut next = col_offsets.clone();
        let n = self.col_indices.len();
        let (mut q_blocks, mut blocks) = (vec![0; n], vec![0; n]);
        for h in 0..stored {
            for qb in 0..nq {
                let r = h * nq + qb;
                for x in self.row_offsets[r]..self.row_offsets[r + 1] {
                    let c = h * nk + self.col_indices[x];
                    q_blocks[next[c]] = qb;
                    blocks[next[c]] = x;
                    next[c] += 1;
                }
            }
        }
        ColumnIndex {
            k_blocks: nk,
            col_offsets,
            q_blocks,
            blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::LayoutHeads;

    #[test]
    fn every_kept_block_appears_once_in_its_column_in_ascending_query_order() {
        // 3 query blocks × 4 key blocks per head, two heads, with an empty row and column.
        let mask = [
            true, false, true, false, //
            false, false, false, false, //
            true, false, true, true, //
            false, true, false, false, //
            true, true, false, false, //
            false, true, false, false,
        ];
        let layout =
            BlockLayout::from_block_mask(48, 64, 16, LayoutHeads::PerHead(2), &mask).unwrap();
        let cols = layout.columns();
        assert_eq!(cols.column(0, 0).0, &[0, 2]);
        assert!(cols.column(0, 1).0.is_empty());
        assert_eq!(cols.column(0, 2).0, &[0, 2]);
        assert_eq!(cols.column(0, 3).0, &[2]);
        assert_eq!(cols.column(1, 1).0, &[0, 1, 2]);
        assert_eq!(cols.column(1, 0).0, &[1]);
        for h in 0..2 {
            for kb in 0..4 {
                let (qbs, xs) = cols.column(h, kb);
                for (&qb, &x) in qbs.iter().zip(xs) {
                    assert_eq!(layout.col_indices()[x], kb);
                    let r = h * 3 + qb;
                    assert!((layout.row_offsets()[r]..layout.row_offsets()[r + 1]).contains(&x));
                }
            }
        }
        let kept = layout.kept_blocks();
        assert_eq!(cols.device_bytes(), 4 * (2 * 4 + 1) + 8 * kept);
        let [o, q, b] = cols.to_device().unwrap();
        assert_eq!((o.len(), q.len(), b.len()), (9, kept, kept));
    }
}
