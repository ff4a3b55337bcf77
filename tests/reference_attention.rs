//! The attention reference against properties that do not share its code: closed forms,
//! invariances, equivalences between options, the masking conventions (fully-masked rows give
//! O = 0 and LSE = −inf, NaN in keys nobody may see never reaches the output), and the LSE
//! identity Σ_j exp(scale·s_ij − LSE_i) = 1. CPU only.

use cuattn::reference::attention::{
    self as reference, admissible_keys, CausalAlign, Options, Shape,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut SmallRng, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| spread * rng.gen_range(-1.0f32..1.0))
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

const ALIGNS: [Option<CausalAlign>; 3] = [
    None,
    Some(CausalAlign::TopLeft),
    Some(CausalAlign::BottomRight),
];

#[test]
fn admissible_keys_follow_both_causal_alignments() {
    // Lq = 3, Lk = 5: top-left keeps j ≤ i; bottom-right keeps j ≤ i + 2.
    assert_eq!(admissible_keys(0, 3, 5, Some(CausalAlign::TopLeft)), 0..1);
    assert_eq!(admissible_keys(2, 3, 5, Some(CausalAlign::TopLeft)), 0..3);
    assert_eq!(
        admissible_keys(0, 3, 5, Some(CausalAlign::BottomRight)),
        0..3
    );
    assert_eq!(
        admissible_keys(2, 3, 5, Some(CausalAlign::BottomRight)),
        0..5
    );
    // Lq = 5, Lk = 3, bottom-right: rows 0 and 1 see nothing.
    assert!(admissible_keys(1, 5, 3, Some(CausalAlign::BottomRight)).is_empty());
    assert_eq!(
        admissible_keys(2, 5, 3, Some(CausalAlign::BottomRight)),
        0..1
    );
    assert_eq!(admissible_keys(4, 5, 3, None), 0..3);
}

#[test]
fn equal_keys_give_the_mean_of_the_admissible_values() {
    let mut rng = SmallRng::seed_from_u64(1);
    let s = Shape::new(1, 1, 1, 4, 6, 8, 5);
    let q = rand_vec(&mut rng, s.q_len(), 1.0);
    let row = rand_vec(&mut rng, 8, 1.0);
    let k: Vec<f32> = (0..6).flat_map(|_| row.clone()).collect();
    let v = rand_vec(&mut rng, s.v_len(), 2.0);
    for causal in ALIGNS {
        let opts = Options {
            causal,
            ..Options::new(8)
        };
        let out = reference::forward(&q, &k, &v, &s, &opts).unwrap();
        for i in 0..4 {
            let keys = admissible_keys(i, 4, 6, causal);
            let n = keys.len() as f64;
            for d in 0..5 {
                let mean = keys.clone().map(|j| v[j * 5 + d] as f64).sum::<f64>() / n;
                assert!(close(out.o[i * 5 + d], mean, 1e-12), "{causal:?} row {i}");
            }
            let score: f64 = (0..8)
                .map(|d| q[i * 8 + d] as f64 * row[d] as f64)
                .sum::<f64>()
                * opts.scale;
            assert!(close(out.lse[i], score + n.ln(), 1e-12));
        }
    }
}

#[test]
fn a_dominant_key_takes_all_the_weight() {
    let s = Shape::new(1, 1, 1, 1, 3, 2, 2);
    let q = [1.0f32, 0.0];
    let k = [0.0f32, 0.0, 200.0, 0.0, 0.0, 1.0];
    let v = [1.0f32, 2.0, -3.0, 4.0, 5.0, 6.0];
    let out = reference::forward(
        &q,
        &k,
        &v,
        &s,
        &Options {
            scale: 1.0,
            ..Options::new(2)
        },
    )
    .unwrap();
    assert!(
        close(out.o[0], -3.0, 1e-12) && close(out.o[1], 4.0, 1e-12),
        "{:?}",
        out.o
    );
}

