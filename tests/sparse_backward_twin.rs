//! The CPU twin of the block-sparse attention backward
//! (`cuattn::twin::attention_backward::backward_sparse`) against the f64 reference with each
//! layout's element mask — the pattern's own definition, not the layout — on random layouts of
//! every kind, both dQ modes and every dtype; zero gradients for query blocks that keep nothing
//! and key blocks that nobody keeps; bitwise agreement with the dense twin where the layout
//! keeps every block; work that follows the kept blocks; and the typed errors. The kernels'
//! own loop (`backward_sparse_tiled`): layouts of every block size (16, 32, 64, 128) re-blocked
//! to the kernels' 64-tiles, head dims up to 256 with the column split, against the reference,
//! bit for bit against the twin on the layout's own blocks, work that follows the kept tiles,
//! and column-offset faults caught. CPU only.

mod sparse_layouts;

use cuattn::error::SparseLayoutError;
use cuattn::reference::attention::{Options, Shape};
use cuattn::reference::attention_backward as reference;
use cuattn::sparse::{BlockLayout, LayoutHeads};
use cuattn::tolerance::{attention_backward as tolerances, expect_close};
use cuattn::twin::attention as dense_fwd;
use cuattn::twin::attention_backward::{
    self as twin, ColumnFault, Columns, Grads, Mode, Tiling, Visits, KERNEL_SPARSE_TILE,
};
use cuattn::twin::sparse_attention as sparse_fwd;
use cuattn::{DType, Error};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparse_layouts::{generate, self_attention_only, KINDS};

struct Case {
    s: Shape,
    opts: Options,
    dtype: DType,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

impl Case {
    fn new(seed: u64, s: Shape, opts: Options, dtype: DType) -> Case {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut rv = |n: usize, spread: f32| -> Vec<f32> {
            (0..n)
                .map(|_| dtype.round(spread * rng.gen_range(-1.0f32..1.0)))
                .collect()
        };
        let (q, k, v, d_o) = (
            rv(s.q_len(), 2.0),
            rv(s.k_len(), 2.0),
            rv(s.v_len(), 1.0),
            rv(s.o_len(), 1.0),
        );
        Case {
            s,
            opts,
            dtype,
            q,
            k,
            v,
            d_o,
        }
    }

    /// The sparse twin's forward, then its backward.
    fn run(&self, layout: &BlockLayout, mode: Mode) -> Result<(Grads, Visits), Error> {
        let (out, _) = sparse_fwd::forward(
            &self.q,
            &self.k,
            &self.v,
            &self.s,
            &self.opts,
            layout,
            layout.block_size(),
            self.dtype,
        )?;
        twin::backward_sparse(
            &self.q, &self.k, &self.v, &out.o, &out.lse, &self.d_o, &self.s, &self.opts, layout,
            mode, self.dtype,
        )
    }

    /// The sparse twin's forward, then the backward as the kernels run it: the layout
    /// re-blocked to `tile`, the columns split as `cols` says.
    fn run_tiled(
        &self,
        layout: &BlockLayout,
        tile: usize,
        cols: Columns,
        mode: Mode,
    ) -> Result<(Grads, Visits), Error> {
        let (out, _) = sparse_fwd::forward(
            &self.q,
            &self.k,
            &self.v,
            &self.s,
            &self.opts,
            layout,
            layout.block_size(),
            self.dtype,
        )?;
        twin::backward_sparse_tiled(
            &self.q, &self.k, &self.v, &out.o, &out.lse, &self.d_o, &self.s, &self.opts, layout,
            tile, cols, mode, self.dtype,
        )
    }

