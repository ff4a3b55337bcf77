//! Every layer's backward on the CPU backend against central finite differences of its f64
//! reference (`cuattn::reference::runtime`), on fresh random inputs, and the classic backward
//! bugs shown to fail the same checks.
//!
//! Each check projects the layer's output on a random `w` (L = Σ w∘y, so dL/dy = w), feeds w to
//! the backward and compares the result with (L(x + h) − L(x − h))/2h computed in f64.
//!
//! Tolerance: the f64 differences are exact to ~1e-9 relative (h = 1e-5: truncation h²·L‴,
//! rounding 1e-16·|L|/h), far below the f32 backward's own error, so the bound is the f32 one of
//! `cuattn::tolerance`: a gradient element is a sum of n products accumulated in f32, bound
//! `4·√n·u32·scale + (u32 + 4·√n·u32)·|ref|` with `scale` the largest magnitude a term of that
//! sum can have (written out per layer below).

use cuattn::reference::runtime::{
    self as reference, activation, AttentionSizes, HeadsRef, ProbsDropout,
};
use cuattn::rng::Dropout;
use cuattn::runtime::train::layers::{
    embeddings_backward, feed_forward_backward, feed_forward_forward, layer_norm_backward,
    layer_norm_forward, linear_backward, self_attention_backward, self_attention_forward,
    FeedForwardParams, LayerNormParams, LinearParams, SelfAttentionParams,
};
use cuattn::runtime::train::{CrossEntropy, DropoutSite, TrainBackend};
use cuattn::runtime::{Activation, AttentionMask, Backend, Cpu, CpuTensor, Heads};
use cuattn::tolerance::{compare, Comparison, Tolerance};
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn up(shape: &[usize], v: &[f32]) -> CpuTensor {
    Cpu.upload_as(shape, v, DType::F32).unwrap()
}

fn host(t: &CpuTensor) -> Vec<f32> {
    Cpu.to_f32(t).unwrap()
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |a, &b| a.max((b as f64).abs()))
}

fn widen(v: &[f32]) -> Vec<f64> {
    reference::widen(v)
}

