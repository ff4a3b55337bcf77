//! The bridge from candle's CUDA storage to cuattn's ops (feature `candle-cuda`).
//!
//! candle 0.11 is built on cudarc 0.19, as cuattn is, so one cudarc is compiled and candle's
//! `CudaDevice` hands out cuattn's own types: its stream (`cuda_stream()`) and, through it, its
//! context. Each op makes (once per candle stream, then cached) a [`Gpu`] handle on that
//! context and stream with [`Gpu::from_context`], views candle's buffers in place as
//! [`TensorRef`]/[`TensorMut`] (device address + candle's layout, strides in elements), and
//! queues its kernels on candle's stream: no copy, no synchronisation, stream order alone
//! orders the kernels after candle's writes and before its later reads. Outputs are allocated
//! on candle's device and handed back as candle storage.
//!
//! The cached handles keep their context and stream alive for the life of the process (so a
//! cached address can never name a newer context).

use super::{AttentionOp, Kind};
use crate::error::Error as OurError;
use crate::gpu::{ContextId, Gpu, TensorMut, TensorRef};
use crate::ops::{attention as attn, decode as dec, layernorm as ln, sparse_attention as sp};
use crate::reference::attention::Shape;
use crate::DType;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Storage, Tensor};
use cudarc::driver::DevicePtr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

fn wrap(e: OurError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The cuattn handle on candle's context and stream for `dev`.
fn gpu_of(dev: &CudaDevice) -> Result<Arc<Gpu>> {
    type Handles = Mutex<HashMap<(usize, usize), Arc<Gpu>>>;
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = (
        stream.context().cu_ctx() as usize,
        stream.cu_stream() as usize,
    );
    let mut handles = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(g) = handles.get(&key) {
        return Ok(g.clone());
    }
    let gpu = Gpu::from_context(stream.context().clone(), stream).map_err(wrap)?;
    handles.insert(key, gpu.clone());
    Ok(gpu)
}

/// Device address, byte size and dtype of candle's buffer.
fn raw(s: &CudaStorage) -> Result<(u64, usize, DType)> {
    let stream = s.device.cuda_stream();
    // The read/write events candle records when the guard drops order other streams against
    // candle's stream; cuattn queues on that same stream.
    Ok(match &s.slice {
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, x.len() * 4, DType::F32),
        CudaStorageSlice::F16(x) => (x.device_ptr(&stream).0, x.len() * 2, DType::F16),
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, x.len() * 2, DType::BF16),
        _ => bail!("cuattn: candle tensors must be f32, f16 or bf16"),
    })
}

fn context(s: &CudaStorage) -> ContextId {
    ContextId::of(s.device.cuda_stream().context())
}

/// A read view of candle's tensor in place: its layout's offset, dims and strides.
fn view<'a>(arg: &'static str, (s, l): (&'a CudaStorage, &Layout)) -> Result<TensorRef<'a>> {
    let (ptr, bytes, dtype) = raw(s)?;
    let off = l.start_offset() * dtype.size_bytes();
    if off > bytes {
        bail!("cuattn: `{arg}` starts past its buffer")
    }
    let layout = crate::Layout::strided(arg, l.dims(), l.stride()).map_err(wrap)?;
    // SAFETY: `ptr` is candle's live allocation of `bytes` bytes in `context(s)`, borrowed
    // for 'a; the view starts `off` bytes in and its size is what remains (the op checks the
    // layout against it); candle's stream is the op's stream, so no other stream writes it
    // while the op's kernels read it.
    Ok(unsafe { TensorRef::from_raw(context(s), ptr + off as u64, bytes - off, dtype, layout) })
}

/// A fresh contiguous output of `dims` on candle's device (zeroed, so a bug shows as zeros
/// against the CPU path rather than as stale memory).
fn alloc(dev: &CudaDevice, dtype: DType, dims: &[usize]) -> Result<CudaStorage> {
    let n: usize = dims.iter().product::<usize>().max(1);
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(n)?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::f16>(n)?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::bf16>(n)?, dev.clone()),
    })
}

/// A write view of a contiguous output made by [`alloc`].
fn view_mut<'a>(s: &'a mut CudaStorage, dims: &[usize]) -> Result<TensorMut<'a>> {
    let (ptr, bytes, dtype) = raw(s)?;
    // SAFETY: `s` is the op's own fresh allocation of `bytes` bytes, borrowed mutably for 'a
    // and used by no one else until the op returns it.
    Ok(unsafe {
        TensorMut::from_raw(
            context(s),
            ptr,
            bytes,
            dtype,
            crate::Layout::contiguous(dims),
        )
    })
}

fn tensor(s: CudaStorage, dims: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), dims, BackpropOp::none(), false)
}

