//! The CPU twin of the fused attention backward (`cuattn::twin::attention_backward`) against
//! the f64 reference, under the tolerance of `cuattn::tolerance::attention_backward`: random
//! shapes and options (GQA/MQA, D ≠ Dv, both causal alignments with Lq ≠ Lk, sliding windows,
//! key padding down to 0), every dtype, both dQ modes; tile skipping; fully masked rows; NaN in
//! keys no query may see; and that a mask left out of the backward is caught. Head dims
//! 129–256: the column split of the HD 256 kernels (`twin::attention_backward::backward_split`)
//! for D, Dv in 129..=256 and mixes with one side ≤ 128, GQA, masks, padding, both modes,
//! f16/bf16; that it changes no bit against the unsplit twin; that a wrong column offset is
//! caught; and the grid decomposition. CPU only.

use cuattn::key_band::Window;
use cuattn::reference::attention::{CausalAlign, Options, Shape};
use cuattn::reference::attention_backward as reference;
use cuattn::tolerance::{attention_backward as tolerances, expect_close};
use cuattn::twin::attention as twin_fwd;
use cuattn::twin::attention_backward::{
    self as twin, ColumnFault, Columns, Mode, Program, Tiling, Visits,
};
use cuattn::DType;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const TILING: Tiling = Tiling {
    block_q: 8,
    block_k: 8,
};

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

    /// The twin's forward and backward with `bwd_opts` (normally the forward's options).
    fn run(&self, mode: Mode, tiling: Tiling, bwd_opts: &Options) -> (twin::Grads, Visits) {
        self.run_split(mode, tiling, bwd_opts, Columns::WHOLE)
    }

    /// As [`Case::run`] with the columns of dK, dV, dQ split as `cols` says.
    fn run_split(
        &self,
        mode: Mode,
        tiling: Tiling,
        bwd_opts: &Options,
        cols: Columns,
    ) -> (twin::Grads, Visits) {
        let fwd_tiling = twin_fwd::Tiling {
            block_q: tiling.block_q,
            block_k: tiling.block_k,
        };
        let (out, _) = twin_fwd::forward(
            &self.q, &self.k, &self.v, &self.s, &self.opts, fwd_tiling, self.dtype,
        );
        twin::backward_split(
            &self.q, &self.k, &self.v, &out.o, &out.lse, &self.d_o, &self.s, bwd_opts, tiling,
            cols, mode, self.dtype,
        )
    }

    fn check(&self, mode: Mode, tiling: Tiling) -> Result<Visits, String> {
        let (g, visits) = self.run(mode, tiling, &self.opts);
        self.compare(&g)?;
        Ok(visits)
    }

    fn compare(&self, g: &twin::Grads) -> Result<(), String> {
        let all = |_: usize, _: usize, _: usize, _: usize| true;
        let want = reference::backward(&self.q, &self.k, &self.v, &self.d_o, &self.s, &self.opts);
        let tol = tolerances::bounds(
            &self.q, &self.k, &self.v, &self.d_o, &self.s, &self.opts, &all, self.dtype,
        );
        let what = |x: &str| format!("{x} {:?} {:?} {:?}", self.s, self.opts, self.dtype);
        expect_close(&what("dq"), &g.dq, &want.dq, tol.dq)?;
        expect_close(&what("dk"), &g.dk, &want.dk, tol.dk)?;
        expect_close(&what("dv"), &g.dv, &want.dv, tol.dv)
    }
}

