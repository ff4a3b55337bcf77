//! The attention backward kernels (tensor cores for f16/bf16 in both dQ modes, and the exact
//! path) held to the f64 reference on the GPU: random shapes, head dims, GQA, masks, key
//! padding, BSHD inputs and packed batches (proptest), bitwise repeatability of the
//! deterministic mode, fully masked rows, GQA sums, a mask missing from the backward, and head
//! dims 129–256 (the HD 256 tiles with their columns split across CTAs). The
//! checks (NaN-poisoned outputs, the tolerance rule) are `cuattn::check::attention_backward`.

use cuattn::check::attention_backward::{self as check, Case};
use cuattn::check::gpu_or_skip;
use cuattn::ops::attention::{Kernel, Window};
use cuattn::ops::attention_backward::Mode;
use cuattn::reference::attention::{CausalAlign, Shape};
use cuattn::DType;
use proptest::prelude::*;

fn case_strategy() -> impl Strategy<Value = Case> {
    let dim = prop_oneof![
        1usize..=256,
        prop::sample::select(vec![64usize, 72, 96, 128, 256])
    ];
    let causal = prop::option::of(prop::sample::select(vec![
        CausalAlign::TopLeft,
        CausalAlign::BottomRight,
    ]));
    (
        prop::sample::select(DType::ALL.to_vec()),
        (1usize..=2, 1usize..=3, 1usize..=3),
        prop_oneof![
            3 => (1usize..=80, 1usize..=80),
            1 => (1usize..=200, 1usize..=200), // several 64-key blocks and query tiles
        ],
        (dim.clone(), dim),
        causal,
        (any::<bool>(), any::<bool>(), any::<bool>(), 0u8..3),
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                (b, hkv, group),
                (lq, lk),
                (d, dv),
                causal,
                (pad, bshd, packed, path),
                seed,
            )| {
                let s = Shape::new(b, hkv * group, hkv, lq, lk, d, dv);
                let key_lens = pad.then(|| {
                    (0..b)
                        .map(|i| ((seed as usize >> i) % (lk + 1)) as i32)
                        .collect()
                });
                let packed = packed.then(|| {
                    let lens = |n: usize, salt: u32| {
                        (0..b)
                            .map(|i| (seed.rotate_left(salt + i as u32 * 7) as usize) % (n + 1))
                            .collect()
                    };
                    (lens(lq, 3), lens(lk, 17))
                });
                let window = (seed % 4 == 0).then(|| {
                    let align = if seed & 16 == 0 {
                        CausalAlign::TopLeft
                    } else {
                        CausalAlign::BottomRight
                    };
                    Window::new((seed >> 8) as usize % 60, (seed >> 16) as usize % 60, align)
                });
                let tc = dtype != DType::F32 && d.max(dv) <= 256;
                let (kernel, mode) = match path {
                    0 if tc => (Kernel::TensorCore, Mode::Deterministic),
                    1 if tc => (Kernel::TensorCore, Mode::Fast),
                    _ => (Kernel::Exact, Mode::Deterministic),
                };
                Case {
                    dtype,
                    shape: s,
                    causal,
                    window,
                    key_lens: if packed.is_some() { None } else { key_lens },
                    packed,
                    bshd: bshd && !pad,
                    kernel,
                    mode,
                    seed,
                }
            },
        )
}

#[test]
fn backward_kernels_match_the_reference_on_random_cases() {
    let name = "backward_kernels_match_the_reference_on_random_cases";
    let Some(gpu) = gpu_or_skip(name) else { return };
    crate::run_proptest(name, case_strategy(), 48, |c| check::backward(&gpu, &c));
}

/// The case on tensor cores in both modes (f16 and bf16; every head dim ≤ 256) and on the
/// exact path (every dtype).
fn every_path(f: impl Fn(DType) -> Case) -> Vec<Case> {
    let mut out: Vec<Case> = DType::ALL
        .into_iter()
        .map(|dt| Case {
            kernel: Kernel::Exact,
            ..f(dt)
        })
        .collect();
    for dt in [DType::F16, DType::BF16] {
        for mode in [Mode::Deterministic, Mode::Fast] {
            out.push(Case {
                kernel: Kernel::TensorCore,
                mode,
                ..f(dt)
            });
        }
    }
    out
}

fn run(name: &str, cases: Vec<Case>) {
    let Some(gpu) = gpu_or_skip(name) else { return };
    for c in cases {
        check::backward(&gpu, &c).unwrap();
    }
}

