//! Each backend op and building block on fresh random inputs against the f64 references of
//! [`crate::reference::runtime`]. Generic over [`Backend`], so the CPU tests (tests/runtime_*.rs)
//! and the GPU tests (tests/gpu/runtime.rs) hold both backends to the same checks.
//!
//! Inputs are rounded to the backend's dtype before the reference reads them, so input
//! rounding is not part of any budget. Bounds follow [`crate::tolerance`]'s rule, plus, for
//! blocks that store intermediate results (a layer is several ops), one rounding of the
//! storage dtype per stored intermediate, relative to the output's magnitude scale.

use super::backend::{Activation, AttentionMask, Backend, CausalAlign, Heads, Window};
use super::checkpoint::HostParam;
use super::layers::{self, CachedKv, FeedForward, KvCache, LayerNorm, Linear, MultiHeadAttention};
use crate::reference::runtime::{self as reference, AttentionSizes, HeadsRef};
use crate::tolerance::{expect_close, Tolerance};
use crate::DType;
use rand::{Rng, SeedableRng};

type Check = Result<(), String>;

fn err(e: crate::Error) -> String {
    e.to_string()
}

/// Random values in [-spread, spread], rounded to `dtype` (never all zeros).
pub fn random(dtype: DType, n: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| dtype.round(rng.gen_range(-spread..spread)))
        .collect()
}

fn param(dtype: DType, shape: &[usize], spread: f32, seed: u64) -> HostParam {
    HostParam {
        shape: shape.to_vec(),
        values: random(dtype, shape.iter().product(), spread, seed),
    }
}

/// The bound for an output made by `stored` chained ops of `n` summed terms in all, with
/// magnitudes up to `scale`.
pub fn tolerance(dtype: DType, n: usize, scale: f64, stored: usize) -> Tolerance {
    let mut t = Tolerance::for_output(dtype, n, scale);
    let extra = 2.0 * stored as f64 * dtype.unit_roundoff() * scale;
    t.atol += extra;
    t.rel_norm_bound += 2.0 * stored as f64 * dtype.unit_roundoff();
    t
}

/// Weights and biases of the four projections (Q, K, V, output) of a `width`-wide attention
/// layer: weights spread `spread`, biases 0.2.
fn projection_params(
    dt: DType,
    width: usize,
    spread: f32,
    seed: u64,
) -> Vec<(HostParam, HostParam)> {
    (0..4)
        .map(|i| {
            (
                param(dt, &[width, width], spread, seed + 10 * i),
                param(dt, &[width], 0.2, seed + 10 * i + 1),
            )
        })
        .collect()
}