/// dL/dx by central differences of `loss` at `x` (f64).
fn numeric_grad(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let lp = loss(&xp);
            xp[i] = x[i] - h;
            let lm = loss(&xp);
            xp[i] = x[i];
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

/// L = Σ w·y.
fn project(y: &[f64], w: &[f32]) -> f64 {
    assert_eq!(y.len(), w.len());
    y.iter().zip(w).map(|(&a, &b)| a * b as f64).sum()
}

/// The backward's gradient against the numerical one, under the f32 bound for sums of `n`
/// terms of magnitude ≤ `scale`.
fn grad_cmp(got: &[f32], numeric: &[f64], n: usize, scale: f64) -> Comparison {
    compare(got, numeric, Tolerance::for_output(DType::F32, n, scale))
}

#[track_caller]
fn expect_grad(what: &str, got: &[f32], numeric: &[f64], n: usize, scale: f64) {
    let c = grad_cmp(got, numeric, n, scale);
    assert!(
        c.passed,
        "{what}: {c:?} (got {} vs numeric {})",
        got[c.worst_index], numeric[c.worst_index]
    );
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = SmallRng::seed_from_u64(1);
    let (rows, inp, out) = (5, 7, 4);
    let x = rand_vec(&mut rng, rows * inp, 1.0);
    let w = rand_vec(&mut rng, out * inp, 0.5);
    let b = rand_vec(&mut rng, out, 0.5);
    let dy = rand_vec(&mut rng, rows * out, 1.0);
    let (xt, wt, bt, dyt) = (
        up(&[rows, inp], &x),
        up(&[out, inp], &w),
        up(&[out], &b),
        up(&[rows, out], &dy),
    );
    let p = LinearParams {
        w: &wt,
        b: Some(&bt),
    };
    let g = linear_backward(&Cpu, p, &xt, &dyt, true).unwrap();
    let (xd, wd, bd) = (widen(&x), widen(&w), widen(&b));
    let f = |x: &[f64], w: &[f64], b: &[f64]| {
        project(
            &reference::linear_f64(x, inp, w, out, Some(b), Activation::None),
            &dy,
        )
    };
    // dx = dy·W (n = out), dW = dyᵀ·x and db = Σ dy (n = rows).
    let ndx = numeric_grad(&xd, |x| f(x, &wd, &bd));
    let ndw = numeric_grad(&wd, |w| f(&xd, w, &bd));
    let ndb = numeric_grad(&bd, |b| f(&xd, &wd, b));
    expect_grad(
        "dx",
        &host(g.dx.as_ref().unwrap()),
        &ndx,
        out,
        max_abs(&dy) * max_abs(&w),
    );
    expect_grad("dW", &host(&g.dw), &ndw, rows, max_abs(&dy) * max_abs(&x));
    expect_grad(
        "db",
        &host(g.db.as_ref().unwrap()),
        &ndb,
        rows,
        max_abs(&dy),
    );
}

#[test]
fn layer_norm_backward_with_residual_matches_finite_differences() {
    let mut rng = SmallRng::seed_from_u64(2);
    let (rows, width, eps) = (4, 9, 1e-5f32);
    let x = rand_vec(&mut rng, rows * width, 2.0);
    let r = rand_vec(&mut rng, rows * width, 1.0);
    let gamma = rand_vec(&mut rng, width, 1.5);
    let beta = rand_vec(&mut rng, width, 0.5);
    let dy = rand_vec(&mut rng, rows * width, 1.0);
    let (xt, rt, gt, bt) = (
        up(&[rows, width], &x),
        up(&[rows, width], &r),
        up(&[width], &gamma),
        up(&[width], &beta),
    );
    let p = LayerNormParams {
        gamma: &gt,
        beta: &bt,
        eps,
    };
    let (_, s) = layer_norm_forward(&Cpu, p, &xt, Some(&rt)).unwrap();
    let g = layer_norm_backward(&Cpu, p, &s, &up(&[rows, width], &dy)).unwrap();
    let (xd, rd, gd, bd) = (widen(&x), widen(&r), widen(&gamma), widen(&beta));
    let f = |x: &[f64], r: &[f64], g: &[f64], b: &[f64]| {
        project(
            &reference::layer_norm_f64(x, Some(r), width, g, b, eps),
            &dy,
        )
    };
    let ndx = numeric_grad(&xd, |x| f(x, &rd, &gd, &bd));
    let ndr = numeric_grad(&rd, |r| f(&xd, r, &gd, &bd));
    let ndg = numeric_grad(&gd, |g| f(&xd, &rd, g, &bd));
    let ndb = numeric_grad(&bd, |b| f(&xd, &rd, &gd, b));
    // Row statistics of s = x + r: |x̂| ≤ √width; dx = rstd·(dŷ − mean dŷ − x̂·mean(dŷ·x̂))
    // with |dŷ| ≤ max|dy|·max|γ|, so a term is at most rstd·D·(2 + width).
    let s = widen(&host(&s));
    let rstd_max = s
        .chunks(width)
        .map(|row| {
            let m = row.iter().sum::<f64>() / width as f64;
            let v = row.iter().map(|x| (x - m).powi(2)).sum::<f64>() / width as f64;
            1.0 / (v + eps as f64).sqrt()
        })
        .fold(0.0, f64::max);
    let dmax = max_abs(&dy) * max_abs(&gamma);
    let dx = host(&g.dx);
    let sx = rstd_max * dmax * (2.0 + width as f64);
    expect_grad("dx", &dx, &ndx, width, sx);
    expect_grad("d residual", &dx, &ndr, width, sx);
    let xhat_max = (width as f64).sqrt();
    expect_grad("dγ", &host(&g.dgamma), &ndg, rows, max_abs(&dy) * xhat_max);
    expect_grad("dβ", &host(&g.dbeta), &ndb, rows, max_abs(&dy));
}

#[test]
fn feed_forward_backward_matches_finite_differences_for_both_gelus() {
    for (seed, act) in [(3, Activation::GeluErf), (4, Activation::GeluTanh)] {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (rows, width, inner) = (3, 6, 10);
        let x = rand_vec(&mut rng, rows * width, 1.5);
        let w1 = rand_vec(&mut rng, inner * width, 0.7);
        let b1 = rand_vec(&mut rng, inner, 0.3);
        let w2 = rand_vec(&mut rng, width * inner, 0.7);
        let b2 = rand_vec(&mut rng, width, 0.3);
        let dy = rand_vec(&mut rng, rows * width, 1.0);
        let t = |s: &[usize], v: &[f32]| up(s, v);
        let (xt, w1t, b1t, w2t, b2t) = (
            t(&[rows, width], &x),
            t(&[inner, width], &w1),
            t(&[inner], &b1),
            t(&[width, inner], &w2),
            t(&[width], &b2),
        );
        let p = FeedForwardParams {
            up: LinearParams {
                w: &w1t,
                b: Some(&b1t),
            },
            down: LinearParams {
                w: &w2t,
                b: Some(&b2t),
            },
            act,
        };
        let (_, cache) = feed_forward_forward(&Cpu, p, &xt).unwrap();
        let g = feed_forward_backward(&Cpu, p, &xt, &cache, &t(&[rows, width], &dy)).unwrap();
        let (xd, w1d, b1d, w2d, b2d) = (widen(&x), widen(&w1), widen(&b1), widen(&w2), widen(&b2));
        let f = |x: &[f64], w1: &[f64], w2: &[f64]| {
            let a = reference::linear_f64(x, width, w1, inner, Some(&b1d), act);
            project(
                &reference::linear_f64(&a, inner, w2, width, Some(&b2d), Activation::None),
                &dy,
            )
        };
        let ndx = numeric_grad(&xd, |x| f(x, &w1d, &w2d));
        let ndw1 = numeric_grad(&w1d, |w| f(&xd, w, &w2d));
        let ndw2 = numeric_grad(&w2d, |w| f(&xd, &w1d, w));
        // GELU′ ≤ 1.13; the hidden activation is bounded by the pre-activation's size.
        let dz_max = max_abs(&dy) * max_abs(&w2) * inner as f64 * 1.13;
        let z_max = max_abs(&x) * max_abs(&w1) * width as f64 + max_abs(&b1);
        expect_grad(
            &format!("{act:?} dx"),
            &host(&g.dx),
            &ndx,
            inner,
            dz_max * max_abs(&w1),
        );
        expect_grad(
            &format!("{act:?} dW_up"),
            &host(&g.up.dw),
            &ndw1,
            rows,
            dz_max * max_abs(&x),
        );
        expect_grad(
            &format!("{act:?} dW_down"),
            &host(&g.down.dw),
            &ndw2,
            rows,
            max_abs(&dy) * z_max,
        );
        let _ = b1d;
    }
}

/// Sizes of one attention test case.
struct AttnCase {
    batch: usize,
    len: usize,
    heads_q: usize,
    heads_kv: usize,
    dim: usize,
    key_lens: Option<Vec<usize>>,
    causal: bool,
    dropout: Option<f32>,
}

struct AttnRun {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    site: Option<DropoutSite>,
}

impl AttnCase {
    fn mask(&self) -> AttentionMask<'_> {
        AttentionMask {
            batch: self.batch,
            len_q: self.len,
            len_k: self.len,
            key_lens: self.key_lens.as_deref(),
            causal: self
                .causal
                .then_some(cuattn::runtime::backend::CausalAlign::TopLeft),
            window: None,
            scale: None,
        }
    }

    fn inputs(&self, seed: u64) -> AttnRun {
        let mut rng = SmallRng::seed_from_u64(seed);
        let rows = self.batch * self.len;
        AttnRun {
            q: rand_vec(&mut rng, rows * self.heads_q * self.dim, 1.5),
            k: rand_vec(&mut rng, rows * self.heads_kv * self.dim, 1.5),
            v: rand_vec(&mut rng, rows * self.heads_kv * self.dim, 1.0),
            dout: rand_vec(&mut rng, rows * self.heads_q * self.dim, 1.0),
            site: self.dropout.map(|p| DropoutSite {
                p,
                seed: 77,
                offset: seed,
            }),
        }
    }

    /// L = Σ dout∘O of the f64 reference at (q, k, v).
    fn reference_loss(&self, r: &AttnRun, q: &[f64], k: &[f64], v: &[f64]) -> f64 {
        let hr = |data, heads| HeadsRef {
            data,
            width: heads * self.dim,
            col: 0,
            heads,
            dim: self.dim,
        };
        let sizes = AttentionSizes {
            batch: self.batch,
            len_q: self.len,
            len_k: self.len,
            key_lens: self.key_lens.as_deref(),
            causal: self.mask().causal,
            window: None,
            scale: 1.0 / (self.dim as f64).sqrt(),
        };
        let keep;
        let dropout = match r.site {
            Some(s) => {
                let d = Dropout::new(s.p).unwrap();
                keep = move |i: u64| d.keeps(s.seed, s.offset, i);
                Some(ProbsDropout {
                    keep: &keep,
                    scale: d.scale() as f64,
                })
            }
            None => None,
        };
        let (o, _) = reference::attention_with(
            hr(q, self.heads_q),
            hr(k, self.heads_kv),
            hr(v, self.heads_kv),
            &sizes,
            dropout.as_ref(),
        );
        project(&o, &r.dout)
    }

    fn numeric(&self, r: &AttnRun) -> [Vec<f64>; 3] {
        let (q, k, v) = (widen(&r.q), widen(&r.k), widen(&r.v));
        [
            numeric_grad(&q, |q| self.reference_loss(r, q, &k, &v)),
            numeric_grad(&k, |k| self.reference_loss(r, &q, k, &v)),
            numeric_grad(&v, |v| self.reference_loss(r, &q, &k, v)),
        ]
    }

    fn tensors(&self, r: &AttnRun) -> [CpuTensor; 4] {
        let rows = self.batch * self.len;
        [
            up(&[rows, self.heads_q * self.dim], &r.q),
            up(&[rows, self.heads_kv * self.dim], &r.k),
            up(&[rows, self.heads_kv * self.dim], &r.v),
            up(&[rows, self.heads_q * self.dim], &r.dout),
        ]
    }

    /// The backend's dQ, dK, dV; `fwd_site`/`bwd_site` are the dropout the forward and the
    /// backward use (equal unless a bug is being simulated), `o_site` the one of the O handed
    /// to the backward.
    fn backend_grads(
        &self,
        r: &AttnRun,
        fwd_site: Option<DropoutSite>,
        o_site: Option<DropoutSite>,
        bwd_site: Option<DropoutSite>,
    ) -> [Vec<f32>; 3] {
        let [q, k, v, dout] = self.tensors(r);
        let hv = |t, heads| Heads {
            tensor: t,
            col: 0,
            heads,
            dim: self.dim,
        };
        let m = self.mask();
        let (_, lse) = Cpu
            .attention_with_lse(
                hv(&q, self.heads_q),
                hv(&k, self.heads_kv),
                hv(&v, self.heads_kv),
                &m,
                fwd_site,
            )
            .unwrap();
        let (o, _) = Cpu
            .attention_with_lse(
                hv(&q, self.heads_q),
                hv(&k, self.heads_kv),
                hv(&v, self.heads_kv),
                &m,
                o_site,
            )
            .unwrap();
        let g = Cpu
            .attention_backward(
                hv(&q, self.heads_q),
                hv(&k, self.heads_kv),
                hv(&v, self.heads_kv),
                &o,
                &lse,
                &dout,
                &m,
                bwd_site,
            )
            .unwrap();
        [host(&g.dq), host(&g.dk), host(&g.dv)]
    }

    /// Comparisons of (dQ, dK, dV) with the numerical gradients. A term of dQ/dK is
    /// scale·P·(dP − D)·K (|P| ≤ 1/(1−p) after dropout, |dP|,|D| ≤ dim·|dO|·|V|/(1−p)); of dV,
    /// P·dO; the sums run over the keys (dQ) or queries·group (dK, dV) and the head dim.
    fn compare(
        &self,
        r: &AttnRun,
        got: &[Vec<f32>; 3],
        numeric: &[Vec<f64>; 3],
    ) -> [Comparison; 3] {
        let inv_keep = 1.0 / (1.0 - self.dropout.unwrap_or(0.0) as f64);
        let (dq_, dv_, qm, km, vm) = (
            max_abs(&r.dout),
            max_abs(&r.dout),
            max_abs(&r.q),
            max_abs(&r.k),
            max_abs(&r.v),
        );
        let scale = 1.0 / (self.dim as f64).sqrt();
        let dp = 2.0 * self.dim as f64 * dq_ * vm * inv_keep;
        let group = self.heads_q / self.heads_kv;
        let n_keys = self.len + self.dim;
        let n_queries = self.len * group + self.dim;
        [
            grad_cmp(&got[0], &numeric[0], n_keys, scale * inv_keep * dp * km),
            grad_cmp(&got[1], &numeric[1], n_queries, scale * inv_keep * dp * qm),
            grad_cmp(&got[2], &numeric[2], n_queries, inv_keep * dv_),
        ]
    }
}