#[test]
fn fully_masked_rows_get_zero_gradients() {
    run(
        "fully_masked_rows_get_zero_gradients",
        every_path(|dt| Case {
            causal: Some(CausalAlign::BottomRight),
            key_lens: Some(vec![5, 0]),
            ..Case::dense(dt, Shape::new(2, 2, 1, 40, 9, 64, 64))
        }),
    );
}

#[test]
fn gqa_and_mqa_sum_dk_and_dv_over_the_group() {
    run(
        "gqa_and_mqa_sum_dk_and_dv_over_the_group",
        [
            Shape::new(1, 8, 2, 70, 90, 64, 64),
            Shape::new(2, 6, 1, 33, 130, 128, 96),
        ]
        .into_iter()
        .flat_map(|s| every_path(move |dt| Case::dense(dt, s)))
        .collect(),
    );
}

#[test]
fn both_causal_alignments_windows_and_head_dims_up_to_256() {
    let mut cases = Vec::new();
    for (i, (lq, lk)) in [(50, 130), (130, 50), (64, 64)].into_iter().enumerate() {
        for causal in [CausalAlign::TopLeft, CausalAlign::BottomRight] {
            let d = [40, 128, 256][i];
            cases.extend(every_path(|dt| Case {
                causal: Some(causal),
                window: (i == 2).then(|| Window::new(17, 3, causal)),
                ..Case::dense(dt, Shape::new(1, 2, 2, lq, lk, d, d))
            }));
        }
    }
    run(
        "both_causal_alignments_windows_and_head_dims_up_to_256",
        cases,
    );
}

#[test]
fn head_dims_129_to_256_split_their_columns_and_match_the_reference() {
    // Both sides wide, one side ≤ 128 (only the wider one has a second column block), a head
    // dim that is not a multiple of 8 (element loads), GQA, causal, a window, key padding.
    let mut cases = Vec::new();
    let mixes = [
        (256, 256),
        (256, 128),
        (128, 256),
        (192, 192),
        (136, 250),
        (130, 64),
    ];
    for (n, (d, dv)) in mixes.into_iter().enumerate() {
        cases.extend(every_path(|dt| Case {
            causal: (n % 2 == 0).then_some(CausalAlign::BottomRight),
            window: (n == 3).then(|| Window::new(30, 0, CausalAlign::TopLeft)),
            key_lens: (n % 3 == 1).then(|| vec![150, 7]),
            ..Case::dense(dt, Shape::new(2, 4, 2, 70 + 30 * (n % 2), 150, d, dv))
        }));
    }
    cases.push(Case {
        kernel: Kernel::TensorCore,
        mode: Mode::Fast,
        packed: Some((vec![9, 0, 80], vec![20, 5, 100])),
        ..Case::dense(DType::BF16, Shape::new(3, 2, 1, 0, 0, 256, 200))
    });
    run(
        "head_dims_129_to_256_split_their_columns_and_match_the_reference",
        cases,
    );
}

#[test]
fn the_deterministic_mode_is_bitwise_repeatable_over_30_runs() {
    let name = "the_deterministic_mode_is_bitwise_repeatable_over_30_runs";
    let Some(gpu) = gpu_or_skip(name) else { return };
    for dt in [DType::F16, DType::BF16] {
        for d in [128, 256] {
            let c = Case {
                kernel: Kernel::TensorCore,
                causal: Some(CausalAlign::TopLeft),
                ..Case::dense(dt, Shape::new(2, 4, 2, 300, 300, d, d))
            };
            check::bitwise_repeatable(&gpu, &c, 30).unwrap();
        }
    }
    let exact = Case {
        kernel: Kernel::Exact,
        ..Case::dense(DType::F32, Shape::new(1, 2, 1, 100, 120, 64, 64))
    };
    check::bitwise_repeatable(&gpu, &exact, 30).unwrap();
}

#[test]
fn a_mask_applied_in_the_forward_but_not_the_backward_is_caught() {
    let name = "a_mask_applied_in_the_forward_but_not_the_backward_is_caught";
    let Some(gpu) = gpu_or_skip(name) else { return };
    for c in every_path(|dt| Case {
        causal: Some(CausalAlign::TopLeft),
        ..Case::dense(dt, Shape::new(1, 2, 1, 64, 64, 64, 64))
    }) {
        check::mask_missing_from_the_backward_is_caught(&gpu, &c).unwrap();
    }
}

#[test]
fn the_standard_cases_of_cuattn_check_pass() {
    let name = "the_standard_cases_of_cuattn_check_pass";
    let Some(gpu) = gpu_or_skip(name) else { return };
    for (case_name, c) in check::standard_cases() {
        if let Err(e) = check::backward(&gpu, &c) {
            panic!("{case_name}: {e}");
        }
    }
}