/// The reference of a multi-head attention layer with [`projection_params`]: Q from `x`, K
/// and V from `memory` (`x` again for self-attention), per-head attention, output projection.
fn reference_mha(
    ps: &[(HostParam, HostParam)],
    width: usize,
    heads: usize,
    (x, memory): (&[f32], &[f32]),
    sizes: &AttentionSizes,
) -> Vec<f64> {
    let proj = |i: usize, inp: &[f32]| -> Vec<f32> {
        reference::linear(
            inp,
            width,
            &ps[i].0.values,
            width,
            Some(&ps[i].1.values),
            Activation::None,
        )
        .iter()
        .map(|&v| v as f32)
        .collect()
    };
    let (q, k, v) = (proj(0, x), proj(1, memory), proj(2, memory));
    let ctx: Vec<f32> = reference::attention(
        packed(&q, width, heads),
        packed(&k, width, heads),
        packed(&v, width, heads),
        sizes,
    )
    .iter()
    .map(|&v| v as f32)
    .collect();
    reference::linear(
        &ctx,
        width,
        &ps[3].0.values,
        width,
        Some(&ps[3].1.values),
        Activation::None,
    )
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn compare<B: Backend>(
    be: &B,
    what: &str,
    t: &B::Tensor,
    r: &[f64],
    n: usize,
    stored: usize,
) -> Check {
    let out = be.to_f32(t).map_err(err)?;
    expect_close(
        what,
        &out,
        r,
        tolerance(be.dtype(), n, max_abs(r).max(1.0), stored),
    )
}

fn up<B: Backend>(be: &B, shape: &[usize], v: &[f32]) -> Result<B::Tensor, String> {
    be.upload(shape, v).map_err(err)
}

/// `linear` with and without bias, each activation.
pub fn linear<B: Backend>(
    be: &B,
    rows: usize,
    inp: usize,
    out: usize,
    act: Activation,
    bias: bool,
    seed: u64,
) -> Check {
    let dt = be.dtype();
    let x = random(dt, rows * inp, 1.0, seed);
    let w = random(dt, out * inp, 1.0 / (inp as f32).sqrt(), seed + 1);
    let b = random(dt, out, 0.5, seed + 2);
    let bias_t = if bias {
        Some(up(be, &[out], &b)?)
    } else {
        None
    };
    let y = be
        .linear(
            &up(be, &[rows, inp], &x)?,
            &up(be, &[out, inp], &w)?,
            bias_t.as_ref(),
            act,
        )
        .map_err(err)?;
    let r = reference::linear(&x, inp, &w, out, bias.then_some(&b[..]), act);
    let stored = usize::from(act != Activation::None || bias);
    compare(
        be,
        &format!("linear {rows}x{inp}->{out} {act:?} bias={bias}"),
        &y,
        &r,
        inp,
        stored,
    )
}

/// `a·bᵀ` per batch.
pub fn batched_matmul_nt<B: Backend>(
    be: &B,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> Check {
    let dt = be.dtype();
    let a = random(dt, batch * m * k, 1.0, seed);
    let b = random(dt, batch * n * k, 1.0, seed + 1);
    let c = be
        .batched_matmul_nt(
            &up(be, &[batch * m, k], &a)?,
            &up(be, &[batch * n, k], &b)?,
            batch,
        )
        .map_err(err)?;
    let mut r = vec![0f64; batch * m * n];
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                r[(bi * m + i) * n + j] = (0..k)
                    .map(|d| a[(bi * m + i) * k + d] as f64 * b[(bi * n + j) * k + d] as f64)
                    .sum();
            }
        }
    }
    compare(be, "batched_matmul_nt", &c, &r, k, 0)
}

