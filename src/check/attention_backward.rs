//! Attention backward against [`crate::reference::attention_backward`], under
//! [`crate::tolerance::attention_backward`]. O and LSE come from the GPU forward (as in
//! training); dQ, dK, dV are poisoned with NaN before each launch; K/V rows past each
//! sequence's key length are NaN.

use super::attention::{err, poison_keys, upload_4d};
use super::{expect_close, random_values, CheckResult};
use crate::dtype::DType;
use crate::gpu::{DeviceTensor, Gpu};
use crate::ops::attention::{self as attn, Kernel, Sequences, Window};
use crate::ops::attention_backward::{self as bwd, Mode};
use crate::reference::attention::{self as reference, CausalAlign, Shape};
use crate::reference::attention_backward as ref_bwd;
use crate::tensor::HostTensor;
use crate::tolerance::attention_backward as tolerances;
use rand::SeedableRng;
use std::sync::Arc;

/// One randomized backward check.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub shape: Shape,
    pub causal: Option<CausalAlign>,
    pub window: Option<Window>,
    /// Dense batches: valid keys per sequence.
    pub key_lens: Option<Vec<i32>>,
    /// Packed batches: (query lengths, key lengths) per sequence (`shape.batch` of them).
    pub packed: Option<(Vec<usize>, Vec<usize>)>,
    /// Dense batches: BSHD memory read through strides.
    pub bshd: bool,
    pub kernel: Kernel,
    pub mode: Mode,
    pub seed: u64,
}

impl Case {
    pub fn dense(dtype: DType, shape: Shape) -> Case {
        Case {
            dtype,
            shape,
            causal: None,
            window: None,
            key_lens: None,
            packed: None,
            bshd: false,
            kernel: Kernel::Auto,
            mode: Mode::Deterministic,
            seed: 0xb4c ^ (shape.len_q * 131 + shape.len_k) as u64,
        }
    }

    fn ref_opts(&self) -> reference::Options {
        reference::Options {
            scale: 1.0 / (self.shape.dim_qk as f64).sqrt(),
            causal: self.causal,
            key_lens: self
                .key_lens
                .as_ref()
                .map(|l| l.iter().map(|&x| x.max(0) as usize).collect()),
            window: self.window,
        }
    }
}

/// Host inputs and the device tensors of one case (packed cases: THD, sequences back to back).
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    qd: DeviceTensor,
    kd: DeviceTensor,
    vd: DeviceTensor,
    dod: DeviceTensor,
    cu: Option<(Vec<i32>, Vec<i32>)>,
}

fn prefix(lens: &[usize]) -> Vec<usize> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &l| {
            *acc += l;
            Some(*acc)
        }))
        .collect()
}

