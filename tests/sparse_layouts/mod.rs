//! Random block-sparse layouts of every kind, for the layout and twin tests.

use cuattn::reference::attention::{CausalAlign, Window};
use cuattn::sparse::{BigBird, BlockLayout, LayoutHeads};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Every way of building a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Banded,
    SlidingWindow,
    Strided,
    Fixed,
    BigBird,
    BlockMask,
    Predicate,
}

pub const KINDS: [Kind; 7] = [
    Kind::Banded,
    Kind::SlidingWindow,
    Kind::Strided,
    Kind::Fixed,
    Kind::BigBird,
    Kind::BlockMask,
    Kind::Predicate,
];

/// Whether a kind needs `len_q == len_k` (the block-level self-attention patterns).
pub fn self_attention_only(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::SlidingWindow | Kind::Strided | Kind::Fixed | Kind::BigBird
    )
}

/// A layout and, independently of it, the element mask it must expand to:
/// `truth(stored_head, i, j)` for `i < len_q`, `j < len_k`.
pub struct Generated {
    pub layout: BlockLayout,
    pub truth: ElementMask,
}

/// `keep(stored_head, i, j)`.
pub type ElementMask = Box<dyn Fn(usize, usize, usize) -> bool>;

/// A layout of `kind` (causal version when `causal`) over `len_q × len_k` in blocks of
/// `block_size`, its parameters drawn from `seed`; per-head where the kind allows and the
/// seed says so (`heads_q` heads), with its independent element mask. Block-level patterns
/// use `len_q` for both sides.
pub fn generate(
    kind: Kind,
    causal: bool,
    len_q: usize,
    len_k: usize,
    block_size: usize,
    heads_q: usize,
    seed: u64,
) -> Generated {
    let mut rng = SmallRng::seed_from_u64(seed);
    let bs = block_size;
    let blocks = len_q.div_ceil(bs).max(1);
    let align = if rng.gen_bool(0.5) {
        CausalAlign::TopLeft
    } else {
        CausalAlign::BottomRight
    };
    let heads = if rng.gen_bool(0.5) {
        LayoutHeads::Shared
    } else {
        LayoutHeads::PerHead(heads_q)
    };
    // Causal for the self-attention patterns: j ≤ i.
    let below = move |i: usize, j: usize| !causal || j <= i;
    let (layout, truth): (_, ElementMask) = match kind {
        Kind::Banded => {
            let window = rng
                .gen_bool(0.7)
                .then(|| Window::new(rng.gen_range(0..40), rng.gen_range(0..40), align));
            let off = match align {
                CausalAlign::TopLeft => 0,
                CausalAlign::BottomRight => len_k as i64 - len_q as i64,
            };
            let truth = move |_h, i: usize, j: usize| {
                let (i, j) = (i as i64, j as i64);
                (!causal || j <= i + off)
                    && window.is_none_or(|w| {
                        j >= i + off - w.left as i64 && j <= i + off + w.right as i64
                    })
            };
            (
                BlockLayout::banded(len_q, len_k, bs, causal.then_some(align), window),
                Box::new(truth) as _,
            )
        }
        Kind::SlidingWindow => {
            let (left, right) = (rng.gen_range(0..50), rng.gen_range(0..50));
            (
                BlockLayout::sliding_window(len_q, bs, left, right, causal),
                Box::new(move |_h, i: usize, j: usize| {
                    j + left >= i && j <= i + right && below(i, j)
                }) as _,
            )
        }
        Kind::Strided => {
            let stride = rng.gen_range(1..=blocks);
            let local = rng.gen_range(1..=blocks);
            (
                BlockLayout::strided(len_q, bs, local, stride, causal),
                Box::new(move |_h, i: usize, j: usize| {
                    let d = (i / bs).abs_diff(j / bs);
                    (d < local || d.is_multiple_of(stride)) && below(i, j)
                }) as _,
            )
        }
        Kind::Fixed => {
            let stride = rng.gen_range(1..=blocks);
            let summary = rng.gen_range(1..=stride);
            (
                BlockLayout::fixed(len_q, bs, stride, summary, causal),
                Box::new(move |_h, i: usize, j: usize| {
                    let (m, n) = (i / bs, j / bs);
                    (m / stride == n / stride || n % stride >= stride - summary) && below(i, j)
                }) as _,
            )
        }
        Kind::BigBird => {
            let layout = BlockLayout::bigbird(
                len_q,
                bs,
                heads,
                BigBird {
                    global_blocks: rng.gen_range(0..=blocks.min(2)),
                    window_radius: rng.gen_range(0..3),
                    random_blocks: rng.gen_range(0..4),
                    seed: rng.gen(),
                },
                causal,
            );
            // The random blocks are the layout's own; what is checked is their element masks.
            let blocks_kept = layout.as_ref().map(|l| l.block_mask()).unwrap_or_default();
            let nk = blocks;
            let truth = move |h: usize, i: usize, j: usize| {
                blocks_kept[(h * nk + i / bs) * nk + j / bs] && below(i, j)
            };
            (layout, Box::new(truth) as _)
        }
        Kind::BlockMask => {
            let (nq, nk) = (len_q.div_ceil(bs), len_k.div_ceil(bs));
            let p = rng.gen_range(0.1..0.9);
            let mask: Vec<bool> = (0..heads.stored() * nq * nk)
                .map(|at| {
                    let (qb, kb) = (at / nk % nq.max(1), at % nk);
                    rng.gen_bool(p) && (!causal || kb <= qb)
                })
                .collect();
            let layout = BlockLayout::from_block_mask(len_q, len_k, bs, heads, &mask);
            let truth = move |h: usize, i: usize, j: usize| mask[(h * nq + i / bs) * nk + j / bs];
            (layout, Box::new(truth) as _)
        }
        Kind::Predicate => {
            // A hash of (head, i, j): an irregular mask, so partial blocks carry bitmasks.
            let salt: u64 = rng.gen();
            let density = rng.gen_range(1..8u64);
            let keep = move |h: usize, i: usize, j: usize| {
                let x = (h as u64 * 1_000_003 + i as u64 * 7919 + j as u64)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ salt;
                (x >> 29) % 8 < density && below(i, j)
            };
            (
                BlockLayout::from_predicate_per_head(len_q, len_k, bs, heads, keep),
                Box::new(keep) as _,
            )
        }
    };
    Generated {
        layout: layout.expect("valid pattern parameters"),
        truth,
    }
}
