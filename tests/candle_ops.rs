//! cuattn's candle ops (feature `candle`) on candle's CPU storage against the same math
//! composed from candle's own ops (matmul, exp, sums; masks written out from their
//! definitions here), on fresh random inputs in f32 and bf16, under the tolerance rule of
//! `cuattn::tolerance`. LayerNorm's gradients are checked through candle's autograd on both
//! sides.

use candle_core::{DType as CDType, Device, Tensor, Var, D};
use cuattn::candle::{self as cc, AttentionOptions, BlockLayout, CausalAlign, Window};
use cuattn::tolerance::{self, Tolerance};
use cuattn::DType;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64, dtype: CDType) -> Tensor {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(CDType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn ours(dtype: CDType) -> DType {
    match dtype {
        CDType::F32 => DType::F32,
        CDType::BF16 => DType::BF16,
        _ => DType::F16,
    }
}

/// `got` (stored in `dtype`) within the tolerance rule of an f32 accumulation over `n` terms
/// of magnitude ≤ `scale` around `want` (candle's composition, computed in f32).
fn expect_close(what: &str, got: &Tensor, want: &Tensor, dtype: CDType, n: usize, scale: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (flat(got), flat(want));
    assert!(g.iter().all(|x| !x.is_nan()), "{what}: NaN in the output");
    let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    // Both sides round: candle's f32 composition carries an accumulation error of its own.
    let mut tol = Tolerance::for_output(ours(dtype), n, scale);
    tol.atol *= 2.0;
    tol.rtol += DType::F32.unit_roundoff() * 4.0 * (n as f64).sqrt();
    if let Err(e) = tolerance::expect_close(what, &g, &w64, tol) {
        panic!("{e}");
    }
}

/// The additive mask (0 or −inf), `[B, 1, Lq, Lk]`, written out from the definitions: key
/// padding j < key_len, causal j ≤ i + off, window i + off − left ≤ j ≤ i + off + right, with
/// off = 0 top-left and key_len − Lq bottom-right.
fn mask(
    batch: usize,
    len_q: usize,
    len_k: usize,
    opts: &AttentionOptions,
    keep_extra: &dyn Fn(usize, usize) -> bool,
) -> Tensor {
    let off = |a: CausalAlign, key_len: usize| match a {
        CausalAlign::TopLeft => 0i64,
        CausalAlign::BottomRight => key_len as i64 - len_q as i64,
    };
    let mut m = Vec::with_capacity(batch * len_q * len_k);
    for b in 0..batch {
        let key_len = opts.key_lens.as_ref().map_or(len_k, |l| l[b].min(len_k));
        for i in 0..len_q {
            for j in 0..len_k {
                let (i64_, j64) = (i as i64, j as i64);
                let mut keep = j < key_len && keep_extra(i, j);
                if let Some(a) = opts.causal {
                    keep &= j64 <= i64_ + off(a, key_len);
                }
                if let Some(w) = opts.window {
                    let d = i64_ + off(w.align, key_len);
                    keep &= j64 >= d - w.left as i64 && j64 <= d + w.right as i64;
                }
                m.push(if keep { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(m, (batch, 1, len_q, len_k), &Device::Cpu).unwrap()
}

/// Attention from candle's ops: K/V heads repeated for grouped queries, softmax written out;
/// returns (O, LSE) in f32.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> (Tensor, Tensor) {
    let f = |t: &Tensor| t.to_dtype(CDType::F32).unwrap();
    let (q, k, v) = (f(q), f(k), f(v));
    let (b, hq, _, _) = q.dims4().unwrap();
    let hkv = k.dims()[1];
    let repeat = |t: &Tensor| {
        let (_, _, l, d) = t.dims4().unwrap();
        t.unsqueeze(2)
            .unwrap()
            .expand((b, hkv, hq / hkv, l, d))
            .unwrap()
            .reshape((b, hq, l, d))
            .unwrap()
    };
    let (k, v) = (repeat(&k), repeat(&v));
    let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(mask)
        .unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap();
    let p = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let sum = p.sum_keepdim(D::Minus1).unwrap();
    let o = p.broadcast_div(&sum).unwrap().matmul(&v).unwrap();
    let lse = (max + sum.log().unwrap())
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap();
    (o, lse)
}

#[test]
fn attention_matches_candle_composition_under_causal_padding_window_and_grouped_heads() {
    let cases: Vec<(usize, usize, usize, usize, usize, usize, AttentionOptions)> = vec![
        // (batch, heads_q, heads_kv, len_q, len_k, dim, options)
        (2, 4, 4, 9, 9, 16, AttentionOptions::default()),
        (
            2,
            4,
            2,
            5,
            12,
            32,
            AttentionOptions {
                causal: Some(CausalAlign::BottomRight),
                key_lens: Some(vec![12, 7]),
                ..Default::default()
            },
        ),
        (
            1,
            6,
            1,
            16,
            16,
            8,
            AttentionOptions {
                scale: Some(0.3),
                causal: Some(CausalAlign::TopLeft),
                window: Some(Window::new(3, 0, CausalAlign::TopLeft)),
                ..Default::default()
            },
        ),
        (
            2,
            2,
            2,
            7,
            10,
            16,
            AttentionOptions {
                window: Some(Window::new(2, 2, CausalAlign::BottomRight)),
                key_lens: Some(vec![10, 30]),
                ..Default::default()
            },
        ),
    ];
    for (n, (b, hq, hkv, lq, lk, d, opts)) in cases.into_iter().enumerate() {
        for dtype in [CDType::F32, CDType::BF16] {
            let seed = 10 * n as u64;
            let q = random(&[b, hq, lq, d], seed, dtype);
            let k = random(&[b, hkv, lk, d], seed + 1, dtype);
            let v = random(&[b, hkv, lk, d], seed + 2, dtype);
            let (o, lse) = cc::attention_with_lse(&q, &k, &v, &opts).unwrap();
            assert_eq!(o.dtype(), dtype);
            assert_eq!(lse.dtype(), CDType::F32);
            let scale = opts.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
            let m = mask(b, lq, lk, &opts, &|_, _| true);
            let (want_o, want_lse) = composed(&q, &k, &v, &m, scale);
            let what = format!("case {n} {dtype:?}");
            expect_close(&format!("{what} O"), &o, &want_o, dtype, lk, 1.0);
            // LSE is computed from the same inputs in f32 on both sides.
            expect_close(
                &format!("{what} LSE"),
                &lse,
                &want_lse,
                CDType::F32,
                lk * d,
                scale * d as f64 + (lk as f64).ln(),
            );
            let plain = cc::attention(&q, &k, &v, &opts).unwrap();
            assert_eq!(
                flat(&plain),
                flat(&o),
                "{what}: attention = attention_with_lse.0"
            );
        }
    }
}

#[test]
fn non_contiguous_inputs_give_the_contiguous_result() {
    let (b, h, l, d) = (1, 2, 8, 16);
    // [B, L, H, D] transposed to [B, H, L, D]: strided views.
    let q = random(&[b, l, h, d], 1, CDType::F32)
        .transpose(1, 2)
        .unwrap();
    let k = random(&[b, l, h, d], 2, CDType::F32)
        .transpose(1, 2)
        .unwrap();
    let v = random(&[b, l, h, d], 3, CDType::F32)
        .transpose(1, 2)
        .unwrap();
    assert!(!q.is_contiguous());
    let opts = AttentionOptions::default();
    let got = cc::attention(&q, &k, &v, &opts).unwrap();
    let c = |t: &Tensor| t.contiguous().unwrap();
    let want = cc::attention(&c(&q), &c(&k), &c(&v), &opts).unwrap();
    assert_eq!(flat(&got), flat(&want));
}

#[test]
fn sparse_attention_matches_candle_composition_with_the_layouts_element_mask() {
    let (b, h, len, d, block) = (2, 2, 64, 16, 16);
    for dtype in [CDType::F32, CDType::BF16] {
        let layout = BlockLayout::strided(len, block, 1, 2, true).unwrap();
        let q = random(&[b, h, len, d], 31, dtype);
        let k = random(&[b, h, len, d], 32, dtype);
        let v = random(&[b, h, len, d], 33, dtype);
        let opts = AttentionOptions {
            key_lens: Some(vec![len, 40]),
            ..Default::default()
        };
        let (o, lse) = cc::sparse_attention(&q, &k, &v, &layout, &opts).unwrap();
        // The layout is shared by the heads: head 0's element mask.
        let keep = layout.expand(0);
        let m = mask(b, len, len, &opts, &|i, j| keep[i * len + j]);
        let scale = 1.0 / (d as f64).sqrt();
        let (want_o, want_lse) = composed(&q, &k, &v, &m, scale);
        expect_close(&format!("sparse {dtype:?} O"), &o, &want_o, dtype, len, 1.0);
        expect_close(
            &format!("sparse {dtype:?} LSE"),
            &lse,
            &want_lse,
            CDType::F32,
            len * d,
            scale * d as f64 + (len as f64).ln(),
        );
    }
}

#[test]
fn decode_matches_candle_composition_over_each_cache_length() {
    let (b, hq, hkv, cap, d) = (3, 4, 2, 20, 32);
    let lens = [20, 1, 13];
    for dtype in [CDType::F32, CDType::BF16] {
        let q = random(&[b, hq, d], 41, dtype);
        let k = random(&[b, hkv, cap, d], 42, dtype);
        let v = random(&[b, hkv, cap, d], 43, dtype);
        let o = cc::decode(&q, &k, &v, &lens, None).unwrap();
        assert_eq!(o.dims(), [b, hq, d]);
        let opts = AttentionOptions {
            key_lens: Some(lens.to_vec()),
            ..Default::default()
        };
        let m = mask(b, 1, cap, &opts, &|_, _| true);
        let (want, _) = composed(
            &q.unsqueeze(2).unwrap(),
            &k,
            &v,
            &m,
            1.0 / (d as f64).sqrt(),
        );
        expect_close(
            &format!("decode {dtype:?}"),
            &o,
            &want.squeeze(2).unwrap(),
            dtype,
            cap,
            1.0,
        );
    }
}

fn composed_layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let rstd = (var + eps).unwrap().sqrt().unwrap().recip().unwrap();
    xc.broadcast_mul(&rstd)
        .unwrap()
        .broadcast_mul(gamma)
        .unwrap()
        .broadcast_add(beta)
        .unwrap()
}

#[test]
fn layer_norm_and_its_gradients_match_candle_composition_and_autograd() {
    let (rows, hidden, eps) = (6, 48, 1e-5f32);
    let x = Var::from_tensor(&random(&[2, rows / 2, hidden], 51, CDType::F32)).unwrap();
    let gamma = Var::from_tensor(&(random(&[hidden], 52, CDType::F32) + 1.0).unwrap()).unwrap();
    let beta = Var::from_tensor(&random(&[hidden], 53, CDType::F32)).unwrap();
    let dy = random(&[2, rows / 2, hidden], 54, CDType::F32);

    let y = cc::layer_norm(&x, &gamma, &beta, eps).unwrap();
    let want = composed_layer_norm(&x, &gamma, &beta, eps as f64);
    expect_close("layer norm y", &y, &want, CDType::F32, hidden, 4.0);

    // Σ y·dy: its gradients are the backward of dy.
    let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    let want_grads = (want * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v, n) in [
        ("dx", x.as_tensor(), hidden),
        ("dgamma", gamma.as_tensor(), rows),
        ("dbeta", beta.as_tensor(), rows),
    ] {
        let (g, w) = (grads.get(v).unwrap(), want_grads.get(v).unwrap());
        expect_close(name, g, w, CDType::F32, n * hidden, 8.0);
    }
    // The explicit backward gives the same as autograd's call of it.
    let (dx, dgamma, dbeta) = cc::layer_norm_backward(&dy, &x, &gamma, eps).unwrap();
    assert_eq!(flat(&dx), flat(grads.get(x.as_tensor()).unwrap()));
    assert_eq!(flat(&dgamma), flat(grads.get(gamma.as_tensor()).unwrap()));
    assert_eq!(flat(&dbeta), flat(grads.get(beta.as_tensor()).unwrap()));

    // bf16: y and the gradients come back in bf16.
    let xb = x.to_dtype(CDType::BF16).unwrap();
    let (gb, bb) = (
        gamma.to_dtype(CDType::BF16).unwrap(),
        beta.to_dtype(CDType::BF16).unwrap(),
    );
    let yb = cc::layer_norm(&xb, &gb, &bb, eps).unwrap();
    assert_eq!(yb.dtype(), CDType::BF16);
    let f = |t: &Tensor| t.to_dtype(CDType::F32).unwrap();
    let want_b = composed_layer_norm(&f(&xb), &f(&gb), &f(&bb), eps as f64);
    expect_close("layer norm y bf16", &yb, &want_b, CDType::BF16, hidden, 4.0);
    let (dxb, dgb, _) =
        cc::layer_norm_backward(&dy.to_dtype(CDType::BF16).unwrap(), &xb, &gb, eps).unwrap();
    assert_eq!((dxb.dtype(), dgb.dtype()), (CDType::BF16, CDType::BF16));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dt = CDType::F32;
    let q = random(&[1, 2, 4, 8], 1, dt);
    let opts = AttentionOptions::default();
    // Q of rank 3, K/V with a head count that does not divide Q's, integer inputs.
    assert!(cc::attention(&random(&[2, 4, 8], 2, dt), &q, &q, &opts).is_err());
    let k3 = random(&[1, 3, 4, 8], 3, dt);
    assert!(cc::attention(&q, &k3, &k3, &opts).is_err());
    let ints = Tensor::zeros((1, 2, 4, 8), CDType::I64, &Device::Cpu).unwrap();
    assert!(cc::attention(&ints, &q, &q, &opts).is_err());
    // Key lengths not one per sequence.
    let bad_lens = AttentionOptions {
        key_lens: Some(vec![1, 2, 3]),
        ..Default::default()
    };
    assert!(cc::attention(&q, &q, &q, &bad_lens).is_err());
    // A sparse layout for another length, or with a causal mask in the options.
    let layout = BlockLayout::strided(32, 16, 1, 2, false).unwrap();
    assert!(cc::sparse_attention(&q, &q, &q, &layout, &opts).is_err());
    let causal = AttentionOptions {
        causal: Some(CausalAlign::TopLeft),
        ..Default::default()
    };
    let q32 = random(&[1, 2, 32, 8], 4, dt);
    assert!(cc::sparse_attention(&q32, &q32, &q32, &layout, &causal).is_err());
    // Decode with a 4-dim query, LayerNorm with a γ of the wrong size.
    assert!(cc::decode(&q, &q, &q, &[4], None).is_err());
    let x = random(&[3, 8], 5, dt);
    assert!(cc::layer_norm(&x, &random(&[7], 6, dt), &random(&[8], 7, dt), 1e-5).is_err());
    assert!(
        cc::layer_norm_backward(&x, &random(&[3, 9], 8, dt), &random(&[8], 9, dt), 1e-5).is_err()
    );
}