impl Inputs {
    fn new(gpu: &Arc<Gpu>, c: &Case) -> CheckResult<Inputs> {
        let s = c.shape;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(c.seed);
        match &c.packed {
            None => {
                let q = random_values(&mut rng, c.dtype, s.q_len(), 0.0, 2.0);
                let mut k = random_values(&mut rng, c.dtype, s.k_len(), 0.0, 2.0);
                let mut v = random_values(&mut rng, c.dtype, s.v_len(), 0.0, 1.0);
                let d_o = random_values(&mut rng, c.dtype, s.o_len(), 0.0, 1.0);
                let key_len = |b: usize| {
                    c.key_lens
                        .as_ref()
                        .map_or(s.len_k, |l| l[b].max(0) as usize)
                };
                poison_keys(&mut k, &mut v, &s, |b, j| j >= key_len(b));
                let up = |dims, x: &[f32]| upload_4d(gpu, c.dtype, dims, c.bshd, Some(x), 0.0);
                Ok(Inputs {
                    qd: up([s.batch, s.heads_q, s.len_q, s.dim_qk], &q)?,
                    kd: up([s.batch, s.heads_kv, s.len_k, s.dim_qk], &k)?,
                    vd: up([s.batch, s.heads_kv, s.len_k, s.dim_v], &v)?,
                    dod: up([s.batch, s.heads_q, s.len_q, s.dim_v], &d_o)?,
                    q,
                    k,
                    v,
                    d_o,
                    cu: None,
                })
            }
            Some((lq, lk)) => {
                let (cq, ck) = (prefix(lq), prefix(lk));
                let (tq, tk) = (cq[s.batch].max(1), ck[s.batch].max(1));
                let q = random_values(&mut rng, c.dtype, tq * s.heads_q * s.dim_qk, 0.0, 2.0);
                let k = random_values(&mut rng, c.dtype, tk * s.heads_kv * s.dim_qk, 0.0, 2.0);
                let v = random_values(&mut rng, c.dtype, tk * s.heads_kv * s.dim_v, 0.0, 1.0);
                let d_o = random_values(&mut rng, c.dtype, tq * s.heads_q * s.dim_v, 0.0, 1.0);
                let up = |shape: &[usize], x: &[f32]| -> CheckResult<DeviceTensor> {
                    gpu.upload(&HostTensor::from_f32(c.dtype, shape, x).map_err(err)?)
                        .map_err(err)
                };
                let to_i32 = |x: &[usize]| x.iter().map(|&a| a as i32).collect::<Vec<i32>>();
                Ok(Inputs {
                    qd: up(&[tq, s.heads_q, s.dim_qk], &q)?,
                    kd: up(&[tk, s.heads_kv, s.dim_qk], &k)?,
                    vd: up(&[tk, s.heads_kv, s.dim_v], &v)?,
                    dod: up(&[tq, s.heads_q, s.dim_v], &d_o)?,
                    q,
                    k,
                    v,
                    d_o,
                    cu: Some((to_i32(&cq), to_i32(&ck))),
                })
            }
        }
    }

    fn fwd_opts<'s>(&'s self, c: &'s Case) -> attn::Options<'s> {
        attn::Options {
            scale: None,
            causal: c.causal,
            window: c.window,
            kernel: c.kernel,
            sequences: match (&self.cu, &c.key_lens) {
                (Some((cq, ck)), _) => Sequences::Packed {
                    cu_seqlens_q: cq,
                    cu_seqlens_k: ck,
                },
                (None, key_lens) => Sequences::Dense {
                    key_lens: key_lens.as_deref(),
                },
            },
        }
    }

    /// The GPU forward (O, LSE) with `fwd`, then the backward with `bwd_fwd` as the forward
    /// options it is told about: dQ, dK, dV read back (f32, memory order of the uploads).
    fn grads(
        &self,
        gpu: &Arc<Gpu>,
        c: &Case,
        fwd: &attn::Options,
        bwd_fwd: &attn::Options,
    ) -> CheckResult<[Vec<f32>; 3]> {
        let (o, lse) = attn::forward(&self.qd, &self.kd, &self.vd, fwd).map_err(err)?;
        // Contiguous outputs shaped like the inputs (BHSD even when the inputs are BSHD).
        let poisoned = |t: &DeviceTensor| gpu.full(t.dtype(), t.shape(), f32::NAN).map_err(err);
        let (mut dq, mut dk, mut dv) = (
            poisoned(&self.qd)?,
            poisoned(&self.kd)?,
            poisoned(&self.vd)?,
        );
        bwd::backward_into(
            gpu,
            &self.qd.view(),
            &self.kd.view(),
            &self.vd.view(),
            &o.view(),
            &lse.view(),
            &self.dod.view(),
            &mut dq.view_mut(),
            &mut dk.view_mut(),
            &mut dv.view_mut(),
            &bwd::Options {
                forward: *bwd_fwd,
                mode: c.mode,
            },
        )
        .map_err(|e| format!("{e} for {c:?}"))?;
        Ok([
            dq.to_f32_vec().map_err(err)?,
            dk.to_f32_vec().map_err(err)?,
            dv.to_f32_vec().map_err(err)?,
        ])
    }
}