/// `add`, `gather_rows` and `layer_norm` (with and without the residual).
pub fn elementwise<B: Backend>(be: &B, rows: usize, width: usize, seed: u64) -> Check {
    let dt = be.dtype();
    let a = random(dt, rows * width, 2.0, seed);
    let b = random(dt, rows * width, 2.0, seed + 1);
    let (ta, tb) = (up(be, &[rows, width], &a)?, up(be, &[rows, width], &b)?);
    let sum = be.add(&ta, &tb).map_err(err)?;
    let r: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| x as f64 + y as f64)
        .collect();
    compare(be, "add", &sum, &r, 2, 0)?;

    let ids: Vec<u32> = (0..rows as u32 * 2)
        .map(|i| (i * 7 + 3) % rows as u32)
        .collect();
    let g = be.gather_rows(&ta, &ids).map_err(err)?;
    let r: Vec<f64> = ids
        .iter()
        .flat_map(|&i| {
            a[i as usize * width..(i as usize + 1) * width]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    compare(be, "gather_rows", &g, &r, 1, 0)?;

    let gamma = random(dt, width, 1.5, seed + 2);
    let beta = random(dt, width, 0.5, seed + 3);
    let (tg, tbeta) = (up(be, &[width], &gamma)?, up(be, &[width], &beta)?);
    for residual in [false, true] {
        let y = be
            .layer_norm(&ta, residual.then_some(&tb), &tg, &tbeta, 1e-5)
            .map_err(err)?;
        let r = reference::layer_norm(&a, residual.then_some(&b[..]), width, &gamma, &beta, 1e-5);
        // The fused residual is stored in the dtype before it is normalised.
        compare(
            be,
            &format!("layer_norm residual={residual}"),
            &y,
            &r,
            width,
            usize::from(residual),
        )?;
    }
    Ok(())
}

/// Sizes of one attention check.
#[derive(Clone, Debug)]
pub struct AttentionCase {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub dim: usize,
    pub key_lens: Option<Vec<usize>>,
    pub causal: Option<CausalAlign>,
    /// Sliding window (GPT-Neo's local layers).
    pub window: Option<Window>,
    /// `None`: 1/√dim.
    pub scale: Option<f32>,
    /// Q, K and V as column blocks of one `[rows, 3·width]` tensor (a fused projection's
    /// output) instead of three tensors with one block each and padding columns.
    pub fused: bool,
}

/// The backend's `attention` on a case.
pub fn attention<B: Backend>(be: &B, c: &AttentionCase, seed: u64) -> Check {
    let dt = be.dtype();
    let (wq, wkv) = (c.heads_q * c.dim, c.heads_kv * c.dim);
    let mask = AttentionMask {
        batch: c.batch,
        len_q: c.len_q,
        len_k: c.len_k,
        key_lens: c.key_lens.as_deref(),
        causal: c.causal,
        window: c.window,
        scale: c.scale,
    };
    let sizes = AttentionSizes {
        batch: c.batch,
        len_q: c.len_q,
        len_k: c.len_k,
        key_lens: c.key_lens.as_deref(),
        causal: c.causal,
        window: c.window,
        scale: c.scale.map_or(1.0 / (c.dim as f64).sqrt(), f64::from),
    };
    let (out, r) = if c.fused {
        if c.len_q != c.len_k || c.heads_q != c.heads_kv {
            return Err("a fused case needs len_q = len_k and heads_q = heads_kv".into());
        }
        let rows = c.batch * c.len_q;
        let x = random(dt, rows * 3 * wq, 2.0, seed);
        let t = up(be, &[rows, 3 * wq], &x)?;
        let h = |i: usize| Heads {
            tensor: &t,
            col: i * wq,
            heads: c.heads_q,
            dim: c.dim,
        };
        let hr = |i: usize| HeadsRef {
            data: &x,
            width: 3 * wq,
            col: i * wq,
            heads: c.heads_q,
            dim: c.dim,
        };
        let o = be.attention(h(0), h(1), h(2), &mask).map_err(err)?;
        (o, reference::attention(hr(0), hr(1), hr(2), &sizes))
    } else {
        // One spare column before the heads: views at a column offset into a wider tensor.
        let (pq, pk) = (wq + 1, wkv + 1);
        let q = random(dt, c.batch * c.len_q * pq, 2.0, seed);
        let k = random(dt, c.batch * c.len_k * pk, 2.0, seed + 1);
        let v = random(dt, c.batch * c.len_k * pk, 2.0, seed + 2);
        let tq = up(be, &[c.batch * c.len_q, pq], &q)?;
        let tk = up(be, &[c.batch * c.len_k, pk], &k)?;
        let tv = up(be, &[c.batch * c.len_k, pk], &v)?;
        let o = be
            .attention(
                Heads {
                    tensor: &tq,
                    col: 1,
                    heads: c.heads_q,
                    dim: c.dim,
                },
                Heads {
                    tensor: &tk,
                    col: 1,
                    heads: c.heads_kv,
                    dim: c.dim,
                },
                Heads {
                    tensor: &tv,
                    col: 1,
                    heads: c.heads_kv,
                    dim: c.dim,
                },
                &mask,
            )
            .map_err(err)?;
        let r = reference::attention(
            HeadsRef {
                data: &q,
                width: pq,
                col: 1,
                heads: c.heads_q,
                dim: c.dim,
            },
            HeadsRef {
                data: &k,
                width: pk,
                col: 1,
                heads: c.heads_kv,
                dim: c.dim,
            },
            HeadsRef {
                data: &v,
                width: pk,
                col: 1,
                heads: c.heads_kv,
                dim: c.dim,
            },
            &sizes,
        );
        (o, r)
    };
    // One stored intermediate: the fused kernels round the probabilities P to the input dtype
    // before P·V (as src/tolerance/attention.rs budgets with its 2·u_in term). Without it, an
    // H200 run (2026-11-26) failed an f16 case by an element error of 4.8e-4 against a bound of
    // 7.6e-6, within the 2·u_f16·max|O| = 9.8e-4 that this rounding allows.
    compare(
        be,
        &format!("attention {c:?}"),
        &out,
        &r,
        c.dim + c.len_k,
        1,
    )
}

/// [`Backend::attention_packed`] on sequences of `lens` tokens packed back to back (Q, K and
/// V as column blocks of one fused `[Σ lens, 3·width]` tensor, grouped K/V heads when
/// `heads_kv` < `heads_q`), each sequence against the f64 reference on its own rows. Returns
/// whether the backend took the packed path (`Ok(false)`: it declined, nothing to compare).
pub fn attention_packed<B: Backend>(
    be: &B,
    lens: &[usize],
    (heads_q, heads_kv, dim): (usize, usize, usize),
    window: Option<Window>,
    seed: u64,
) -> Result<bool, String> {
    let (wq, wkv) = (heads_q * dim, heads_kv * dim);
    let width = wq + 2 * wkv;
    let rows: usize = lens.iter().sum();
    let x = random(be.dtype(), rows * width, 2.0, seed);
    let t = up(be, &[rows, width], &x)?;
    let h = |col: usize, heads: usize| Heads {
        tensor: &t,
        col,
        heads,
        dim,
    };
    let Some(out) = be
        .attention_packed(
            h(0, heads_q),
            h(wq, heads_kv),
            h(wq + wkv, heads_kv),
            lens,
            window,
            None,
        )
        .map_err(err)?
    else {
        return Ok(false);
    };
    let mut want = Vec::with_capacity(rows * wq);
    let mut start = 0;
    for &n in lens {
        let seq = &x[start * width..(start + n) * width];
        let hr = |col: usize, heads: usize| HeadsRef {
            data: seq,
            width,
            col,
            heads,
            dim,
        };
        let sizes = AttentionSizes {
            batch: 1,
            len_q: n,
            len_k: n,
            key_lens: None,
            causal: None,
            window,
            scale: 1.0 / (dim as f64).sqrt(),
        };
        if n > 0 {
            want.extend(reference::attention(
                hr(0, heads_q),
                hr(wq, heads_kv),
                hr(wq + wkv, heads_kv),
                &sizes,
            ));
        }
        start += n;
    }
    let longest = lens.iter().copied().max().unwrap_or(0);
    let what = format!("packed attention, lens {lens:?}, window {window:?}");
    compare(be, &what, &out, &want, dim + longest, 1).map(|()| true)
}

/// The standard attention cases: padding, causal (both alignments), grouped heads, fused.
pub fn attention_cases() -> Vec<AttentionCase> {
    let base = AttentionCase {
        batch: 3,
        heads_q: 4,
        heads_kv: 4,
        len_q: 9,
        len_k: 9,
        dim: 8,
        key_lens: None,
        causal: None,
        window: None,
        scale: None,
        fused: false,
    };
    vec![
        base.clone(),
        AttentionCase {
            key_lens: Some(vec![9, 4, 1]),
            ..base.clone()
        },
        AttentionCase {
            key_lens: Some(vec![0, 5, 9]),
            ..base.clone()
        },
        AttentionCase {
            causal: Some(CausalAlign::TopLeft),
            ..base.clone()
        },
        AttentionCase {
            len_q: 3,
            len_k: 11,
            causal: Some(CausalAlign::BottomRight),
            key_lens: Some(vec![11, 6, 3]),
            ..base.clone()
        },
        AttentionCase {
            heads_kv: 2,
            ..base.clone()
        },
        AttentionCase {
            fused: true,
            dim: 32,
            key_lens: Some(vec![9, 7, 2]),
            ..base.clone()
        },
        AttentionCase {
            batch: 2,
            len_q: 1,
            len_k: 1,
            fused: true,
            ..base.clone()
        },
        // One query against many keys (a decode step; the CUDA backend runs the split-KV
        // decode kernel): grouped heads, an empty cache, bottom-right and no causal mask.
        AttentionCase {
            len_q: 1,
            len_k: 13,
            heads_kv: 2,
            key_lens: Some(vec![13, 5, 0]),
            causal: Some(CausalAlign::BottomRight),
            ..base.clone()
        },
        AttentionCase {
            len_q: 1,
            len_k: 40,
            dim: 64,
            ..base.clone()
        },
        // Top-left with one query keeps key 0 only: not a decode step.
        AttentionCase {
            len_q: 1,
            len_k: 6,
            causal: Some(CausalAlign::TopLeft),
            ..base.clone()
        },
        // GPT-Neo's local layers (the last 4 keys up to the query, no score scaling): a
        // prefill over its own keys with padding, then decode steps over a cache that
        // outgrew the window in one sequence, fits it in another and is empty in the third
        // (the CUDA backend's decode kernel takes a step only when the window holds every key).
        AttentionCase {
            len_q: 11,
            len_k: 11,
            causal: Some(CausalAlign::TopLeft),
            window: Some(Window::new(3, 0, CausalAlign::TopLeft)),
            key_lens: Some(vec![11, 6, 2]),
            scale: Some(1.0),
            fused: true,
            ..base.clone()
        },
        AttentionCase {
            len_q: 1,
            len_k: 13,
            heads_kv: 2,
            causal: Some(CausalAlign::BottomRight),
            window: Some(Window::new(3, 0, CausalAlign::BottomRight)),
            key_lens: Some(vec![13, 3, 0]),
            scale: Some(1.0),
            ..base.clone()
        },
        AttentionCase {
            len_q: 1,
            len_k: 13,
            causal: Some(CausalAlign::BottomRight),
            window: Some(Window::new(3, 0, CausalAlign::BottomRight)),
            key_lens: Some(vec![4, 2, 1]),
            ..base.clone()
        },
        // A window over several queries against a longer cache (bottom-right, both sides).
        AttentionCase {
            len_q: 3,
            len_k: 12,
            window: Some(Window::new(2, 1, CausalAlign::BottomRight)),
            key_lens: Some(vec![12, 7, 3]),
            ..base
        },
    ]
}

/// `heads` heads side by side filling rows of `width`.
fn packed(data: &[f32], width: usize, heads: usize) -> HeadsRef<'_> {
    HeadsRef {
        data,
        width,
        col: 0,
        heads,
        dim: width / heads,
    }
}

