//! Block-sparse layouts on the CPU: kept-block counts against each pattern's formula, the
//! strided pattern's two-hop reach, causal versions above the diagonal, full/partial
//! classification against the expanded mask, round trips through the block mask and the
//! element predicate, the device arrays, and the typed errors of bad layouts.

mod sparse_layouts;

use cuattn::error::SparseLayoutError;
use cuattn::reference::attention::{CausalAlign, KeyBand, Shape, Window};
use cuattn::sparse::{
    BigBird, BlockKind, BlockLayout, DeviceLayout, ElementMask, LayoutHeads, DEFAULT_BLOCK_SIZE,
};
use cuattn::Error;
use proptest::prelude::*;
use sparse_layouts::{generate, self_attention_only, Kind, KINDS};

/// Kept blocks of each query block of stored head `head`.
fn row_counts(l: &BlockLayout, head: usize) -> Vec<usize> {
    (0..l.q_blocks())
        .map(|qb| l.row(head, qb).0.len())
        .collect()
}

/// Sequence lengths with whole and short last blocks, for 16-token blocks.
const LENS: [usize; 5] = [16, 100, 160, 203, 256];
const BS: usize = 16;

#[test]
fn strided_kept_blocks_match_the_formula() {
    for len in LENS {
        let n = len.div_ceil(BS);
        for local in 1..=n.min(6) {
            for stride in 1..=n.min(6) {
                let causal = BlockLayout::strided(len, BS, local, stride, true).unwrap();
                let both = BlockLayout::strided(len, BS, local, stride, false).unwrap();
                for m in 0..n {
                    // Backward: the local run, plus the strided blocks m − t·stride the run
                    // does not already hold (t·stride ≥ local).
                    let back_strided = m / stride + 1;
                    let back_overlap = back_strided.min(local.div_ceil(stride));
                    let back = local.min(m + 1) + back_strided - back_overlap;
                    assert_eq!(
                        causal.row(0, m).0.len(),
                        back,
                        "causal len {len} local {local} stride {stride} block {m}"
                    );
                    // Forward, the mirror image over the n − 1 − m blocks after m.
                    let ahead = n - 1 - m;
                    let fwd_local = (local - 1).min(ahead);
                    let fwd_strided = ahead / stride;
                    let fwd_overlap = fwd_strided.min((local - 1) / stride);
                    assert_eq!(
                        both.row(0, m).0.len(),
                        back + fwd_local + fwd_strided - fwd_overlap,
                        "len {len} local {local} stride {stride} block {m}"
                    );
                }
            }
        }
    }
}

#[test]
fn fixed_kept_blocks_match_the_formula() {
    for len in LENS {
        let n = len.div_ceil(BS);
        for stride in 1..=n.min(6) {
            for summary in 1..=stride {
                let causal = BlockLayout::fixed(len, BS, stride, summary, true).unwrap();
                let both = BlockLayout::fixed(len, BS, stride, summary, false).unwrap();
                // Summary columns among blocks 0..k: c per whole segment plus the part of
                // the last segment's summary that lies below k.
                let summaries_below = |k: usize| {
                    (k / stride) * summary + (k % stride).saturating_sub(stride - summary)
                };
                for m in 0..n {
                    let seg0 = m / stride * stride;
                    let seg_end = n.min(seg0 + stride);
                    // Causal: own segment up to m, and c summary blocks per earlier segment.
                    assert_eq!(
                        causal.row(0, m).0.len(),
                        m - seg0 + 1 + (m / stride) * summary,
                        "causal len {len} stride {stride} summary {summary} block {m}"
                    );
                    // Both ways: own segment, and every summary block outside it.
                    let own_summaries = summaries_below(seg_end) - summaries_below(seg0);
                    assert_eq!(
                        both.row(0, m).0.len(),
                        seg_end - seg0 + summaries_below(n) - own_summaries,
                        "len {len} stride {stride} summary {summary} block {m}"
                    );
                }
            }
        }
    }
}

