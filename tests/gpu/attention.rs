//! The attention kernels (exact, and tensor cores for f16/bf16) held to the f64 reference on the GPU: random shapes, head dims,
//! GQA, masks, key padding, BHSD/BSHD layouts and packed variable-length batches (proptest),
//! and the edge cases of docs/kernels/attention-forward.md as named tests. The checks themselves (poisoned
//! outputs, the tolerance rule) are `cuattn::check::attention`.

use cuattn::check::attention::{self as check, Case};
use cuattn::check::gpu_or_skip;
use cuattn::ops::attention::{Kernel, Window};
use cuattn::reference::attention::{CausalAlign, Shape};
use cuattn::DType;
use proptest::prelude::*;

fn case_strategy() -> impl Strategy<Value = Case> {
    let dim = prop_oneof![
        1usize..=256,
        prop::sample::select(vec![64usize, 72, 80, 96, 128, 224, 256])
    ];
    let causal = prop::option::of(prop::sample::select(vec![
        CausalAlign::TopLeft,
        CausalAlign::BottomRight,
    ]));
    (
        prop::sample::select(DType::ALL.to_vec()),
        (1usize..=3, 1usize..=3, 1usize..=3),
        prop_oneof![
            3 => (1usize..=80, 1usize..=80),
            1 => (1usize..=300, 1usize..=300), // several 128-row query blocks and key tiles
        ],
        (dim.clone(), dim),
        causal,
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (b, hkv, group), (lq, lk), (d, dv), causal, (pad, bshd, packed, tc), seed)| {
                let s = Shape::new(b, hkv * group, hkv, lq, lk, d, dv);
                let key_lens = pad.then(|| {
                    (0..b)
                        .map(|i| ((seed as usize >> i) % (lk + 1)) as i32)
                        .collect()
                });
                let packed = packed.then(|| {
                    let lens = |n: usize, salt: u64| {
                        (0..b)
                            .map(|i| {
                                ((seed.rotate_left(salt as u32 + i as u32 * 7)) as usize) % (n + 1)
                            })
                            .collect()
                    };
                    (lens(lq, 3), lens(lk, 17))
                });
                // One case in four with a sliding window (widths and alignment from the seed).
                let window = (seed % 4 == 0).then(|| {
                    let align = if seed & 16 == 0 {
                        CausalAlign::TopLeft
                    } else {
                        CausalAlign::BottomRight
                    };
                    Window::new((seed >> 8) as usize % 60, (seed >> 16) as usize % 60, align)
                });
                Case {
                    dtype,
                    shape: s,
                    causal,
                    window,
                    key_lens: if packed.is_some() { None } else { key_lens },
                    packed,
                    bshd: bshd && !pad,
                    scale: None,
                    kernel: if tc && dtype != DType::F32 {
                        Kernel::TensorCore
                    } else {
                        Kernel::Exact
                    },
                    seed,
                }
            },
        )
}

#[test]
fn kernels_match_reference_on_random_cases() {
    let Some(gpu) = gpu_or_skip("kernels_match_reference_on_random_cases") else {
        return;
    };
    crate::run_proptest(
        "kernels_match_reference_on_random_cases",
        case_strategy(),
        64,
        |c| check::forward(&gpu, &c),
    );
}

fn run(name: &str, cases: Vec<Case>) {
    let Some(gpu) = gpu_or_skip(name) else { return };
    for c in cases {
        check::forward(&gpu, &c).unwrap();
    }
}

/// The case for every dtype, with the exact kernel, and with tensor cores for f16/bf16.
fn every_dtype(f: impl Fn(DType) -> Case) -> Vec<Case> {
    let mut out: Vec<Case> = DType::ALL
        .into_iter()
        .map(|dt| Case {
            kernel: Kernel::Exact,
            ..f(dt)
        })
        .collect();
    out.extend([DType::F16, DType::BF16].map(|dt| Case {
        kernel: Kernel::TensorCore,
        ..f(dt)
    }));
    out
}

/// One of [`every_dtype`]'s variants, rotating with `i`: long case lists cover every kernel and
/// dtype without running each combination five times (compute-sanitizer runs them too).
fn one_dtype(i: usize, f: impl Fn(DType) -> Case) -> Case {
    let mut all = every_dtype(f);
    all.swap_remove(i % all.len())
}

#[test]
fn fully_masked_rows_give_zero_and_negative_infinite_lse() {
    // Bottom-right with Lq > Lk, and a sequence with no valid key at all.
    run(
        "fully_masked_rows_give_zero_and_negative_infinite_lse",
        every_dtype(|dt| Case {
            causal: Some(CausalAlign::BottomRight),
            key_lens: Some(vec![5, 0]),
            ..Case::dense(dt, Shape::new(2, 2, 1, 40, 9, 64, 64))
        }),
    );
}

#[test]
fn causal_alignments_differ_when_lq_differs_from_lk() {
    let mut cases = Vec::new();
    for causal in [CausalAlign::TopLeft, CausalAlign::BottomRight] {
        for (lq, lk) in [(17, 50), (50, 17), (1, 33), (33, 1)] {
            cases.extend(every_dtype(|dt| Case {
                causal: Some(causal),
                ..Case::dense(dt, Shape::new(1, 2, 2, lq, lk, 64, 64))
            }));
        }
    }
    run("causal_alignments_differ_when_lq_differs_from_lk", cases);
}