#[track_caller]
fn expect_all(c: &[Comparison; 3], what: &str) {
    for (name, c) in ["dQ", "dK", "dV"].iter().zip(c) {
        assert!(c.passed, "{what}: {name} {c:?}");
    }
}

fn cases() -> Vec<AttnCase> {
    vec![
        AttnCase {
            batch: 2,
            len: 5,
            heads_q: 2,
            heads_kv: 2,
            dim: 4,
            key_lens: Some(vec![5, 3]),
            causal: false,
            dropout: None,
        },
        AttnCase {
            batch: 1,
            len: 6,
            heads_q: 4,
            heads_kv: 2,
            dim: 3,
            key_lens: None,
            causal: true,
            dropout: None,
        },
        AttnCase {
            batch: 2,
            len: 4,
            heads_q: 2,
            heads_kv: 1,
            dim: 4,
            key_lens: Some(vec![4, 2]),
            causal: false,
            dropout: Some(0.3),
        },
    ]
}

#[test]
fn attention_backward_padding_causal_gqa_dropout_matches_finite_differences() {
    for (i, c) in cases().iter().enumerate() {
        let r = c.inputs(10 + i as u64);
        let got = c.backend_grads(&r, r.site, r.site, r.site);
        expect_all(&c.compare(&r, &got, &c.numeric(&r)), &format!("case {i}"));
    }
}

