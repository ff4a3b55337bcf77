//! The CPU twin of the block-sparse attention forward (`cuattn::twin::sparse_attention`)
//! against the f64 reference with each layout's element mask — computed from the pattern's own
//! definition, not from the layout — on random layouts of every kind; exact agreement with the
//! dense twin where the layout is the dense mask; work that follows the kept blocks; NaN in
//! keys no query keeps; fully masked rows; and the typed errors of layouts that do not fit.

mod sparse_layouts;

use cuattn::error::SparseLayoutError;
use cuattn::reference::attention::{self as reference, CausalAlign, Options, Shape, Window};
use cuattn::sparse::{BlockKind, BlockLayout, LayoutHeads, DEFAULT_BLOCK_SIZE};
use cuattn::tolerance::{attention as tolerances, expect_close, Tolerance};
use cuattn::twin::attention::{self as dense_twin, Tiling};
use cuattn::twin::sparse_attention as twin;
use cuattn::{DType, Error};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparse_layouts::{generate, self_attention_only, KINDS};

fn rand_vec(rng: &mut SmallRng, dtype: DType, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(spread * rng.gen_range(-1.0f32..1.0)))
        .collect()
}

fn check(what: &str, out: &[f32], want: &[f64], tol: Tolerance) -> Result<(), TestCaseError> {
    expect_close(what, out, want, tol).map_err(TestCaseError::fail)
}

const BS: usize = 16;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn twin_matches_the_reference_with_the_patterns_element_mask(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        len_q in 1..100usize,
        len_k in 1..100usize,
        gqa in any::<bool>(),
        padded in any::<bool>(),
        dtype in 0..3usize,
        kernel_tile in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let kind = KINDS[kind];
        let dtype = DType::ALL[dtype];
        // Mostly 16-token blocks (more blocks per case); some at the kernel's 64, longer.
        let (bs, len_q, len_k) = if kernel_tile {
            (DEFAULT_BLOCK_SIZE, 2 * len_q, 2 * len_k)
        } else {
            (BS, len_q, len_k)
        };
        let len_k = if self_attention_only(kind) { len_q } else { len_k };
        let (d, dv) = if seed % 2 == 0 { (8, 8) } else { (9, 5) };
        let s = Shape::new(2, 4, if gqa { 2 } else { 4 }, len_q, len_k, d, dv);
        let g = generate(kind, causal, len_q, len_k, bs, s.heads_q, seed);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
        let q = rand_vec(&mut rng, dtype, s.q_len(), 2.0);
        let k = rand_vec(&mut rng, dtype, s.k_len(), 2.0);
        let v = rand_vec(&mut rng, dtype, s.v_len(), 1.0);
        // Key padding on top of the layout: the second sequence may see fewer keys, even none.
        let opts = Options {
            key_lens: padded.then(|| vec![len_k, rng.gen_range(0..=len_k)]),
            ..Options::new(d)
        };
        let layout = &g.layout;
        let want = reference::forward_masked(&q, &k, &v, &s, &opts, &|_, h, i, j| {
            (g.truth)(layout.head_of(h), i, j)
        }).unwrap();
        let (got, counts) = twin::forward(&q, &k, &v, &s, &opts, layout, bs, dtype).unwrap();
        let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, dtype);
        let what = format!(
            "{kind:?} causal {causal} {dtype} {len_q}×{len_k} blocks of {bs} {:?}",
            opts.key_lens
        );
        check(&format!("{what}: O"), &got.o, &want.o, tol.o)?;
        check(&format!("{what}: LSE"), &got.lse, &want.lse, tol.lse)?;
        // Without padding the programs compute exactly the kept blocks, no others.
        if !padded {
            let kept: usize = (0..s.heads_q).map(|h| layout.kept_blocks_of_head(layout.head_of(h))).sum();
            prop_assert_eq!(counts.full + counts.masked, s.batch * kept);
            let full: usize = (0..s.heads_q)
                .map(|h| {
                    let n = layout.q_blocks();
                    let head = layout.head_of(h);
                    let span = layout.row_offsets()[head * n]..layout.row_offsets()[(head + 1) * n];
                    layout.kinds()[span].iter().filter(|&&k| k == BlockKind::Full).count()
                })
                .sum();
            prop_assert_eq!(counts.full, s.batch * full, "full blocks run unmasked");
        }
    }
}

