//! The split-KV decoding twin (`cuattn::twin::decode`) against the f64 reference: one query
//! token per sequence against caches of 1 to 128k keys, batches with different cache lengths,
//! any number of splits (more splits than key tiles leaves empty ones), and the merge's
//! guards for empty splits and fully masked rows. CPU only.

use cuattn::reference::attention::{self as reference, CausalAlign, Options, Shape};
use cuattn::tolerance::{attention as tolerances, expect_close, Tolerance};
use cuattn::twin::decode::{self as twin, merge, split_range, Partial};
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut SmallRng, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| spread * rng.gen_range(-1.0f32..1.0))
        .collect()
}

fn expect(what: &str, out: &[f32], want: &[f64], tol: Tolerance) {
    if let Err(e) = expect_close(what, out, want, tol) {
        panic!("{e}");
    }
}

#[test]
fn split_ranges_tile_the_keys_exactly_once() {
    for n_keys in [1usize, 7, 64, 65, 1000] {
        for splits in [1usize, 2, 3, 8, 40] {
            let mut covered = 0;
            for s in 0..splits {
                let r = split_range(s, splits, n_keys, 16);
                assert_eq!(
                    r.start,
                    covered.min(n_keys),
                    "n={n_keys} splits={splits} s={s}"
                );
                assert!(r.start.is_multiple_of(16) || r.is_empty());
                covered = covered.max(r.end);
            }
            assert_eq!(covered, n_keys);
        }
    }
}

#[test]
fn decode_of_one_token_matches_the_reference_for_any_split_count() {
    let mut rng = SmallRng::seed_from_u64(42);
    for len_k in [1usize, 2, 63, 64, 65, 1000, 4097] {
        let s = Shape {
            batch: 3,
            heads_q: 4,
            heads_kv: 2,
            len_q: 1,
            len_k,
            dim_qk: 64,
            dim_v: 64,
        };
        let (q, k, v) = (
            rand_vec(&mut rng, s.q_len(), 1.0),
            rand_vec(&mut rng, s.k_len(), 1.0),
            rand_vec(&mut rng, s.v_len(), 1.0),
        );
        // Different cache lengths per sequence, one of them 0 (a fully masked row).
        let opts = Options {
            causal: Some(CausalAlign::BottomRight),
            key_lens: Some(vec![len_k, len_k / 2, 0]),
            ..Options::new(64)
        };
        let want = reference::forward(&q, &k, &v, &s, &opts).unwrap();
        let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::F32);
        for splits in [1, 2, 5, 16, 200] {
            let (o, lse) = twin::forward(&q, &k, &v, &s, &opts, splits, 64);
            expect(
                &format!("len {len_k} splits {splits}: O"),
                &o,
                &want.o,
                tol.o,
            );
            expect(
                &format!("len {len_k} splits {splits}: LSE"),
                &lse,
                &want.lse,
                tol.lse,
            );
        }
    }
}

#[test]
fn decode_over_a_128k_cache() {
    let mut rng = SmallRng::seed_from_u64(7);
    let s = Shape {
        batch: 1,
        heads_q: 1,
        heads_kv: 1,
        len_q: 1,
        len_k: 128 * 1024,
        dim_qk: 32,
        dim_v: 32,
    };
    let (q, k, v) = (
        rand_vec(&mut rng, s.q_len(), 1.0),
        rand_vec(&mut rng, s.k_len(), 1.0),
        rand_vec(&mut rng, s.v_len(), 1.0),
    );
    let opts = Options::new(32);
    let want = reference::forward(&q, &k, &v, &s, &opts).unwrap();
    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::F32);
    let (o, lse) = twin::forward(&q, &k, &v, &s, &opts, 132, 128);
    expect("O", &o, &want.o, tol.o);
    expect("LSE", &lse, &want.lse, tol.lse);
}