#[test]
fn attention_dropout_mask_only_in_forward_is_caught() {
    let c = &cases()[2];
    let r = c.inputs(20);
    let numeric = c.numeric(&r);
    expect_all(
        &c.compare(&r, &c.backend_grads(&r, r.site, r.site, r.site), &numeric),
        "correct",
    );
    // The forward dropped probabilities, the backward forgot the mask.
    let buggy = c.compare(&r, &c.backend_grads(&r, r.site, r.site, None), &numeric);
    assert!(
        buggy.iter().any(|c| !c.passed),
        "a backward without the mask passed: {buggy:?}"
    );
}

#[test]
fn attention_d_from_the_output_before_dropout_is_caught() {
    // D = rowsum(dO∘O) must use the O the forward returned (after dropout on P); the O of the
    // undropped probabilities gives wrong dQ, dK.
    let c = &cases()[2];
    let r = c.inputs(21);
    let numeric = c.numeric(&r);
    let buggy = c.compare(&r, &c.backend_grads(&r, r.site, None, r.site), &numeric);
    assert!(
        !buggy[0].passed || !buggy[1].passed,
        "D from the wrong O passed: {buggy:?}"
    );
}

#[test]
fn gqa_dk_dv_sum_over_the_group_and_one_head_alone_is_caught() {
    // GQA (4 query heads on 2 K/V heads) equals MHA on K/V repeated per query head, with each
    // K/V head's gradient the sum over its group; keeping one head's share alone fails.
    let c = &cases()[1];
    let r = c.inputs(22);
    let numeric = c.numeric(&r);
    let gqa = c.backend_grads(&r, None, None, None);
    expect_all(&c.compare(&r, &gqa, &numeric), "GQA");
    let group = c.heads_q / c.heads_kv;
    let repeat = |x: &[f32]| -> Vec<f32> {
        x.chunks(c.dim)
            .flat_map(|head| std::iter::repeat_n(head, group).flatten().copied())
            .collect()
    };
    let mha = AttnCase {
        heads_kv: c.heads_q,
        key_lens: c.key_lens.clone(),
        ..*c
    };
    let rm = AttnRun {
        q: r.q.clone(),
        k: repeat(&r.k),
        v: repeat(&r.v),
        dout: r.dout.clone(),
        site: None,
    };
    let [_, dk_m, dv_m] = mha.backend_grads(&rm, None, None, None);
    // Per K/V head: the sum of its query heads' shares, and (the bug) the last share alone.
    let fold = |x: &[f32], last_only: bool| -> Vec<f32> {
        x.chunks(c.dim * group)
            .flat_map(|g| {
                (0..c.dim).map(move |d| {
                    if last_only {
                        g[(group - 1) * c.dim + d]
                    } else {
                        (0..group).map(|h| g[h * c.dim + d]).sum()
                    }
                })
            })
            .collect()
    };
    let summed = [gqa[0].clone(), fold(&dk_m, false), fold(&dv_m, false)];
    expect_all(
        &c.compare(&r, &summed, &numeric),
        "MHA on repeated K/V, summed",
    );
    let one = [gqa[0].clone(), fold(&dk_m, true), fold(&dv_m, true)];
    let buggy = c.compare(&r, &one, &numeric);
    assert!(
        !buggy[1].passed && !buggy[2].passed,
        "dK/dV of one head of the group passed: {buggy:?}"
    );
}