#[test]
fn dense_and_banded_layouts_run_exactly_as_the_dense_twin() {
    let mut rng = SmallRng::seed_from_u64(0xd3);
    let tiling = Tiling {
        block_q: BS,
        block_k: BS,
    };
    for (lq, lk) in [(64, 64), (50, 77), (77, 50), (5, 40)] {
        let s = Shape::new(2, 2, 1, lq, lk, 8, 8);
        let q = rand_vec(&mut rng, DType::BF16, s.q_len(), 2.0);
        let k = rand_vec(&mut rng, DType::BF16, s.k_len(), 2.0);
        let v = rand_vec(&mut rng, DType::BF16, s.v_len(), 1.0);
        let causal = [
            None,
            Some(CausalAlign::TopLeft),
            Some(CausalAlign::BottomRight),
        ];
        for causal in causal {
            for window in [None, Some(Window::new(20, 3, CausalAlign::BottomRight))] {
                let key_lens = Some(vec![lk, lk * 2 / 3]);
                let dense_opts = Options {
                    causal,
                    window,
                    key_lens: key_lens.clone(),
                    ..Options::new(8)
                };
                let layout = BlockLayout::banded(lq, lk, BS, causal, window).unwrap();
                let sparse_opts = Options {
                    key_lens,
                    ..Options::new(8)
                };
                let what = format!("{lq}×{lk} {causal:?} {window:?}");
                let (want, _) =
                    dense_twin::forward(&q, &k, &v, &s, &dense_opts, tiling, DType::BF16);
                // Key padding shortens sequence 1 below the layout's len_k, so only sequence
                // 0 runs the same masks; compare it, and everything when there is no padding.
                let (got, _) =
                    twin::forward(&q, &k, &v, &s, &sparse_opts, &layout, BS, DType::BF16).unwrap();
                let first = s.o_len() / 2;
                assert_eq!(got.o[..first], want.o[..first], "{what}: O");
                assert_eq!(
                    got.lse[..s.lse_len() / 2],
                    want.lse[..s.lse_len() / 2],
                    "{what}: LSE"
                );
                let unpadded = Options {
                    key_lens: None,
                    ..dense_opts.clone()
                };
                let (want, want_counts) =
                    dense_twin::forward(&q, &k, &v, &s, &unpadded, tiling, DType::BF16);
                let (got, counts) =
                    twin::forward(&q, &k, &v, &s, &Options::new(8), &layout, BS, DType::BF16)
                        .unwrap();
                assert_eq!(got.o, want.o, "{what}: O");
                assert_eq!(got.lse, want.lse, "{what}: LSE");
                assert_eq!(
                    counts, want_counts,
                    "{what}: the same tiles run the same way"
                );
            }
        }
    }
    // The all-blocks layout is the dense call.
    let s = Shape::new(1, 2, 2, 70, 45, 8, 8);
    let q = rand_vec(&mut rng, DType::F16, s.q_len(), 2.0);
    let k = rand_vec(&mut rng, DType::F16, s.k_len(), 2.0);
    let v = rand_vec(&mut rng, DType::F16, s.v_len(), 1.0);
    let all = BlockLayout::from_block_mask(70, 45, BS, LayoutHeads::PerHead(2), &[true; 2 * 5 * 3])
        .unwrap();
    let (want, want_counts) =
        dense_twin::forward(&q, &k, &v, &s, &Options::new(8), tiling, DType::F16);
    let (got, counts) =
        twin::forward(&q, &k, &v, &s, &Options::new(8), &all, BS, DType::F16).unwrap();
    assert_eq!(got.o, want.o);
    assert_eq!(got.lse, want.lse);
    assert_eq!(counts, want_counts);
}