    /// `g` against the f64 reference under the element mask `keep(stored_head, i, j)`.
    fn compare(
        &self,
        g: &Grads,
        layout: &BlockLayout,
        keep: &dyn Fn(usize, usize, usize) -> bool,
    ) -> Result<(), String> {
        let keep4 = |_b: usize, h: usize, i: usize, j: usize| keep(layout.head_of(h), i, j);
        let want = reference::backward_masked(
            &self.q, &self.k, &self.v, &self.d_o, &self.s, &self.opts, &keep4,
        );
        let tol = tolerances::bounds(
            &self.q, &self.k, &self.v, &self.d_o, &self.s, &self.opts, &keep4, self.dtype,
        );
        let what = |x: &str| format!("{x} {:?} {:?} {:?}", self.s, self.opts, self.dtype);
        expect_close(&what("dq"), &g.dq, &want.dq, tol.dq)?;
        expect_close(&what("dk"), &g.dk, &want.dk, tol.dk)?;
        expect_close(&what("dv"), &g.dv, &want.dv, tol.dv)
    }
}

fn mode(atomic: bool) -> Mode {
    if atomic {
        Mode::Atomic
    } else {
        Mode::Deterministic
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn twin_gradients_match_the_reference_with_the_patterns_element_mask(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        len_q in 1..70usize,
        len_k in 1..70usize,
        gqa in any::<bool>(),
        padded in any::<bool>(),
        dtype in 0..3usize,
        atomic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let kind = KINDS[kind];
        let len_k = if self_attention_only(kind) { len_q } else { len_k };
        let (d, dv) = if seed % 2 == 0 { (8, 8) } else { (9, 5) };
        let s = Shape::new(2, 4, if gqa { 2 } else { 4 }, len_q, len_k, d, dv);
        let g = generate(kind, causal, len_q, len_k, 16, s.heads_q, seed);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0xb0d);
        let opts = Options {
            key_lens: padded.then(|| vec![len_k, rng.gen_range(0..=len_k)]),
            ..Options::new(d)
        };
        let case = Case::new(seed, s, opts, DType::ALL[dtype]);
        let (grads, _) = case.run(&g.layout, mode(atomic)).unwrap();
        if let Err(e) = case.compare(&grads, &g.layout, &*g.truth) {
            panic!("{kind:?} causal {causal} {:?}: {e}", mode(atomic));
        }
    }
}

#[test]
fn query_blocks_keeping_nothing_and_key_blocks_nobody_keeps_get_zero_gradients() {
    // 4 query blocks × 5 key blocks of 16: query block 1 keeps nothing, key block 2 is kept by
    // no query block; the last key block is short (70 keys).
    let (nq, nk) = (4, 5);
    let mask: Vec<bool> = (0..nq * nk)
        .map(|at| {
            let (qb, kb) = (at / nk, at % nk);
            qb != 1 && kb != 2 && (qb + kb) % 3 != 1
        })
        .collect();
    let layout = BlockLayout::from_block_mask(64, 70, 16, LayoutHeads::Shared, &mask).unwrap();
    let s = Shape::new(1, 2, 1, 64, 70, 8, 8);
    let case = Case::new(11, s, Options::new(8), DType::BF16);
    let keep = |_h: usize, i: usize, j: usize| mask[(i / 16) * nk + j / 16];
    for atomic in [false, true] {
        let (g, _) = case.run(&layout, mode(atomic)).unwrap();
        case.compare(&g, &layout, &keep).unwrap();
        for h in 0..2 {
            let rows = &g.dq[(h * 64 + 16) * 8..(h * 64 + 32) * 8];
            assert!(
                rows.iter().all(|&x| x == 0.0),
                "{atomic}: dq of query block 1"
            );
        }
        assert!(g.dk[32 * 8..48 * 8].iter().all(|&x| x == 0.0));
        assert!(g.dv[32 * 8..48 * 8].iter().all(|&x| x == 0.0));
        // Every other gradient element is written (the outputs start as NaN).
        assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
    }
}

#[test]
fn a_layout_keeping_every_block_gives_the_dense_twins_gradients_bit_for_bit() {
    let s = Shape::new(2, 4, 2, 40, 45, 8, 8);
    let opts = Options {
        key_lens: Some(vec![45, 20]),
        ..Options::new(8)
    };
    let case = Case::new(12, s, opts, DType::F16);
    let layout = BlockLayout::from_block_mask(40, 45, 16, LayoutHeads::Shared, &[true; 9]).unwrap();
    let (out, _) = dense_fwd::forward(
        &case.q,
        &case.k,
        &case.v,
        &case.s,
        &case.opts,
        dense_fwd::Tiling {
            block_q: 16,
            block_k: 16,
        },
        case.dtype,
    );
    for atomic in [false, true] {
        let (dense, dense_visits) = twin::backward(
            &case.q,
            &case.k,
            &case.v,
            &out.o,
            &out.lse,
            &case.d_o,
            &case.s,
            &case.opts,
            Tiling {
                block_q: 16,
                block_k: 16,
            },
            mode(atomic),
            case.dtype,
        );
        let (sparse, sparse_visits) = case.run(&layout, mode(atomic)).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&sparse.dq), bits(&dense.dq), "dq, atomic {atomic}");
        assert_eq!(bits(&sparse.dk), bits(&dense.dk), "dk, atomic {atomic}");
        assert_eq!(bits(&sparse.dv), bits(&dense.dv), "dv, atomic {atomic}");
        assert_eq!(sparse_visits, dense_visits);
    }
}

