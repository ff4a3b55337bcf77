//! The training ops on the GPU against their f64 references (`reference::training`): each
//! check makes fresh random inputs, poisons its outputs with NaN, runs the op through its safe
//! wrapper and holds every output to the tolerance rule; the deterministic ops are also run
//! twice and must agree bit for bit.

use super::{expect_close, gpu_err, random_values, read_vec, CheckResult};
use crate::dtype::DType;
use crate::gpu::{DeviceTensor, Gpu};
use crate::ops::training::bias_gelu::{self, BiasGeluOptions, ColumnSumOptions};
use crate::ops::training::cross_entropy::{self, CrossEntropyOptions};
use crate::ops::training::dropout::{self, DropoutOptions};
use crate::ops::training::embedding::{self, EmbeddingBackwardOptions};
use crate::ops::training::optimizer::{self, AdamWOptions, AdamWTensor, ClipOptions};
use crate::reference::training::{self as reference, AdamWConfig, Gelu};
use crate::rng::Dropout;
use crate::tensor::HostTensor;
use crate::tolerance::Tolerance;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn upload(gpu: &Arc<Gpu>, dtype: DType, shape: &[usize], v: &[f32]) -> CheckResult<DeviceTensor> {
    let host = HostTensor::from_f32(dtype, shape, v).map_err(gpu_err)?;
    gpu.upload(&host).map_err(gpu_err)
}

fn poisoned(gpu: &Arc<Gpu>, dtype: DType, shape: &[usize]) -> CheckResult<DeviceTensor> {
    gpu.full(dtype, shape, f32::NAN).map_err(gpu_err)
}

