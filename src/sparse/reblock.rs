//! A layout re-blocked to another block size with the same element mask: how the tensor-core
//! backward, whose kernels read layouts of their tile (64), runs layouts of every supported
//! block size without kernel code per block size.
//!
//! - Larger blocks (128 → 64): each kept block becomes the tiles it covers, in ascending key
//!   order, each classified again by the one classifier (`classify`): a band block's tiles may
//!   come out full, banded or dropped (a causal diagonal block of 128 keeps three of its four
//!   tiles), a bitmask block's tiles get their quarter of its bitmask (or full/dropped).
//! - Smaller blocks (16, 32 → 64): a tile is kept iff at least one of the blocks it holds is,
//!   so tiles with no kept block are never visited; a tile whose blocks are all kept and full
//!   (or key-tail) is full (key-tail), any other an explicit bitmask of the kept blocks'
//!   elements. Inside the tile the kernels then compute every element and mask by the bitmask:
//!   cost follows the kept tiles, not the kept blocks.
//!
//! Host work: O(kept tiles · tile²) element tests for the bitmask tiles (each block's kind looked
//! up once per tile), O(kept blocks) for the rest; done once per layout (the device layout
//! keeps the result).

use super::classify::Builder;
use super::layout::{BlockKind, BlockLayout, ElementMask};
use crate::Result;

impl BlockLayout {
    /// This layout with blocks of `tile` (one of [`super::SUPPORTED_BLOCK_SIZES`]): the same
    /// element mask for every stored head, the same heads and lengths (see the module docs).
    /// The same block size returns a copy.
    pub fn reblocked(&self, tile: usize) -> Result<BlockLayout> {
        let mut b = Builder::new(self.len_q, self.len_k, tile, self.heads)?;
        if tile == self.block_size {
            return Ok(self.clone());
        }
        let q_tiles = self.len_q.div_ceil(tile);
        for h in 0..self.heads.stored() {
            for qt in 0..q_tiles {
                if tile < self.block_size {
                    self.split_row(&mut b, h, qt, tile);
                } else {
                    self.merge_row(&mut b, h, qt, tile);
                }
                b.end_row();
            }
        }
        Ok(b.finish())
    }

    /// Row `qt` of the re-blocked layout when `tile` divides the block size: the tiles of the
    /// kept blocks of the one row that holds it.
    fn split_row(&self, b: &mut Builder, h: usize, qt: usize, tile: usize) {
        let per = self.block_size / tile;
        let qb = qt / per;
        let (cols, kinds) = self.row(h, qb);
        for (&kb, &kind) in cols.iter().zip(kinds) {
            for kt in kb * per..(kb + 1) * per {
                match kind {
                    BlockKind::Full | BlockKind::Partial(ElementMask::KeyTail) => {
                        b.push_whole(qt, kt)
                    }
                    BlockKind::Partial(ElementMask::Band { lo, hi }) => {
                        b.push_banded(qt, kt, Some(lo), Some(hi))
                    }
                    BlockKind::Partial(ElementMask::Bits { .. }) => {
                        b.push_predicate(qt, kt, &|i, j| self.kind_admits(kind, qb, kb, i, j))
                    }
                }
            }
        }
    }