/// A multi-head self-attention layer (padding, causal) against references composed op by op.
pub fn multi_head_self_attention<B: Backend>(be: &B, causal: bool, seed: u64) -> Check {
    let dt = be.dtype();
    let (batch, len, width, heads) = (2usize, 7usize, 24usize, 3usize);
    let key_lens = [7usize, 4];
    let s = 1.0 / (width as f32).sqrt();
    let ps = projection_params(dt, width, s, seed);
    let p = |i: usize| (&ps[i].0, Some(&ps[i].1));
    let mha = MultiHeadAttention::self_attention(be, heads, p(0), p(1), p(2), p(3)).map_err(err)?;
    let x = random(dt, batch * len * width, 1.0, seed + 99);
    let y = mha
        .forward_self(
            be,
            &up(be, &[batch * len, width], &x)?,
            batch,
            len,
            Some(&key_lens),
            causal,
            None,
        )
        .map_err(err)?;
    let r = reference_mha(
        &ps,
        width,
        heads,
        (&x, &x),
        &AttentionSizes {
            batch,
            len_q: len,
            len_k: len,
            key_lens: Some(&key_lens),
            causal: causal.then_some(CausalAlign::TopLeft),
            window: None,
            scale: 1.0 / ((width / heads) as f64).sqrt(),
        },
    );
    compare(
        be,
        &format!("multi-head self-attention causal={causal}"),
        &y,
        &r,
        3 * width + len,
        3,
    )
}