#[test]
fn self_attention_block_backward_matches_finite_differences() {
    let mut rng = SmallRng::seed_from_u64(5);
    let (batch, len, width, heads) = (2, 4, 6, 2);
    let rows = batch * len;
    let key_lens = [4usize, 3];
    let x = rand_vec(&mut rng, rows * width, 1.0);
    let ws: Vec<Vec<f32>> = (0..4)
        .map(|_| rand_vec(&mut rng, width * width, 0.6))
        .collect();
    let bs: Vec<Vec<f32>> = (0..4).map(|_| rand_vec(&mut rng, width, 0.2)).collect();
    let dy = rand_vec(&mut rng, rows * width, 1.0);
    let wt: Vec<CpuTensor> = ws.iter().map(|w| up(&[width, width], w)).collect();
    let bt: Vec<CpuTensor> = bs.iter().map(|b| up(&[width], b)).collect();
    let lin = |i: usize| LinearParams {
        w: &wt[i],
        b: Some(&bt[i]),
    };
    let p = SelfAttentionParams {
        q: lin(0),
        k: lin(1),
        v: lin(2),
        out: lin(3),
        heads,
    };
    let mask = AttentionMask {
        batch,
        len_q: len,
        len_k: len,
        key_lens: Some(&key_lens),
        causal: None,
        window: None,
        scale: None,
    };
    let site = Some(DropoutSite {
        p: 0.25,
        seed: 5,
        offset: 9,
    });
    let xt = up(&[rows, width], &x);
    let (_, cache) = self_attention_forward(&Cpu, p, &xt, &mask, site).unwrap();
    let g = self_attention_backward(&Cpu, p, &xt, &cache, &mask, site, &up(&[rows, width], &dy))
        .unwrap();
    let d = Dropout::new(0.25).unwrap();
    let keep = |i: u64| d.keeps(5, 9, i);
    let wd: Vec<Vec<f64>> = ws.iter().map(|w| widen(w)).collect();
    let bd: Vec<Vec<f64>> = bs.iter().map(|b| widen(b)).collect();
    let f = |x: &[f64], wq: &[f64]| {
        let proj = |w: &[f64], b: &[f64]| {
            reference::linear_f64(x, width, w, width, Some(b), Activation::None)
        };
        let (q, k, v) = (proj(wq, &bd[0]), proj(&wd[1], &bd[1]), proj(&wd[2], &bd[2]));
        let hr = |data| HeadsRef {
            data,
            width,
            col: 0,
            heads,
            dim: width / heads,
        };
        let sizes = AttentionSizes {
            batch,
            len_q: len,
            len_k: len,
            key_lens: Some(&key_lens),
            causal: None,
            window: None,
            scale: 1.0 / ((width / heads) as f64).sqrt(),
        };
        let pd = ProbsDropout {
            keep: &keep,
            scale: d.scale() as f64,
        };
        let (ctx, _) = reference::attention_with(hr(&q), hr(&k), hr(&v), &sizes, Some(&pd));
        let out = reference::linear_f64(&ctx, width, &wd[3], width, Some(&bd[3]), Activation::None);
        project(&out, &dy)
    };
    let xd = widen(&x);
    let ndx = numeric_grad(&xd, |x| f(x, &wd[0]));
    let ndwq = numeric_grad(&wd[0], |w| f(&xd, w));
    // Bound: a chain of four GEMMs; its terms are bounded by the product of the factors'
    // largest entries over the widths they sum (the attention's as above, inv_keep 4/3).
    let wm = ws.iter().map(|w| max_abs(w)).fold(0.0, f64::max);
    let proj_max = width as f64 * max_abs(&x) * wm + 0.2;
    let dctx = width as f64 * max_abs(&dy) * wm;
    let dp = 2.0 * (width / heads) as f64 * dctx * proj_max * (4.0 / 3.0);
    let dqkv = len as f64 * dp * proj_max * (4.0 / 3.0) / ((width / heads) as f64).sqrt();
    let n = 3 * width + len + width / heads;
    expect_grad("dx", &host(&g.dx), &ndx, n, dqkv * wm);
    expect_grad("dW_q", &host(&g.q.dw), &ndwq, n, dqkv * max_abs(&x));
}