#[test]
fn lse_normalises_the_softmax() {
    let mut rng = SmallRng::seed_from_u64(2);
    let s = Shape::new(2, 2, 1, 5, 7, 6, 3);
    let (q, k, v) = (
        rand_vec(&mut rng, s.q_len(), 2.0),
        rand_vec(&mut rng, s.k_len(), 2.0),
        rand_vec(&mut rng, s.v_len(), 1.0),
    );
    for causal in ALIGNS {
        let opts = Options {
            causal,
            key_lens: Some(vec![7, 4]),
            ..Options::new(6)
        };
        let out = reference::forward(&q, &k, &v, &s, &opts).unwrap();
        for b in 0..2 {
            for h in 0..2 {
                for i in 0..5 {
                    let keys = admissible_keys(i, 5, [7, 4][b], causal);
                    let lse = out.lse[(b * 2 + h) * 5 + i];
                    if keys.is_empty() {
                        assert_eq!(lse, f64::NEG_INFINITY);
                        continue;
                    }
                    let qi = &q[((b * 2 + h) * 5 + i) * 6..][..6];
                    let total: f64 = keys
                        .map(|j| {
                            let kj = &k[(b * 7 + j) * 6..][..6];
                            let s: f64 =
                                qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum();
                            (s * opts.scale - lse).exp()
                        })
                        .sum();
                    assert!(
                        close(total, 1.0, 1e-12),
                        "{causal:?} b{b} h{h} i{i}: {total}"
                    );
                }
            }
        }
    }
}

#[test]
fn key_order_does_not_matter_without_a_causal_mask() {
    let mut rng = SmallRng::seed_from_u64(3);
    let s = Shape::new(1, 1, 1, 3, 5, 4, 4);
    let (q, k, v) = (
        rand_vec(&mut rng, s.q_len(), 1.0),
        rand_vec(&mut rng, s.k_len(), 1.0),
        rand_vec(&mut rng, s.v_len(), 1.0),
    );
    let perm = [3, 0, 4, 1, 2];
    let kp: Vec<f32> = perm
        .iter()
        .flat_map(|&j| k[j * 4..j * 4 + 4].to_vec())
        .collect();
    let vp: Vec<f32> = perm
        .iter()
        .flat_map(|&j| v[j * 4..j * 4 + 4].to_vec())
        .collect();
    let a = reference::forward(&q, &k, &v, &s, &Options::new(4)).unwrap();
    let b = reference::forward(&q, &kp, &vp, &s, &Options::new(4)).unwrap();
    assert!(a.o.iter().zip(&b.o).all(|(x, y)| close(*x, *y, 1e-12)));
    assert!(a.lse.iter().zip(&b.lse).all(|(x, y)| close(*x, *y, 1e-12)));
}

#[test]
fn grouped_query_attention_equals_repeating_the_kv_heads() {
    let mut rng = SmallRng::seed_from_u64(4);
    let gqa = Shape::new(2, 6, 2, 3, 4, 5, 3);
    let (q, k, v) = (
        rand_vec(&mut rng, gqa.q_len(), 1.0),
        rand_vec(&mut rng, gqa.k_len(), 1.0),
        rand_vec(&mut rng, gqa.v_len(), 1.0),
    );
    let repeat = |x: &[f32], d: usize| -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..2 {
            for h in 0..6 {
                let hk = h / 3;
                out.extend_from_slice(&x[(b * 2 + hk) * 4 * d..][..4 * d]);
            }
        }
        out
    };
    let mha = Shape { heads_kv: 6, ..gqa };
    for causal in ALIGNS {
        let opts = Options {
            causal,
            ..Options::new(5)
        };
        let a = reference::forward(&q, &k, &v, &gqa, &opts).unwrap();
        let b = reference::forward(&q, &repeat(&k, 5), &repeat(&v, 3), &mha, &opts).unwrap();
        assert_eq!(a.o, b.o);
        assert_eq!(a.lse, b.lse);
    }
}

#[test]
fn both_alignments_agree_when_lq_equals_lk() {
    let mut rng = SmallRng::seed_from_u64(5);
    let s = Shape::new(1, 2, 2, 6, 6, 4, 4);
    let (q, k, v) = (
        rand_vec(&mut rng, s.q_len(), 1.0),
        rand_vec(&mut rng, s.k_len(), 1.0),
        rand_vec(&mut rng, s.v_len(), 1.0),
    );
    let tl = reference::forward(
        &q,
        &k,
        &v,
        &s,
        &Options {
            causal: Some(CausalAlign::TopLeft),
            ..Options::new(4)
        },
    )
    .unwrap();
    let br = reference::forward(
        &q,
        &k,
        &v,
        &s,
        &Options {
            causal: Some(CausalAlign::BottomRight),
            ..Options::new(4)
        },
    )
    .unwrap();
    assert_eq!(tl.o, br.o);
    assert_eq!(tl.lse, br.lse);
}