#[test]
fn merge_guards_empty_splits_and_all_empty_rows() {
    let empty = Partial {
        o: vec![0.0; 2],
        lse: f32::NEG_INFINITY,
    };
    let (o, lse) = merge(&[empty.clone(), empty.clone()], 2);
    assert_eq!((o, lse), (vec![0.0, 0.0], f32::NEG_INFINITY));
    let full = Partial {
        o: vec![1.0, -2.0],
        lse: 3.5,
    };
    let (o, lse) = merge(&[empty.clone(), full.clone(), empty], 2);
    assert_eq!(lse, 3.5);
    assert_eq!(o, vec![1.0, -2.0]);
    // Two equal halves: LSE grows by ln 2, O is their mean.
    let (o, lse) = merge(
        &[
            full.clone(),
            Partial {
                o: vec![3.0, 0.0],
                lse: 3.5,
            },
        ],
        2,
    );
    assert!((lse - (3.5 + 2f32.ln())).abs() < 1e-6);
    assert!((o[0] - 2.0).abs() < 1e-6 && (o[1] + 1.0).abs() < 1e-6);
}

// ---- The kernel's own loop (`twin::decode::forward_kernel`) --------------------------------

use cuattn::twin::decode::{forward_kernel, plan_splits, Geometry, MIN_KEYS_PER_SPLIT, SPLIT_TILE};
use proptest::prelude::*;

/// q [B, Hq, D], K/V [B, Hkv, capacity, D]; the reference sees one query row per head, the
/// cache lengths as key padding.
fn check_kernel_twin(
    seed: u64,
    dtype: DType,
    (batch, heads_kv, group, dim): (usize, usize, usize, usize),
    lens: &[usize],
    capacity: usize,
    splits: usize,
) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let s = Shape::new(batch, heads_kv * group, heads_kv, 1, capacity, dim, dim);
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|a| dtype.round(a)).collect() };
    let q = round(rand_vec(&mut rng, s.q_len(), 2.0));
    let k = round(rand_vec(&mut rng, s.k_len(), 2.0));
    let v = round(rand_vec(&mut rng, s.v_len(), 1.0));
    let opts = Options {
        key_lens: Some(lens.to_vec()),
        ..Options::new(dim)
    };
    let want = reference::forward(&q, &k, &v, &s, &opts).unwrap();
    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::F32);
    let geo = Geometry::new(dtype.size_bytes(), dim, group);
    let (o, lse) = forward_kernel(&q, &k, &v, &s, lens, opts.scale as f32, splits, &geo);
    let what =
        format!("B{batch} Hkv{heads_kv} G{group} D{dim} lens {lens:?} splits {splits} {dtype}");
    expect_close(&format!("{what}: O"), &o, &want.o, tol.o)?;
    expect_close(&format!("{what}: LSE"), &lse, &want.lse, tol.lse)
}

#[test]
fn kernel_loop_handles_length_zero_short_and_tile_edge_caches() {
    for dtype in DType::ALL {
        for dim in [64usize, 128, 80, 256, 3] {
            for splits in [1usize, 2, 7] {
                let lens = [0usize, 1, 63, 64, 65, 129];
                check_kernel_twin(dim as u64, dtype, (6, 1, 1, dim), &lens, 129, splits).unwrap();
            }
        }
    }
}

#[test]
fn kernel_loop_groups_query_heads_in_chunks() {
    // Groups 1..=12: 1, 2, 4 and 8 heads per block, and two chunks (12 = 8 + 4 left over).
    for group in [1usize, 2, 3, 4, 5, 8, 12] {
        check_kernel_twin(
            group as u64,
            DType::F16,
            (2, 2, group, 64),
            &[200, 37],
            200,
            3,
        )
        .unwrap();
    }
}

#[test]
fn every_length_zero_gives_zero_output_and_negative_infinite_lse() {
    let s = Shape::new(2, 2, 1, 1, 8, 16, 16);
    let (q, k, v) = (vec![1.0; 64], vec![f32::NAN; 256], vec![f32::NAN; 256]);
    let geo = Geometry::new(2, 16, 2);
    let (o, lse) = forward_kernel(&q, &k, &v, &s, &[0, 0], 0.25, 3, &geo);
    assert!(o.iter().all(|&x| x == 0.0), "{o:?}");
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY), "{lse:?}");
}

