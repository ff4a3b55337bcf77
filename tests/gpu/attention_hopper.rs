//! The Hopper (sm_90a wgmma/TMA) attention kernel held to the f64 reference, through the same
//! checks as the other attention kernels (poisoned outputs, the tolerance rule, LSE): random
//! dense cases of its domain (f16/bf16, D = Dv ∈ {64, 128}, GQA, causal both alignments,
//! sliding windows, key padding with NaN in the padding, BHSD/BSHD), plus named edge cases:
//! zero and one key tile, fully masked rows, tails shorter than a tile. On a GPU that is not
//! compute capability 9.0, asking for the kernel must be a clean error instead.

use cuattn::check::attention::{self as check, Case};
use cuattn::check::gpu_or_skip;
use cuattn::ops::attention::{Kernel, Window};
use cuattn::reference::attention::{CausalAlign, Shape};
use cuattn::DType;
use proptest::prelude::*;

fn hopper_case(dtype: DType, shape: Shape) -> Case {
    Case {
        kernel: Kernel::Hopper,
        ..Case::dense(dtype, shape)
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![DType::F16, DType::BF16]),
        (1usize..=2, 1usize..=3, 1usize..=3),
        prop_oneof![2 => (1usize..=140, 1usize..=140), 1 => (100usize..=520, 100usize..=520)],
        prop::sample::select(vec![64usize, 128]),
        prop::option::of(prop::sample::select(vec![
            CausalAlign::TopLeft,
            CausalAlign::BottomRight,
        ])),
        (any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (b, hkv, group), (lq, lk), d, causal, (pad, bshd), seed)| {
                let shape = Shape::new(b, hkv * group, hkv, lq, lk, d, d);
                let window = (seed % 4 == 0).then(|| {
                    Window::new(
                        (seed >> 8) as usize % 200,
                        (seed >> 16) as usize % 200,
                        CausalAlign::BottomRight,
                    )
                });
                Case {
                    causal,
                    window,
                    key_lens: pad.then(|| {
                        (0..b)
                            .map(|i| ((seed as usize >> (3 * i)) % (lk + 1)) as i32)
                            .collect()
                    }),
                    bshd: bshd && !pad,
                    seed,
                    ..hopper_case(dtype, shape)
                }
            },
        )
}

/// The GPU if it is compute capability 9.0; otherwise checks that `Kernel::Hopper` is refused
/// with a typed error, and returns None.
fn hopper_or_refused(test: &str) -> Option<std::sync::Arc<cuattn::gpu::Gpu>> {
    let gpu = gpu_or_skip(test)?;
    if gpu.info().compute_capability == (9, 0) {
        return Some(gpu);
    }
    let err = check::forward(
        &gpu,
        &hopper_case(DType::BF16, Shape::new(1, 1, 1, 8, 8, 64, 64)),
    )
    .expect_err("Kernel::Hopper must be refused off compute capability 9.0");
    assert!(err.contains("compute capability 9.0"), "{test}: {err}");
    None
}

#[test]
fn hopper_kernel_matches_reference_on_random_cases() {
    let Some(gpu) = hopper_or_refused("hopper_kernel_matches_reference_on_random_cases") else {
        return;
    };
    crate::run_proptest(
        "hopper_kernel_matches_reference_on_random_cases",
        case_strategy(),
        48,
        |c| check::forward(&gpu, &c),
    );
}

#[test]
fn hopper_kernel_edge_cases() {
    let Some(gpu) = hopper_or_refused("hopper_kernel_edge_cases") else {
        return;
    };
    let mut cases = Vec::new();
    for dt in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            // One key tile, fewer rows than a tile, a single query and key.
            cases.push(hopper_case(dt, Shape::new(1, 2, 1, 1, 1, d, d)));
            cases.push(hopper_case(dt, Shape::new(2, 4, 2, 37, 128, d, d)));
            // Exactly two tiles and a ragged third, with padding that leaves one sequence no key
            // (zero tiles for its blocks: O = 0, LSE = −∞) and one whose last tile is partial.
            cases.push(Case {
                key_lens: Some(vec![0, 129, 256]),
                ..hopper_case(dt, Shape::new(3, 2, 2, 200, 300, d, d))
            });
            // Bottom-right causal with Lq > Lk: the first Lq − Lk rows see no key.
            cases.push(Case {
                causal: Some(CausalAlign::BottomRight),
                ..hopper_case(dt, Shape::new(1, 2, 1, 300, 130, d, d))
            });
            // Top-left causal over several tiles, BSHD strides.
            cases.push(Case {
                causal: Some(CausalAlign::TopLeft),
                bshd: true,
                ..hopper_case(dt, Shape::new(2, 4, 1, 520, 520, d, d))
            });
            // A narrow sliding window: most tiles skipped, masks on both band edges.
            cases.push(Case {
                window: Some(Window::new(40, 0, CausalAlign::TopLeft)),
                ..hopper_case(dt, Shape::new(1, 2, 2, 400, 400, d, d))
            });
        }
    }
    for c in cases {
        check::forward(&gpu, &c).unwrap();
    }
}