#[test]
fn the_work_follows_the_kept_blocks() {
    // Shared layout, Hq = 4 over Hkv = 2: each kept block is visited once per query head by
    // each pass, and key padding skips the blocks past the key length.
    let mask = [
        true, false, false, true, //
        false, true, false, false, //
        true, true, true, false,
    ];
    let layout = BlockLayout::from_block_mask(48, 64, 16, LayoutHeads::Shared, &mask).unwrap();
    let s = Shape::new(1, 4, 2, 48, 64, 8, 8);
    let case = Case::new(13, s, Options::new(8), DType::BF16);
    let (_, visits) = case.run(&layout, Mode::Deterministic).unwrap();
    assert_eq!(
        visits,
        Visits {
            dkdv_tiles: 4 * 6,
            dq_tiles: 4 * 6
        }
    );
    // 40 keys: key block 3 (48..64) lies in the padding, and one kept block with it.
    let padded = Case {
        opts: Options {
            key_lens: Some(vec![40]),
            ..Options::new(8)
        },
        ..case
    };
    let (_, visits) = padded.run(&layout, Mode::Deterministic).unwrap();
    assert_eq!(
        visits,
        Visits {
            dkdv_tiles: 4 * 5,
            dq_tiles: 4 * 5
        }
    );
}

#[test]
fn gradients_computed_without_the_layout_fail_the_comparison() {
    // The dense backward on the sparse forward's O and LSE: the dropped blocks leak in.
    let layout = BlockLayout::strided(48, 16, 1, 2, true).unwrap();
    let s = Shape::new(1, 2, 1, 48, 48, 8, 8);
    let case = Case::new(14, s, Options::new(8), DType::F32);
    let keep = |_h: usize, i: usize, j: usize| layout.admits(0, i, j);
    let (good, _) = case.run(&layout, Mode::Deterministic).unwrap();
    case.compare(&good, &layout, &keep).unwrap();
    let (out, _) = sparse_fwd::forward(
        &case.q, &case.k, &case.v, &case.s, &case.opts, &layout, 16, case.dtype,
    )
    .unwrap();
    let (bad, _) = twin::backward(
        &case.q,
        &case.k,
        &case.v,
        &out.o,
        &out.lse,
        &case.d_o,
        &case.s,
        &case.opts,
        Tiling {
            block_q: 16,
            block_k: 16,
        },
        Mode::Deterministic,
        case.dtype,
    );
    assert!(case.compare(&bad, &layout, &keep).is_err());
}

#[test]
fn layouts_that_do_not_fit_and_masks_outside_the_layout_get_typed_errors() {
    let s = Shape::new(1, 2, 1, 32, 32, 8, 8);
    let case = Case::new(15, s, Options::new(8), DType::F16);
    let zeros = vec![0.0f32; s.o_len()];
    let lse = vec![0.0f32; s.lse_len()];
    let run = |layout: &BlockLayout, opts: &Options| {
        twin::backward_sparse(
            &case.q,
            &case.k,
            &case.v,
            &zeros,
            &lse,
            &case.d_o,
            &s,
            opts,
            layout,
            Mode::Deterministic,
            case.dtype,
        )
    };
    let short = BlockLayout::from_block_mask(16, 32, 16, LayoutHeads::Shared, &[true; 2]).unwrap();
    assert!(matches!(
        run(&short, &case.opts),
        Err(Error::SparseLayout(SparseLayoutError::ShapeMismatch {
            what: "len_q",
            ..
        }))
    ));
    let three =
        BlockLayout::from_block_mask(32, 32, 16, LayoutHeads::PerHead(3), &[true; 12]).unwrap();
    assert!(matches!(
        run(&three, &case.opts),
        Err(Error::SparseLayout(SparseLayoutError::ShapeMismatch {
            what: "heads",
            ..
        }))
    ));
    let fits = BlockLayout::from_block_mask(32, 32, 16, LayoutHeads::Shared, &[true; 4]).unwrap();
    let causal = Options {
        causal: Some(cuattn::reference::attention::CausalAlign::TopLeft),
        ..Options::new(8)
    };
    assert!(matches!(
        run(&fits, &causal),
        Err(Error::InvalidArgument { arg: "opts", .. })
    ));
}

fn bits(g: &Grads) -> [Vec<u32>; 3] {
    let b = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    [b(&g.dq), b(&g.dk), b(&g.dv)]
}