/// Cross-attention: queries from one sequence batch, keys/values from a padded memory.
pub fn multi_head_cross_attention<B: Backend>(be: &B, seed: u64) -> Check {
    let dt = be.dtype();
    let (batch, len_q, len_k, width, heads) = (2usize, 3usize, 6usize, 16usize, 2usize);
    let mem_lens = [6usize, 2];
    let s = 1.0 / (width as f32).sqrt();
    let ps = projection_params(dt, width, s, seed);
    let p = |i: usize| (&ps[i].0, Some(&ps[i].1));
    let mha =
        MultiHeadAttention::cross_attention(be, heads, p(0), p(1), p(2), p(3)).map_err(err)?;
    let x = random(dt, batch * len_q * width, 1.0, seed + 98);
    let m = random(dt, batch * len_k * width, 1.0, seed + 97);
    let y = mha
        .forward_cross(
            be,
            &up(be, &[batch * len_q, width], &x)?,
            &up(be, &[batch * len_k, width], &m)?,
            batch,
            len_q,
            len_k,
            Some(&mem_lens),
        )
        .map_err(err)?;
    let r = reference_mha(
        &ps,
        width,
        heads,
        (&x, &m),
        &AttentionSizes {
            batch,
            len_q,
            len_k,
            key_lens: Some(&mem_lens),
            causal: None,
            window: None,
            scale: 1.0 / ((width / heads) as f64).sqrt(),
        },
    );
    compare(
        be,
        "multi-head cross-attention",
        &y,
        &r,
        3 * width + len_k,
        3,
    )
}