/// Dense gradients are read back contiguous (BHSD); the inputs' BHSD values are the reference's.
fn compare_dense(c: &Case, x: &Inputs, got: &[Vec<f32>; 3]) -> CheckResult {
    let s = c.shape;
    let ro = c.ref_opts();
    let want = ref_bwd::backward(&x.q, &x.k, &x.v, &x.d_o, &s, &ro);
    let all = |_: usize, _: usize, _: usize, _: usize| true;
    let tol = tolerances::bounds(&x.q, &x.k, &x.v, &x.d_o, &s, &ro, &all, c.dtype);
    let ctx = |what: &str| format!("{what} for {c:?}");
    expect_close(&ctx("dQ"), &got[0], &want.dq, tol.dq)?;
    expect_close(&ctx("dK"), &got[1], &want.dk, tol.dk)?;
    expect_close(&ctx("dV"), &got[2], &want.dv, tol.dv)
}

/// Packed gradients (THD) against the varlen reference; the bound is the largest of the
/// sequences' bounds (each computed on the sequence gathered to BHSD).
fn compare_packed(c: &Case, x: &Inputs, got: &[Vec<f32>; 3]) -> CheckResult {
    let s = c.shape;
    let (lq, lk) = c.packed.as_ref().expect("packed case");
    let (cq, ck) = (prefix(lq), prefix(lk));
    let ro = reference::Options {
        key_lens: None,
        ..c.ref_opts()
    };
    let (tq, tk) = (cq[s.batch], ck[s.batch]);
    let n = |t: usize, h: usize, d: usize| t * h * d;
    let want = ref_bwd::backward_varlen(
        &x.q[..n(tq, s.heads_q, s.dim_qk)],
        &x.k[..n(tk, s.heads_kv, s.dim_qk)],
        &x.v[..n(tk, s.heads_kv, s.dim_v)],
        &x.d_o[..n(tq, s.heads_q, s.dim_v)],
        &cq,
        &ck,
        s.heads_q,
        s.heads_kv,
        s.dim_qk,
        s.dim_v,
        &ro,
    );
    let gather = |src: &[f32], r0: usize, r1: usize, heads: usize, d: usize| -> Vec<f32> {
        (0..heads)
            .flat_map(|h| (r0..r1).flat_map(move |r| (0..d).map(move |e| (r, h, e))))
            .map(|(r, h, e)| src[(r * heads + h) * d + e])
            .collect()
    };
    let mut tol: Option<tolerances::Tolerances> = None;
    for b in 0..s.batch {
        let shape = Shape::new(1, s.heads_q, s.heads_kv, lq[b], lk[b], s.dim_qk, s.dim_v);
        let all = |_: usize, _: usize, _: usize, _: usize| true;
        let t = tolerances::bounds(
            &gather(&x.q, cq[b], cq[b + 1], s.heads_q, s.dim_qk),
            &gather(&x.k, ck[b], ck[b + 1], s.heads_kv, s.dim_qk),
            &gather(&x.v, ck[b], ck[b + 1], s.heads_kv, s.dim_v),
            &gather(&x.d_o, cq[b], cq[b + 1], s.heads_q, s.dim_v),
            &shape,
            &ro,
            &all,
            c.dtype,
        );
        tol = Some(match tol {
            None => t,
            Some(m) => {
                let wider = |a: crate::tolerance::Tolerance, b: crate::tolerance::Tolerance| {
                    if b.atol > a.atol {
                        b
                    } else {
                        a
                    }
                };
                tolerances::Tolerances {
                    dq: wider(m.dq, t.dq),
                    dk: wider(m.dk, t.dk),
                    dv: wider(m.dv, t.dv),
                }
            }
        });
    }
    let tol = tol.expect("at least one sequence");
    let ctx = |what: &str| format!("{what} for {c:?}");
    expect_close(&ctx("dQ"), &got[0][..want.dq.len()], &want.dq, tol.dq)?;
    expect_close(&ctx("dK"), &got[1][..want.dk.len()], &want.dk, tol.dk)?;
    expect_close(&ctx("dV"), &got[2][..want.dv.len()], &want.dv, tol.dv)
}