#[test]
fn nan_in_keys_no_query_keeps_never_reaches_the_output() {
    // Keys j ≡ 3 (mod 5) are masked for every query, inside kept partial (bitmask) blocks;
    // a checkerboard of dropped blocks removes more. NaN there must not matter.
    let (lq, lk) = (80, 96);
    let keep = |i: usize, j: usize| j % 5 != 3 && (i / BS + j / BS) % 3 != 1;
    let layout = BlockLayout::from_predicate(lq, lk, BS, keep).unwrap();
    assert!(layout.density() < 1.0);
    let s = Shape::new(1, 2, 1, lq, lk, 8, 8);
    let mut rng = SmallRng::seed_from_u64(21);
    let q = rand_vec(&mut rng, DType::F16, s.q_len(), 1.0);
    let mut k = rand_vec(&mut rng, DType::F16, s.k_len(), 1.0);
    let mut v = rand_vec(&mut rng, DType::F16, s.v_len(), 1.0);
    let opts = Options::new(8);
    let clean = reference::forward_masked(&q, &k, &v, &s, &opts, &|_, _, i, j| keep(i, j)).unwrap();
    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::F16);
    for j in (3..lk).step_by(5) {
        k[j * 8..(j + 1) * 8].iter_mut().for_each(|x| *x = f32::NAN);
        v[j * 8..(j + 1) * 8].iter_mut().for_each(|x| *x = f32::NAN);
    }
    let (got, _) = twin::forward(&q, &k, &v, &s, &opts, &layout, BS, DType::F16).unwrap();
    expect_close("O", &got.o, &clean.o, tol.o).unwrap();
    expect_close("LSE", &got.lse, &clean.lse, tol.lse).unwrap();
}

#[test]
fn rows_whose_blocks_keep_nothing_give_zero_and_negative_infinity() {
    // Query block 1 keeps no block; in query block 0, rows 0..5 keep no key of their blocks.
    let (lq, lk) = (40, 40);
    let keep = |i: usize, j: usize| (5..BS).contains(&i) && j < 20 || i >= 2 * BS;
    let layout = BlockLayout::from_predicate(lq, lk, BS, keep).unwrap();
    assert!(layout.row(0, 1).0.is_empty());
    let s = Shape::new(1, 1, 1, lq, lk, 4, 4);
    let mut rng = SmallRng::seed_from_u64(22);
    let (q, k, v) = (
        rand_vec(&mut rng, DType::F32, s.q_len(), 1.0),
        rand_vec(&mut rng, DType::F32, s.k_len(), 1.0),
        rand_vec(&mut rng, DType::F32, s.v_len(), 1.0),
    );
    let (got, _) =
        twin::forward(&q, &k, &v, &s, &Options::new(4), &layout, BS, DType::F32).unwrap();
    for i in (0..5).chain(BS..2 * BS) {
        assert_eq!(got.lse[i], f32::NEG_INFINITY, "row {i}");
        assert!(got.o[i * 4..i * 4 + 4].iter().all(|&o| o == 0.0), "row {i}");
    }
    for i in (5..BS).chain(2 * BS..lq) {
        assert!(got.lse[i].is_finite(), "row {i}");
    }
}