/// Basic (unparameterised) self-attention and single-head attention with learned projections.
pub fn simple_attention<B: Backend>(be: &B, seed: u64) -> Check {
    let dt = be.dtype();
    let (batch, len, width, dim) = (2usize, 5usize, 6usize, 4usize);
    let x = random(dt, batch * len * width, 0.8, seed);
    let tx = up(be, &[batch * len, width], &x)?;
    let y = layers::basic_self_attention(be, &tx, batch, len).map_err(err)?;
    let h = HeadsRef {
        data: &x,
        width,
        col: 0,
        heads: 1,
        dim: width,
    };
    let sizes = AttentionSizes {
        batch,
        len_q: len,
        len_k: len,
        key_lens: None,
        causal: None,
        window: None,
        scale: 1.0,
    };
    compare(
        be,
        "basic self-attention",
        &y,
        &reference::attention(h, h, h, &sizes),
        width + len,
        0,
    )?;

    let ws: Vec<HostParam> = (0..3)
        .map(|i| param(dt, &[dim, width], 0.5, seed + 1 + i))
        .collect();
    let sha = layers::SingleHeadAttention::new(be, &ws[0], &ws[1], &ws[2]).map_err(err)?;
    for causal in [false, true] {
        let y = sha.forward(be, &tx, batch, len, causal).map_err(err)?;
        let pr = |w: &HostParam| -> Vec<f32> {
            reference::linear(&x, width, &w.values, dim, None, Activation::None)
                .iter()
                .map(|&v| v as f32)
                .collect()
        };
        let (q, k, v) = (pr(&ws[0]), pr(&ws[1]), pr(&ws[2]));
        let sizes = AttentionSizes {
            window: None,
            scale: 1.0 / (dim as f64).sqrt(),
            causal: causal.then_some(CausalAlign::TopLeft),
            ..sizes
        };
        let r = reference::attention(
            packed(&q, dim, 1),
            packed(&k, dim, 1),
            packed(&v, dim, 1),
            &sizes,
        );
        compare(
            be,
            &format!("single-head attention causal={causal}"),
            &y,
            &r,
            width + dim + len,
            1,
        )?;
    }
    Ok(())
}

/// Feed-forward (both GELU forms), LayerNorm layer and the positional encodings.
pub fn blocks<B: Backend>(be: &B, seed: u64) -> Check {
    let dt = be.dtype();
    let (rows, width, inner) = (6usize, 20usize, 37usize);
    let x = random(dt, rows * width, 1.5, seed);
    let tx = up(be, &[rows, width], &x)?;
    for act in [Activation::GeluErf, Activation::GeluTanh] {
        let (w1, b1) = (
            param(dt, &[inner, width], 0.4, seed + 1),
            param(dt, &[inner], 0.3, seed + 2),
        );
        let (w2, b2) = (
            param(dt, &[width, inner], 0.3, seed + 3),
            param(dt, &[width], 0.3, seed + 4),
        );
        let ffn = FeedForward {
            up: Linear::new(be, &w1, Some(&b1)).map_err(err)?,
            down: Linear::new(be, &w2, Some(&b2)).map_err(err)?,
            act,
        };
        let y = ffn.forward(be, &tx).map_err(err)?;
        let h: Vec<f32> = reference::linear(&x, width, &w1.values, inner, Some(&b1.values), act)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let r = reference::linear(
            &h,
            inner,
            &w2.values,
            width,
            Some(&b2.values),
            Activation::None,
        );
        compare(
            be,
            &format!("feed-forward {act:?}"),
            &y,
            &r,
            width + inner,
            2,
        )?;
    }
    let (g, b) = (
        param(dt, &[width], 1.0, seed + 5),
        param(dt, &[width], 1.0, seed + 6),
    );
    let ln = LayerNorm::new(be, &g, &b, 1e-6).map_err(err)?;
    let y = ln.forward(be, &tx, None).map_err(err)?;
    compare(
        be,
        "LayerNorm layer",
        &y,
        &reference::layer_norm(&x, None, width, &g.values, &b.values, 1e-6),
        width,
        0,
    )?;

    // Sinusoidal: independent values of the formula; learned: a lookup of the table's rows.
    let pe = layers::sinusoidal_positions(50, 16);
    for (p, c, want) in [
        (0, 0, 0.0f64),
        (0, 1, 1.0),
        (3, 0, 3f64.sin()),
        (3, 1, 3f64.cos()),
        (49, 2, (49.0 / 10f64.sqrt()).sin()),
        (49, 15, (49.0 / 10000f64.powf(14.0 / 16.0)).cos()),
    ] {
        let got = pe.values[p * 16 + c] as f64;
        if (got - want).abs() > 1e-6 {
            return Err(format!("sinusoidal PE[{p}, {c}] = {got}, expected {want}"));
        }
    }
    let table = param(dt, &[10, 16], 1.0, seed + 7);
    let learned = layers::Embedding::new(be, &table).map_err(err)?;
    let ids = [3u32, 0, 9, 3];
    let y = learned.forward(be, &ids).map_err(err)?;
    let r: Vec<f64> = ids
        .iter()
        .flat_map(|&i| {
            table.values[i as usize * 16..(i as usize + 1) * 16]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    compare(be, "learned positions", &y, &r, 1, 0)?;
    Ok(())
}

/// A KV cache for the checks: keeps every step's keys and values on the host and uploads
/// the concatenation (simple and slow; the point is the hook, not the cache).
pub struct ConcatKvCache<T> {
    width: usize,
    k: Vec<Vec<f32>>, // per sequence, rows of `width`
    v: Vec<Vec<f32>>,
    uploaded: Option<(T, T)>,
}

impl<T> ConcatKvCache<T> {
    pub fn new(batch: usize, width: usize) -> Self {
        ConcatKvCache {
            width,
            k: vec![Vec::new(); batch],
            v: vec![Vec::new(); batch],
            uploaded: None,
        }
    }
}

impl<B: Backend> KvCache<B> for ConcatKvCache<B::Tensor> {
    fn append<'a>(
        &'a mut self,
        be: &B,
        k: Heads<'a, B::Tensor>,
        v: Heads<'a, B::Tensor>,
        batch: usize,
        len_new: usize,
    ) -> crate::Result<CachedKv<'a, B::Tensor>> {
        let wide = be.shape(k.tensor)[1];
        let (kh, vh) = (be.to_f32(k.tensor)?, be.to_f32(v.tensor)?);
        for b in 0..batch {
            for t in 0..len_new {
                let row = (b * len_new + t) * wide;
                self.k[b].extend_from_slice(&kh[row + k.col..row + k.col + self.width]);
                self.v[b].extend_from_slice(&vh[row + v.col..row + v.col + self.width]);
            }
        }
        let len_k = self.k[0].len() / self.width;
        let cat = |parts: &[Vec<f32>]| parts.concat();
        let (kt, vt) = self.uploaded.insert((
            be.upload(&[batch * len_k, self.width], &cat(&self.k))?,
            be.upload(&[batch * len_k, self.width], &cat(&self.v))?,
        ));
        let at = |tensor| Heads {
            tensor,
            col: 0,
            ..k
        };
        Ok(CachedKv {
            k: at(kt),
            v: at(vt),
            len_k,
            key_lens: None,
        })
    }
}

