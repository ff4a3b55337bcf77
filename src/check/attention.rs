//! Attention forward against [`crate::reference::attention`], under
//! [`crate::tolerance::attention`]. Outputs are poisoned with NaN before each launch.

use super::{expect_close, random_values, CheckResult};
use crate::dtype::{self, DType};
use crate::gpu::{DeviceTensor, Gpu};
use crate::ops::attention::{self as attn, Kernel, Options, Sequences, Window};
use crate::ops::attention_unfused as attn_unfused;
use crate::reference::attention::{self as reference, CausalAlign, Shape};
use crate::tensor::{HostTensor, Layout};
use crate::tolerance::attention as tolerances;
use rand::SeedableRng;
use std::sync::Arc;

/// One randomized attention check.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub shape: Shape,
    pub causal: Option<CausalAlign>,
    /// Sliding window (dense and packed batches).
    pub window: Option<Window>,
    /// Dense batches: valid keys per sequence.
    pub key_lens: Option<Vec<i32>>,
    /// Packed batches: (query lengths, key lengths) per sequence; `shape.batch` must match,
    /// and `shape.len_q`/`len_k` are ignored.
    pub packed: Option<(Vec<usize>, Vec<usize>)>,
    /// Dense batches: lay Q, K, V and O out as BSHD in memory (read through strides).
    pub bshd: bool,
    pub scale: Option<f32>,
    pub kernel: Kernel,
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
            scale: None,
            kernel: Kernel::Auto,
            seed: 0x5eed ^ (shape.len_q * 131 + shape.len_k) as u64,
        }
    }
}

pub(super) fn err(e: crate::Error) -> String {
    e.to_string()
}
/// The device O and LSE against the reference's, each within its bound.
pub(super) fn expect_o_and_lse(
    ctx: &dyn Fn(&str) -> String,
    (o, lse): (&DeviceTensor, &DeviceTensor),
    want: &reference::Output,
    tol: &tolerances::Tolerances,
) -> CheckResult {
    expect_close(&ctx("O"), &o.to_f32_vec().map_err(err)?, &want.o, tol.o)?;
    expect_close(
        &ctx("LSE"),
        &lse.to_f32_vec().map_err(err)?,
        &want.lse,
        tol.lse,
    )
}

/// Sets the K and V rows (BHSD) of key `j` of batch entry `b` to NaN wherever `hidden(b, j)`:
/// keys no query may see, which must never reach the output (pytorch#101967).
pub(super) fn poison_keys(
    k: &mut [f32],
    v: &mut [f32],
    s: &Shape,
    hidden: impl Fn(usize, usize) -> bool,
) {
    for b in 0..s.batch {
        for j in (0..s.len_k).filter(|&j| hidden(b, j)) {
            for h in 0..s.heads_kv {
                let row = (b * s.heads_kv + h) * s.len_k + j;
                k[row * s.dim_qk..(row + 1) * s.dim_qk].fill(f32::NAN);
                v[row * s.dim_v..(row + 1) * s.dim_v].fill(f32::NAN);
            }
        }
    }
}

/// A [B, H, L, D] tensor uploaded as BHSD or, with `bshd`, as BSHD memory seen through strides;
/// `values` are in BHSD order. `fill` everywhere when `values` is `None`.
pub(crate) fn upload_4d(
    gpu: &Arc<Gpu>,
    dtype: DType,
    dims: [usize; 4],
    bshd: bool,
    values: Option<&[f32]>,
    fill: f32,
) -> CheckResult<DeviceTensor> {
    let [b, h, l, d] = dims;
    let n = b * h * l * d;
    let (layout, mut storage) = if bshd {
        (
            Layout::strided("t", &dims, &[l * h * d, d, h * d, 1]).map_err(err)?,
            vec![fill; n],
        )
    } else {
        (Layout::contiguous(&dims), vec![fill; n])
    };
    if let Some(values) = values {
        for bi in 0..b {
            for hi in 0..h {
                for li in 0..l {
                    let src = ((bi * h + hi) * l + li) * d;
                    let dst = if bshd {
                        ((bi * l + li) * h + hi) * d
                    } else {
                        src
                    };
                    storage[dst..dst + d].copy_from_slice(&values[src..src + d]);
                }
            }
        }
    }
    let host =
        HostTensor::from_bytes(dtype, layout, dtype::encode(dtype, &storage)).map_err(err)?;
    gpu.upload(&host).map_err(err)
}

