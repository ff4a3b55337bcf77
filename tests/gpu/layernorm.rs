//! LayerNorm kernels held to the f64 CPU reference on the GPU: random shapes, values, dtypes,
//! layouts and launch paths (proptest), the sizes users hit (1, 1600, 16384, 65536), odd
//! sizes, the fused residual form, the backward, determinism, and bad input through the
//! public API. The checks themselves (poisoned outputs, NaN-filled gaps, the tolerance rule)
//! are `cuattn::check::layernorm`.

use cuattn::check::layernorm::{self as check, Case};
use cuattn::check::{gpu_or_skip, Placement};
use cuattn::gpu::Gpu;
use cuattn::ops::layernorm::{self as ln, ParamGrads, Tuning};
use cuattn::{DType, Error};
use proptest::prelude::*;
use std::sync::Arc;

fn case_strategy() -> impl Strategy<Value = Case> {
    let hidden = prop_oneof![
        4 => 1usize..=64,
        3 => 65usize..=2500,
        2 => prop::sample::select(vec![768usize, 1024, 1600, 4096, 5120, 8192, 16384, 24576, 65536]),
    ];
    let placement = (0usize..3, prop::bool::weighted(0.25)).prop_map(|(pad, misalign)| Placement {
        row_pad: pad * 8 + pad % 2,
        offset: misalign as usize,
    });
    let grads = prop::option::of(prop::sample::select(vec![
        ParamGrads::Shared,
        ParamGrads::Global,
        ParamGrads::Columns,
    ]));
    let packs = prop::option::of(prop::sample::select(vec![1usize, 2, 4]));
    let tuning = (
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        grads,
        packs,
    )
        .prop_map(
            |(registers, smem_cache, param_grads, packs_per_thread)| Tuning {
                registers,
                smem_cache,
                param_grads,
                packs_per_thread,
            },
        );
    (
        prop::sample::select(DType::ALL.to_vec()),
        1usize..=300,
        hidden,
        any::<(bool, bool)>(),
        prop::sample::select(vec![1e-5f32, 1e-6, 1e-3, 1e-12]),
        (placement.clone(), placement),
        tuning,
        (-4.0f32..4.0, prop::sample::select(vec![0.05f32, 1.0, 10.0])),
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                rows,
                hidden,
                (gamma, beta),
                eps,
                (in_at, out_at),
                tuning,
                (center, spread),
                seed,
            )| {
                // Under ~2M elements per case, so the f64 reference stays quick.
                let rows = rows.min((1 << 21) / hidden).max(1);
                Case {
                    dtype,
                    rows,
                    hidden,
                    gamma,
                    beta,
                    eps,
                    in_at,
                    out_at,
                    tuning,
                    center,
                    spread,
                    seed,
                }
            },
        )
}

fn run_property(
    name: &str,
    default_cases: u32,
    f: impl Fn(&Arc<Gpu>, &Case) -> Result<(), String>,
) {
    let Some(gpu) = gpu_or_skip(name) else { return };
    crate::run_proptest(name, case_strategy(), default_cases, |c| f(&gpu, &c));
}

#[test]
fn forward_matches_reference_on_random_cases() {
    run_property("forward_matches_reference_on_random_cases", 64, |g, c| {
        check::forward(g, c, false).map(|_| ())
    });
}

#[test]
fn fused_residual_forward_matches_reference_on_random_cases() {
    run_property(
        "fused_residual_forward_matches_reference_on_random_cases",
        48,
        |g, c| check::forward(g, c, true).map(|_| ()),
    );
}

#[test]
fn backward_matches_reference_on_random_cases() {
    run_property(
        "backward_matches_reference_on_random_cases",
        48,
        check::backward,
    );
}

/// Every launch path: the planner's choice, then the generic path with each way of forming
/// dγ/dβ, with and without the shared-memory row cache.
fn every_path() -> Vec<Tuning> {
    let generic = |smem_cache, grads| Tuning {
        registers: Some(false),
        smem_cache: Some(smem_cache),
        param_grads: Some(grads),
        packs_per_thread: None,
    };
    let regs = |packs| Tuning {
        registers: Some(true),
        packs_per_thread: Some(packs),
        ..Tuning::default()
    };
    vec![
        Tuning::default(),
        regs(1),
        regs(4),
        generic(true, ParamGrads::Shared),
        generic(false, ParamGrads::Global),
        generic(true, ParamGrads::Columns),
    ]
}

