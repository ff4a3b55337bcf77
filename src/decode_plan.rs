//! The decode kernel's launch geometry and its split planner (kernels/decode.cu), on the host:
//! the op (`ops::decode`, feature `cuda`) plans its launches with them and the CPU
//! twin (`twin::decode`, feature `testing`) runs the same geometry, so neither depends on the other.

/// Threads of one split block (`CUATTN_DECODE_THREADS`).
pub const THREADS: usize = 128;
/// Splits cover whole tiles of this many keys (`CUATTN_DECODE_SPLIT_TILE`).
pub const SPLIT_TILE: usize = 64;
/// Fewest keys a split is given when the planner can choose (each split writes D + 1 floats
/// and costs a block launch: below this the merge traffic stops being small).
pub const MIN_KEYS_PER_SPLIT: usize = 128;
/// Most splits the planner picks (bounds the workspace: B·Hq·splits·(D + 1) floats).
pub const MAX_SPLITS: usize = 256;

/// The split kernel's geometry for one call, as `Geometry` in kernels/decode.cu computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Padded head dim HD: 64, 128 or 256.
    pub head_dim_tile: usize,
    /// Query heads per block (HPB): 1, 2, 4 or 8.
    pub heads_per_block: usize,
    /// Elements per 16-byte pack.
    pub vec: usize,
    /// Threads sharing one key row (TPK).
    pub threads_per_key: usize,
    /// Packs per thread (NP).
    pub packs_per_thread: usize,
    /// Key groups per block (NG = THREADS / TPK).
    pub groups: usize,
    /// Keys per group per iteration (KPG).
    pub keys_per_group: usize,
    /// 2-byte types where the group's HPB·KPG scores fit its lanes (`SCATTER`): the partial
    /// dot products are reduce-scattered, one (head, key) slot per lane, and each slot keeps
    /// its own running sum l, summed per head by a butterfly at the end of the block.
    pub scatter_scores: bool,
}

impl Geometry {
    /// For elements of `elem_bytes` bytes, head dim `dim` (1..=256) and `group` query heads
    /// per key/value head.
    pub fn new(elem_bytes: usize, dim: usize, group: usize) -> Geometry {
        let head_dim_tile = match dim {
            0..=64 => 64,
            65..=128 => 128,
            _ => 256,
        };
        let heads_per_block = match group {
            0 | 1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let vec = 16 / elem_bytes;
        let packs = head_dim_tile / vec;
        let threads_per_key = packs.min(32);
        let packs_per_thread = packs / threads_per_key;
        let keys_per_group = match packs_per_thread * heads_per_block {
            0..=2 => 4,
            3..=8 => 2,
            _ => 1,
        };
        Geometry {
            head_dim_tile,
            heads_per_block,
            vec,
            threads_per_key,
            packs_per_thread,
            groups: THREADS / threads_per_key,
            keys_per_group,
            scatter_scores: elem_bytes == 2 && heads_per_block * keys_per_group <= threads_per_key,
        }
    }

    /// Keys one block takes per iteration.
    pub fn block_keys(&self) -> usize {
        self.groups * self.keys_per_group
    }

    /// Blocks per (batch, kv-head) pair needed to cover `group` query heads.
    pub fn head_chunks(&self, group: usize) -> usize {
        group.div_ceil(self.heads_per_block)
    }
}

/// Fraction of the best wave efficiency the planner accepts in exchange for fewer splits.
const WAVE_EFFICIENCY: f64 = 0.9;

/// The number of splits for `base_blocks` = B·Hkv·chunks blocks per split, a longest cache of
/// `max_len` keys and `resident_blocks` blocks resident on the whole GPU at once.
///
/// Each split gets at least [`MIN_KEYS_PER_SPLIT`] keys; at most [`MAX_SPLITS`]. While all the
/// blocks fit in one wave, as many splits as that allows. Beyond, the blocks run in waves and
/// a last, partly filled wave costs as long as a full one (every block streams the same number
/// of keys): the count is the smallest whose wave efficiency, blocks / (waves · resident), is
/// within [`WAVE_EFFICIENCY`] of the best (FlashAttention-2's `num_splits_heuristic` rule).
/// Finally whole tiles per split: no split is left empty for the longest cache.
pub fn plan_splits(base_blocks: usize, max_len: usize, resident_blocks: usize) -> usize {
    let (base, resident) = (base_blocks.max(1), resident_blocks.max(1));
    let max_s = (max_len / MIN_KEYS_PER_SPLIT).clamp(1, MAX_SPLITS);
    let s = if base * max_s <= resident {
        max_s
    } else {
        let eff = |s: usize| {
            let blocks = base * s;
            blocks as f64 / (blocks.div_ceil(resident) * resident) as f64
        };
        let best = (1..=max_s).map(eff).fold(0.0, f64::max);
        (1..=max_s)
            .find(|&s| eff(s) >= WAVE_EFFICIENCY * best)
            .unwrap_or(1)
    };
    let tiles = max_len.div_ceil(SPLIT_TILE);
    let per = tiles.div_ceil(s).max(1);
    tiles.div_ceil(per).max(1)
}