    /// Row `qt` of the re-blocked layout when the block size divides `tile`: the tiles that
    /// hold a kept block of the rows `qt` covers, ascending.
    fn merge_row(&self, b: &mut Builder, h: usize, qt: usize, tile: usize) {
        let (bs, per) = (self.block_size, tile / self.block_size);
        let rows = qt * per..((qt + 1) * per).min(self.q_blocks());
        let mut tiles: Vec<usize> = rows
            .clone()
            .flat_map(|qb| self.row(h, qb).0.iter().map(|&kb| kb / per))
            .collect();
        tiles.sort_unstable();
        tiles.dedup();
        for kt in tiles {
            let blocks = kt * per..((kt + 1) * per).min(self.k_blocks());
            // The kinds of the tile's blocks (None: dropped), looked up once per block.
            let kinds: Vec<Option<BlockKind>> = rows
                .clone()
                .flat_map(|qb| blocks.clone().map(move |kb| (qb, kb)))
                .map(|(qb, kb)| self.block(h, qb, kb))
                .collect();
            let whole = kinds.iter().all(|k| {
                matches!(
                    k,
                    Some(BlockKind::Full | BlockKind::Partial(ElementMask::KeyTail))
                )
            });
            if whole {
                b.push_whole(qt, kt);
            } else {
                let width = blocks.len();
                b.push_predicate(qt, kt, &|i, j| {
                    let (qb, kb) = (i / bs, j / bs);
                    kinds[(qb - rows.start) * width + kb - blocks.start]
                        .is_some_and(|kind| self.kind_admits(kind, qb, kb, i, j))
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::{LayoutHeads, SUPPORTED_BLOCK_SIZES};

    fn same_mask(a: &BlockLayout, b: &BlockLayout) {
        for h in 0..a.heads().stored() {
            assert_eq!(a.expand(h), b.expand(h), "head {h}");
        }
    }

    #[test]
    fn every_block_size_reblocks_to_every_other_with_the_same_element_mask() {
        for &bs in &SUPPORTED_BLOCK_SIZES {
            let causal = BlockLayout::sliding_window(200, bs, 70, 0, true).unwrap();
            let strided = BlockLayout::strided(150, bs, 1, 3, false).unwrap();
            for layout in [causal, strided] {
                for &tile in &SUPPORTED_BLOCK_SIZES {
                    let r = layout.reblocked(tile).unwrap();
                    assert_eq!(r.block_size(), tile);
                    same_mask(&layout, &r);
                }
            }
        }
    }

    #[test]
    fn per_head_predicate_layouts_of_unequal_lengths_keep_their_masks() {
        for &bs in &SUPPORTED_BLOCK_SIZES {
            let layout = BlockLayout::from_predicate_per_head(
                150,
                203,
                bs,
                LayoutHeads::PerHead(2),
                |h, i, j| (i * 3 + j * (h + 1)) % 7 < 3 || j + 20 > i + 40 * h,
            )
            .unwrap();
            for &tile in &SUPPORTED_BLOCK_SIZES {
                same_mask(&layout, &layout.reblocked(tile).unwrap());
            }
        }
    }

    #[test]
    fn tiles_with_no_kept_block_are_dropped_and_whole_tiles_stay_full() {
        // Blocks of 16 over 128 × 128 (8 × 8 blocks): tile (0, 0) holds only full blocks, tile
        // (0, 1) one kept block, tile (1, 0) none.
        let mut mask = vec![false; 64];
        for qb in 0..4 {
            for kb in 0..4 {
                mask[qb * 8 + kb] = true;
            }
        }
        mask[2 * 8 + 5] = true;
        let layout =
            BlockLayout::from_block_mask(128, 128, 16, LayoutHeads::Shared, &mask).unwrap();
        let r = layout.reblocked(64).unwrap();
        assert_eq!(r.block_mask(), vec![true, true, false, false]);
        assert_eq!(r.block(0, 0, 0), Some(BlockKind::Full));
        assert!(matches!(
            r.block(0, 0, 1),
            Some(BlockKind::Partial(ElementMask::Bits { .. }))
        ));
        same_mask(&layout, &r);
    }

    #[test]
    fn a_causal_block_of_128_keeps_three_tiles_of_64_one_of_them_a_band() {
        let layout = BlockLayout::sliding_window(128, 128, 200, 0, true).unwrap();
        let r = layout.reblocked(64).unwrap();
        assert_eq!(r.block_mask(), vec![true, false, true, true]);
        assert_eq!(r.block(0, 1, 0), Some(BlockKind::Full));
        assert!(matches!(
            r.block(0, 1, 1),
            Some(BlockKind::Partial(ElementMask::Band { .. }))
        ));
        same_mask(&layout, &r);
    }

    #[test]
    fn unsupported_tiles_are_refused() {
        let layout = BlockLayout::sliding_window(64, 64, 8, 0, true).unwrap();
        assert!(layout.reblocked(48).is_err());
    }
}