/// Head dims of the kernel-loop cases: both ≤ 128 (one program per tile), and above 128 on
/// either side or both (the HD 256 column split).
const DIMS: [(usize, usize); 5] = [(8, 8), (9, 5), (136, 24), (24, 136), (130, 130)];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn the_kernels_tile_loop_matches_the_reference_for_every_block_size_and_head_dim(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        bs in 0..4usize,
        len_q in 1..140usize,
        len_k in 1..140usize,
        gqa in any::<bool>(),
        padded in any::<bool>(),
        dtype in 0..3usize,
        atomic in any::<bool>(),
        dims in 0..DIMS.len(),
        seed in any::<u64>(),
    ) {
        let kind = KINDS[kind];
        let bs = [16, 32, 64, 128][bs];
        let len_k = if self_attention_only(kind) { len_q } else { len_k };
        let (d, dv) = DIMS[dims];
        let s = Shape::new(2, 2, if gqa { 1 } else { 2 }, len_q, len_k, d, dv);
        let g = generate(kind, causal, len_q, len_k, bs, s.heads_q, seed);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5b1);
        let opts = Options {
            key_lens: padded.then(|| vec![rng.gen_range(0..=len_k), len_k]),
            ..Options::new(d)
        };
        let case = Case::new(seed, s, opts, DType::ALL[dtype]);
        let cols = Columns::kernel(&s);
        let (grads, _) = case
            .run_tiled(&g.layout, KERNEL_SPARSE_TILE, cols, mode(atomic))
            .unwrap();
        if let Err(e) = case.compare(&grads, &g.layout, &*g.truth) {
            panic!("{kind:?} causal {causal} blocks of {bs} {:?}: {e}", mode(atomic));
        }
    }

    #[test]
    fn re_blocking_to_the_kernels_tile_and_splitting_the_columns_change_no_bit(
        kind in 0..KINDS.len(),
        causal in any::<bool>(),
        bs in 0..4usize,
        len in 1..140usize,
        padded in any::<bool>(),
        atomic in any::<bool>(),
        wide in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // The same keys in the same order reach every gradient element whatever the tiles,
        // and a column block computes its columns as the whole program does.
        let kind = KINDS[kind];
        let bs = [16, 32, 64, 128][bs];
        let (d, dv) = if wide { (136, 8) } else { (8, 136) };
        let s = Shape::new(1, 2, 1, len, len, d, dv);
        let g = generate(kind, causal, len, len, bs, s.heads_q, seed);
        let opts = Options {
            key_lens: padded.then(|| vec![(seed as usize) % (len + 1)]),
            ..Options::new(d)
        };
        let case = Case::new(seed, s, opts, DType::BF16);
        let (own, _) = case.run(&g.layout, mode(atomic)).unwrap();
        let (kernel, _) = case
            .run_tiled(&g.layout, KERNEL_SPARSE_TILE, Columns::kernel(&s), mode(atomic))
            .unwrap();
        prop_assert_eq!(bits(&own), bits(&kernel), "{:?} blocks of {}", kind, bs);
    }
}

#[test]
fn the_kernels_work_follows_the_kept_tiles_of_64() {
    // Blocks of 16 over 128 × 128 (8 × 8 blocks): three kept blocks inside tile (0, 0) and one
    // in tile (1, 1); tiles (0, 1) and (1, 0) hold none and are never visited.
    let mut mask = vec![false; 64];
    for (qb, kb) in [(0, 0), (1, 1), (2, 3), (5, 6)] {
        mask[qb * 8 + kb] = true;
    }
    let layout = BlockLayout::from_block_mask(128, 128, 16, LayoutHeads::Shared, &mask).unwrap();
    for (d, col_blocks) in [(8, 1), (136, 2)] {
        let s = Shape::new(1, 2, 1, 128, 128, d, d);
        let case = Case::new(16, s, Options::new(d), DType::F16);
        let (g, visits) = case
            .run_tiled(
                &layout,
                KERNEL_SPARSE_TILE,
                Columns::kernel(&s),
                Mode::Deterministic,
            )
            .unwrap();
        // 2 kept tiles × 2 query heads, once per column block.
        let tiles = 2 * 2 * col_blocks;
        assert_eq!(
            visits,
            Visits {
                dkdv_tiles: tiles,
                dq_tiles: tiles
            },
            "d {d}"
        );
        let keep = |_h: usize, i: usize, j: usize| mask[(i / 16) * 8 + j / 16];
        case.compare(&g, &layout, &keep).unwrap();
    }
}

#[test]
fn column_offset_faults_in_the_sparse_split_fail_the_comparison() {
    let layout = BlockLayout::strided(100, 32, 1, 2, true).unwrap();
    let s = Shape::new(1, 2, 1, 100, 100, 136, 136);
    let case = Case::new(17, s, Options::new(136), DType::F32);
    let keep = |_h: usize, i: usize, j: usize| layout.admits(0, i, j);
    let good = Columns::kernel(&s);
    for m in [Mode::Deterministic, Mode::Atomic] {
        let (g, _) = case
            .run_tiled(&layout, KERNEL_SPARSE_TILE, good, m)
            .unwrap();
        case.compare(&g, &layout, &keep).unwrap();
        for fault in [
            ColumnFault::OperandsFromColumnZero,
            ColumnFault::KLoopOffset,
        ] {
            let cols = Columns {
                fault: Some(fault),
                ..good
            };
            let (bad, _) = case
                .run_tiled(&layout, KERNEL_SPARSE_TILE, cols, m)
                .unwrap();
            assert!(
                case.compare(&bad, &layout, &keep).is_err(),
                "{fault:?} {m:?} went unnoticed"
            );
        }
    }
}