/// Runs the case and checks dQ, dK, dV.
pub fn backward(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let x = Inputs::new(gpu, c)?;
    let opts = x.fwd_opts(c);
    let got = x.grads(gpu, c, &opts, &opts)?;
    match c.packed {
        None => compare_dense(c, &x, &got),
        Some(_) => compare_packed(c, &x, &got),
    }
}

/// `runs` backward calls on the same inputs give bit-identical dQ, dK, dV.
pub fn bitwise_repeatable(gpu: &Arc<Gpu>, c: &Case, runs: usize) -> CheckResult {
    let x = Inputs::new(gpu, c)?;
    let opts = x.fwd_opts(c);
    let first = x.grads(gpu, c, &opts, &opts)?;
    for run in 1..runs {
        let again = x.grads(gpu, c, &opts, &opts)?;
        for (name, (a, b)) in ["dQ", "dK", "dV"].iter().zip(first.iter().zip(&again)) {
            if let Some(i) = a
                .iter()
                .zip(b)
                .position(|(x, y)| x.to_bits() != y.to_bits())
            {
                return Err(format!(
                    "{name} differs at element {i} on run {run}: {} vs {} for {c:?}",
                    a[i], b[i]
                ));
            }
        }
    }
    Ok(())
}

/// The forward runs with the case's masks, the backward is told there are none: the
/// comparison must fail (the checks would catch a mask missing from the backward).
pub fn mask_missing_from_the_backward_is_caught(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let x = Inputs::new(gpu, c)?;
    let opts = x.fwd_opts(c);
    let unmasked = attn::Options {
        causal: None,
        window: None,
        ..opts
    };
    let got = x.grads(gpu, c, &opts, &unmasked)?;
    match compare_dense(c, &x, &got) {
        Ok(()) => Err(format!(
            "a backward without the forward's mask passed the comparison for {c:?}"
        )),
        Err(_) => Ok(()),
    }
}

/// The fixed list `cuattn check` runs.
pub fn standard_cases() -> Vec<(String, Case)> {
    let shape = Shape::new;
    let mut out = Vec::new();
    for dt in DType::ALL {
        out.push((
            format!("{dt} 2x4x100x130 d64"),
            Case::dense(dt, shape(2, 4, 4, 100, 130, 64, 64)),
        ));
        out.push((
            format!("{dt} gqa 8/2 causal-br 70x33 d72/40"),
            Case {
                causal: Some(CausalAlign::BottomRight),
                ..Case::dense(dt, shape(1, 8, 2, 70, 33, 72, 40))
            },
        ));
        out.push((
            format!("{dt} causal-tl padded d128"),
            Case {
                causal: Some(CausalAlign::TopLeft),
                key_lens: Some(vec![90, 0]),
                ..Case::dense(dt, shape(2, 2, 1, 64, 96, 128, 128))
            },
        ));
        out.push((
            format!("{dt} gqa 4/2 causal-tl padded d256/192"),
            Case {
                causal: Some(CausalAlign::TopLeft),
                key_lens: Some(vec![100, 33]),
                ..Case::dense(dt, shape(2, 4, 2, 90, 110, 256, 192))
            },
        ));
        out.push((
            format!("{dt} varlen 3 seqs d96 window"),
            Case {
                packed: Some((vec![5, 0, 70], vec![7, 3, 90])),
                window: Some(Window::new(20, 0, CausalAlign::BottomRight)),
                ..Case::dense(dt, shape(3, 2, 1, 0, 0, 96, 96))
            },
        ));
    }
    let exact: Vec<(String, Case)> = out
        .iter()
        .filter(|(_, c)| c.dtype != DType::F32)
        .map(|(name, c)| {
            let case = Case {
                kernel: Kernel::Exact,
                ..c.clone()
            };
            (format!("{name} [exact]"), case)
        })
        .collect();
    let fast: Vec<(String, Case)> = out
        .iter()
        .filter(|(_, c)| c.dtype != DType::F32)
        .map(|(name, c)| {
            let case = Case {
                mode: Mode::Fast,
                ..c.clone()
            };
            (format!("{name} [fast]"), case)
        })
        .collect();
    out.extend(exact);
    out.extend(fast);
    out
}