/// Every dtype, forward, fused forward and backward, through every launch path.
fn sizes_users_hit(name: &str, rows: usize, hidden: usize) {
    let Some(gpu) = gpu_or_skip(name) else { return };
    for dt in DType::ALL {
        for tuning in every_path() {
            let c = Case {
                tuning,
                ..Case::plain(dt, rows, hidden)
            };
            check::forward(&gpu, &c, false).unwrap();
            check::forward(&gpu, &c, true).unwrap();
            check::backward(&gpu, &c).unwrap();
        }
    }
}

#[test]
fn hidden_1_normalises_to_beta() {
    sizes_users_hit("hidden_1_normalises_to_beta", 37, 1);
}

#[test]
fn hidden_1_gives_exactly_beta() {
    let Some(gpu) = gpu_or_skip("hidden_1_gives_exactly_beta") else {
        return;
    };
    for dt in DType::ALL {
        let inp = check::inputs(&Case::plain(dt, 37, 1));
        let up = |v: &[f32], shape: &[usize]| {
            gpu.upload(&cuattn::HostTensor::from_f32(dt, shape, v).unwrap())
                .unwrap()
        };
        let x = up(&inp.x, &[37, 1]);
        let beta = up(inp.beta.as_ref().unwrap(), &[1]);
        let gamma = up(inp.gamma.as_ref().unwrap(), &[1]);
        let y = ln::forward(&x, Some(&gamma), Some(&beta), 1e-5)
            .unwrap()
            .y
            .to_f32_vec()
            .unwrap();
        let b = inp.beta.as_ref().unwrap()[0];
        assert!(
            y.iter().all(|&v| v.to_bits() == b.to_bits()),
            "{dt}: {y:?} is not all {b}"
        );
    }
}

#[test]
fn hidden_1600_gpt2_xl() {
    sizes_users_hit("hidden_1600_gpt2_xl", 65, 1600);
}

#[test]
fn hidden_16384_needs_more_than_48kb_of_shared_memory() {
    sizes_users_hit(
        "hidden_16384_needs_more_than_48kb_of_shared_memory",
        9,
        16384,
    );
}

#[test]
fn hidden_65536_the_maximum() {
    sizes_users_hit("hidden_65536_the_maximum", 5, 65536);
}

#[test]
fn odd_hidden_sizes_take_the_scalar_path() {
    let Some(gpu) = gpu_or_skip("odd_hidden_sizes_take_the_scalar_path") else {
        return;
    };
    for hidden in [3, 7, 33, 255, 1023, 4097] {
        for dt in DType::ALL {
            for tuning in every_path() {
                let c = Case {
                    tuning,
                    ..Case::plain(dt, 19, hidden)
                };
                check::forward(&gpu, &c, false).unwrap();
                check::backward(&gpu, &c).unwrap();
            }
        }
    }
}

#[test]
fn many_rows_more_than_one_wave_of_blocks() {
    let Some(gpu) = gpu_or_skip("many_rows_more_than_one_wave_of_blocks") else {
        return;
    };
    let c = Case::plain(DType::BF16, 200_003, 8);
    check::forward(&gpu, &c, false).unwrap();
    check::backward(&gpu, &c).unwrap();
}

#[test]
fn ill_conditioned_rows_with_a_large_mean() {
    let Some(gpu) = gpu_or_skip("ill_conditioned_rows_with_a_large_mean") else {
        return;
    };
    for dt in DType::ALL {
        let c = Case {
            center: 100.0,
            spread: 1.0,
            ..Case::plain(dt, 40, 3000)
        };
        check::forward(&gpu, &c, false).unwrap();
        check::backward(&gpu, &c).unwrap();
    }
}