#[test]
fn key_padding_equals_truncating_the_keys_and_never_reads_the_padding() {
    let mut rng = SmallRng::seed_from_u64(6);
    let s = Shape::new(1, 1, 1, 4, 7, 3, 2);
    let q = rand_vec(&mut rng, s.q_len(), 1.0);
    let mut k = rand_vec(&mut rng, s.k_len(), 1.0);
    let mut v = rand_vec(&mut rng, s.v_len(), 1.0);
    let short = Shape { len_k: 5, ..s };
    for causal in ALIGNS {
        let truncated = reference::forward(
            &q,
            &k[..15],
            &v[..10],
            &short,
            &Options {
                causal,
                ..Options::new(3)
            },
        )
        .unwrap();
        // NaN and huge values in the padded keys must not matter.
        k[15..].iter_mut().for_each(|x| *x = f32::NAN);
        v[10..].iter_mut().for_each(|x| *x = f32::MAX);
        let padded = reference::forward(
            &q,
            &k,
            &v,
            &s,
            &Options {
                causal,
                key_lens: Some(vec![5]),
                ..Options::new(3)
            },
        )
        .unwrap();
        assert_eq!(truncated.o, padded.o, "{causal:?}");
        assert_eq!(truncated.lse, padded.lse, "{causal:?}");
    }
}

#[test]
fn fully_masked_rows_give_zero_output_and_negative_infinite_lse() {
    let mut rng = SmallRng::seed_from_u64(7);
    // Bottom-right with Lq = 5 > Lk = 3: rows 0 and 1 see no key. Key length 0: no row sees any.
    let s = Shape::new(2, 1, 1, 5, 3, 4, 4);
    let (q, k, v) = (
        rand_vec(&mut rng, s.q_len(), 1.0),
        rand_vec(&mut rng, s.k_len(), 1.0),
        rand_vec(&mut rng, s.v_len(), 1.0),
    );
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        key_lens: Some(vec![3, 0]),
        ..Options::new(4)
    };
    let out = reference::forward(&q, &k, &v, &s, &opts).unwrap();
    for (b, masked_rows) in [(0usize, 0..2usize), (1, 0..5)] {
        for i in masked_rows {
            assert_eq!(out.lse[b * 5 + i], f64::NEG_INFINITY);
            assert!(out.o[(b * 5 + i) * 4..][..4].iter().all(|&o| o == 0.0));
        }
    }
    assert!(out.o.iter().all(|o| o.is_finite()) && out.lse[2].is_finite());
}

#[test]
fn varlen_equals_one_call_per_sequence_including_empty_ones() {
    let mut rng = SmallRng::seed_from_u64(8);
    let (hq, hkv, d, dv) = (4, 2, 5, 3);
    // Lengths include 0 and 1; 3 query tokens over 4 sequences (fewer tokens than sequences).
    let lens_q = [1usize, 0, 2, 0];
    let lens_k = [3usize, 2, 2, 0];
    let cu = |lens: &[usize]| -> Vec<usize> {
        std::iter::once(0)
            .chain(lens.iter().scan(0, |acc, &l| {
                *acc += l;
                Some(*acc)
            }))
            .collect()
    };
    let (cu_q, cu_k) = (cu(&lens_q), cu(&lens_k));
    let (tq, tk) = (cu_q[4], cu_k[4]);
    let q = rand_vec(&mut rng, tq * hq * d, 1.0);
    let k = rand_vec(&mut rng, tk * hkv * d, 1.0);
    let v = rand_vec(&mut rng, tk * hkv * dv, 1.0);
    for causal in ALIGNS {
        let opts = Options {
            causal,
            ..Options::new(d)
        };
        let out =
            reference::forward_varlen(&q, &k, &v, &cu_q, &cu_k, hq, hkv, d, dv, &opts).unwrap();
        for b in 0..4 {
            let s = Shape::new(1, hq, hkv, lens_q[b], lens_k[b], d, dv);
            let to_bhsd = |x: &[f32], r0: usize, n: usize, heads: usize, w: usize| -> Vec<f32> {
                (0..heads)
                    .flat_map(|h| {
                        (r0..r0 + n).flat_map(move |r| x[(r * heads + h) * w..][..w].to_vec())
                    })
                    .collect()
            };
            let one = reference::forward(
                &to_bhsd(&q, cu_q[b], lens_q[b], hq, d),
                &to_bhsd(&k, cu_k[b], lens_k[b], hkv, d),
                &to_bhsd(&v, cu_k[b], lens_k[b], hkv, dv),
                &s,
                &opts,
            )
            .unwrap();
            for h in 0..hq {
                for i in 0..lens_q[b] {
                    let r = cu_q[b] + i;
                    assert_eq!(out.lse[h * tq + r], one.lse[h * lens_q[b] + i]);
                    assert_eq!(
                        out.o[(r * hq + h) * dv..][..dv],
                        one.o[(h * lens_q[b] + i) * dv..][..dv]
                    );
                }
            }
        }
        // Sequence 0 has key length 3 and one query: it is never fully masked; sequence 3 has none.
        assert!(out.lse[0].is_finite());
    }
}
