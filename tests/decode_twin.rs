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
                assert!(r.start % 16 == 0 || r.is_empty());
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
        let want = reference::forward(&q, &k, &v, &s, &opts);
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
    let want = reference::forward(&q, &k, &v, &s, &opts);
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
