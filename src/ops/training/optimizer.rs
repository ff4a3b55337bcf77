//! Multi-tensor optimizer ops: AdamW over every parameter in one launch, the global gradient
//! L2 norm (two deterministic stages) and clipping by it (PyTorch's `clip_grad_norm_`).
//!
//! Each call uploads a small table of tensor pointers and sizes and a chunk table (one entry
//! per 64 Ki elements); one block per chunk. All tensors of a call share one gradient dtype.

use super::{by_dtype, kernel};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_adamw_params, cuattn_mt_chunk, cuattn_mt_reduce_params, cuattn_mt_tensor,
    cuattn_sum_params,
};
use crate::ops::launch;
use crate::ops::validate::{self, ViewInfo};
use crate::training::{mt_chunks, Chunk, MT_THREADS};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::sync::Arc;

/// AdamW hyper-parameters (PyTorch's names; defaults as `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWOptions {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled decay, applied to the tensors whose `weight_decay` flag is set.
    pub weight_decay: f32,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        AdamWOptions {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One parameter tensor: its f32 master weights and optimizer state, its gradient, and the
/// optional low-precision copy the model computes with (written in the same pass).
#[derive(Debug)]
pub struct AdamWTensor<'a> {
    pub param: TensorMut<'a>,
    pub grad: TensorRef<'a>,
    pub exp_avg: TensorMut<'a>,
    pub exp_avg_sq: TensorMut<'a>,
    /// f16 or bf16 (one dtype for all tensors of a call), same element count.
    pub model: Option<TensorMut<'a>>,
    /// Whether weight decay applies (PyTorch users exclude biases and LayerNorm weights).
    pub weight_decay: bool,
}

/// Options of [`clip_grad_norm`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipOptions {
    /// Gradients are scaled by min(1, max_norm / (norm + 1e-6)).
    pub max_norm: f32,
}

/// A contiguous non-empty view of `dtype` with `numel` elements; its byte range.
fn flat(v: &ViewInfo, dtype: DType, numel: usize) -> Result<(u64, u64)> {
    validate::dtype(v, dtype)?;
    validate::vector(v, numel, "the parameter's element count")?;
    Ok((v.ptr, v.ptr + (numel * dtype.size_bytes()) as u64))
}

/// No two of the ranges overlap (a race between blocks otherwise).
fn disjoint(mut ranges: Vec<(u64, u64, &'static str)>) -> Result<()> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::layout(
                w[1].2,
                format!("overlaps a `{}` of another slot or tensor", w[0].2),
            ));
        }
    }
    Ok(())
}

/// Whether a pointer is aligned to 4 elements of `dtype` (the kernels' vector accesses).
fn aligned4(ptr: u64, dtype: DType) -> bool {
    ptr.is_multiple_of(4 * dtype.size_bytes() as u64)
}

struct Tables {
    tensors: CudaSlice<cuattn_mt_tensor>,
    chunks: CudaSlice<cuattn_mt_chunk>,
    num_chunks: usize,
}

fn upload_tables(gpu: &Gpu, table: &[cuattn_mt_tensor]) -> Result<Option<Tables>> {
    let numels: Vec<usize> = table.iter().map(|t| t.numel as usize).collect();
    let chunks: Vec<cuattn_mt_chunk> = mt_chunks(&numels)?
        .into_iter()
        .map(|Chunk { tensor, index }| cuattn_mt_chunk { tensor, index })
        .collect();
    if chunks.is_empty() {
        return Ok(None);
    }
    let err = |e| Error::driver("copy the tensor table to the device", e);
    Ok(Some(Tables {
        tensors: gpu.stream().clone_htod(table).map_err(err)?,
        chunks: gpu.stream().clone_htod(&chunks).map_err(err)?,
        num_chunks: chunks.len(),
    }))
}

