//! The attention backward reference against central finite differences of the forward
//! reference, for every option (GQA, D ≠ Dv, both causal alignments with Lq ≠ Lk, sliding
//! windows, key padding, element masks, block-sparse layouts, packed batches), and against PyTorch autograd
//! (tests/fixtures/attention-backward.json, made by scripts/make_fixtures.py). CPU only.
//!
//! Finite differences are exact to rounding here: inputs are multiples of 2⁻⁶ in [−2, 2] and the
//! steps are 2⁻¹² and 2⁻¹³, so x ± h is exact in f32, and the forward is f64. The loss is Σ O∘W with a
//! random W, whose gradient with respect to O is dO = W.

use cuattn::key_band::Window;
use cuattn::reference::attention::{self as fwd, CausalAlign, Options, Shape};
use cuattn::reference::attention_backward::{self as bwd, Grads};
use cuattn::sparse::{BlockLayout, LayoutHeads};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const H: f32 = 1.0 / 4096.0;

fn grid_vec(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-128i32..=128) as f32 / 64.0)
        .collect()
}

fn loss(o: &[f64], w: &[f32]) -> f64 {
    o.iter().zip(w).map(|(&a, &b)| a * b as f64).sum()
}

/// Central differences of `f` at every element of `x`, Richardson-extrapolated over steps h and
/// h/2 (truncation O(h⁴) ≈ 1e-14; rounding ≈ 1e-16·|f|/h), compared with `grad`.
fn check_fd(name: &str, x: &[f32], grad: &[f64], f: &dyn Fn(&[f32]) -> f64) -> Result<(), String> {
    let mut xp = x.to_vec();
    let mut central = |idx: usize, h: f32| {
        xp[idx] = x[idx] + h;
        let up = f(&xp);
        xp[idx] = x[idx] - h;
        let down = f(&xp);
        xp[idx] = x[idx];
        (up - down) / (2.0 * h as f64)
    };
    for (idx, &want) in grad.iter().enumerate() {
        let fd = (4.0 * central(idx, H / 2.0) - central(idx, H)) / 3.0;
        let tol = 1e-7 + 1e-6 * fd.abs();
        // NaN in either side fails: the comparison is false.
        let within = (fd - want).abs() <= tol;
        if !within {
            return Err(format!(
                "{name}[{idx}]: finite difference {fd}, reference {want}"
            ));
        }
    }
    Ok(())
}