fn align() -> impl Strategy<Value = Option<CausalAlign>> {
    prop_oneof![
        Just(None),
        Just(Some(CausalAlign::TopLeft)),
        Just(Some(CausalAlign::BottomRight))
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn twin_gradients_match_the_reference_for_random_shapes_and_options(
        seed in any::<u64>(),
        batch in 1usize..3,
        (heads_kv, group) in (1usize..3, 1usize..4),
        len_q in 1usize..30,
        len_k in 1usize..30,
        (dim_qk, dim_v) in (1usize..20, 1usize..20),
        causal in align(),
        window in proptest::option::of((0usize..6, 0usize..6, align())),
        pad in any::<bool>(),
        dtype_idx in 0usize..3,
        atomic in any::<bool>(),
    ) {
        let s = Shape::new(batch, heads_kv * group, heads_kv, len_q, len_k, dim_qk, dim_v);
        let opts = Options {
            causal,
            window: window.and_then(|(l, r, a)| a.map(|a| Window::new(l, r, a))),
            key_lens: pad.then(|| (0..batch).map(|b| (len_k * (b + 1)) / (batch + 1)).collect()),
            ..Options::new(dim_qk)
        };
        let case = Case::new(seed, s, opts, DType::ALL[dtype_idx]);
        let mode = if atomic { Mode::Atomic } else { Mode::Deterministic };
        if let Err(e) = case.check(mode, TILING) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_kernel_tiles_of_64_match_the_reference_with_gqa_and_a_window() {
    let s = Shape::new(1, 4, 2, 70, 130, 24, 16);
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        window: Some(Window::new(40, 0, CausalAlign::BottomRight)),
        ..Options::new(24)
    };
    let case = Case::new(7, s, opts, DType::BF16);
    let tiles = Tiling {
        block_q: 64,
        block_k: 64,
    };
    for mode in [Mode::Deterministic, Mode::Atomic] {
        case.check(mode, tiles).unwrap();
    }
}

#[test]
fn causal_masks_skip_the_tiles_beyond_the_diagonal() {
    let s = Shape::new(1, 1, 1, 64, 64, 8, 8);
    let dense = Case::new(1, s, Options::new(8), DType::F16);
    let causal = Case::new(
        1,
        s,
        Options {
            causal: Some(CausalAlign::TopLeft),
            ..Options::new(8)
        },
        DType::F16,
    );
    let all = dense.check(Mode::Deterministic, TILING).unwrap();
    let tri = causal.check(Mode::Deterministic, TILING).unwrap();
    // 8×8 tiles: 64 in all, 36 on or below the diagonal.
    assert_eq!(
        all,
        Visits {
            dkdv_tiles: 64,
            dq_tiles: 64
        }
    );
    assert_eq!(
        tri,
        Visits {
            dkdv_tiles: 36,
            dq_tiles: 36
        }
    );
}

#[test]
fn fully_masked_rows_get_zero_gradients_and_add_nothing() {
    // Bottom-right with Lq > Lk: the first Lq − Lk rows see no key.
    let s = Shape::new(1, 2, 1, 20, 6, 8, 8);
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        ..Options::new(8)
    };
    let case = Case::new(3, s, opts, DType::BF16);
    for mode in [Mode::Deterministic, Mode::Atomic] {
        let (g, _) = case.run(mode, TILING, &case.opts);
        case.compare(&g).unwrap();
        for h in 0..2 {
            let rows = &g.dq[h * 20 * 8..(h * 20 + 14) * 8];
            assert!(rows.iter().all(|&x| x == 0.0), "{mode:?}");
        }
    }
}

#[test]
fn nan_in_keys_no_query_may_see_stays_out_of_the_gradients() {
    let s = Shape::new(1, 1, 1, 12, 20, 8, 8);
    let opts = Options {
        key_lens: Some(vec![13]),
        causal: Some(CausalAlign::TopLeft),
        ..Options::new(8)
    };
    let mut case = Case::new(4, s, opts, DType::F16);
    // Keys 12.. are beyond every query's causal diagonal, 13.. past the key length too.
    for j in 12..20 {
        case.k[j * 8..(j + 1) * 8].fill(f32::NAN);
        case.v[j * 8..(j + 1) * 8].fill(f32::NAN);
    }
    for mode in [Mode::Deterministic, Mode::Atomic] {
        let (g, _) = case.run(mode, TILING, &case.opts);
        assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
        case.compare(&g).unwrap();
    }
}

#[test]
fn a_mask_applied_in_the_forward_but_not_the_backward_fails_the_comparison() {
    let s = Shape::new(1, 2, 1, 16, 16, 8, 8);
    let opts = Options {
        causal: Some(CausalAlign::TopLeft),
        ..Options::new(8)
    };
    let case = Case::new(5, s, opts, DType::F32);
    let (good, _) = case.run(Mode::Deterministic, TILING, &case.opts);
    case.compare(&good).unwrap();
    let (bad, _) = case.run(Mode::Deterministic, TILING, &Options::new(8));
    assert!(case.compare(&bad).is_err());
}

#[test]
fn gqa_gradients_are_summed_over_the_query_heads_of_a_group() {
    // With the group's dK/dV taken from one head only, the comparison fails; summed, it passes.
    let s = Shape::new(1, 4, 1, 10, 12, 8, 8);
    let case = Case::new(6, s, Options::new(8), DType::F32);
    let (g, _) = case.run(Mode::Deterministic, TILING, &case.opts);
    case.compare(&g).unwrap();
    let one_head = Shape::new(1, 1, 1, 10, 12, 8, 8);
    let single = Case {
        s: one_head,
        opts: case.opts.clone(),
        dtype: case.dtype,
        q: case.q[..80].to_vec(),
        k: case.k.clone(),
        v: case.v.clone(),
        d_o: case.d_o[..80].to_vec(),
    };
    let (g1, _) = single.run(Mode::Deterministic, TILING, &single.opts);
    let wrong = twin::Grads {
        dq: g.dq.clone(),
        dk: g1.dk,
        dv: g1.dv,
    };
    assert!(case.compare(&wrong).is_err());
}

// ---- Head dims 129–256: the column split of the HD 256 kernels ----

/// Head dims with at least one side above 128: both wide (multiples of 8 and not), or one
/// side ≤ 128 (only the wider side has a second column block).
fn wide_dims() -> impl Strategy<Value = (usize, usize)> {
    let wide = prop_oneof![Just(256usize), Just(192), Just(136), 129usize..=256];
    let narrow = prop_oneof![Just(128usize), Just(64), 1usize..=128];
    prop_oneof![
        (wide.clone(), wide.clone()),
        (wide.clone(), narrow.clone()),
        (narrow, wide),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn the_split_columns_of_head_dims_above_128_match_the_reference(
        seed in any::<u64>(),
        batch in 1usize..3,
        (heads_kv, group) in (1usize..3, 1usize..4),
        len_q in 1usize..24,
        len_k in 1usize..24,
        (dim_qk, dim_v) in wide_dims(),
        causal in align(),
        window in proptest::option::of((0usize..6, 0usize..6, align())),
        pad in any::<bool>(),
        bf16 in any::<bool>(),
        atomic in any::<bool>(),
    ) {
        let s = Shape::new(batch, heads_kv * group, heads_kv, len_q, len_k, dim_qk, dim_v);
        let opts = Options {
            causal,
            window: window.and_then(|(l, r, a)| a.map(|a| Window::new(l, r, a))),
            key_lens: pad.then(|| (0..batch).map(|b| (len_k * (b + 1)) / (batch + 1)).collect()),
            ..Options::new(dim_qk)
        };
        let dtype = if bf16 { DType::BF16 } else { DType::F16 };
        let case = Case::new(seed, s, opts, dtype);
        let mode = if atomic { Mode::Atomic } else { Mode::Deterministic };
        let cols = Columns::kernel(&s);
        prop_assert_eq!(cols, Columns::blocks(128));
        let (g, _) = case.run_split(mode, TILING, &case.opts, cols);
        if let Err(e) = case.compare(&g) {
            panic!("{e}");
        }
    }
}

/// The kernels' own tiles (64 × 64, 128 columns per program) on shapes with several key
/// blocks and query tiles, for the four head-dim mixes, both modes and both 16-bit dtypes.
#[test]
fn the_hd256_kernel_tiles_match_the_reference_for_every_head_dim_mix() {
    let tiles = Tiling {
        block_q: 64,
        block_k: 64,
    };
    let mixes = [(256, 256), (256, 128), (128, 256), (192, 200)];
    for (n, &(d, dv)) in mixes.iter().enumerate() {
        let s = Shape::new(1, 4, 2, 70, 130, d, dv);
        let opts = Options {
            causal: Some(CausalAlign::BottomRight),
            window: (n % 2 == 1).then(|| Window::new(40, 0, CausalAlign::BottomRight)),
            key_lens: (n == 2).then(|| vec![100]),
            ..Options::new(d)
        };
        for dtype in [DType::F16, DType::BF16] {
            let case = Case::new(20 + n as u64, s, opts.clone(), dtype);
            for mode in [Mode::Deterministic, Mode::Atomic] {
                let (g, _) = case.run_split(mode, tiles, &case.opts, Columns::kernel(&s));
                case.compare(&g).unwrap();
            }
        }
    }
}

#[test]
fn splitting_the_columns_changes_no_bit_of_the_twin_gradients() {
    // Per output element the split sums the same terms in the same order, and Sᵀ/dPᵀ run
    // over every column in each block: bitwise equal to one program per block.
    for (d, dv) in [(256, 256), (256, 96), (72, 256), (160, 136)] {
        let s = Shape::new(2, 3, 1, 19, 23, d, dv);
        let opts = Options {
            causal: Some(CausalAlign::TopLeft),
            key_lens: Some(vec![23, 9]),
            ..Options::new(d)
        };
        let case = Case::new(11, s, opts, DType::BF16);
        for mode in [Mode::Deterministic, Mode::Atomic] {
            let (whole, vw) = case.run_split(mode, TILING, &case.opts, Columns::WHOLE);
            let (split, vs) = case.run_split(mode, TILING, &case.opts, Columns::blocks(128));
            case.compare(&split).unwrap();
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&whole.dq), bits(&split.dq), "dq {d}/{dv} {mode:?}");
            assert_eq!(bits(&whole.dk), bits(&split.dk), "dk {d}/{dv} {mode:?}");
            assert_eq!(bits(&whole.dv), bits(&split.dv), "dv {d}/{dv} {mode:?}");
            // Two column blocks on the dK/dV side always; on the dQ side only when D > 128.
            assert_eq!(vs.dkdv_tiles, 2 * vw.dkdv_tiles);
            let dq_blocks = if d > 128 { 2 } else { 1 };
            assert_eq!(vs.dq_tiles, dq_blocks * vw.dq_tiles);
        }
    }
}