#[test]
fn dgamma_dbeta_are_bitwise_deterministic_across_30_runs() {
    let Some(gpu) = gpu_or_skip("dgamma_dbeta_are_bitwise_deterministic_across_30_runs") else {
        return;
    };
    for (dt, rows, hidden) in [
        (DType::F32, 4096, 1024),
        (DType::BF16, 3000, 1600),
        (DType::F16, 64, 65536),
    ] {
        let inp = check::inputs(&Case::plain(dt, rows, hidden));
        let up = |v: &[f32], shape: &[usize]| {
            gpu.upload(&cuattn::HostTensor::from_f32(dt, shape, v).unwrap())
                .unwrap()
        };
        let x = up(&inp.x, &[rows, hidden]);
        let dy = up(&inp.dy, &[rows, hidden]);
        let gamma = up(inp.gamma.as_ref().unwrap(), &[hidden]);
        let beta = up(inp.beta.as_ref().unwrap(), &[hidden]);
        let fwd = ln::forward(&x, Some(&gamma), Some(&beta), 1e-5).unwrap();
        let bits = |t: &cuattn::gpu::DeviceTensor| t.to_host().unwrap().bytes().to_vec();
        let first = ln::backward(&dy, &x, Some(&gamma), &fwd.mean, &fwd.rstd).unwrap();
        let want = (
            bits(&first.dx),
            bits(first.dgamma.as_ref().unwrap()),
            bits(&first.dbeta),
        );
        for run in 1..30 {
            let g = ln::backward(&dy, &x, Some(&gamma), &fwd.mean, &fwd.rstd).unwrap();
            let got = (
                bits(&g.dx),
                bits(g.dgamma.as_ref().unwrap()),
                bits(&g.dbeta),
            );
            assert!(
                got == want,
                "{dt} {rows}x{hidden}: backward run {run} differs from run 0"
            );
            let again = ln::forward(&x, Some(&gamma), Some(&beta), 1e-5).unwrap();
            assert_eq!(
                bits(&again.y),
                bits(&fwd.y),
                "{dt}: forward run {run} differs"
            );
        }
    }
}

#[test]
fn concurrent_backwards_from_many_threads_share_the_workspace_safely() {
    let Some(gpu) =
        gpu_or_skip("concurrent_backwards_from_many_threads_share_the_workspace_safely")
    else {
        return;
    };
    // Different sizes make the shared workspace grow while other threads use it.
    std::thread::scope(|s| {
        for t in 0..8usize {
            let gpu = gpu.clone();
            s.spawn(move || {
                for round in 0..6usize {
                    let hidden = [51, 768, 1600, 4096, 9000, 65536][(t + round) % 6];
                    let c = Case::plain(DType::F16, 8 + 5 * t, hidden);
                    check::backward(&gpu, &c)
                        .unwrap_or_else(|e| panic!("thread {t} round {round}: {e}"));
                }
            });
        }
    });
}

#[test]
fn bad_input_is_a_typed_error_and_launches_nothing() {
    let Some(gpu) = gpu_or_skip("bad_input_is_a_typed_error_and_launches_nothing") else {
        return;
    };
    let x = gpu.full(DType::F16, &[4, 8], 1.0).unwrap();
    let gamma7 = gpu.full(DType::F16, &[7], 1.0).unwrap();
    let gamma_f32 = gpu.full(DType::F32, &[8], 1.0).unwrap();
    let empty = gpu.full(DType::F16, &[0, 8], 1.0).unwrap();
    let zero_hidden = gpu.full(DType::F16, &[4, 0], 1.0).unwrap();
    assert!(matches!(
        ln::forward(&x, Some(&gamma7), None, 1e-5),
        Err(Error::Shape { arg: "gamma", .. })
    ));
    assert!(matches!(
        ln::forward(&x, Some(&gamma_f32), None, 1e-5),
        Err(Error::DType { arg: "gamma", .. })
    ));
    assert!(matches!(
        ln::forward(&empty, None, None, 1e-5),
        Err(Error::Empty { arg: "x", .. })
    ));
    assert!(matches!(
        ln::forward(&zero_hidden, None, None, 1e-5),
        Err(Error::InvalidArgument { arg: "x", .. })
    ));
    let transposed = x
        .view_at(0, cuattn::Layout::strided("x", &[8, 4], &[1, 8]).unwrap())
        .unwrap();
    let mut y = gpu.full(DType::F16, &[8, 4], f32::NAN).unwrap();
    let err = ln::forward_into(
        &gpu,
        &transposed,
        None,
        None,
        1e-5,
        &mut y.view_mut(),
        None,
        None,
        Tuning::default(),
    );
    assert!(
        matches!(err, Err(Error::Layout { arg: "x", .. })),
        "{err:?}"
    );
    assert!(
        y.to_f32_vec().unwrap().iter().all(|v| v.is_nan()),
        "nothing may be launched on bad input"
    );
}
