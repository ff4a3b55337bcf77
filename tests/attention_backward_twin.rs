//! The CPU twin of the fused attention backward (`cuattn::twin::attention_backward`) against
//! the f64 reference, under the tolerance of `cuattn::tolerance::attention_backward`: random
//! shapes and options (GQA/MQA, D ≠ Dv, both causal alignments with Lq ≠ Lk, sliding windows,
//! key padding down to 0), every dtype, both dQ modes; tile skipping; fully masked rows; NaN in
//! keys no query may see; and that a mask left out of the backward is caught. CPU only.

use cuattn::key_band::Window;
use cuattn::reference::attention::{CausalAlign, Options, Shape};
use cuattn::reference::attention_backward as reference;
use cuattn::tolerance::{attention_backward as tolerances, expect_close};
use cuattn::twin::attention as twin_fwd;
use cuattn::twin::attention_backward::{self as twin, Mode, Tiling, Visits};
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
        let fwd_tiling = twin_fwd::Tiling {
            block_q: tiling.block_q,
            block_k: tiling.block_k,
        };
        let (out, _) = twin_fwd::forward(
            &self.q, &self.k, &self.v, &self.s, &self.opts, fwd_tiling, self.dtype,
        );
        twin::backward(
            &self.q, &self.k, &self.v, &out.o, &out.lse, &self.d_o, &self.s, bwd_opts, tiling,
            mode, self.dtype,
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
