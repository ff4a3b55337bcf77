//! The CPU twin of the fused attention forward (`cuattn::twin::attention`) against the f64
//! reference, over the edge cases of docs/kernels/attention-forward.md and the attention notes' checklist:
//! Lq, Lk ∈ {1, 2, Bn−1, Bn, Bn+1, 3·Bn+5}, both causal alignments with Lq < Lk and Lq > Lk,
//! key padding down to 0, odd and unequal head dims, GQA, every dtype; plus the causal tile
//! skipping count and NaN in keys no query may see. CPU only.

use cuattn::reference::attention::{self as reference, CausalAlign, Options, Shape};
use cuattn::tolerance::{attention as tolerances, expect_close, Tolerance};
use cuattn::twin::attention::{self as twin, TileCounts, Tiling};
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut SmallRng, dtype: DType, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(spread * rng.gen_range(-1.0f32..1.0)))
        .collect()
}

fn expect(what: &str, out: &[f32], want: &[f64], tol: Tolerance) {
    if let Err(e) = expect_close(what, out, want, tol) {
        panic!("{e}");
    }
}

const TILING: Tiling = Tiling {
    block_q: 16,
    block_k: 8,
};

#[test]
fn twin_matches_the_reference_on_the_edge_case_matrix() {
    let mut rng = SmallRng::seed_from_u64(0xa77);
    let bn = TILING.block_k;
    let lens = [1, 2, bn - 1, bn, bn + 1, 3 * bn + 5];
    for dtype in DType::ALL {
        for &lq in &lens {
            for &lk in &lens {
                for causal in [
                    None,
                    Some(CausalAlign::TopLeft),
                    Some(CausalAlign::BottomRight),
                ] {
                    let (d, dv) = if (lq + lk) % 2 == 0 { (8, 8) } else { (9, 5) };
                    let s = Shape {
                        batch: 2,
                        heads_q: 4,
                        heads_kv: 2,
                        len_q: lq,
                        len_k: lk,
                        dim_qk: d,
                        dim_v: dv,
                    };
                    let q = rand_vec(&mut rng, dtype, s.q_len(), 2.0);
                    let k = rand_vec(&mut rng, dtype, s.k_len(), 2.0);
                    let v = rand_vec(&mut rng, dtype, s.v_len(), 1.0);
                    // Sequence 1 has a shorter key length (0 when lk = 1: all its rows fully masked).
                    let opts = Options {
                        causal,
                        key_lens: Some(vec![lk, lk / 2]),
                        ..Options::new(d)
                    };
                    let want = reference::forward(&q, &k, &v, &s, &opts).unwrap();
                    let (got, _) = twin::forward(&q, &k, &v, &s, &opts, TILING, dtype);
                    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, dtype);
                    let what = format!("{dtype} Lq={lq} Lk={lk} {causal:?}");
                    expect(&format!("{what}: O"), &got.o, &want.o, tol.o);
                    expect(&format!("{what}: LSE"), &got.lse, &want.lse, tol.lse);
                }
            }
        }
    }
}