fn upload_flat(
    gpu: &Arc<Gpu>,
    dtype: DType,
    shape: &[usize],
    values: &[f32],
) -> CheckResult<DeviceTensor> {
    gpu.upload(&HostTensor::from_f32(dtype, shape, values).map_err(err)?)
        .map_err(err)
}

/// Runs the case and checks O and LSE.
pub fn forward(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let s = c.shape;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(c.seed);
    let ctx = |what: &str| format!("{what} for {c:?}");
    match &c.packed {
        None => {
            let q = random_values(&mut rng, c.dtype, s.q_len(), 0.0, 2.0);
            let mut k = random_values(&mut rng, c.dtype, s.k_len(), 0.0, 2.0);
            let mut v = random_values(&mut rng, c.dtype, s.v_len(), 0.0, 1.0);
            let key_len = |b: usize| {
                c.key_lens
                    .as_ref()
                    .map_or(s.len_k, |l| l[b].max(0) as usize)
            };
            poison_keys(&mut k, &mut v, &s, |b, j| j >= key_len(b));
            let up = |dims, values: Option<&[f32]>, fill| {
                upload_4d(gpu, c.dtype, dims, c.bshd, values, fill)
            };
            let qd = up([s.batch, s.heads_q, s.len_q, s.dim_qk], Some(&q), 0.0)?;
            let kd = up([s.batch, s.heads_kv, s.len_k, s.dim_qk], Some(&k), 0.0)?;
            let vd = up([s.batch, s.heads_kv, s.len_k, s.dim_v], Some(&v), 0.0)?;
            let mut od = up([s.batch, s.heads_q, s.len_q, s.dim_v], None, f32::NAN)?;
            let mut lse = gpu
                .full(DType::F32, &[s.batch, s.heads_q, s.len_q], f32::NAN)
                .map_err(err)?;
            let opts = Options {
                scale: c.scale,
                causal: c.causal,
                window: c.window,
                kernel: c.kernel,
                sequences: Sequences::Dense {
                    key_lens: c.key_lens.as_deref(),
                },
            };
            attn::forward_into(
                gpu,
                &qd.view(),
                &kd.view(),
                &vd.view(),
                &mut od.view_mut(),
                Some(&mut lse.view_mut()),
                &opts,
            )
            .map_err(|e| ctx(&e.to_string()))?;
            let ropts = reference::Options {
                scale: c.scale.map_or(1.0 / (s.dim_qk as f64).sqrt(), |x| x as f64),
                causal: c.causal,
                key_lens: c
                    .key_lens
                    .as_ref()
                    .map(|l| l.iter().map(|&x| x as usize).collect()),
                window: c.window,
            };
            let want = reference::forward(&q, &k, &v, &s, &ropts).map_err(|e| e.to_string())?;
            let tol = tolerances::bounds(&q, &k, &v, &s, ropts.scale, c.dtype);
            expect_o_and_lse(&ctx, (&od, &lse), &want, &tol)
        }
        Some((lens_q, lens_k)) => {
            let cu = |lens: &[usize]| -> Vec<usize> {
                std::iter::once(0)
                    .chain(lens.iter().scan(0, |acc, &l| {
                        *acc += l;
                        Some(*acc)
                    }))
                    .collect()
            };
            let (cu_q, cu_k) = (cu(lens_q), cu(lens_k));
            let (tq, tk) = (cu_q[s.batch], cu_k[s.batch]);
            let q = random_values(&mut rng, c.dtype, tq * s.heads_q * s.dim_qk, 0.0, 2.0);
            let k = random_values(&mut rng, c.dtype, tk * s.heads_kv * s.dim_qk, 0.0, 2.0);
            let v = random_values(&mut rng, c.dtype, tk * s.heads_kv * s.dim_v, 0.0, 1.0);
            // Packed tensors need at least one row each; empty totals get one unused row.
            let rows = |t: usize| t.max(1);
            let pad = |x: &[f32], w: usize, t: usize| -> Vec<f32> {
                let mut p = x.to_vec();
                p.resize(rows(t) * w, 0.0);
                p
            };
            let qd = upload_flat(
                gpu,
                c.dtype,
                &[rows(tq), s.heads_q, s.dim_qk],
                &pad(&q, s.heads_q * s.dim_qk, tq),
            )?;
            let kd = upload_flat(
                gpu,
                c.dtype,
                &[rows(tk), s.heads_kv, s.dim_qk],
                &pad(&k, s.heads_kv * s.dim_qk, tk),
            )?;
            let vd = upload_flat(
                gpu,
                c.dtype,
                &[rows(tk), s.heads_kv, s.dim_v],
                &pad(&v, s.heads_kv * s.dim_v, tk),
            )?;
            let mut od = gpu
                .full(c.dtype, &[rows(tq), s.heads_q, s.dim_v], f32::NAN)
                .map_err(err)?;
            let mut lse = gpu
                .full(DType::F32, &[s.heads_q, rows(tq)], f32::NAN)
                .map_err(err)?;
            let (cq, ck): (Vec<i32>, Vec<i32>) = (
                cu_q.iter().map(|&x| x as i32).collect(),
                cu_k.iter().map(|&x| x as i32).collect(),
            );
            let opts = Options {
                scale: c.scale,
                causal: c.causal,
                window: c.window,
                kernel: c.kernel,
                sequences: Sequences::Packed {
                    cu_seqlens_q: &cq,
                    cu_seqlens_k: &ck,
                },
            };
            attn::forward_into(
                gpu,
                &qd.view(),
                &kd.view(),
                &vd.view(),
                &mut od.view_mut(),
                Some(&mut lse.view_mut()),
                &opts,
            )
            .map_err(|e| ctx(&e.to_string()))?;
            let ropts = reference::Options {
                scale: c.scale.map_or(1.0 / (s.dim_qk as f64).sqrt(), |x| x as f64),
                causal: c.causal,
                key_lens: None,
                window: c.window,
            };
            let want = reference::forward_varlen(
                &q, &k, &v, &cu_q, &cu_k, s.heads_q, s.heads_kv, s.dim_qk, s.dim_v, &ropts,
            )
            .map_err(|e| e.to_string())?;
            let shape = Shape {
                len_q: lens_q.iter().copied().max().unwrap_or(0),
                len_k: lens_k.iter().copied().max().unwrap_or(0),
                ..s
            };
            let tol = tolerances::bounds(&q, &k, &v, &shape, ropts.scale, c.dtype);
            let o = od.to_f32_vec().map_err(err)?;
            expect_close(&ctx("O"), &o[..tq * s.heads_q * s.dim_v], &want.o, tol.o)?;
            let lse_all = lse.to_f32_vec().map_err(err)?;
            // LSE is [Hq, rows(tq)]: take the first tq of each head.
            let lse_got: Vec<f32> = (0..s.heads_q)
                .flat_map(|h| lse_all[h * rows(tq)..h * rows(tq) + tq].to_vec())
                .collect();
            expect_close(&ctx("LSE"), &lse_got, &want.lse, tol.lse)
        }
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
            format!("{dt} bshd causal-tl padded d128"),
            Case {
                causal: Some(CausalAlign::TopLeft),
                key_lens: Some(vec![90, 0]),
                bshd: true,
                ..Case::dense(dt, shape(2, 2, 1, 64, 96, 128, 128))
            },
        ));
        out.push((
            format!("{dt} varlen 4 seqs d256"),
            Case {
                packed: Some((vec![5, 0, 33, 1], vec![7, 3, 0, 40])),
                causal: Some(CausalAlign::BottomRight),
                ..Case::dense(dt, shape(4, 2, 2, 0, 0, 256, 256))
            },
        ));
    }
    let tensor_core: Vec<(String, Case)> = out
        .iter()
        .filter(|(_, c)| c.dtype != DType::F32)
        .map(|(name, c)| {
            let case = Case {
                kernel: Kernel::TensorCore,
                ..c.clone()
            };
            (format!("{name} [tensor cores]"), case)
        })
        .collect();
    out.extend(tensor_core);
    out
}