/// Checks dQ, dK, dV of a dense call against finite differences of `forward_masked`.
fn check_dense(
    seed: u64,
    s: Shape,
    opts: &Options,
    keep: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Grads {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (q, k, v) = (
        grid_vec(&mut rng, s.q_len()),
        grid_vec(&mut rng, s.k_len()),
        grid_vec(&mut rng, s.v_len()),
    );
    let w = grid_vec(&mut rng, s.o_len());
    let g = bwd::backward_masked(&q, &k, &v, &w, &s, opts, keep);
    let l = |q: &[f32], k: &[f32], v: &[f32]| {
        loss(&fwd::forward_masked(q, k, v, &s, opts, keep).unwrap().o, &w)
    };
    let r = check_fd("dq", &q, &g.dq, &|x| l(x, &k, &v))
        .and_then(|_| check_fd("dk", &k, &g.dk, &|x| l(&q, x, &v)))
        .and_then(|_| check_fd("dv", &v, &g.dv, &|x| l(&q, &k, x)));
    if let Err(e) = r {
        panic!("{s:?} {opts:?}: {e}");
    }
    g
}

#[test]
fn gradients_match_finite_differences_with_gqa_and_unequal_head_dims() {
    let s = Shape::new(2, 4, 2, 5, 6, 5, 3);
    check_dense(1, s, &Options::new(5), &|_, _, _, _| true);
    // MQA: one K/V head for every query head.
    let s = Shape::new(1, 3, 1, 4, 5, 4, 6);
    check_dense(2, s, &Options::new(4), &|_, _, _, _| true);
}

#[test]
fn gradients_match_finite_differences_under_both_causal_alignments() {
    for (seed, (lq, lk)) in [(4, 6), (6, 4), (5, 5)].into_iter().enumerate() {
        for align in [CausalAlign::TopLeft, CausalAlign::BottomRight] {
            let s = Shape::new(1, 2, 1, lq, lk, 4, 3);
            let opts = Options {
                causal: Some(align),
                ..Options::new(4)
            };
            let g = check_dense(10 + seed as u64, s, &opts, &|_, _, _, _| true);
            // Bottom-right with Lq > Lk leaves the first rows fully masked: zero dQ there.
            if align == CausalAlign::BottomRight && lq > lk {
                for h in 0..2 {
                    let row = &g.dq[(h * lq) * 4..(h * lq + lq - lk) * 4];
                    assert!(row.iter().all(|&x| x == 0.0), "masked rows: {row:?}");
                }
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences_with_windows_and_key_padding() {
    let s = Shape::new(2, 2, 2, 6, 7, 4, 4);
    let opts = Options {
        window: Some(Window::new(2, 1, CausalAlign::TopLeft)),
        key_lens: Some(vec![5, 0]),
        ..Options::new(4)
    };
    let g = check_dense(20, s, &opts, &|_, _, _, _| true);
    // The second sequence has no keys: every gradient of it is zero.
    let half = s.q_len() / 2;
    assert!(g.dq[half..].iter().all(|&x| x == 0.0));
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        window: Some(Window::new(1, 3, CausalAlign::BottomRight)),
        key_lens: Some(vec![7, 3]),
        ..Options::new(4)
    };
    check_dense(21, s, &opts, &|_, _, _, _| true);
}

#[test]
fn gradients_match_finite_differences_under_an_element_mask() {
    let s = Shape::new(1, 2, 1, 5, 6, 3, 4);
    let keep = |_b: usize, h: usize, i: usize, j: usize| !(i * 7 + j * 3 + h).is_multiple_of(4);
    check_dense(30, s, &Options::new(3), &keep);
}

#[test]
fn gradients_match_finite_differences_under_a_block_sparse_layout() {
    // Blocks of 16 over 20 queries × 36 keys, one set of rows per head: full, bitmask and
    // dropped blocks (query block 1 of head 1 keeps nothing; key block 1 of head 0 is kept by
    // no query block), with key padding on top. The element mask is the layout's own.
    let layout =
        BlockLayout::from_predicate_per_head(20, 36, 16, LayoutHeads::PerHead(2), |h, i, j| {
            if h == 0 {
                j / 16 != 1 && (j < 16 || (i + j) % 3 != 0)
            } else {
                i < 16 && (j >= 16 || i >= j)
            }
        })
        .unwrap();
    let s = Shape::new(2, 2, 1, 20, 36, 3, 2);
    let opts = Options {
        key_lens: Some(vec![36, 30]),
        ..Options::new(3)
    };
    let keep = |_b: usize, h: usize, i: usize, j: usize| layout.admits(layout.head_of(h), i, j);
    let g = check_dense(40, s, &opts, &keep);
    // Query rows 16..20 of head 1 see nothing: zero dQ.
    for b in 0..2 {
        let r0 = (b * 2 + 1) * 20;
        assert!(g.dq[(r0 + 16) * 3..(r0 + 20) * 3].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn packed_batches_match_finite_differences_per_sequence() {
    let mut rng = SmallRng::seed_from_u64(40);
    let (hq, hkv, d, dv) = (4, 2, 3, 5);
    let (cu_q, cu_k) = (vec![0, 3, 3, 7], vec![0, 4, 6, 9]);
    let (tq, tk) = (7, 9);
    let q = grid_vec(&mut rng, tq * hq * d);
    let k = grid_vec(&mut rng, tk * hkv * d);
    let v = grid_vec(&mut rng, tk * hkv * dv);
    let w = grid_vec(&mut rng, tq * hq * dv);
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        ..Options::new(d)
    };
    let g = bwd::backward_varlen(&q, &k, &v, &w, &cu_q, &cu_k, hq, hkv, d, dv, &opts);
    let l = |q: &[f32], k: &[f32], v: &[f32]| {
        loss(
            &fwd::forward_varlen(q, k, v, &cu_q, &cu_k, hq, hkv, d, dv, &opts)
                .unwrap()
                .o,
            &w,
        )
    };
    check_fd("dq", &q, &g.dq, &|x| l(x, &k, &v)).unwrap();
    check_fd("dk", &k, &g.dk, &|x| l(&q, x, &v)).unwrap();
    check_fd("dv", &v, &g.dv, &|x| l(&q, &k, x)).unwrap();
    // Keys 4..6 belong to a sequence with no queries: no gradient reaches them.
    for r in 4..6 {
        for h in 0..hkv {
            let at = (r * hkv + h) * d;
            assert!(g.dk[at..at + d].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn nan_in_keys_and_values_no_query_may_see_stays_out_of_every_gradient() {
    let mut rng = SmallRng::seed_from_u64(50);
    let s = Shape::new(1, 1, 1, 4, 6, 4, 4);
    let q = grid_vec(&mut rng, s.q_len());
    let mut k = grid_vec(&mut rng, s.k_len());
    let mut v = grid_vec(&mut rng, s.v_len());
    let w = grid_vec(&mut rng, s.o_len());
    // Keys 4 and 5 lie past the key length.
    for j in 4..6 {
        k[j * 4..(j + 1) * 4].fill(f32::NAN);
        v[j * 4..(j + 1) * 4].fill(f32::NAN);
    }
    let opts = Options {
        key_lens: Some(vec![4]),
        causal: Some(CausalAlign::TopLeft),
        ..Options::new(4)
    };
    let g = bwd::backward(&q, &k, &v, &w, &s, &opts);
    assert!(g.dq.iter().all(|x| x.is_finite()));
    assert!(g.dk[..16].iter().all(|x| x.is_finite()));
    assert!(g.dk[16..].iter().all(|&x| x == 0.0));
    assert!(g.dv[16..].iter().all(|&x| x == 0.0));
}

#[test]
fn the_gradient_of_a_gqa_group_is_the_sum_over_its_query_heads() {
    // Hq = 2 sharing one K/V head equals two Hkv = 1 calls whose dK/dV are added.
    let mut rng = SmallRng::seed_from_u64(60);
    let s = Shape::new(1, 2, 1, 3, 4, 4, 2);
    let (q, k, v, w) = (
        grid_vec(&mut rng, s.q_len()),
        grid_vec(&mut rng, s.k_len()),
        grid_vec(&mut rng, s.v_len()),
        grid_vec(&mut rng, s.o_len()),
    );
    let opts = Options::new(4);
    let g = bwd::backward(&q, &k, &v, &w, &s, &opts);
    let one = Shape::new(1, 1, 1, 3, 4, 4, 2);
    let mut dk = vec![0.0; s.k_len()];
    let mut dv = vec![0.0; s.v_len()];
    for h in 0..2 {
        let gh = bwd::backward(
            &q[h * 12..(h + 1) * 12],
            &k,
            &v,
            &w[h * 6..(h + 1) * 6],
            &one,
            &opts,
        );
        dk.iter_mut().zip(&gh.dk).for_each(|(a, b)| *a += b);
        dv.iter_mut().zip(&gh.dv).for_each(|(a, b)| *a += b);
    }
    for (a, b) in g.dk.iter().zip(&dk).chain(g.dv.iter().zip(&dv)) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()));
    }
}

#[test]
fn gradients_match_pytorch_autograd_on_the_committed_fixture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/attention-backward.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture present");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let f32s = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let f64s = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let align = |v: &serde_json::Value| match v.as_str() {
        None => None,
        Some("top_left") => Some(CausalAlign::TopLeft),
        Some("bottom_right") => Some(CausalAlign::BottomRight),
        Some(other) => panic!("alignment {other}"),
    };
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let sh: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let s = Shape::new(sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], sh[6]);
        let window = case["window"].as_array().map(|w| {
            Window::new(
                w[0].as_u64().unwrap() as usize,
                w[1].as_u64().unwrap() as usize,
                align(&w[2]).unwrap(),
            )
        });
        let opts = Options {
            causal: align(&case["causal"]),
            key_lens: case["key_lens"].as_array().map(|l| {
                l.iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect::<Vec<_>>()
            }),
            window,
            ..Options::new(s.dim_qk)
        };
        let (q, k, v, d_o) = (
            f32s(&case["q"]),
            f32s(&case["k"]),
            f32s(&case["v"]),
            f32s(&case["do"]),
        );
        // The inputs were f32 values: back in f64 they match the file (to serde_json's last-bit
        // parsing error).
        for (a, b) in q.iter().zip(f64s(&case["q"])) {
            assert!(
                (*a as f64 - b).abs() <= 1e-15 * b.abs(),
                "{name}: q not f32"
            );
        }
        let o = fwd::forward(&q, &k, &v, &s, &opts).unwrap().o;
        let g = bwd::backward(&q, &k, &v, &d_o, &s, &opts);
        for (what, ours, theirs) in [
            ("o", &o, f64s(&case["o"])),
            ("dq", &g.dq, f64s(&case["dq"])),
            ("dk", &g.dk, f64s(&case["dk"])),
            ("dv", &g.dv, f64s(&case["dv"])),
        ] {
            assert_eq!(ours.len(), theirs.len(), "{name} {what}");
            for (idx, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-10 * (1.0 + b.abs()),
                    "{name} {what}[{idx}]: ours {a}, PyTorch {b}"
                );
            }
        }
    }
}