/// One AdamW step (`step` counts from 1) over all `tensors` in one launch. Master weights,
/// moments: f32; gradients: f32, f16 or bf16 (one dtype for all); model copies: f16 or bf16.
/// `grad_scale`, a `[1]` f32 device tensor, multiplies every gradient first (e.g. the clip
/// coefficient of [`grad_norm`], without a separate scaling pass).
pub fn adamw_step(
    gpu: &Gpu,
    opts: &AdamWOptions,
    step: u32,
    tensors: &mut [AdamWTensor<'_>],
    grad_scale: Option<&TensorRef>,
) -> Result<()> {
    for t in tensors.iter() {
        gpu.check_contexts(
            [
                ("param", t.param.ctx),
                ("grad", t.grad.ctx),
                ("exp_avg", t.exp_avg.ctx),
                ("exp_avg_sq", t.exp_avg_sq.ctx),
            ]
            .into_iter()
            .chain(t.model.as_ref().map(|m| ("model", m.ctx))),
        )?;
    }
    if let Some(s) = grad_scale {
        gpu.check_context("grad_scale", s.ctx)?;
    }
    if step == 0 {
        return Err(Error::invalid("step", "AdamW steps count from 1"));
    }
    for (name, v) in [
        ("lr", opts.lr),
        ("eps", opts.eps),
        ("weight_decay", opts.weight_decay),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::invalid(
                name,
                format!("must be finite and ≥ 0, got {v}"),
            ));
        }
    }
    for (name, v) in [("beta1", opts.beta1), ("beta2", opts.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::invalid(name, format!("must be in [0, 1), got {v}")));
        }
    }
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    let grad_dtype = first.grad.dtype;
    let model_dtype = tensors
        .iter()
        .find_map(|t| t.model.as_ref().map(|m| m.dtype))
        .unwrap_or(DType::F16);
    if model_dtype == DType::F32 {
        return Err(Error::DType {
            arg: "model",
            expected: DType::F16,
            got: DType::F32,
        });
    }
    let scale_ptr = match grad_scale {
        Some(s) => {
            let info = s.info("grad_scale");
            validate::dtype(&info, DType::F32)?;
            validate::vector(&info, 1, "one scale")?;
            s.ptr
        }
        None => 0,
    };
    let mut ranges = Vec::new();
    let mut table = Vec::with_capacity(tensors.len());
    for t in tensors.iter() {
        let numel = t.param.layout.numel();
        if numel == 0 {
            continue;
        }
        let p = flat(&t.param.info("param"), DType::F32, numel)?;
        let g = flat(&t.grad.info("grad"), grad_dtype, numel)?;
        let m = flat(&t.exp_avg.info("exp_avg"), DType::F32, numel)?;
        let v = flat(&t.exp_avg_sq.info("exp_avg_sq"), DType::F32, numel)?;
        ranges.extend([
            (p.0, p.1, "param"),
            (g.0, g.1, "grad"),
            (m.0, m.1, "exp_avg"),
        ]);
        ranges.push((v.0, v.1, "exp_avg_sq"));
        let model = match &t.model {
            Some(mv) => {
                let r = flat(&mv.info("model"), model_dtype, numel)?;
                ranges.push((r.0, r.1, "model"));
                r.0
            }
            None => 0,
        };
        let vectorized = [p.0, m.0, v.0].iter().all(|&a| aligned4(a, DType::F32))
            && aligned4(g.0, grad_dtype)
            && aligned4(model, model_dtype);
        table.push(cuattn_mt_tensor {
            param: p.0,
            grad: g.0,
            exp_avg: m.0,
            exp_avg_sq: v.0,
            model,
            numel: numel as i64,
            weight_decay: t.weight_decay as i32,
            vectorized: vectorized as i32,
        });
    }
    disjoint(ranges)?;
    let Some(tables) = upload_tables(gpu, &table)? else {
        return Ok(());
    };
    let stream = gpu.stream();
    let p = cuattn_adamw_params {
        tensors: tables.tensors.device_ptr(stream).0,
        chunks: tables.chunks.device_ptr(stream).0,
        grad_scale: scale_ptr,
        num_chunks: tables.num_chunks as i32,
        lr: opts.lr,
        beta1: opts.beta1,
        beta2: opts.beta2,
        eps: opts.eps,
        weight_decay: opts.weight_decay,
        bias_correction1: (1.0 - (opts.beta1 as f64).powi(step as i32)) as f32,
        bias_correction2_sqrt: (1.0 - (opts.beta2 as f64).powi(step as i32)).sqrt() as f32,
    };
    let name = match (grad_dtype, model_dtype) {
        (DType::F32, DType::BF16) => "adamw_f32_bf16",
        (DType::F16, DType::BF16) => "adamw_f16_bf16",
        (DType::BF16, DType::BF16) => "adamw_bf16_bf16",
        (DType::F32, _) => "adamw_f32_f16",
        (DType::F16, _) => "adamw_f16_f16",
        (DType::BF16, _) => "adamw_bf16_f16",
    };
    let k = kernel(gpu, name)?;
    // SAFETY: every table entry's pointers are contiguous views of `numel` elements of their
    // dtype inside their memory, pairwise disjoint across all tensors (checked above), so each
    // element has one owning thread; `vectorized` only where all of a tensor's pointers are
    // 4-element aligned; the chunk table comes from `mt_chunks` over the same numels; the
    // uploaded tables are freed in stream order after the kernel; grad_scale is one f32.
    unsafe {
        launch(
            gpu,
            &k,
            &p,
            (tables.num_chunks as u32, 1),
            (MT_THREADS as u32, 1),
            0,
        )
    }
}

