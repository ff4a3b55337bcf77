//! The split-KV decode kernel held to the f64 reference on the GPU: random cases (proptest:
//! dtypes, GQA groups, head dims, cache lengths per sequence, BHSD/BSHD caches, forced and
//! planned split counts, host and device lengths), caches up to 128k keys, empty caches, and
//! device lengths outside the cache (clamped). The checks (NaN-poisoned outputs and unused
//! cache rows, the tolerance rule) are `cuattn::check::decode`.

use cuattn::check::decode::{self as check, Case};
use cuattn::check::gpu_or_skip;
use cuattn::DType;
use proptest::prelude::*;

fn case_strategy() -> impl Strategy<Value = Case> {
    let dim = prop_oneof![
        prop::sample::select(vec![64usize, 128, 80, 96, 256]),
        1usize..=256
    ];
    (
        prop::sample::select(DType::ALL.to_vec()),
        (
            1usize..=4,
            1usize..=3,
            prop::sample::select(vec![1usize, 2, 3, 4, 8, 12]),
        ),
        dim,
        (1usize..=700, prop::collection::vec(0.0f64..=1.0, 4)),
        (any::<bool>(), prop::option::of(1usize..=40), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (b, hkv, group), dim, (cap, fracs), (bshd, splits, dev), seed)| {
                let lens = fracs[..b]
                    .iter()
                    .map(|f| (f * cap as f64).round() as usize)
                    .collect();
                Case {
                    capacity: cap,
                    bshd,
                    splits,
                    device_lens: dev.then(|| vec![0; b]),
                    seed,
                    ..Case::new(dtype, (b, hkv * group, hkv, dim), lens)
                }
            },
        )
}

#[test]
fn decode_matches_reference_on_random_cases() {
    let Some(gpu) = gpu_or_skip("decode_matches_reference_on_random_cases") else {
        return;
    };
    crate::run_proptest(
        "decode_matches_reference_on_random_cases",
        case_strategy(),
        48,
        |c| check::forward(&gpu, &c),
    );
}

fn run(name: &str, cases: Vec<Case>) {
    let Some(gpu) = gpu_or_skip(name) else { return };
    for c in cases {
        check::forward(&gpu, &c).unwrap();
    }
}

fn every_dtype(f: impl Fn(DType) -> Case) -> Vec<Case> {
    DType::ALL.into_iter().map(f).collect()
}

#[test]
fn long_caches_up_to_128k_keys() {
    let mut cases = Vec::new();
    for len in [1usize, 4096, 32768, 131072] {
        cases.extend(every_dtype(|dt| Case::new(dt, (1, 4, 1, 128), vec![len])));
    }
    // GQA 32/8 at 32k, the benchmark's shape.
    cases.push(Case::new(DType::F16, (1, 32, 8, 128), vec![32768]));
    run("long_caches_up_to_128k_keys", cases);
}

#[test]
fn a_batch_of_different_lengths_including_empty_caches() {
    run(
        "a_batch_of_different_lengths_including_empty_caches",
        every_dtype(|dt| Case::new(dt, (6, 8, 2, 128), vec![0, 1, 777, 4095, 20000, 64])),
    );
}

#[test]
fn every_cache_empty_gives_zero_output_and_negative_infinite_lse() {
    let mut cases = every_dtype(|dt| Case {
        capacity: 16,
        ..Case::new(dt, (3, 4, 2, 64), vec![0, 0, 0])
    });
    cases.extend(every_dtype(|dt| Case {
        capacity: 16,
        splits: Some(5),
        ..Case::new(dt, (3, 4, 2, 64), vec![0, 0, 0])
    }));
    run(
        "every_cache_empty_gives_zero_output_and_negative_infinite_lse",
        cases,
    );
}

#[test]
fn bshd_and_bhsd_caches_with_gqa_groups() {
    let mut cases = Vec::new();
    for bshd in [false, true] {
        for (hq, hkv) in [(8, 8), (8, 4), (12, 4), (32, 8), (16, 1), (24, 2)] {
            cases.extend(every_dtype(|dt| Case {
                bshd,
                ..Case::new(dt, (2, hq, hkv, 128), vec![1500, 333])
            }));
        }
    }
    run("bshd_and_bhsd_caches_with_gqa_groups", cases);
}

#[test]
fn head_dims_specialised_padded_and_unaligned() {
    // 64 and 128 exact; 80, 200, 256 padded; 12 and 100 not a multiple of 8 (element loads
    // for f16/bf16), 1 and 3 tiny.
    let mut cases = Vec::new();
    for dim in [64usize, 128, 80, 200, 256, 12, 100, 1, 3] {
        cases.extend(every_dtype(|dt| {
            Case::new(dt, (2, 4, 2, dim), vec![300, 65])
        }));
    }
    run("head_dims_specialised_padded_and_unaligned", cases);
}

#[test]
fn forced_split_counts_from_one_to_more_than_tiles() {
    let mut cases = Vec::new();
    for splits in [1usize, 2, 3, 17, 64, 256] {
        cases.extend(every_dtype(|dt| Case {
            splits: Some(splits),
            ..Case::new(dt, (2, 4, 4, 128), vec![2000, 129])
        }));
    }
    run("forced_split_counts_from_one_to_more_than_tiles", cases);
}

#[test]
fn device_lengths_outside_the_cache_act_clamped() {
    // Lengths 300 + 50 (past the capacity of 300) and 7 − 20 (negative).
    run(
        "device_lengths_outside_the_cache_act_clamped",
        every_dtype(|dt| Case {
            device_lens: Some(vec![50, -20, 0]),
            ..Case::new(dt, (3, 4, 2, 64), vec![300, 7, 150])
        }),
    );
}

#[test]
fn decode_is_bitwise_deterministic_across_calls() {
    use cuattn::ops::decode::{forward, CacheLens, Options};
    let Some(gpu) = gpu_or_skip("decode_is_bitwise_deterministic_across_calls") else {
        return;
    };
    // 32k keys over many splits: the merge runs in a fixed order, so no run differs.
    let (b, hq, hkv, cap, d) = (2, 8, 2, 32768, 128);
    let q = gpu.random(DType::BF16, &[b, hq, d], 1, 0.0, 1.0).unwrap();
    let k = gpu
        .random(DType::BF16, &[b, hkv, cap, d], 2, 0.0, 1.0)
        .unwrap();
    let v = gpu
        .random(DType::BF16, &[b, hkv, cap, d], 3, 0.0, 1.0)
        .unwrap();
    let lens = [cap as i32, 20000];
    let run = || {
        let (o, lse) = forward(&q, &k, &v, CacheLens::Host(&lens), &Options::default()).unwrap();
        (o.to_f32_vec().unwrap(), lse.to_f32_vec().unwrap())
    };
    let (o1, l1) = run();
    let (o2, l2) = run();
    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert!(o1.iter().chain(&l1).all(|x| x.is_finite()));
    assert_eq!(bits(&o1), bits(&o2));
    assert_eq!(bits(&l1), bits(&l2));
}