/// Masked self-attention fed one token at a time through the KV-cache hook gives the rows
/// of the full causal forward.
pub fn kv_cache_hook<B: Backend>(be: &B, seed: u64) -> Check {
    let dt = be.dtype();
    let (batch, len, width, heads) = (2usize, 6usize, 16usize, 4usize);
    let s = 1.0 / (width as f32).sqrt();
    let ps = projection_params(dt, width, s, seed);
    let p = |i: usize| (&ps[i].0, Some(&ps[i].1));
    let mha = MultiHeadAttention::self_attention(be, heads, p(0), p(1), p(2), p(3)).map_err(err)?;
    let x = random(dt, batch * len * width, 1.0, seed + 5);
    let full = mha
        .forward_self(
            be,
            &up(be, &[batch * len, width], &x)?,
            batch,
            len,
            None,
            true,
            None,
        )
        .map_err(err)?;
    let full = be.to_f32(&full).map_err(err)?;
    let mut cache = ConcatKvCache::new(batch, width);
    for t in 0..len {
        let step: Vec<f32> = (0..batch)
            .flat_map(|b| {
                x[(b * len + t) * width..(b * len + t + 1) * width]
                    .iter()
                    .copied()
            })
            .collect();
        let y = mha
            .forward_self(
                be,
                &up(be, &[batch, width], &step)?,
                batch,
                1,
                None,
                true,
                Some(&mut cache),
            )
            .map_err(err)?;
        let y = be.to_f32(&y).map_err(err)?;
        let want: Vec<f64> = (0..batch)
            .flat_map(|b| {
                full[(b * len + t) * width..(b * len + t + 1) * width]
                    .iter()
                    .map(|&v| v as f64)
            })
            .collect();
        let scale = max_abs(&want).max(1.0);
        expect_close(
            &format!("cached step {t}"),
            &y,
            &want,
            tolerance(dt, 3 * width + len, scale, 4),
        )?;
    }
    Ok(())
}