#[test]
fn causal_tiles_wholly_above_the_diagonal_are_skipped() {
    // Lq = Lk = 64 with 16×16 tiles: 4 query blocks; block m computes tiles 0..=m (the last
    // one on the diagonal, masked) and skips the rest: 10 computed, 6 skipped, 4 masked.
    let s = Shape {
        batch: 1,
        heads_q: 1,
        heads_kv: 1,
        len_q: 64,
        len_k: 64,
        dim_qk: 4,
        dim_v: 4,
    };
    let mut rng = SmallRng::seed_from_u64(9);
    let (q, k, v) = (
        rand_vec(&mut rng, DType::F32, 256, 1.0),
        rand_vec(&mut rng, DType::F32, 256, 1.0),
        rand_vec(&mut rng, DType::F32, 256, 1.0),
    );
    let tiling = Tiling {
        block_q: 16,
        block_k: 16,
    };
    let opts = Options {
        causal: Some(CausalAlign::TopLeft),
        ..Options::new(4)
    };
    let (_, counts) = twin::forward(&q, &k, &v, &s, &opts, tiling, DType::F32);
    assert_eq!(
        counts,
        TileCounts {
            full: 6,
            masked: 4,
            skipped: 6
        }
    );
    let (_, dense) = twin::forward(&q, &k, &v, &s, &Options::new(4), tiling, DType::F32);
    assert_eq!(
        dense,
        TileCounts {
            full: 16,
            masked: 0,
            skipped: 0
        }
    );
    // Bottom-right with Lq = 16 < Lk = 64: the single query block sees every key tile.
    let s2 = Shape { len_q: 16, ..s };
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        ..Options::new(4)
    };
    let (_, br) = twin::forward(&q[..64], &k, &v, &s2, &opts, tiling, DType::F32);
    assert_eq!(
        br,
        TileCounts {
            full: 3,
            masked: 1,
            skipped: 0
        }
    );
}

#[test]
fn nan_in_keys_no_query_may_see_never_reaches_the_output() {
    let mut rng = SmallRng::seed_from_u64(10);
    // Top-left causal with Lq = 10 < Lk = 30: keys 10.. are seen by no query; with key_len 20,
    // keys 20.. are padding too.
    let s = Shape {
        batch: 1,
        heads_q: 2,
        heads_kv: 1,
        len_q: 10,
        len_k: 30,
        dim_qk: 8,
        dim_v: 8,
    };
    let q = rand_vec(&mut rng, DType::BF16, s.q_len(), 1.0);
    let mut k = rand_vec(&mut rng, DType::BF16, s.k_len(), 1.0);
    let mut v = rand_vec(&mut rng, DType::BF16, s.v_len(), 1.0);
    let opts = Options {
        causal: Some(CausalAlign::TopLeft),
        key_lens: Some(vec![20]),
        ..Options::new(8)
    };
    let clean = reference::forward(&q, &k, &v, &s, &opts).unwrap();
    k[10 * 8..].iter_mut().for_each(|x| *x = f32::NAN);
    v[10 * 8..].iter_mut().for_each(|x| *x = f32::NAN);
    let (got, _) = twin::forward(&q, &k, &v, &s, &opts, TILING, DType::BF16);
    let tol = tolerances::bounds(&q, &k[..80], &v[..80], &s, opts.scale, DType::BF16);
    expect("O", &got.o, &clean.o, tol.o);
    expect("LSE", &got.lse, &clean.lse, tol.lse);
}

#[test]
fn fully_masked_rows_give_zero_and_negative_infinity_without_nan() {
    let mut rng = SmallRng::seed_from_u64(11);
    // Bottom-right, Lq = 40 > Lk = 9: rows 0..31 see no key.
    let s = Shape {
        batch: 1,
        heads_q: 1,
        heads_kv: 1,
        len_q: 40,
        len_k: 9,
        dim_qk: 4,
        dim_v: 4,
    };
    let (q, k, v) = (
        rand_vec(&mut rng, DType::F16, 160, 1.0),
        rand_vec(&mut rng, DType::F16, 36, 1.0),
        rand_vec(&mut rng, DType::F16, 36, 1.0),
    );
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        ..Options::new(4)
    };
    let (got, counts) = twin::forward(&q, &k, &v, &s, &opts, TILING, DType::F16);
    for i in 0..31 {
        assert_eq!(got.lse[i], f32::NEG_INFINITY, "row {i}");
        assert!(got.o[i * 4..i * 4 + 4].iter().all(|&o| o == 0.0), "row {i}");
    }
    assert!(got.o.iter().all(|o| !o.is_nan()) && got.lse[31..].iter().all(|l| l.is_finite()));
    assert!(
        counts.skipped > 0,
        "query blocks above the diagonal skip key tiles: {counts:?}"
    );
}