#[test]
fn embeddings_backward_scatters_and_skips_the_padding_row() {
    let mut rng = SmallRng::seed_from_u64(6);
    let width = 3;
    let word = rand_vec(&mut rng, 7 * width, 1.0);
    let pos = rand_vec(&mut rng, 5 * width, 1.0);
    let ty = rand_vec(&mut rng, 2 * width, 1.0);
    let ids: [u32; 6] = [3, 0, 3, 6, 1, 0];
    let positions: [u32; 6] = [0, 1, 2, 0, 1, 2];
    let types: [u32; 6] = [0, 0, 1, 1, 1, 0];
    let dsum = rand_vec(&mut rng, 6 * width, 1.0);
    let tables = [
        up(&[7, width], &word),
        up(&[5, width], &pos),
        up(&[2, width], &ty),
    ];
    let g = embeddings_backward(
        &Cpu,
        [&tables[0], &tables[1], &tables[2]],
        [&ids, &positions, &types],
        [Some(0), None, None],
        &up(&[6, width], &dsum),
    )
    .unwrap();
    let f = |t: &[f64], which: usize| {
        let idx: &[u32] = [&ids[..], &positions[..], &types[..]][which];
        let sum: Vec<f64> = idx
            .iter()
            .flat_map(|&i| t[i as usize * width..(i as usize + 1) * width].to_vec())
            .collect();
        project(&sum, &dsum)
    };
    for (which, table) in [&word, &pos, &ty].into_iter().enumerate() {
        let mut numeric = numeric_grad(&widen(table), |t| f(t, which));
        if which == 0 {
            // nn.Embedding(padding_idx = 0): row 0 gets no gradient.
            numeric[..width].fill(0.0);
        }
        expect_grad(
            &format!("table {which}"),
            &host(&g[which]),
            &numeric,
            6,
            max_abs(&dsum),
        );
    }
    assert!(host(&g[0])[..width].iter().all(|&v| v == 0.0));
}