#[test]
fn a_wrong_column_offset_fails_the_comparison() {
    let s = Shape::new(1, 2, 1, 20, 24, 256, 192);
    let opts = Options {
        causal: Some(CausalAlign::TopLeft),
        ..Options::new(256)
    };
    let case = Case::new(12, s, opts, DType::F16);
    for mode in [Mode::Deterministic, Mode::Atomic] {
        let good = case
            .run_split(mode, TILING, &case.opts, Columns::blocks(128))
            .0;
        case.compare(&good).unwrap();
        for fault in [
            ColumnFault::OperandsFromColumnZero,
            ColumnFault::KLoopOffset,
        ] {
            let cols = Columns {
                fault: Some(fault),
                ..Columns::blocks(128)
            };
            let (bad, _) = case.run_split(mode, TILING, &case.opts, cols);
            // Column block 0 is unaffected by either fault; block 1 is wrong.
            assert_eq!(bad.dk[..128], good.dk[..128], "{fault:?} {mode:?}");
            assert!(case.compare(&bad).is_err(), "{fault:?} {mode:?} passed");
        }
    }
}

#[test]
fn the_grid_index_decomposes_into_block_column_head_batch_with_blocks_fastest() {
    let cols = Columns::blocks(128);
    assert_eq!(twin::dkdv_column_blocks(256, 256, cols), 2);
    assert_eq!(twin::dkdv_column_blocks(256, 128, cols), 2);
    assert_eq!(twin::dkdv_column_blocks(64, 129, cols), 2);
    assert_eq!(twin::dkdv_column_blocks(128, 128, cols), 1);
    assert_eq!(twin::dq_column_blocks(256, cols), 2);
    assert_eq!(twin::dq_column_blocks(128, cols), 1);
    assert_eq!(twin::dq_column_blocks(200, Columns::WHOLE), 1);
    // 3 key blocks × 2 column blocks × 2 K/V heads × 2 batch entries: every program once.
    let mut seen = std::collections::HashSet::new();
    for flat in 0..24 {
        let p = twin::dkdv_program(flat, 3, 2, 2);
        assert!(p.block < 3 && p.col < 2 && p.head < 2 && p.batch < 2);
        assert!(seen.insert((p.block, p.col, p.head, p.batch)));
    }
    assert_eq!(
        twin::dkdv_program(7, 3, 2, 2),
        Program {
            block: 1,
            col: 0,
            head: 1,
            batch: 0
        }
    );
    // The dQ grid runs the last (heaviest under a causal mask) query block first.
    assert_eq!(
        twin::dq_program(3, 3, 2, 4),
        Program {
            block: 2,
            col: 1,
            head: 0,
            batch: 0
        }
    );
}