#[test]
fn layouts_that_do_not_fit_the_call_get_typed_errors() {
    let s = Shape::new(1, 4, 2, 64, 64, 8, 8);
    let mut rng = SmallRng::seed_from_u64(23);
    let q = rand_vec(&mut rng, DType::F32, s.q_len(), 1.0);
    let k = rand_vec(&mut rng, DType::F32, s.k_len(), 1.0);
    let v = rand_vec(&mut rng, DType::F32, s.v_len(), 1.0);
    let run = |layout: &BlockLayout, opts: &Options, bs| {
        twin::forward(&q, &k, &v, &s, opts, layout, bs, DType::F32).map(|_| ())
    };
    let opts = Options::new(8);
    let fits = BlockLayout::sliding_window(64, BS, 8, 8, true).unwrap();
    assert!(run(&fits, &opts, BS).is_ok());
    let layout_err = |r: cuattn::Result<()>| match r {
        Err(Error::SparseLayout(e)) => e,
        other => panic!("expected a layout error, got {other:?}"),
    };
    assert!(matches!(
        layout_err(run(&fits, &opts, 64)),
        SparseLayoutError::BlockSize { got: 16, .. }
    ));
    let short = BlockLayout::sliding_window(60, BS, 8, 8, true).unwrap();
    assert!(matches!(
        layout_err(run(&short, &opts, BS)),
        SparseLayoutError::ShapeMismatch { what: "len_q", .. }
    ));
    let other_k = BlockLayout::banded(64, 65, BS, None, None).unwrap();
    assert!(matches!(
        layout_err(run(&other_k, &opts, BS)),
        SparseLayoutError::ShapeMismatch { what: "len_k", .. }
    ));
    let two_heads =
        BlockLayout::from_block_mask(64, 64, BS, LayoutHeads::PerHead(2), &[true; 2 * 16]).unwrap();
    assert!(matches!(
        layout_err(run(&two_heads, &opts, BS)),
        SparseLayoutError::ShapeMismatch {
            what: "heads",
            layout: 2,
            call: 4
        }
    ));
    // Causal and window masks belong in the layout.
    let causal = Options {
        causal: Some(CausalAlign::TopLeft),
        ..Options::new(8)
    };
    assert!(matches!(
        run(&fits, &causal, BS),
        Err(Error::InvalidArgument { arg: "opts", .. })
    ));
}

/// Head dims of the tensor-core cases: one per head-dim tile of the entries (64, 128, 256;
/// D ≠ Dv on either side), kept small where the tile allows (the twin pads nothing).
const TC_DIMS: [(usize, usize); 5] = [(8, 8), (9, 5), (72, 40), (136, 8), (24, 130)];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn the_tensor_core_walk_matches_the_reference_for_every_block_size_and_head_dim(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        bs in 0..4usize,
        len_q in 1..160usize,
        len_k in 1..160usize,
        gqa in any::<bool>(),
        padded in any::<bool>(),
        bf16 in any::<bool>(),
        dims in 0..TC_DIMS.len(),
        seed in any::<u64>(),
    ) {
        let kind = KINDS[kind];
        let bs = [16, 32, 64, 128][bs];
        let dtype = if bf16 { DType::BF16 } else { DType::F16 };
        let len_k = if self_attention_only(kind) { len_q } else { len_k };
        let (d, dv) = TC_DIMS[dims];
        let s = Shape::new(2, 2, if gqa { 1 } else { 2 }, len_q, len_k, d, dv);
        let g = generate(kind, causal, len_q, len_k, bs, s.heads_q, seed);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x7c);
        let q = rand_vec(&mut rng, dtype, s.q_len(), 2.0);
        let k = rand_vec(&mut rng, dtype, s.k_len(), 2.0);
        let v = rand_vec(&mut rng, dtype, s.v_len(), 1.0);
        let opts = Options {
            key_lens: padded.then(|| vec![rng.gen_range(0..=len_k), len_k]),
            ..Options::new(d)
        };
        let layout = &g.layout;
        let tile = twin::kernel_block_size(bs, d, dv);
        // Blocks of 64, and of 128 up to head dim 128, run as they are; the rest in 64s.
        let native = bs == 64 || (bs == 128 && d.max(dv) <= 128);
        prop_assert_eq!(tile, if native { bs } else { twin::KERNEL_TILE });
        let want = reference::forward_masked(&q, &k, &v, &s, &opts, &|_, h, i, j| {
            (g.truth)(layout.head_of(h), i, j)
        }).unwrap();
        let (got, counts) =
            twin::forward_tiled(&q, &k, &v, &s, &opts, layout, tile, dtype).unwrap();
        let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, dtype);
        let what = format!(
            "{kind:?} causal {causal} {dtype} {len_q}×{len_k} d {d}/{dv} blocks of {bs} \
             in tiles of {tile} {:?}",
            opts.key_lens
        );
        check(&format!("{what}: O"), &got.o, &want.o, tol.o)?;
        check(&format!("{what}: LSE"), &got.lse, &want.lse, tol.lse)?;
        // Without padding the programs compute exactly the re-blocked layout's kept tiles.
        if !padded {
            let tiled = layout.reblocked(tile).unwrap();
            let kept: usize =
                (0..s.heads_q).map(|h| tiled.kept_blocks_of_head(tiled.head_of(h))).sum();
            prop_assert_eq!(counts.full + counts.masked, s.batch * kept, "{}", what);
        }
    }
}