#[test]
fn bigbird_kept_blocks_match_the_formula() {
    for len in LENS {
        let n = len.div_ceil(BS);
        for g in 0..=n.min(2) {
            for w in 0..3 {
                for r in 0..4 {
                    let p = BigBird {
                        global_blocks: g,
                        window_radius: w,
                        random_blocks: r,
                        seed: 7,
                    };
                    for causal in [false, true] {
                        let l = BlockLayout::bigbird(len, BS, LayoutHeads::PerHead(3), p, causal)
                            .unwrap();
                        for head in 0..3 {
                            for (m, &got) in row_counts(&l, head).iter().enumerate() {
                                let reach = if causal { m + 1 } else { n };
                                let want = if m < g {
                                    reach
                                } else {
                                    let (lo, hi) = (m.saturating_sub(w), (m + w).min(reach - 1));
                                    let window = hi + 1 - lo;
                                    let both = g.min(hi + 1).saturating_sub(lo);
                                    let fixed = g + window - both;
                                    fixed + r.min(reach - fixed)
                                };
                                assert_eq!(
                                    got, want,
                                    "len {len} {p:?} causal {causal} head {head} block {m}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bigbird_random_blocks_follow_the_seed() {
    let p = BigBird {
        global_blocks: 1,
        window_radius: 1,
        random_blocks: 3,
        seed: 42,
    };
    let a = BlockLayout::bigbird(4096, 64, LayoutHeads::PerHead(2), p, false).unwrap();
    let b = BlockLayout::bigbird(4096, 64, LayoutHeads::PerHead(2), p, false).unwrap();
    assert_eq!(a, b, "same seed, same layout");
    let c = BlockLayout::bigbird(
        4096,
        64,
        LayoutHeads::PerHead(2),
        BigBird { seed: 43, ..p },
        false,
    )
    .unwrap();
    assert_ne!(
        a.block_mask(),
        c.block_mask(),
        "another seed, other random blocks"
    );
    // The two heads draw their own random blocks.
    let nq = a.q_blocks();
    let per_head = nq * a.k_blocks();
    let mask = a.block_mask();
    assert_ne!(mask[..per_head], mask[per_head..]);
    assert_eq!(a.kept_blocks_of_head(0), a.kept_blocks_of_head(1));
}

#[test]
fn sliding_window_is_element_exact_and_keeps_the_blocks_its_band_touches() {
    for len in LENS {
        for (left, right) in [
            (0, 0),
            (1, 0),
            (15, 0),
            (16, 16),
            (37, 5),
            (0, 40),
            (300, 300),
        ] {
            for causal in [false, true] {
                let l = BlockLayout::sliding_window(len, BS, left, right, causal).unwrap();
                let right = if causal { 0 } else { right };
                let mask = l.expand(0);
                for i in 0..len {
                    for j in 0..len {
                        let want = j + left >= i && j <= i + right;
                        assert_eq!(
                            mask[i * len + j],
                            want,
                            "len {len} ({left},{right}) i {i} j {j}"
                        );
                    }
                }
                // Query block m holds rows r0..=r1, which see keys r0 − left ..= r1 + right.
                for (m, &got) in row_counts(&l, 0).iter().enumerate() {
                    let (r0, r1) = (m * BS, (len - 1).min(m * BS + BS - 1));
                    let (k0, k1) = (r0.saturating_sub(left), (len - 1).min(r1 + right));
                    assert_eq!(
                        got,
                        k1 / BS - k0 / BS + 1,
                        "len {len} ({left},{right}) block {m}"
                    );
                }
            }
        }
    }
}

/// Whether every position reaches every earlier one (itself included) in at most two hops
/// through the element mask `mask` (`len × len`).
fn reaches_every_earlier_position_in_two_hops(mask: &[bool], len: usize) -> bool {
    for i in 0..len {
        let hop1: Vec<usize> = (0..len).filter(|&k| mask[i * len + k]).collect();
        for j in 0..=i {
            if !mask[i * len + j] && !hop1.iter().any(|&k| mask[k * len + j]) {
                return false;
            }
        }
    }
    true
}

#[test]
fn strided_pattern_connects_every_position_to_every_earlier_one_within_two_hops() {
    for len in [64usize, 100, 203] {
        let n = len.div_ceil(BS);
        for stride in 1..=n.min(5) {
            for local in stride..=n.min(6) {
                for causal in [true, false] {
                    let l = BlockLayout::strided(len, BS, local, stride, causal).unwrap();
                    assert!(
                        reaches_every_earlier_position_in_two_hops(&l.expand(0), len),
                        "len {len} local {local} stride {stride} causal {causal}"
                    );
                }
            }
        }
    }
    // Control: a local run shorter than the stride leaves gaps the check must see.
    let l = BlockLayout::strided(256, BS, 1, 4, true).unwrap();
    assert!(!reaches_every_earlier_position_in_two_hops(
        &l.expand(0),
        256
    ));
}

/// Whether stored head `h` of `l` keeps nothing above the diagonal `j = i + off`.
fn nothing_above(l: &BlockLayout, off: i64) -> bool {
    let (lq, lk) = (l.len_q(), l.len_k());
    (0..l.heads().stored()).all(|h| {
        let m = l.expand(h);
        (0..lq).all(|i| (0..lk).all(|j| !m[i * lk + j] || j as i64 <= i as i64 + off))
    })
}

#[test]
fn causal_versions_keep_nothing_above_the_diagonal() {
    // Self-attention patterns (and the causal predicate): top-left diagonal, and no key block
    // past the query block.
    for kind in KINDS
        .into_iter()
        .filter(|&k| !matches!(k, Kind::BlockMask | Kind::Banded))
    {
        for seed in 0..12u64 {
            let (lq, lk) = if self_attention_only(kind) {
                (150, 150)
            } else {
                (150, 203)
            };
            let l = generate(kind, true, lq, lk, BS, 2, seed).layout;
            assert!(
                nothing_above(&l, 0),
                "{kind:?} seed {seed}: a key above the diagonal"
            );
            if self_attention_only(kind) {
                for h in 0..l.heads().stored() {
                    for qb in 0..l.q_blocks() {
                        assert!(
                            l.row(h, qb).0.iter().all(|&kb| kb <= qb),
                            "{kind:?} seed {seed}"
                        );
                    }
                }
            }
        }
    }
    // Control: the non-causal versions do keep keys above the diagonal.
    let bb = BigBird {
        global_blocks: 1,
        window_radius: 1,
        random_blocks: 1,
        seed: 1,
    };
    for l in [
        BlockLayout::strided(150, BS, 2, 3, false).unwrap(),
        BlockLayout::fixed(150, BS, 3, 1, false).unwrap(),
        BlockLayout::bigbird(150, BS, LayoutHeads::Shared, bb, false).unwrap(),
        BlockLayout::sliding_window(150, BS, 5, 1, false).unwrap(),
    ] {
        assert!(!nothing_above(&l, 0));
    }
    // Banded, with either alignment and Lq ≠ Lk: the diagonal is j = i + off.
    for (lq, lk) in [(150, 90), (90, 150), (77, 77)] {
        for align in [CausalAlign::TopLeft, CausalAlign::BottomRight] {
            let off = if align == CausalAlign::BottomRight {
                lk as i64 - lq as i64
            } else {
                0
            };
            for window in [
                None,
                Some(Window::new(10, 30, align)),
                Some(Window::new(0, 0, align)),
            ] {
                let l = BlockLayout::banded(lq, lk, BS, Some(align), window).unwrap();
                assert!(nothing_above(&l, off), "{lq}×{lk} {align:?} {window:?}");
                // The diagonal itself is kept where it lies inside the keys.
                let m = l.expand(0);
                for i in 0..lq {
                    let j = i as i64 + off;
                    if (0..lk as i64).contains(&j) {
                        assert!(m[i * lk + j as usize], "{lq}×{lk} {align:?} ({i},{j})");
                    }
                }
            }
        }
    }
}

/// Every block of the grid against the element mask `keep(stored_head, i, j)` (keys past
/// len_k masked): a block is kept iff it keeps an element, full iff it keeps every element of
/// its rows, partial iff it masks at least one; a key-tail block reaches past the keys.
fn check_classification(l: &BlockLayout, keep: &dyn Fn(usize, usize, usize) -> bool, what: &str) {
    let bs = l.block_size();
    for h in 0..l.heads().stored() {
        for qb in 0..l.q_blocks() {
            for kb in 0..l.k_blocks() {
                let (mut kept, mut masked) = (0, 0);
                for i in l.q_rows(qb) {
                    for j in kb * bs..(kb + 1) * bs {
                        if keep(h, i, j) {
                            kept += 1;
                        } else {
                            masked += 1;
                        }
                    }
                }
                let kind = l.block(h, qb, kb);
                let at = format!(
                    "{what}: head {h} block ({qb},{kb}) {kind:?}, {kept} kept, {masked} masked"
                );
                match kind {
                    None => assert_eq!(kept, 0, "{at}: dropped but keeps elements"),
                    Some(BlockKind::Full) => assert_eq!(masked, 0, "{at}: full but masks"),
                    Some(BlockKind::Partial(mask)) => {
                        assert!(kept > 0, "{at}: kept but keeps nothing");
                        assert!(masked > 0, "{at}: partial but masks nothing");
                        if mask == ElementMask::KeyTail {
                            assert!((kb + 1) * bs > l.len_k(), "{at}: key tail inside the keys");
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn classification_agrees_with_the_expanded_mask(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        len_q in 1..140usize,
        len_k in 1..140usize,
        seed in any::<u64>(),
    ) {
        let kind = KINDS[kind];
        let len_k = if self_attention_only(kind) { len_q } else { len_k };
        let g = generate(kind, causal, len_q, len_k, BS, 3, seed);
        let l = &g.layout;
        let what = format!("{kind:?} causal {causal} {len_q}×{len_k}");
        // The expansion is the pattern's own element mask, computed without the layout.
        for h in 0..l.heads().stored() {
            let m = l.expand(h);
            for i in 0..len_q {
                for j in 0..len_k {
                    prop_assert_eq!(m[i * len_k + j], (g.truth)(h, i, j), "{} head {} ({},{})", what, h, i, j);
                    prop_assert_eq!(m[i * len_k + j], l.admits(h, i, j));
                }
            }
        }
        // Blocks: kept iff the pattern keeps an element of them; full iff it keeps them all.
        check_classification(l, &|h, i, j| j < len_k && (g.truth)(h, i, j), &what);
    }

    #[test]
    fn predicate_and_block_mask_constructors_round_trip(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        len_q in 1..140usize,
        len_k in 1..140usize,
        seed in any::<u64>(),
    ) {
        let kind = KINDS[kind];
        let len_k = if self_attention_only(kind) { len_q } else { len_k };
        let l = generate(kind, causal, len_q, len_k, BS, 3, seed).layout;
        let heads = l.heads();
        // Element level: the predicate of the expanded mask rebuilds the same mask, blocks and
        // full blocks.
        let masks: Vec<Vec<bool>> = (0..heads.stored()).map(|h| l.expand(h)).collect();
        let p = BlockLayout::from_predicate_per_head(len_q, len_k, BS, heads, |h, i, j| {
            masks[h][i * len_k + j]
        }).unwrap();
        prop_assert_eq!(p.block_mask(), l.block_mask());
        for (h, mask) in masks.iter().enumerate() {
            prop_assert_eq!(&p.expand(h), mask);
            for qb in 0..l.q_blocks() {
                let full = |x: &BlockLayout| -> Vec<bool> {
                    x.row(h, qb).1.iter().map(|&k| k == BlockKind::Full).collect()
                };
                prop_assert_eq!(full(&p), full(&l));
            }
        }
        // Block level: the block mask and the compressed rows rebuild the same blocks.
        let b = BlockLayout::from_block_mask(len_q, len_k, BS, heads, &l.block_mask()).unwrap();
        prop_assert_eq!(b.block_mask(), l.block_mask());
        let c = BlockLayout::from_csr(len_q, len_k, BS, heads, l.row_offsets(), l.col_indices())
            .unwrap();
        prop_assert_eq!(&c, &b);
        // The device arrays hold the same rows and one descriptor per kept block.
        let d = l.to_device().unwrap();
        let as_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
        prop_assert_eq!(&d.row_offsets, &as_i32(l.row_offsets()));
        prop_assert_eq!(&d.col_indices, &as_i32(l.col_indices()));
        for (at, kind) in l.kinds().iter().enumerate() {
            let code = match kind {
                BlockKind::Full => DeviceLayout::FULL,
                BlockKind::Partial(ElementMask::KeyTail) => DeviceLayout::KEY_TAIL,
                BlockKind::Partial(ElementMask::Band { lo, hi }) => {
                    prop_assert_eq!((d.band_lo[at] as i64, d.band_hi[at] as i64), (*lo, *hi));
                    DeviceLayout::BAND
                }
                BlockKind::Partial(ElementMask::Bits { index }) => {
                    prop_assert_eq!(d.bits_index[at] as usize, *index);
                    DeviceLayout::BITS
                }
            };
            prop_assert_eq!(d.mask_kind[at], code);
        }
    }
}

#[test]
fn density_counts_kept_blocks_over_all_blocks() {
    let dense =
        BlockLayout::from_block_mask(200, 200, BS, LayoutHeads::Shared, &[true; 13 * 13]).unwrap();
    assert_eq!(dense.kept_blocks(), 169);
    assert_eq!(dense.density(), 1.0);
    // Causal top-left over 13×13 blocks keeps the lower triangle with its diagonal.
    let causal = BlockLayout::banded(200, 200, BS, Some(CausalAlign::TopLeft), None).unwrap();
    assert_eq!(causal.kept_blocks(), 13 * 14 / 2);
    assert!((causal.density() - 91.0 / 169.0).abs() < 1e-12);
    let diag = causal
        .kinds()
        .iter()
        .filter(|k| **k != BlockKind::Full)
        .count();
    assert_eq!(diag, 13, "only the diagonal blocks are partial");
    // The default block size is the kernel's tile.
    assert!(BlockLayout::sliding_window(4096, DEFAULT_BLOCK_SIZE, 255, 0, true).is_ok());
}

#[test]
fn banded_layouts_hold_exactly_the_dense_masks_band() {
    for (lq, lk) in [(50, 50), (40, 90), (90, 40), (1, 33)] {
        for causal in [
            None,
            Some(CausalAlign::TopLeft),
            Some(CausalAlign::BottomRight),
        ] {
            for window in [
                None,
                Some(Window::new(5, 3, CausalAlign::TopLeft)),
                Some(Window::new(20, 0, CausalAlign::BottomRight)),
            ] {
                let l = BlockLayout::banded(lq, lk, BS, causal, window).unwrap();
                let band = KeyBand::new(lq, lk, causal, window);
                let m = l.expand(0);
                for i in 0..lq {
                    for j in 0..lk {
                        assert_eq!(
                            m[i * lk + j],
                            band.admits(i, j),
                            "{lq}×{lk} {causal:?} {window:?} ({i},{j})"
                        );
                    }
                }
                check_classification(&l, &|_, i, j| band.admits(i, j), "banded");
            }
        }
    }
}

fn layout_error(r: cuattn::Result<BlockLayout>) -> SparseLayoutError {
    match r {
        Err(Error::SparseLayout(e)) => e,
        other => panic!("expected a sparse layout error, got {other:?}"),
    }
}

#[test]
fn bad_compressed_rows_get_typed_errors() {
    // 40 tokens in 16-token blocks: 3 query blocks, 3 key blocks.
    let csr = |offsets: &[usize], cols: &[usize]| {
        BlockLayout::from_csr(40, 40, BS, LayoutHeads::Shared, offsets, cols)
    };
    assert!(csr(&[0, 1, 3, 4], &[0, 0, 2, 1]).is_ok());
    assert_eq!(
        layout_error(csr(&[0, 1, 3, 4], &[0, 2, 0, 1])),
        SparseLayoutError::Unsorted {
            head: 0,
            q_block: 1,
            prev: 2,
            next: 0
        }
    );
    assert_eq!(
        layout_error(csr(&[0, 1, 3, 4], &[0, 1, 1, 1])),
        SparseLayoutError::Duplicate {
            head: 0,
            q_block: 1,
            k_block: 1
        }
    );
    assert_eq!(
        layout_error(csr(&[0, 1, 3, 4], &[0, 1, 2, 3])),
        SparseLayoutError::OutOfRange {
            head: 0,
            q_block: 2,
            k_block: 3,
            k_blocks: 3
        }
    );
    for offsets in [&[0, 1, 3][..], &[1, 1, 3, 4], &[0, 3, 1, 4], &[0, 1, 3, 5]] {
        assert!(
            matches!(
                layout_error(csr(offsets, &[0, 0, 2, 1])),
                SparseLayoutError::RowOffsets { .. }
            ),
            "offsets {offsets:?}"
        );
    }
    // Per-head rows: the error names the head.
    let per_head = BlockLayout::from_csr(
        40,
        40,
        BS,
        LayoutHeads::PerHead(2),
        &[0, 1, 2, 3, 4, 5, 7],
        &[0, 1, 2, 0, 1, 2, 2],
    );
    assert_eq!(
        layout_error(per_head),
        SparseLayoutError::Duplicate {
            head: 1,
            q_block: 2,
            k_block: 2
        }
    );
}

#[test]
fn bad_block_sizes_and_parameters_get_typed_errors() {
    for bs in [0, 8, 48, 96, 256] {
        assert!(matches!(
            layout_error(BlockLayout::sliding_window(100, bs, 4, 4, false)),
            SparseLayoutError::BlockSize { got, .. } if got == bs
        ));
        assert!(matches!(
            layout_error(BlockLayout::from_block_mask(
                100,
                100,
                bs,
                LayoutHeads::Shared,
                &[]
            )),
            SparseLayoutError::BlockSize { .. }
        ));
    }
    let pattern = |r| matches!(layout_error(r), SparseLayoutError::Pattern { .. });
    assert!(pattern(BlockLayout::strided(100, BS, 0, 2, true)));
    assert!(pattern(BlockLayout::strided(100, BS, 2, 0, true)));
    assert!(pattern(BlockLayout::fixed(100, BS, 0, 1, true)));
    assert!(pattern(BlockLayout::fixed(100, BS, 3, 4, true)));
    assert!(pattern(BlockLayout::fixed(100, BS, 3, 0, true)));
    let bb = BigBird {
        global_blocks: 8,
        window_radius: 1,
        random_blocks: 1,
        seed: 0,
    };
    assert!(pattern(BlockLayout::bigbird(
        100,
        BS,
        LayoutHeads::Shared,
        bb,
        false
    )));
    assert!(pattern(BlockLayout::from_block_mask(
        100,
        100,
        BS,
        LayoutHeads::PerHead(0),
        &[]
    )));
    assert!(matches!(
        BlockLayout::from_block_mask(100, 100, BS, LayoutHeads::Shared, &[true; 48]),
        Err(Error::Shape {
            arg: "block mask",
            ..
        })
    ));
}

#[test]
fn layouts_that_do_not_fit_the_call_get_typed_errors() {
    let l = BlockLayout::bigbird(
        128,
        BS,
        LayoutHeads::PerHead(4),
        BigBird {
            global_blocks: 1,
            window_radius: 1,
            random_blocks: 1,
            seed: 3,
        },
        true,
    )
    .unwrap();
    let s = Shape::new(2, 4, 2, 128, 128, 64, 64);
    assert!(l.check_call(&s, BS).is_ok());
    let err = |s: &Shape, bs| match l.check_call(s, bs) {
        Err(Error::SparseLayout(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(
        err(&s, 64),
        SparseLayoutError::BlockSize {
            got: BS,
            supported: vec![64]
        }
    );
    assert_eq!(
        err(&Shape { len_q: 127, ..s }, BS),
        SparseLayoutError::ShapeMismatch {
            what: "len_q",
            layout: 128,
            call: 127
        }
    );
    assert_eq!(
        err(&Shape { len_k: 200, ..s }, BS),
        SparseLayoutError::ShapeMismatch {
            what: "len_k",
            layout: 128,
            call: 200
        }
    );
    assert_eq!(
        err(&Shape { heads_q: 8, ..s }, BS),
        SparseLayoutError::ShapeMismatch {
            what: "heads",
            layout: 4,
            call: 8
        }
    );
    // A shared layout fits any head count.
    let shared = BlockLayout::sliding_window(128, BS, 8, 8, false).unwrap();
    assert!(shared.check_call(&Shape { heads_q: 8, ..s }, BS).is_ok());
}