fn grad_table(grads: &[(u64, &ViewInfo)]) -> Result<(DType, Vec<cuattn_mt_tensor>)> {
    let dtype = grads.first().map_or(DType::F32, |g| g.1.dtype);
    let mut ranges = Vec::new();
    let mut table = Vec::new();
    for (ptr, info) in grads {
        let numel = info.layout.numel();
        if numel == 0 {
            continue;
        }
        let r = flat(info, dtype, numel)?;
        ranges.push((r.0, r.1, "grad"));
        table.push(cuattn_mt_tensor {
            grad: *ptr,
            numel: numel as i64,
            vectorized: aligned4(*ptr, dtype) as i32,
            ..Default::default()
        });
    }
    disjoint(ranges)?;
    Ok((dtype, table))
}

/// Scratch bytes [`grad_norm`] and [`clip_grad_norm`] take from the Gpu's workspace for
/// gradients of `numels` elements.
pub fn grad_norm_workspace_bytes(numels: &[usize]) -> Result<usize> {
    crate::training::grad_norm_workspace_bytes(numels)
}

/// Queues the norm of the gradients in `table` into `out` ([2] f32: norm, min(1, max_norm /
/// (norm + 1e-6))); returns the uploaded tables for a following scale pass.
fn norm_into(
    gpu: &Gpu,
    dtype: DType,
    table: &[cuattn_mt_tensor],
    max_norm: f32,
    out: u64,
) -> Result<Option<Tables>> {
    let sum = kernel(gpu, "sum_f32")?;
    let Some(tables) = upload_tables(gpu, table)? else {
        // No elements: norm 0, coefficient min(1, max_norm / 1e-6).
        let p = cuattn_sum_params {
            values: 0,
            out,
            n: 0,
            scale: 1.0,
            max_norm,
            finish_norm: 1,
        };
        // SAFETY: n = 0 reads nothing; out holds two f32.
        unsafe { launch(gpu, &sum, &p, (1, 1), (32, 1), 0)? };
        return Ok(None);
    };
    let stream = gpu.stream();
    let partials = kernel(
        gpu,
        by_dtype(
            dtype,
            [
                "grad_norm_partials_f32",
                "grad_norm_partials_f16",
                "grad_norm_partials_bf16",
            ],
        ),
    )?;
    gpu.with_workspace(tables.num_chunks * 4, |ws| {
        let p1 = cuattn_mt_reduce_params {
            tensors: tables.tensors.device_ptr(stream).0,
            chunks: tables.chunks.device_ptr(stream).0,
            partials: ws,
            coef: 0,
            num_chunks: tables.num_chunks as i32,
        };
        let p2 = cuattn_sum_params {
            values: ws,
            out,
            n: tables.num_chunks as i64,
            scale: 1.0,
            max_norm,
            finish_norm: 1,
        };
        // SAFETY: the table's gradients are disjoint contiguous views of their numel elements
        // (checked by `grad_table`); the workspace holds one f32 per chunk, each written by
        // its block before `sum_f32` reads them in stream order; out holds two f32.
        unsafe {
            launch(
                gpu,
                &partials,
                &p1,
                (tables.num_chunks as u32, 1),
                (MT_THREADS as u32, 1),
                0,
            )?;
            launch(gpu, &sum, &p2, (1, 1), (1024, 1), 0)
        }
    })?;
    Ok(Some(tables))
}

