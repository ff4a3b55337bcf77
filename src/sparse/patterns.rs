//! Layouts from the literature, each with a causal version:
//!
//! - [`BlockLayout::banded`]: causal and/or sliding-window (local) attention, as element-exact
//!   bands (Longformer's and Mistral's local attention, GPT-3's locally banded layers);
//! - [`BlockLayout::strided`] and [`BlockLayout::fixed`]: the two factorised patterns of the
//!   Sparse Transformer (Child et al. 2019) in block units, as block-sparse kernels run them;
//! - [`BlockLayout::bigbird`]: global blocks, a window of blocks and `r` random blocks per
//!   query block (Zaheer et al. 2020), drawn from a seeded generator.
//!
//! The block-level patterns are for self-attention (`len` queries and keys). Their causal
//! versions keep only key blocks at or below the query block, and the diagonal blocks carry
//! the causal band (`j ≤ i`) as their element mask.

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::classify::Builder;
use super::layout::{BlockLayout, LayoutHeads};
use crate::attention_types::CausalAlign;
use crate::error::SparseLayoutError;
use crate::key_band::{KeyBand, Window};
use crate::Result;

/// Parameters of the BigBird pattern, in blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BigBird {
    /// The first `global_blocks` blocks attend to every block and every block to them.
    pub global_blocks: usize,
    /// Each query block sees the key blocks within this distance of it (causal: before it).
    pub window_radius: usize,
    /// Key blocks drawn at random per query block among those not already kept.
    pub random_blocks: usize,
    /// Seed of the generator (`StdRng`) the random blocks are drawn from.
    pub seed: u64,
}

fn pattern_error(param: &'static str, reason: impl Into<String>) -> crate::Error {
    SparseLayoutError::Pattern {
        param,
        reason: reason.into(),
    }
    .into()
}

/// Builds a shared self-attention layout from a block-level rule `keep(q_block, k_block)`; the
/// causal version drops blocks above the diagonal and bands the diagonal ones.
fn block_pattern(
    len: usize,
    block_size: usize,
    causal: bool,
    keep: impl Fn(usize, usize) -> bool,
) -> Result<BlockLayout> {
    let mut b = Builder::new(len, len, block_size, LayoutHeads::Shared)?;
    let n = b.layout().q_blocks();
    for qb in 0..n {
        let last = if causal { qb + 1 } else { n };
        for kb in (0..last).filter(|&kb| keep(qb, kb)) {
            b.push_banded(qb, kb, None, causal.then_some(0));
        }
        b.end_row();
    }
    Ok(b.finish())
}

impl BlockLayout {
    /// The blocks holding any key admitted by a causal mask and/or a sliding window (a
    /// [`KeyBand`] with `key_len = len_k`), with the band as the partial blocks' element mask.
    pub fn banded(
        len_q: usize,
        len_k: usize,
        block_size: usize,
        causal: Option<CausalAlign>,
        window: Option<Window>,
    ) -> Result<Self> {
        let band = KeyBand::new(len_q, len_k, causal, window);
        let mut b = Builder::new(len_q, len_k, block_size, LayoutHeads::Shared)?;
        for qb in 0..b.layout().q_blocks() {
            let rows = b.layout().q_rows(qb);
            for kb in band.key_tiles(rows, block_size) {
                b.push_banded(qb, kb, band.lo, band.hi);
            }
            b.end_row();
        }
        Ok(b.finish())
    }

    /// Local attention over `len` tokens: query `i` sees keys `i − left ..= i + right`, and in
    /// the causal version `i − left ..= i`.
    pub fn sliding_window(
        len: usize,
        block_size: usize,
        left: usize,
        right: usize,
        causal: bool,
    ) -> Result<Self> {
        let align = CausalAlign::TopLeft;
        Self::banded(
            len,
            len,
            block_size,
            causal.then_some(align),
            Some(Window::new(left, right, align)),
        )
    }

    /// Sparse Transformer strided pattern in blocks: query block `m` keeps key block `n` when
    /// `|m − n| < local_blocks` (the local head) or `|m − n|` is a multiple of `stride_blocks`
    /// (the strided head). With `local_blocks ≥ stride_blocks` every position reaches every
    /// earlier one within two hops.
    pub fn strided(
        len: usize,
        block_size: usize,
        local_blocks: usize,
        stride_blocks: usize,
        causal: bool,
    ) -> Result<Self> {
        if local_blocks == 0 {
            return Err(pattern_error("local_blocks", "must be at least 1"));
        }
        if stride_blocks == 0 {
            return Err(pattern_error("stride_blocks", "must be at least 1"));
        }
        block_pattern(len, block_size, causal, |m, n| {
            let d = m.abs_diff(n);
            d < local_blocks || d % stride_blocks == 0
        })
    }

    /// Sparse Transformer fixed pattern in blocks: query block `m` keeps key block `n` when
    /// both lie in the same segment of `stride_blocks` blocks, or `n` is one of the last
    /// `summary_blocks` blocks of its segment (the summary columns every query reads).
    pub fn fixed(
        len: usize,
        block_size: usize,
        stride_blocks: usize,
        summary_blocks: usize,
        causal: bool,
    ) -> Result<Self> {
        if stride_blocks == 0 {
            return Err(pattern_error("stride_blocks", "must be at least 1"));
        }
        if summary_blocks == 0 || summary_blocks > stride_blocks {
            return Err(pattern_error(
                "summary_blocks",
                format!("must be in 1..={stride_blocks} (the stride), got {summary_blocks}"),
            ));
        }
        block_pattern(len, block_size, causal, |m, n| {
            m / stride_blocks == n / stride_blocks
                || n % stride_blocks >= stride_blocks - summary_blocks
        })
    }

    /// BigBird over `len` tokens: global blocks, a window of blocks, and `random_blocks`
    /// further key blocks per query block drawn without replacement from those not already
    /// kept (causal: at or below the query block). Per-head layouts draw each head's random
    /// blocks independently from the one seeded generator.
    pub fn bigbird(
        len: usize,
        block_size: usize,
        heads: LayoutHeads,
        params: BigBird,
        causal: bool,
    ) -> Result<Self> {
        let mut b = Builder::new(len, len, block_size, heads)?;
        let n = b.layout().q_blocks();
        if params.global_blocks > n {
            return Err(pattern_error(
                "global_blocks",
                format!(
                    "{} global blocks, but the sequence has {n}",
                    params.global_blocks
                ),
            ));
        }
        let mut rng = StdRng::seed_from_u64(params.seed);
        let g = params.global_blocks;
        for _ in 0..heads.stored() {
            for qb in 0..n {
                let last = if causal { qb + 1 } else { n };
                let mut keep: Vec<bool> = (0..last)
                    .map(|kb| qb < g || kb < g || qb.abs_diff(kb) <= params.window_radius)
                    .collect();
                let free: Vec<usize> = (0..last).filter(|&kb| !keep[kb]).collect();
                let r = params.random_blocks.min(free.len());
                for at in rand::seq::index::sample(&mut rng, free.len(), r) {
                    keep[free[at]] = true;
                }
                for kb in (0..last).filter(|&kb| keep[kb]) {
                    b.push_banded(qb, kb, None, causal.then_some(0));
                }
                b.end_row();
            }
        }
        Ok(b.finish())
    }
}