/// Dense BHSD Q, K, V of `s` with fresh random values (and NaN-poisoned O, LSE) on the GPU.
struct DenseInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qd: DeviceTensor,
    kd: DeviceTensor,
    vd: DeviceTensor,
}

impl DenseInputs {
    fn new(gpu: &Arc<Gpu>, dtype: DType, s: &Shape, seed: u64) -> CheckResult<DenseInputs> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let q = random_values(&mut rng, dtype, s.q_len(), 0.0, 2.0);
        let k = random_values(&mut rng, dtype, s.k_len(), 0.0, 2.0);
        let v = random_values(&mut rng, dtype, s.v_len(), 0.0, 1.0);
        let up = |dims: [usize; 4], x: &[f32]| upload_4d(gpu, dtype, dims, false, Some(x), 0.0);
        Ok(DenseInputs {
            qd: up([s.batch, s.heads_q, s.len_q, s.dim_qk], &q)?,
            kd: up([s.batch, s.heads_kv, s.len_k, s.dim_qk], &k)?,
            vd: up([s.batch, s.heads_kv, s.len_k, s.dim_v], &v)?,
            q,
            k,
            v,
        })
    }

    /// (O, LSE) from the fused op (`kernel`) or, with `None`, the unfused cuBLAS baseline.
    fn run(
        &self,
        gpu: &Arc<Gpu>,
        dtype: DType,
        s: &Shape,
        causal: Option<CausalAlign>,
        kernel: Option<Kernel>,
    ) -> CheckResult<(Vec<f32>, Vec<f32>)> {
        let mut o = upload_4d(
            gpu,
            dtype,
            [s.batch, s.heads_q, s.len_q, s.dim_v],
            false,
            None,
            f32::NAN,
        )?;
        let mut lse = gpu
            .full(DType::F32, &[s.batch, s.heads_q, s.len_q], f32::NAN)
            .map_err(err)?;
        let opts = Options {
            causal,
            kernel: kernel.unwrap_or_default(),
            ..Options::default()
        };
        let (q, k, v) = (self.qd.view(), self.kd.view(), self.vd.view());
        let (mut ov, mut lv) = (o.view_mut(), lse.view_mut());
        match kernel {
            Some(_) => attn::forward_into(gpu, &q, &k, &v, &mut ov, Some(&mut lv), &opts),
            None => attn_unfused::Unfused::new(gpu)
                .and_then(|mut u| u.forward_into(&q, &k, &v, &mut ov, Some(&mut lv), &opts)),
        }
        .map_err(err)?;
        Ok((o.to_f32_vec().map_err(err)?, lse.to_f32_vec().map_err(err)?))
    }
}