#[test]
fn odd_head_dims_and_unequal_qk_and_v_dims() {
    let mut cases = Vec::new();
    for (d, dv) in [
        (1, 1),
        (72, 72),
        (80, 96),
        (96, 80),
        (224, 32),
        (256, 256),
        (3, 255),
    ] {
        cases.extend(every_dtype(|dt| {
            Case::dense(dt, Shape::new(1, 3, 1, 19, 23, d, dv))
        }));
    }
    run("odd_head_dims_and_unequal_qk_and_v_dims", cases);
}

#[test]
fn bshd_layout_is_read_through_strides() {
    run(
        "bshd_layout_is_read_through_strides",
        every_dtype(|dt| Case {
            bshd: true,
            causal: Some(CausalAlign::TopLeft),
            ..Case::dense(dt, Shape::new(2, 4, 2, 31, 45, 128, 128))
        }),
    );
}

#[test]
fn varlen_with_empty_sequences_and_fewer_tokens_than_sequences() {
    run(
        "varlen_with_empty_sequences_and_fewer_tokens_than_sequences",
        every_dtype(|dt| Case {
            packed: Some((vec![1, 0, 2, 0, 0], vec![3, 2, 0, 0, 1])),
            causal: Some(CausalAlign::BottomRight),
            ..Case::dense(dt, Shape::new(5, 2, 1, 0, 0, 64, 64))
        }),
    );
}

#[test]
fn large_logits_do_not_overflow() {
    // Scores around ±600 overflow f16 if formed in f16; the kernel accumulates in f32.
    run(
        "large_logits_do_not_overflow",
        every_dtype(|dt| Case {
            scale: Some(30.0),
            ..Case::dense(dt, Shape::new(1, 1, 1, 16, 16, 64, 64))
        }),
    );
}

#[test]
fn sequence_length_one() {
    run(
        "sequence_length_one",
        every_dtype(|dt| Case::dense(dt, Shape::new(3, 2, 2, 1, 1, 64, 64))),
    );
}

#[test]
fn several_query_blocks_and_key_tiles_with_tails() {
    // Lengths around the tensor-core tiles (128-row query blocks, 32/64-key tiles): causal
    // blocks on and off the diagonal, tail tiles, blocks with no admissible key.
    let mut cases = Vec::new();
    for (lq, lk) in [(128, 128), (129, 127), (200, 300), (300, 140), (257, 64)] {
        for causal in [
            None,
            Some(CausalAlign::TopLeft),
            Some(CausalAlign::BottomRight),
        ] {
            for d in [64, 128] {
                cases.push(one_dtype(cases.len(), |dt| Case {
                    causal,
                    key_lens: Some(vec![lk as i32, (lk / 3) as i32]),
                    ..Case::dense(dt, Shape::new(2, 2, 1, lq, lk, d, d))
                }));
            }
        }
    }
    run("several_query_blocks_and_key_tiles_with_tails", cases);
}

#[test]
fn unfused_baseline_matches_reference() {
    let Some(gpu) = gpu_or_skip("unfused_baseline_matches_reference") else {
        return;
    };
    for dt in DType::ALL {
        for causal in [
            None,
            Some(CausalAlign::TopLeft),
            Some(CausalAlign::BottomRight),
        ] {
            check::unfused(&gpu, dt, Shape::new(2, 3, 3, 100, 130, 64, 64), causal, 7).unwrap();
            // Lq > Lk: bottom-right leaves rows with no key (O = 0, LSE = −inf).
            check::unfused(&gpu, dt, Shape::new(1, 2, 2, 130, 70, 128, 96), causal, 8).unwrap();
        }
    }
}

#[test]
fn fused_matches_unfused_baseline_at_long_sequences() {
    let Some(gpu) = gpu_or_skip("fused_matches_unfused_baseline_at_long_sequences") else {
        return;
    };
    for causal in [
        None,
        Some(CausalAlign::TopLeft),
        Some(CausalAlign::BottomRight),
    ] {
        for dt in [DType::F16, DType::BF16] {
            for (l, d) in [(2048, 128), (1536, 64), (1024, 256)] {
                let s = Shape::new(1, 4, 4, l, l, d, d);
                check::fused_vs_unfused(&gpu, dt, s, causal, Kernel::TensorCore, 9).unwrap();
            }
        }
        let s = Shape::new(1, 2, 2, 1024, 1024, 64, 64);
        check::fused_vs_unfused(&gpu, DType::F32, s, causal, Kernel::Exact, 10).unwrap();
    }
}

#[test]
fn sliding_window_with_and_without_causal() {
    let mut cases = Vec::new();
    for (lq, lk) in [(300, 300), (200, 331), (129, 64)] {
        for (left, right) in [(0, 0), (37, 5), (100, 0), (5, 200)] {
            for align in [CausalAlign::TopLeft, CausalAlign::BottomRight] {
                for causal in [None, Some(align)] {
                    cases.push(one_dtype(cases.len(), |dt| Case {
                        causal,
                        window: Some(Window::new(left, right, align)),
                        key_lens: Some(vec![lk as i32, (lk / 2) as i32]),
                        ..Case::dense(dt, Shape::new(2, 2, 1, lq, lk, 64, 64))
                    }));
                }
            }
        }
    }
    run("sliding_window_with_and_without_causal", cases);
}