#[test]
fn planner_fills_the_gpu_without_empty_splits() {
    // 132 SMs × 3 resident blocks. One sequence of 8 kv-heads at 32k: 43 splits, 344 blocks in
    // one wave (90% of the best wave efficiency, then whole tiles per split).
    assert_eq!(plan_splits(8, 32768, 396), 43);
    // Eight sequences: 6 splits, 384 blocks, one wave, where 7 would need a second wave.
    assert_eq!(plan_splits(64, 32768, 396), 6);
    // A short cache: every split it can have (32 of 128 keys), all in one wave.
    assert_eq!(plan_splits(8, 4096, 396), 32);
    assert_eq!(plan_splits(8, 0, 528), 1);
    assert_eq!(plan_splits(8, 100, 528), 1);
    assert_eq!(plan_splits(1024, 131072, 528), 1);
    for (base, len) in [(8usize, 4096usize), (64, 131072), (1, 1000), (3, 70000)] {
        let s = plan_splits(base, len, 528);
        assert!((1..=256).contains(&s));
        // Every split of the longest cache has keys.
        assert!(!split_range(s - 1, s, len, SPLIT_TILE).is_empty() || len == 0);
        assert!(
            len == 0 || s == 1 || split_range(0, s, len, SPLIT_TILE).len() >= MIN_KEYS_PER_SPLIT
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Cache lengths 0..=5000 per sequence, 1 to 40 splits (more splits than tiles leaves
    /// empty ones), any head dim up to 256, GQA groups, every dtype's pack geometry.
    #[test]
    fn kernel_loop_matches_the_reference(
        seed in any::<u64>(),
        dtype in prop::sample::select(DType::ALL.to_vec()),
        batch in 1usize..=3,
        heads_kv in 1usize..=2,
        group in prop::sample::select(vec![1usize, 2, 3, 4, 6, 8]),
        dim in prop_oneof![prop::sample::select(vec![64usize, 128]), 1usize..=256],
        raw_lens in prop::collection::vec(0usize..=5000, 3),
        splits in 1usize..=40,
    ) {
        let lens = &raw_lens[..batch];
        let capacity = lens.iter().copied().max().unwrap_or(0).max(1);
        check_kernel_twin(seed, dtype, (batch, heads_kv, group, dim), lens, capacity, splits)
            .map_err(TestCaseError::fail)?;
    }
}

#[test]
fn geometry_follows_the_kernels_constants() {
    let fields = |g: Geometry| {
        (
            g.head_dim_tile,
            g.heads_per_block,
            g.vec,
            g.threads_per_key,
            g.packs_per_thread,
            g.groups,
            g.keys_per_group,
            g.scatter_scores,
        )
    };
    // f16, D 128, 4 query heads per kv-head: 16 packs → 16 threads per key, 8 groups.
    assert_eq!(
        fields(Geometry::new(2, 128, 4)),
        (128, 4, 8, 16, 1, 8, 2, true)
    );
    // f16, D 64, MHA: 8 threads per key, 16 groups, 4 keys each.
    assert_eq!(
        fields(Geometry::new(2, 64, 1)),
        (64, 1, 8, 8, 1, 16, 4, true)
    );
    // f32, D 200 → 256, group 12 → 8 per block: 64 packs, 2 per thread, 1 key per group.
    assert_eq!(
        fields(Geometry::new(4, 200, 12)),
        (256, 8, 4, 32, 2, 4, 1, false)
    );
    assert_eq!(Geometry::new(4, 200, 12).head_chunks(12), 2);
    // f16, D 64, 8 heads per block: 16 scores for 8 lanes, so butterflies as f32.
    assert_eq!(
        fields(Geometry::new(2, 64, 8)),
        (64, 8, 8, 8, 1, 16, 2, false)
    );
    assert!(!Geometry::new(4, 128, 4).scatter_scores);
}