/// The unfused cuBLAS baseline against the f64 reference (dense BHSD, Hq = Hkv).
pub fn unfused(
    gpu: &Arc<Gpu>,
    dtype: DType,
    s: Shape,
    causal: Option<CausalAlign>,
    seed: u64,
) -> CheckResult {
    let ctx = |what: &str| format!("unfused {what} for {dtype} {s:?} {causal:?}");
    let x = DenseInputs::new(gpu, dtype, &s, seed)?;
    let (o, lse) = x.run(gpu, dtype, &s, causal, None)?;
    let ropts = reference::Options {
        scale: 1.0 / (s.dim_qk as f64).sqrt(),
        causal,
        key_lens: None,
        window: None,
    };
    let want = reference::forward(&x.q, &x.k, &x.v, &s, &ropts).map_err(|e| e.to_string())?;
    let tol = tolerances::bounds(&x.q, &x.k, &x.v, &s, ropts.scale, dtype);
    expect_close(&ctx("O"), &o, &want.o, tol.o)?;
    expect_close(&ctx("LSE"), &lse, &want.lse, tol.lse)
}

/// The fused op (`kernel`) against the unfused baseline, at sizes the CPU reference is too slow
/// for. Each side is within the reference bound of the exact result, so they may differ by the
/// sum of the two bounds: twice the bound, by the triangle inequality.
pub fn fused_vs_unfused(
    gpu: &Arc<Gpu>,
    dtype: DType,
    s: Shape,
    causal: Option<CausalAlign>,
    kernel: Kernel,
    seed: u64,
) -> CheckResult {
    let ctx =
        |what: &str| format!("fused ({kernel:?}) vs unfused {what} for {dtype} {s:?} {causal:?}");
    let x = DenseInputs::new(gpu, dtype, &s, seed)?;
    let (o, lse) = x.run(gpu, dtype, &s, causal, Some(kernel))?;
    let (uo, ulse) = x.run(gpu, dtype, &s, causal, None)?;
    let tol = tolerances::bounds(&x.q, &x.k, &x.v, &s, 1.0 / (s.dim_qk as f64).sqrt(), dtype);
    let twice = |t: crate::tolerance::Tolerance| crate::tolerance::Tolerance {
        atol: 2.0 * t.atol,
        rtol: 2.0 * t.rtol,
        rel_norm_bound: 2.0 * t.rel_norm_bound,
        ..t
    };
    let f64s = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    expect_close(&ctx("O"), &o, &f64s(&uo), twice(tol.o))?;
    expect_close(&ctx("LSE"), &lse, &f64s(&ulse), twice(tol.lse))
}
