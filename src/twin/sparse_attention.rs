//! CPU twin of the fused block-sparse attention forward: the dense kernel's FlashAttention-2
//! block loop ([`crate::twin::attention`]) walking only the key blocks a [`BlockLayout`] keeps.
//!
//! - one program per (batch, query head, query block) of `block_size` rows; it reads the
//!   layout row of its head (head 0 for a shared layout) and walks the listed key blocks in
//!   ascending order — blocks not listed are never touched, so the work follows the blocks kept;
//! - key padding (`key_lens`) is applied at run time as in the dense kernel: blocks starting at
//!   or past the sequence's key length are skipped, blocks reaching past it are masked;
//! - a [`BlockKind::Full`] block inside the keys runs without element masking; any other block
//!   masks element by element by assignment to −inf, with its
//!   [`ElementMask`](crate::sparse::ElementMask)
//!   ([`BlockLayout::kind_admits`]) and `j < key_len`;
//! - in a masked block, V rows of keys that no row of the block keeps are read as zero, so NaN
//!   there cannot reach the output through 0·NaN (the kernel zero-fills those rows of its V
//!   tile: for a band, keys outside `[row0 + lo, row_last + hi]`; for a bitmask, the columns
//!   whose bits are clear in every row; and keys past `key_len`);
//! - online softmax, P rounding and finalisation as in the dense twin; a query row whose kept
//!   blocks hold no key it may see (or that has none) gives O = 0 and LSE = −inf.
//!
//! Causal and window masks of a sparse call belong in its layout ([`BlockLayout::banded`] and
//! the causal pattern versions): `opts.causal` and `opts.window` must be `None`.
//!
//! [`forward_tiled`] runs a layout as the tensor-core entries do: re-blocked to the block size
//! the host picks for the head dims ([`kernel_block_size`]) and walked with that tile.

use super::attention::{BlockState, HeadOperands, Output, TileCounts};
use crate::dtype::DType;
use crate::reference::attention::{Options, Shape};
use crate::sparse::{BlockKind, BlockLayout};
use crate::{Error, Result};

/// The twin's forward over the BHSD inputs of `shape` (as in [`crate::reference::attention`]),
/// the kernel's tile being `block_size` square. Errors if the layout does not fit the call
/// ([`BlockLayout::check_call`]) or `opts` carries a causal or window mask.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    opts: &Options,
    layout: &BlockLayout,
    block_size: usize,
    dtype: DType,
) -> Result<(Output, TileCounts)> {
    layout.check_call(shape, block_size)?;
    if opts.causal.is_some() || opts.window.is_some() {
        return Err(Error::invalid(
            "opts",
            "a sparse call's causal and window masks belong in its layout",
        ));
    }
    let s = shape;
    let bs = block_size;
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
        let key_blocks = key_len.div_ceil(bs);
        for h in 0..s.heads_q {
            let ops = HeadOperands::new(q, k, v, s, b, h);
            let head = layout.head_of(h);
            let o_head = (b * s.heads_q + h) * s.len_q;
            for qb in 0..layout.q_blocks() {
                let rows = layout.q_rows(qb);
                let mut state = BlockState::new(rows.start, rows.len(), s.dim_v);
                let mut computed = 0;
                let (cols, kinds) = layout.row(head, qb);
                for (&kb, &kind) in cols.iter().zip(kinds) {
                    let key0 = kb * bs;
                    if key0 >= key_len {
                        continue; // wholly in the padding: skipped at run time
                    }
                    computed += 1;
                    let masked = kind != BlockKind::Full || key0 + bs > key_len;
                    let keep =
                        |i: usize, j: usize| j < key_len && layout.kind_admits(kind, qb, kb, i, j);
                    if !masked {
                        counts.full += 1;
                        state.fold_tile(&ops, key0, bs, c, dtype, None, &|_| true);
                        continue;
                    }
                    counts.masked += 1;
                    // Keys some row of the block keeps: the only V rows loaded.
                    let seen: Vec<bool> = (key0..key0 + bs)
                        .map(|j| rows.clone().any(|i| keep(i, j)))
                        .collect();
                    state.fold_tile(&ops, key0, bs, c, dtype, Some(&keep), &|j| seen[j - key0]);
                }
                counts.skipped += key_blocks - computed;
                state.finish(
                    scale,
                    dtype,
                    &mut out.o[o_head * s.dim_v..(o_head + s.len_q) * s.dim_v],
                    &mut out.lse[o_head..o_head + s.len_q],
                );
            }
        }
    }
    Ok((out, counts))
}

/// The tensor-core entries' tile for re-blocked layouts (`attention_sparse_bs64_*`).
pub const KERNEL_TILE: usize = 64;

/// The block size of the layout the tensor-core sparse forward reads for a layout of
/// `block_size` at head dims `dim_qk`, `dim_v` (the host's `ops::attention::sparse_tc_block`,
/// checked equal by a unit test there): blocks of 64, and of 128 when both head dims are at
/// most 128, run as they are; every other layout is re-blocked to [`KERNEL_TILE`].
pub fn kernel_block_size(block_size: usize, dim_qk: usize, dim_v: usize) -> usize {
    if block_size == 128 && dim_qk.max(dim_v) <= 128 {
        128
    } else {
        KERNEL_TILE
    }
}

/// The forward as the tensor-core entries run `layout`: re-blocked
/// ([`BlockLayout::reblocked`], as the host does once per layout) to `tile` square blocks, then
/// [`forward`]'s walk over the re-blocked layout's kept tiles (its [`TileCounts`] count those
/// tiles). Errors as [`forward`] for a layout that does not fit the call (in its own block
/// size) and for an unsupported `tile`.
#[allow(clippy::too_many_arguments)]
pub fn forward_tiled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    opts: &Options,
    layout: &BlockLayout,
    tile: usize,
    dtype: DType,
) -> Result<(Output, TileCounts)> {
    layout.check_call(shape, layout.block_size())?;
    let tiled = layout.reblocked(tile)?;
    forward(q, k, v, shape, opts, &tiled, tile, dtype)
}