#[test]
fn tanh_pooler_and_cross_entropy_with_smoothing_and_ignore_index() {
    let mut rng = SmallRng::seed_from_u64(7);
    let z = rand_vec(&mut rng, 12, 2.0);
    let zt = up(&[4, 3], &z);
    let dy = rand_vec(&mut rng, 12, 1.0);
    let y = Cpu.activate(&zt, Activation::Tanh).unwrap();
    let dz = Cpu.tanh_backward(&y, &up(&[4, 3], &dy)).unwrap();
    let numeric = numeric_grad(&widen(&z), |z| {
        let t: Vec<f64> = z.iter().map(|&v| activation(Activation::Tanh, v)).collect();
        project(&t, &dy)
    });
    expect_grad("tanh", &host(&dz), &numeric, 1, max_abs(&dy));
    let labels = [2i64, -100, 0, 1];
    for smoothing in [0.0f32, 0.1] {
        let opts = CrossEntropy {
            ignore_index: -100,
            label_smoothing: smoothing,
        };
        let (loss, g) = Cpu.cross_entropy(&zt, &labels, &opts).unwrap();
        let f = |z: &[f64]| reference::cross_entropy(z, 3, &labels, -100, smoothing as f64);
        let zd = widen(&z);
        let want = f(&zd);
        assert!(
            (loss as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "loss {loss} vs {want}"
        );
        expect_grad("dlogits", &host(&g), &numeric_grad(&zd, f), 3, 1.0);
        assert!(host(&g)[3..6].iter().all(|&v| v == 0.0), "ignored row");
    }
    // Every row ignored: loss 0, zero gradient (PyTorch gives NaN; a trainer wants 0).
    let (loss, g) = Cpu
        .cross_entropy(&zt, &[-100; 4], &CrossEntropy::default())
        .unwrap();
    assert_eq!(loss, 0.0);
    assert!(host(&g).iter().all(|&v| v == 0.0));
    assert!(Cpu
        .cross_entropy(&zt, &[3, 0, 0, 0], &CrossEntropy::default())
        .is_err());
}

#[test]
fn dropout_rescales_kept_elements_and_a_missing_rescale_is_caught() {
    let mut rng = SmallRng::seed_from_u64(8);
    let n = 4000;
    let p = 0.3f32;
    let x = rand_vec(&mut rng, n, 1.0);
    let site = DropoutSite {
        p,
        seed: 3,
        offset: 1,
    };
    let y = host(&Cpu.dropout(&up(&[n], &x), site).unwrap());
    let d = Dropout::new(p).unwrap();
    let kept = (0..n).filter(|&i| d.keeps(3, 1, i as u64)).count();
    // About (1 − p)·n kept: 2800 ± 5σ (σ = √(n·p·(1−p)) ≈ 29).
    assert!((kept as i64 - 2800).abs() < 145, "{kept} kept");
    let reference: Vec<f64> = (0..n)
        .map(|i| {
            if d.keeps(3, 1, i as u64) {
                x[i] as f64 / (1.0 - p as f64)
            } else {
                0.0
            }
        })
        .collect();
    let tol = Tolerance::for_output(DType::F32, 1, 1.0 / (1.0 - p as f64));
    let c = compare(&y, &reference, tol);
    assert!(c.passed, "{c:?}");
    // The same mask with no 1/(1−p): E[y] ≠ x, and the check rejects it.
    let unscaled: Vec<f32> = (0..n)
        .map(|i| if d.keeps(3, 1, i as u64) { x[i] } else { 0.0 })
        .collect();
    assert!(!compare(&unscaled, &reference, tol).passed);
    // Backward = the same call on dy: the gradient of Σ w∘dropout(x) is dropout(w).
    let w = rand_vec(&mut rng, n, 1.0);
    let dx = host(&Cpu.dropout(&up(&[n], &w), site).unwrap());
    let numeric: Vec<f64> = (0..n)
        .map(|i| {
            if d.keeps(3, 1, i as u64) {
                w[i] as f64 / (1.0 - p as f64)
            } else {
                0.0
            }
        })
        .collect();
    assert!(compare(&dx, &numeric, tol).passed);
    assert!(Cpu
        .dropout(&up(&[n], &x), DropoutSite { p: 1.5, ..site })
        .is_err());
}

#[test]
fn matmul_variants_reductions_slices_and_adamw_against_plain_loops() {
    let mut rng = SmallRng::seed_from_u64(9);
    let (m, k, n) = (3, 5, 4);
    let a = rand_vec(&mut rng, m * k, 1.0);
    let b = rand_vec(&mut rng, k * n, 1.0);
    let at = |v: &[f32], r, c| -> Vec<f32> {
        (0..c)
            .flat_map(|j| (0..r).map(move |i| v[i * c + j]))
            .collect()
    };
    let want: Vec<f64> = (0..m * n)
        .map(|ij| {
            (0..k)
                .map(|l| a[ij / n * k + l] as f64 * b[l * n + ij % n] as f64)
                .sum()
        })
        .collect();
    let tol = Tolerance::for_output(DType::F32, k, 1.0);
    use cuattn::runtime::train::Op;
    for (oa, ob) in [
        (Op::N, Op::N),
        (Op::N, Op::T),
        (Op::T, Op::N),
        (Op::T, Op::T),
    ] {
        let ta = match oa {
            Op::N => up(&[m, k], &a),
            Op::T => up(&[k, m], &at(&a, m, k)),
        };
        let tb = match ob {
            Op::N => up(&[k, n], &b),
            Op::T => up(&[n, k], &at(&b, k, n)),
        };
        let c = host(&Cpu.matmul(&ta, oa, &tb, ob).unwrap());
        assert!(compare(&c, &want, tol).passed, "{oa:?}{ob:?}");
    }
    assert!(Cpu
        .matmul(&up(&[m, k], &a), Op::N, &up(&[m, k], &a), Op::N)
        .is_err());
    let x = up(&[m, k], &a);
    let parts = [
        Cpu.slice_cols(&x, 0, 2).unwrap(),
        Cpu.slice_cols(&x, 2, 3).unwrap(),
    ];
    assert_eq!(host(&Cpu.concat_cols(&[&parts[0], &parts[1]]).unwrap()), a);
    assert!(Cpu.slice_cols(&x, 4, 2).is_err());
    let sums = host(&Cpu.sum_rows(&x).unwrap());
    for (c, s) in sums.iter().enumerate() {
        let w: f64 = (0..m).map(|r| a[r * k + c] as f64).sum();
        assert!((*s as f64 - w).abs() <= 1e-6);
    }
    let sq = Cpu.sum_squares(&x).unwrap();
    assert!((sq - a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()).abs() < 1e-9);
    let sig = host(&Cpu.sigmoid(&x).unwrap());
    let dsig = host(
        &Cpu.sigmoid_backward(&Cpu.sigmoid(&x).unwrap(), &up(&[m, k], &b[..m * k]))
            .unwrap(),
    );
    let numeric = numeric_grad(&widen(&a), |z| {
        z.iter()
            .zip(&b)
            .map(|(&v, &w)| w as f64 / (1.0 + (-v).exp()))
            .sum()
    });
    for i in 0..m * k {
        assert!((sig[i] as f64 - 1.0 / (1.0 + (-(a[i] as f64)).exp())).abs() < 1e-6);
    }
    expect_grad("sigmoid", &dsig, &numeric, 1, 1.0);
}

#[test]
fn a_padding_row_outside_the_table_is_an_error_on_the_cpu_as_on_cuda() {
    let dy = Cpu.upload(&[2, 3], &[1.0; 6]).unwrap();
    let e = Cpu
        .gather_rows_backward(&dy, &[0, 1], 4, Some(4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("padding_idx"), "{e}");
    // The last row is a valid padding row: it gets no gradient, the others do.
    let g = Cpu.gather_rows_backward(&dy, &[0, 3], 4, Some(3)).unwrap();
    let g = Cpu.to_f32(&g).unwrap();
    assert_eq!(g[..3], [1.0; 3]);
    assert_eq!(g[9..], [0.0; 3]);
}
