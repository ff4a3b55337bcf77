//! Block-sparse attention layouts: for each query block, the key blocks it keeps and how each
//! kept block is masked inside, for a fused kernel whose cost follows the blocks kept.
//!
//! - [`layout`]: the type ([`BlockLayout`]), its queries, expansion to the element mask, the
//!   arrays the kernel reads ([`DeviceLayout`]) and the check against a call's shape;
//! - [`from_masks`]: layouts from compressed rows, a dense block mask or an element predicate;
//! - [`patterns`]: sliding window, Sparse Transformer strided and fixed, BigBird, and their
//!   causal versions;
//! - `classify`: the one place that decides whether a block is dropped, full or partial;
//! - [`columns`]: the transposed index (key block → query blocks keeping it) the backward's
//!   dK/dV pass walks;
//! - `reblock`: the same element mask in blocks of another size
//!   ([`BlockLayout::reblocked`]), how the tensor-core backward runs every block size on its
//!   64-tiles.
//!
//! The CPU twin of the kernel's block loop is [`crate::twin::sparse_attention`].

mod classify;
pub mod columns;
pub mod from_masks;
pub mod layout;
pub mod patterns;
mod reblock;

pub use columns::ColumnIndex;
pub use layout::{
    check_block_size, BlockKind, BlockLayout, DeviceLayout, ElementMask, LayoutHeads,
    DEFAULT_BLOCK_SIZE, SUPPORTED_BLOCK_SIZES,
};
pub use patterns::BigBird;