fn bits(t: &DeviceTensor) -> CheckResult<Vec<u8>> {
    Ok(t.to_host().map_err(gpu_err)?.bytes().to_vec())
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// Bias + GELU forward, the fused backward (dx and dbias in `dbias_dtype`), bitwise repeat.
pub fn bias_gelu(
    gpu: &Arc<Gpu>,
    dtype: DType,
    dbias_dtype: DType,
    (rows, cols): (usize, usize),
    gelu: Gelu,
    with_bias: bool,
    seed: u64,
) -> CheckResult {
    let ctx = |w: &str| format!("bias_gelu {dtype} {rows}x{cols} {gelu:?} bias={with_bias}: {w}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let x = random_values(&mut rng, dtype, rows * cols, 0.0, 4.0);
    let b = random_values(&mut rng, dtype, cols, 0.0, 1.0);
    let dy = random_values(&mut rng, dtype, rows * cols, 0.0, 1.0);
    let bias = with_bias.then_some(b.as_slice());
    let (xd, bd, dyd) = (
        upload(gpu, dtype, &[rows, cols], &x)?,
        upload(gpu, dtype, &[cols], &b)?,
        upload(gpu, dtype, &[rows, cols], &dy)?,
    );
    let opts = BiasGeluOptions {
        gelu,
        accumulate_dbias: false,
    };
    let mut y = poisoned(gpu, dtype, &[rows, cols])?;
    let bview = bd.view();
    bias_gelu::bias_gelu_forward_into(
        gpu,
        &opts,
        &xd.view(),
        with_bias.then_some(&bview),
        &mut y.view_mut(),
    )
    .map_err(gpu_err)?;
    let want_y = reference::bias_gelu_forward(&x, bias, cols, gelu);
    expect_close(
        &ctx("y"),
        &read_vec(&y)?,
        &want_y,
        Tolerance::for_output(dtype, 16, max_abs(&want_y)),
    )?;
    let (want_dx, want_db) = reference::bias_gelu_backward(&dy, &x, bias, cols, gelu);
    let mut first = None;
    for _ in 0..2 {
        let mut dx = poisoned(gpu, dtype, &[rows, cols])?;
        let mut db = poisoned(gpu, dbias_dtype, &[cols])?;
        bias_gelu::bias_gelu_backward_into(
            gpu,
            &opts,
            &dyd.view(),
            &xd.view(),
            with_bias.then_some(&bview),
            &mut dx.view_mut(),
            &mut db.view_mut(),
        )
        .map_err(gpu_err)?;
        expect_close(
            &ctx("dx"),
            &read_vec(&dx)?,
            &want_dx,
            Tolerance::for_output(dtype, 16, max_abs(&want_dx)),
        )?;
        expect_close(
            &ctx("dbias"),
            &read_vec(&db)?,
            &want_db,
            Tolerance::for_output(dbias_dtype, rows, rows as f64 * 1.2),
        )?;
        let got = bits(&db)?;
        if first.get_or_insert_with(|| got.clone()) != &got {
            return Err(ctx("dbias differs between two identical runs"));
        }
    }
    Ok(())
}

/// Column sums into `out_dtype`, overwrite then accumulate (the sum doubled).
pub fn column_sums(
    gpu: &Arc<Gpu>,
    dtype: DType,
    out_dtype: DType,
    (rows, cols): (usize, usize),
    seed: u64,
) -> CheckResult {
    let ctx = |w: &str| format!("column_sums {dtype}->{out_dtype} {rows}x{cols}: {w}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let v = random_values(&mut rng, dtype, rows * cols, 0.0, 1.0);
    let vd = upload(gpu, dtype, &[rows, cols], &v)?;
    let mut out = poisoned(gpu, out_dtype, &[cols])?;
    let want = reference::column_sums(&v, cols);
    let tol = Tolerance::for_output(out_dtype, rows, rows as f64);
    bias_gelu::column_sums_into(
        gpu,
        &ColumnSumOptions::default(),
        &vd.view(),
        &mut out.view_mut(),
    )
    .map_err(gpu_err)?;
    let once = read_vec(&out)?;
    expect_close(&ctx("sums"), &once, &want, tol)?;
    bias_gelu::column_sums_into(
        gpu,
        &ColumnSumOptions { accumulate: true },
        &vd.view(),
        &mut out.view_mut(),
    )
    .map_err(gpu_err)?;
    // The second pass adds the same sums to the stored (rounded) first result.
    let want2: Vec<f64> = once
        .iter()
        .zip(&want)
        .map(|(&a, &s)| a as f64 + s)
        .collect();
    expect_close(
        &ctx("accumulated"),
        &read_vec(&out)?,
        &want2,
        Tolerance::for_output(out_dtype, rows, 2.0 * rows as f64),
    )
}

/// Cross-entropy loss and gradient (separate buffer or in place), some rows ignored.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    gpu: &Arc<Gpu>,
    dtype: DType,
    (rows, classes): (usize, usize),
    smoothing: f32,
    ignore_every: usize,
    in_place: bool,
    seed: u64,
) -> CheckResult {
    let ctx = |w: &str| {
        format!("cross_entropy {dtype} {rows}x{classes} ε={smoothing} in_place={in_place}: {w}")
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let logits = random_values(&mut rng, dtype, rows * classes, 0.0, 6.0);
    let opts = CrossEntropyOptions {
        label_smoothing: smoothing,
        grad_scale: 1.0,
        ..CrossEntropyOptions::default()
    };
    let labels: Vec<i32> = (0..rows)
        .map(|r| {
            if ignore_every > 0 && r % ignore_every == 1 {
                opts.ignore_index
            } else {
                rng.gen_range(0..classes as i32)
            }
        })
        .collect();
    let (want_loss, want_d) = reference::cross_entropy(
        &logits,
        classes,
        &labels,
        opts.ignore_index,
        smoothing as f64,
    );
    let mut ld = upload(gpu, dtype, &[rows, classes], &logits)?;
    let (loss, d) = if in_place {
        let loss = cross_entropy::cross_entropy_in_place(gpu, &opts, &mut ld.view_mut(), &labels)
            .map_err(gpu_err)?;
        (loss, read_vec(&ld)?)
    } else {
        let mut dd = poisoned(gpu, dtype, &[rows, classes])?;
        let loss = cross_entropy::cross_entropy_into(
            gpu,
            &opts,
            &ld.view(),
            &labels,
            Some(&mut dd.view_mut()),
        )
        .map_err(gpu_err)?;
        (loss, read_vec(&dd)?)
    };
    let valid = loss.valid_rows.max(1) as f64;
    let n = classes + rows;
    expect_close(
        &ctx("loss"),
        &read_vec(&loss.loss)?,
        &[want_loss],
        Tolerance::for_output(DType::F32, n, 14.0 + (classes as f64).ln()),
    )?;
    expect_close(
        &ctx("dlogits"),
        &d,
        &want_d,
        Tolerance::for_output(dtype, n, 7.0 / valid),
    )
}

/// Embedding backward into an f32 or same-dtype table; overwrite and accumulate; repeat.
pub fn embedding_backward(
    gpu: &Arc<Gpu>,
    dtype: DType,
    table_dtype: DType,
    (tokens, width, vocab): (usize, usize, usize),
    seed: u64,
) -> CheckResult {
    let ctx = |w: &str| {
        format!("embedding_bwd {dtype}->{table_dtype} {tokens}x{width} vocab {vocab}: {w}")
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let dy = random_values(&mut rng, dtype, tokens * width, 0.0, 1.0);
    // A skewed id distribution: many repeats of a few rows (as padding and common tokens).
    let ids: Vec<u32> = (0..tokens)
        .map(|_| {
            if rng.gen_bool(0.3) {
                rng.gen_range(0..3.min(vocab) as u32)
            } else {
                rng.gen_range(0..vocab as u32)
            }
        })
        .collect();
    let want = reference::embedding_backward(&dy, width, &ids, vocab);
    let dyd = upload(gpu, dtype, &[tokens, width], &dy)?;
    let mut first = None;
    let tol = Tolerance::for_output(table_dtype, tokens, tokens as f64);
    for _ in 0..2 {
        let mut table = poisoned(gpu, table_dtype, &[vocab, width])?;
        embedding::embedding_backward_into(
            gpu,
            &EmbeddingBackwardOptions::default(),
            &dyd.view(),
            &ids,
            &mut table.view_mut(),
        )
        .map_err(gpu_err)?;
        expect_close(&ctx("dtable"), &read_vec(&table)?, &want, tol)?;
        let got = bits(&table)?;
        if first.get_or_insert_with(|| got.clone()) != &got {
            return Err(ctx("dtable differs between two identical runs"));
        }
    }
    let mut table = upload(gpu, table_dtype, &[vocab, width], &vec![1.0; vocab * width])?;
    embedding::embedding_backward_into(
        gpu,
        &EmbeddingBackwardOptions { accumulate: true },
        &dyd.view(),
        &ids,
        &mut table.view_mut(),
    )
    .map_err(gpu_err)?;
    let want1: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
    expect_close(&ctx("accumulated"), &read_vec(&table)?, &want1, tol)
}

/// `steps` AdamW steps over tensors of `numels` (odd sizes, chunk edges, some misaligned so
/// they take the scalar path) with `grad_dtype` gradients and `model_dtype` copies.
pub fn adamw(
    gpu: &Arc<Gpu>,
    grad_dtype: DType,
    model_dtype: DType,
    numels: &[usize],
    steps: u32,
    seed: u64,
) -> CheckResult {
    let ctx = |w: &str| format!("adamw grads {grad_dtype} model {model_dtype} {numels:?}: {w}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let opts = AdamWOptions {
        lr: 3e-3,
        weight_decay: 0.05,
        ..AdamWOptions::default()
    };
    let cfg = AdamWConfig {
        lr: opts.lr as f64,
        beta1: opts.beta1 as f64,
        beta2: opts.beta2 as f64,
        eps: opts.eps as f64,
        weight_decay: opts.weight_decay as f64,
    };
    // One buffer per role, tensors packed with a 1-element gap (odd offsets break alignment).
    let total: usize = numels.iter().map(|n| n + 1).sum();
    let offsets: Vec<usize> = numels
        .iter()
        .scan(0, |o, &n| {
            let at = *o;
            *o += n + 1;
            Some(at)
        })
        .collect();
    let p0 = random_values(&mut rng, DType::F32, total, 0.0, 1.0);
    let mut param = upload(gpu, DType::F32, &[total], &p0)?;
    let mut m = upload(gpu, DType::F32, &[total], &vec![0.0; total])?;
    let mut v = upload(gpu, DType::F32, &[total], &vec![0.0; total])?;
    let mut model = poisoned(gpu, model_dtype, &[total])?;
    let mut want_p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut want_m, mut want_v) = (vec![0.0; total], vec![0.0; total]);
    let scale = upload(gpu, DType::F32, &[1], &[0.5])?;
    for step in 1..=steps {
        let g = random_values(&mut rng, grad_dtype, total, 0.0, 2.0);
        let gd = upload(gpu, grad_dtype, &[total], &g)?;
        let use_scale = step == 2;
        let gs = if use_scale { 0.5 } else { 1.0 };
        for (k, (&at, &n)) in offsets.iter().zip(numels).enumerate() {
            let gk: Vec<f64> = g[at..at + n].iter().map(|&x| x as f64 * gs).collect();
            reference::adamw_step(
                &cfg,
                step,
                k % 2 == 0,
                &mut want_p[at..at + n],
                &gk,
                &mut want_m[at..at + n],
                &mut want_v[at..at + n],
            );
        }
        let layout = |n: usize| crate::tensor::Layout::contiguous(&[n]);
        // Views per tensor: each role's buffer split at the offsets.
        let mut tensors = Vec::new();
        let (pp, mp, vp, mdp) = (
            param.view_mut().device_ptr(),
            m.view_mut().device_ptr(),
            v.view_mut().device_ptr(),
            model.view_mut().device_ptr(),
        );
        let gp = gd.view().device_ptr();
        let ctx = gpu.context_id();
        for (k, (&at, &n)) in offsets.iter().zip(numels).enumerate() {
            let f32b = |base: u64| base + (at * 4) as u64;
            let hb = |base: u64, dt: DType| base + (at * dt.size_bytes()) as u64;
            // SAFETY: each view addresses n elements at offset `at` of a buffer of `total`
            // elements that outlives this step; views of different tensors are disjoint.
            unsafe {
                tensors.push(AdamWTensor {
                    param: crate::gpu::TensorMut::from_raw(
                        ctx,
                        f32b(pp),
                        n * 4,
                        DType::F32,
                        layout(n),
                    ),
                    grad: crate::gpu::TensorRef::from_raw(
                        ctx,
                        hb(gp, grad_dtype),
                        n * grad_dtype.size_bytes(),
                        grad_dtype,
                        layout(n),
                    ),
                    exp_avg: crate::gpu::TensorMut::from_raw(
                        ctx,
                        f32b(mp),
                        n * 4,
                        DType::F32,
                        layout(n),
                    ),
                    exp_avg_sq: crate::gpu::TensorMut::from_raw(
                        ctx,
                        f32b(vp),
                        n * 4,
                        DType::F32,
                        layout(n),
                    ),
                    model: Some(crate::gpu::TensorMut::from_raw(
                        ctx,
                        hb(mdp, model_dtype),
                        n * model_dtype.size_bytes(),
                        model_dtype,
                        layout(n),
                    )),
                    weight_decay: k % 2 == 0,
                });
            }
        }
        let sv = scale.view();
        optimizer::adamw_step(gpu, &opts, step, &mut tensors, use_scale.then_some(&sv))
            .map_err(gpu_err)?;
    }
    // Gaps between tensors: untouched (0 in param's neighbours would show as a mismatch).
    let keep = |all: Vec<f32>| -> Vec<f32> {
        offsets
            .iter()
            .zip(numels)
            .flat_map(|(&at, &n)| all[at..at + n].to_vec())
            .collect()
    };
    let keep64 = |all: &[f64]| -> Vec<f64> {
        offsets
            .iter()
            .zip(numels)
            .flat_map(|(&at, &n)| all[at..at + n].to_vec())
            .collect()
    };
    let model_all = read_vec(&model)?;
    for (&at, &n) in offsets.iter().zip(numels) {
        if !model_all[at + n].is_nan() {
            return Err(ctx("the model copy was written between tensors"));
        }
    }
    expect_close(
        &ctx("param"),
        &keep(read_vec(&param)?),
        &keep64(&want_p),
        Tolerance::for_output(DType::F32, 16, 1.1),
    )?;
    expect_close(
        &ctx("exp_avg"),
        &keep(read_vec(&m)?),
        &keep64(&want_m),
        Tolerance::for_output(DType::F32, 16, 2.0),
    )?;
    expect_close(
        &ctx("exp_avg_sq"),
        &keep(read_vec(&v)?),
        &keep64(&want_v),
        Tolerance::for_output(DType::F32, 16, 4.0),
    )?;
    expect_close(
        &ctx("model"),
        &keep(model_all),
        &keep64(&want_p),
        Tolerance::for_output(model_dtype, 16, 1.1),
    )
}

/// Global norm and clipping over tensors of `numels`; the clipped gradients and the norm.
pub fn clip_grad_norm(
    gpu: &Arc<Gpu>,
    dtype: DType,
    numels: &[usize],
    max_norm: f32,
    seed: u64,
) -> CheckResult {
    let ctx = |w: &str| format!("clip_grad_norm {dtype} {numels:?} max {max_norm}: {w}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let grads: Vec<Vec<f32>> = numels
        .iter()
        .map(|&n| random_values(&mut rng, dtype, n, 0.0, 1.0))
        .collect();
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let norm = reference::global_norm(&refs);
    let coef = reference::clip_coefficient(norm, max_norm as f64);
    let total: usize = numels.iter().sum();
    let mut dev: Vec<DeviceTensor> = grads
        .iter()
        .map(|g| upload(gpu, dtype, &[g.len()], g))
        .collect::<CheckResult<_>>()?;
    let views: Vec<_> = dev.iter().map(|d| d.view()).collect();
    let only_norm = optimizer::grad_norm(gpu, &views, max_norm).map_err(gpu_err)?;
    drop(views);
    // [norm, coefficient]: the norm's scale is itself, the coefficient's at most 1.
    let expect_norm = |what: &str, got: Vec<f32>| -> CheckResult {
        expect_close(
            &ctx(what),
            &got[..1],
            &[norm],
            Tolerance::for_output(DType::F32, total, norm),
        )?;
        expect_close(
            &ctx(what),
            &got[1..],
            &[coef],
            Tolerance::for_output(DType::F32, total, 1.0),
        )
    };
    expect_norm("grad_norm", read_vec(&only_norm)?)?;
    let mut views: Vec<_> = dev.iter_mut().map(|d| d.view_mut()).collect();
    let out =
        optimizer::clip_grad_norm(gpu, &ClipOptions { max_norm }, &mut views).map_err(gpu_err)?;
    drop(views);
    expect_norm("clip_grad_norm", read_vec(&out)?)?;
    for (k, (d, g)) in dev.iter().zip(&grads).enumerate() {
        let want: Vec<f64> = g.iter().map(|&x| x as f64 * coef).collect();
        expect_close(
            &ctx(&format!("clipped tensor {k}")),
            &read_vec(d)?,
            &want,
            Tolerance::for_output(dtype, 4, 1.0),
        )?;
    }
    Ok(())
}

/// Dropout forward and backward: the mask is the CPU's (`rng::Dropout`) exactly, kept values
/// are x/(1 − p) (bit for bit in f32), the backward regenerates the same mask.
pub fn dropout(gpu: &Arc<Gpu>, dtype: DType, n: usize, p: f32, seed: u64) -> CheckResult {
    let ctx = |w: &str| format!("dropout {dtype} n={n} p={p}: {w}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let x = random_values(&mut rng, dtype, n, 0.0, 3.0);
    let dy = random_values(&mut rng, dtype, n, 0.0, 3.0);
    let d = Dropout::new(p).map_err(gpu_err)?;
    let opts = DropoutOptions {
        p,
        seed: rng.gen(),
        offset: rng.gen(),
    };
    let run = |input: &[f32]| -> CheckResult<Vec<f32>> {
        let xd = upload(gpu, dtype, &[n], input)?;
        let mut y = poisoned(gpu, dtype, &[n])?;
        dropout::dropout_into(gpu, &opts, &xd.view(), &mut y.view_mut()).map_err(gpu_err)?;
        read_vec(&y)
    };
    let (y, dx) = (run(&x)?, run(&dy)?);
    for (what, input, out) in [("y", &x, &y), ("dx", &dy, &dx)] {
        let mut cpu = vec![f32::NAN; n];
        d.apply(opts.seed, opts.offset, 0, input, &mut cpu);
        for (i, (&g, &c)) in out.iter().zip(&cpu).enumerate() {
            let want = dtype.round(c);
            if g.to_bits() != want.to_bits() {
                return Err(ctx(&format!(
                    "{what}[{i}] = {g}, the CPU mask and scale give {want} (x = {})",
                    input[i]
                )));
            }
        }
        let want = reference::dropout(input, &d, opts.seed, opts.offset);
        expect_close(&ctx(what), out, &want, Tolerance::for_output(dtype, 1, 1.0))?;
    }
    Ok(())
}

type Check = Box<dyn Fn(&Arc<Gpu>) -> CheckResult>;

/// The fixed list `cuattn check` runs.
pub fn standard_cases() -> Vec<(String, Check)> {
    let mut out: Vec<(String, Check)> = Vec::new();
    for dt in DType::ALL {
        for (gelu, shape) in [(Gelu::Erf, (64, 768)), (Gelu::Tanh, (33, 3072 + 5))] {
            out.push((
                format!("bias_gelu {dt} {gelu:?} {}x{}", shape.0, shape.1),
                Box::new(move |g: &Arc<Gpu>| bias_gelu(g, dt, DType::F32, shape, gelu, true, 1)),
            ));
        }
        out.push((
            format!("column_sums {dt} 4097x770"),
            Box::new(move |g: &Arc<Gpu>| column_sums(g, dt, dt, (4097, 770), 2)),
        ));
        out.push((
            format!("cross_entropy {dt} 37x50257 ε=0.1"),
            Box::new(move |g: &Arc<Gpu>| cross_entropy(g, dt, (37, 50257), 0.1, 5, true, 3)),
        ));
        out.push((
            format!("embedding_bwd {dt} 512x768"),
            Box::new(move |g: &Arc<Gpu>| {
                embedding_backward(g, dt, DType::F32, (512, 768, 30522), 4)
            }),
        ));
        out.push((
            format!("clip_grad_norm {dt}"),
            Box::new(move |g: &Arc<Gpu>| clip_grad_norm(g, dt, &[768, 70_001, 3], 1.0, 5)),
        ));
        out.push((
            format!("dropout {dt} p=0.1"),
            Box::new(move |g: &Arc<Gpu>| dropout(g, dt, 100_003, 0.1, 6)),
        ));
    }
    for (gd, md) in [
        (DType::F32, DType::BF16),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
    ] {
        out.push((
            format!("adamw grads {gd} model {md}"),
            Box::new(move |g: &Arc<Gpu>| adamw(g, gd, md, &[5, 65536 + 3, 1000, 131072], 3, 7)),
        ));
    }
    out
}