#[test]
fn small_blocks_cost_the_kept_tiles_of_64_not_the_kept_blocks() {
    // Blocks of 16 over 128 × 128 (8 × 8 blocks): three kept blocks inside tile (0, 0) and one
    // in tile (1, 1); tiles (0, 1) and (1, 0) hold none and are never visited. Every tile is
    // partial (a bitmask of its kept blocks), so each runs masked.
    let mut mask = vec![false; 64];
    for (qb, kb) in [(0, 0), (1, 1), (2, 3), (5, 6)] {
        mask[qb * 8 + kb] = true;
    }
    let layout = BlockLayout::from_block_mask(128, 128, 16, LayoutHeads::Shared, &mask).unwrap();
    let s = Shape::new(1, 2, 1, 128, 128, 8, 8);
    let mut rng = SmallRng::seed_from_u64(24);
    let q = rand_vec(&mut rng, DType::BF16, s.q_len(), 2.0);
    let k = rand_vec(&mut rng, DType::BF16, s.k_len(), 2.0);
    let v = rand_vec(&mut rng, DType::BF16, s.v_len(), 1.0);
    let opts = Options::new(8);
    let tile = twin::kernel_block_size(16, 8, 8);
    assert_eq!(tile, 64);
    let (got, counts) =
        twin::forward_tiled(&q, &k, &v, &s, &opts, &layout, tile, DType::BF16).unwrap();
    assert_eq!(
        (counts.full, counts.masked),
        (0, 2 * 2),
        "2 kept tiles × 2 heads"
    );
    let keep = |_b: usize, _h: usize, i: usize, j: usize| mask[(i / 16) * 8 + j / 16];
    let want = reference::forward_masked(&q, &k, &v, &s, &opts, &keep).unwrap();
    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::BF16);
    expect_close("O", &got.o, &want.o, tol.o).unwrap();
    expect_close("LSE", &got.lse, &want.lse, tol.lse).unwrap();
    // Rows of query blocks that keep nothing (blocks 3, 4, 6, 7) give 0 and −inf.
    for i in (48..80).chain(96..128) {
        assert_eq!(got.lse[i], f32::NEG_INFINITY, "row {i}");
    }
}

#[test]
fn a_layout_that_does_not_fit_is_refused_before_re_blocking() {
    let s = Shape::new(1, 1, 1, 64, 64, 8, 8);
    let q = vec![0.0; s.q_len()];
    let short = BlockLayout::sliding_window(60, 16, 8, 8, true).unwrap();
    let r = twin::forward_tiled(&q, &q, &q, &s, &Options::new(8), &short, 64, DType::F16);
    assert!(matches!(
        r,
        Err(Error::SparseLayout(SparseLayoutError::ShapeMismatch {
            what: "len_q",
            ..
        }))
    ));
}