/// Attention (dense, sparse or decode) on candle's buffers: O as storage, LSE as a tensor.
pub(super) fn attention(
    op: &AttentionOp,
    s: &Shape,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Tensor)> {
    let dev = &q.0.device;
    let gpu = gpu_of(dev)?;
    let (qv, kv, vv) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (o_dims, lse_dims) = match op.kind {
        Kind::Decode => (vec![s.batch, s.heads_q, s.dim_v], vec![s.batch, s.heads_q]),
        _ => (
            vec![s.batch, s.heads_q, s.len_q, s.dim_v],
            vec![s.batch, s.heads_q, s.len_q],
        ),
    };
    let mut o = alloc(dev, qv.dtype(), &o_dims)?;
    let mut lse = alloc(dev, DType::F32, &lse_dims)?;
    // Lengths past the keys held mean all of them, as on the CPU path.
    let key_lens: Option<Vec<i32>> = op.opts.key_lens.as_ref().map(|l| {
        l.iter()
            .map(|&n| n.min(s.len_k).min(i32::MAX as usize) as i32)
            .collect()
    });
    {
        let mut ov = view_mut(&mut o, &o_dims)?;
        let mut lv = view_mut(&mut lse, &lse_dims)?;
        let opts = attn::Options {
            scale: op.opts.scale,
            causal: op.opts.causal,
            window: op.opts.window,
            sequences: attn::Sequences::Dense {
                key_lens: key_lens.as_deref(),
            },
            ..Default::default()
        };
        match &op.kind {
            Kind::Dense => attn::forward_into(&gpu, &qv, &kv, &vv, &mut ov, Some(&mut lv), &opts),
            Kind::Sparse(layout) => {
                let device_layout = sp::DeviceBlockLayout::upload(&gpu, layout).map_err(wrap)?;
                sp::forward_into(
                    &gpu,
                    &qv,
                    &kv,
                    &vv,
                    &mut ov,
                    Some(&mut lv),
                    &device_layout,
                    &opts,
                )
            }
            Kind::Decode => {
                let lens = key_lens.unwrap_or_else(|| vec![s.len_k as i32; s.batch]);
                dec::forward_into(
                    &gpu,
                    &qv,
                    &kv,
                    &vv,
                    dec::CacheLens::Host(&lens),
                    &mut ov,
                    Some(&mut lv),
                    &dec::Options {
                        scale: op.opts.scale,
                        splits: None,
                    },
                )
            }
        }
        .map_err(wrap)?;
    }
    Ok((o, tensor(lse, &lse_dims)))
}

/// LayerNorm forward on candle's buffers.
pub(super) fn layer_norm(
    eps: f32,
    x: (&CudaStorage, &Layout),
    gamma: (&CudaStorage, &Layout),
    beta: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let gpu = gpu_of(dev)?;
    let (xv, gv, bv) = (view("x", x)?, view("gamma", gamma)?, view("beta", beta)?);
    let mut y = alloc(dev, xv.dtype(), x.1.dims())?;
    {
        let mut yv = view_mut(&mut y, x.1.dims())?;
        let opts = ln::ForwardOptions {
            gamma: Some(&gv),
            beta: Some(&bv),
            eps,
            ..Default::default()
        };
        ln::forward_with(&gpu, &xv, &mut yv, opts).map_err(wrap)?;
    }
    Ok(y)
}

/// LayerNorm backward on candle's buffers: the forward runs first for the row statistics,
/// then the backward kernel; dx as storage, dγ and dβ as tensors.
pub(super) fn layer_norm_backward(
    eps: f32,
    dy: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    gamma: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Tensor, Tensor)> {
    let dev = &x.0.device;
    let gpu = gpu_of(dev)?;
    let (dyv, xv, gv) = (view("dy", dy)?, view("x", x)?, view("gamma", gamma)?);
    let dims = x.1.dims();
    let hidden = dims.last().copied().unwrap_or(0);
    let rows = dims.iter().product::<usize>() / hidden.max(1);
    let dtype = xv.dtype();
    let mut y = alloc(dev, dtype, dims)?;
    let mut mean = alloc(dev, DType::F32, &[rows])?;
    let mut rstd = alloc(dev, DType::F32, &[rows])?;
    let mut dx = alloc(dev, dtype, dims)?;
    let mut dgamma = alloc(dev, dtype, &[hidden])?;
    let mut dbeta = alloc(dev, dtype, &[hidden])?;
    {
        let mut yv = view_mut(&mut y, dims)?;
        let mut mv = view_mut(&mut mean, &[rows])?;
        let mut rv = view_mut(&mut rstd, &[rows])?;
        let fwd = ln::ForwardOptions {
            gamma: Some(&gv),
            mean: Some(&mut mv),
            rstd: Some(&mut rv),
            eps,
            ..Default::default()
        };
        ln::forward_with(&gpu, &xv, &mut yv, fwd).map_err(wrap)?;
    }
    {
        let (mv, rv) = (view_mut(&mut mean, &[rows])?, view_mut(&mut rstd, &[rows])?);
        let (mr, rr) = (mv.as_ref(), rv.as_ref());
        let mut dxv = view_mut(&mut dx, dims)?;
        let mut dgv = view_mut(&mut dgamma, &[hidden])?;
        let mut dbv = view_mut(&mut dbeta, &[hidden])?;
        let bwd = ln::BackwardOptions {
            gamma: Some(&gv),
            dgamma: Some(&mut dgv),
            dbeta: Some(&mut dbv),
            workspace: None,
            tuning: Default::default(),
        };
        ln::backward_with(&gpu, &dyv, &xv, &mr, &rr, &mut dxv, bwd).map_err(wrap)?;
    }
    drop(y);
    Ok((dx, tensor(dgamma, &[hidden]), tensor(dbeta, &[hidden])))
}