fn check_max_norm(max_norm: f32) -> Result<()> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::invalid(
            "max_norm",
            format!("must be finite and > 0, got {max_norm}"),
        ));
    }
    Ok(())
}

/// The global L2 norm of all `grads` (one dtype; each contiguous) in two deterministic stages,
/// as a `[2]` f32 device tensor: [norm, min(1, max_norm / (norm + 1e-6))] — the second entry
/// is the clip coefficient [`adamw_step`] can take as its `grad_scale`.
pub fn grad_norm(gpu: &Arc<Gpu>, grads: &[TensorRef], max_norm: f32) -> Result<DeviceTensor> {
    check_max_norm(max_norm)?;
    gpu.check_contexts(grads.iter().map(|g| ("grads", g.ctx)))?;
    let infos: Vec<_> = grads.iter().map(|g| g.info("grads")).collect();
    let pairs: Vec<(u64, &ViewInfo)> = grads.iter().map(|g| g.ptr).zip(&infos).collect();
    let (dtype, table) = grad_table(&pairs)?;
    let out = gpu.full(DType::F32, &[2], f32::NAN)?;
    norm_into(gpu, dtype, &table, max_norm, out.view().device_ptr())?;
    Ok(out)
}

/// PyTorch's `clip_grad_norm_`: computes the global norm of `grads` and scales them in place
/// by min(1, max_norm / (norm + 1e-6)) (NaN norms propagate, as in PyTorch). Returns the
/// `[2]` f32 [norm, coefficient] device tensor; nothing waits for the device.
pub fn clip_grad_norm(
    gpu: &Arc<Gpu>,
    opts: &ClipOptions,
    grads: &mut [TensorMut],
) -> Result<DeviceTensor> {
    check_max_norm(opts.max_norm)?;
    gpu.check_contexts(grads.iter().map(|g| ("grads", g.ctx)))?;
    let infos: Vec<_> = grads.iter().map(|g| g.info("grads")).collect();
    let pairs: Vec<(u64, &ViewInfo)> = grads.iter().map(|g| g.ptr).zip(&infos).collect();
    let (dtype, table) = grad_table(&pairs)?;
    let out = gpu.full(DType::F32, &[2], f32::NAN)?;
    let out_ptr = out.view().device_ptr();
    let Some(tables) = norm_into(gpu, dtype, &table, opts.max_norm, out_ptr)? else {
        return Ok(out);
    };
    let stream = gpu.stream();
    let scale = kernel(
        gpu,
        by_dtype(dtype, ["mt_scale_f32", "mt_scale_f16", "mt_scale_bf16"]),
    )?;
    let p = cuattn_mt_reduce_params {
        tensors: tables.tensors.device_ptr(stream).0,
        chunks: tables.chunks.device_ptr(stream).0,
        partials: 0,
        coef: out_ptr + 4,
        num_chunks: tables.num_chunks as i32,
    };
    // SAFETY: as in `norm_into`; the coefficient is out[1], written by `sum_f32` before this
    // kernel in stream order; each gradient element is scaled by its one owning thread.
    unsafe {
        launch(
            gpu,
            &scale,
            &p,
            (tables.num_chunks as u32, 1),
            (MT_THREADS as u32, 1),
            0,
        )
    }?;
    Ok(out)
}
