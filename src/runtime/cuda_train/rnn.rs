//! The recurrent models' fused ops on the device (`kernels/rnn_ops.cu`): the GRU and LSTM steps
//! after their two cuBLAS GEMMs and Bahdanau's additive attention, forward and backward, overriding the
//! [`TrainBackend`] defaults that run them on the host through a copy. Inputs in another dtype
//! than the backend's (an f32 parameter on a 16-bit backend) are read converted; outputs are in
//! the backend's dtype, except dv, a parameter's gradient, in f32 (the kernel's per-sequence
//! shares summed over the batch by the deterministic column sum).

use super::{numel, ptr, Cuda};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::DeviceTensor;
use crate::kernels::params::{
    cuattn_additive_params, cuattn_gru_params, cuattn_lstm_params, CUATTN_ADDITIVE_MAX_KEYS,
    CUATTN_ADDITIVE_THREADS,
};
use crate::ops::launch;
use crate::runtime::backend::Backend;
use crate::runtime::train::backend::{rnn_cache_dims, TrainBackend};
use crate::runtime::train::rnn_ops::{
    self, AdditiveDims, AdditiveGrads, GruCellGrads, LstmCellGrads,
};
use cudarc::driver::{CudaSlice, DevicePtr};

const MODULE: &str = "rnn_ops";
const THREADS: u32 = 256;

/// The kernels of `rnn_ops.cu`, each in three element types.
#[derive(Clone, Copy)]
enum Kernel {
    GruFwd = 0,
    GruBwd = 1,
    AdditiveFwd = 2,
    AdditiveBwd = 3,
    LstmFwd = 4,
    LstmBwd = 5,
}

fn kernel_name(k: Kernel, dtype: DType) -> &'static str {
    const NAMES: [[&str; 3]; 6] = [
        ["gru_fwd_f32", "gru_fwd_f16", "gru_fwd_bf16"],
        ["gru_bwd_f32", "gru_bwd_f16", "gru_bwd_bf16"],
        ["additive_fwd_f32", "additive_fwd_f16", "additive_fwd_bf16"],
        ["additive_bwd_f32", "additive_bwd_f16", "additive_bwd_bf16"],
        ["lstm_fwd_f32", "lstm_fwd_f16", "lstm_fwd_bf16"],
        ["lstm_bwd_f32", "lstm_bwd_f16", "lstm_bwd_bf16"],
    ];
    let col = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    NAMES[k as usize][col]
}

/// The `active` flags on the device (one byte per row), if any.
fn flags_on_device(be: &Cuda, active: Option<&[bool]>) -> Result<Option<CudaSlice<u8>>> {
    active
        .map(|a| {
            let bytes: Vec<u8> = a.iter().map(|&x| x as u8).collect();
            be.gpu()
                .stream()
                .clone_htod(&bytes)
                .map_err(|e| Error::driver("copy a recurrent step's active rows to the device", e))
        })
        .transpose()
}

fn slice_ptr<T>(be: &Cuda, s: &Option<CudaSlice<T>>) -> u64 {
    s.as_ref().map_or(0, |s| s.device_ptr(be.gpu().stream()).0)
}

fn launch_gru(be: &Cuda, name: Kernel, p: &cuattn_gru_params, units: usize) -> Result<()> {
    if units == 0 {
        return Ok(());
    }
    let k = be.gpu().kernel(MODULE, kernel_name(name, be.dtype()))?;
    // SAFETY: every pointer in p is a contiguous tensor of the backend's dtype with the
    // [batch, kH] shape the header gives (checked by the callers), or the batch's flag bytes
    // freed in stream order after the kernel; the grid-stride loop stays below batch·H.
    unsafe { launch(be.gpu(), &k, p, (be.stride_grid(units), 1), (THREADS, 1), 0) }
}

pub(super) fn gru_cell(
    be: &Cuda,
    gi: &DeviceTensor,
    gh: &DeviceTensor,
    h: &DeviceTensor,
    active: Option<&[bool]>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let (batch, hidden) = rnn_ops::gru_dims(gi.shape(), gh.shape(), h.shape(), active)?;
    let (mut s1, mut s2, mut s3) = (None, None, None);
    let gi = be.in_compute_dtype(gi, &mut s1)?;
    let gh = be.in_compute_dtype(gh, &mut s2)?;
    let h = be.in_compute_dtype(h, &mut s3)?;
    let out = be.gpu().zeros(be.dtype(), &[batch, hidden])?;
    let cache = be.gpu().zeros(be.dtype(), &[batch, 4 * hidden])?;
    let flags = flags_on_device(be, active)?;
    let p = cuattn_gru_params {
        gi: ptr(gi),
        gh: ptr(gh),
        h: ptr(h),
        active: slice_ptr(be, &flags),
        out: ptr(&out),
        cache: ptr(&cache),
        dout: 0,
        dgi: 0,
        dgh: 0,
        dh: 0,
        batch: batch as i64,
        hidden: hidden as i64,
    };
    launch_gru(be, Kernel::GruFwd, &p, batch * hidden)?;
    Ok((out, cache))
}

pub(super) fn gru_cell_backward(
    be: &Cuda,
    cache: &DeviceTensor,
    h: &DeviceTensor,
    dout: &DeviceTensor,
    active: Option<&[bool]>,
) -> Result<GruCellGrads<DeviceTensor>> {
    let (batch, hidden) = rnn_cache_dims(cache.shape(), h.shape(), dout.shape())?;
    if active.is_some_and(|a| a.len() != batch) {
        return Err(Error::shape(
            "active",
            format!("[{batch}]"),
            &[active.map_or(0, <[bool]>::len)],
        ));
    }
    let (mut s1, mut s2, mut s3) = (None, None, None);
    let cache = be.in_compute_dtype(cache, &mut s1)?;
    let h = be.in_compute_dtype(h, &mut s2)?;
    let dout = be.in_compute_dtype(dout, &mut s3)?;
    let dgi = be.gpu().zeros(be.dtype(), &[batch, 3 * hidden])?;
    let dgh = be.gpu().zeros(be.dtype(), &[batch, 3 * hidden])?;
    let dh = be.gpu().zeros(be.dtype(), &[batch, hidden])?;
    let flags = flags_on_device(be, active)?;
    let p = cuattn_gru_params {
        gi: 0,
        gh: 0,
        h: ptr(h),
        active: slice_ptr(be, &flags),
        out: 0,
        cache: ptr(cache),
        dout: ptr(dout),
        dgi: ptr(&dgi),
        dgh: ptr(&dgh),
        dh: ptr(&dh),
        batch: batch as i64,
        hidden: hidden as i64,
    };
    launch_gru(be, Kernel::GruBwd, &p, batch * hidden)?;
    Ok(GruCellGrads { dgi, dgh, dh })
}

fn launch_lstm(be: &Cuda, name: Kernel, p: &cuattn_lstm_params, units: usize) -> Result<()> {
    if units == 0 {
        return Ok(());
    }
    let k = be.gpu().kernel(MODULE, kernel_name(name, be.dtype()))?;
    // SAFETY: every pointer in p is a contiguous tensor of the backend's dtype with the
    // [batch, kH] shape the header gives (checked by the callers), or the batch's flag bytes
    // freed in stream order after the kernel; the grid-stride loop stays below batch·H.
    unsafe { launch(be.gpu(), &k, p, (be.stride_grid(units), 1), (THREADS, 1), 0) }
}

fn lstm_params(batch: usize, hidden: usize, active: u64) -> cuattn_lstm_params {
    cuattn_lstm_params {
        gi: 0,
        gh: 0,
        h: 0,
        c: 0,
        active,
        h_out: 0,
        c_out: 0,
        cache: 0,
        dh_out: 0,
        dc_out: 0,
        dgates: 0,
        dh: 0,
        dc: 0,
        batch: batch as i64,
        hidden: hidden as i64,
    }
}

pub(super) fn lstm_cell(
    be: &Cuda,
    gi: &DeviceTensor,
    gh: &DeviceTensor,
    h: &DeviceTensor,
    c: &DeviceTensor,
    active: Option<&[bool]>,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let (batch, hidden) = rnn_ops::lstm_dims(gi.shape(), gh.shape(), h.shape(), c.shape(), active)?;
    let mut slots: [Option<DeviceTensor>; 4] = Default::default();
    let [s0, s1, s2, s3] = &mut slots;
    let gi = be.in_compute_dtype(gi, s0)?;
    let gh = be.in_compute_dtype(gh, s1)?;
    let h = be.in_compute_dtype(h, s2)?;
    let c = be.in_compute_dtype(c, s3)?;
    let h_out = be.gpu().zeros(be.dtype(), &[batch, hidden])?;
    let c_out = be.gpu().zeros(be.dtype(), &[batch, hidden])?;
    let cache = be.gpu().zeros(be.dtype(), &[batch, 5 * hidden])?;
    let flags = flags_on_device(be, active)?;
    let p = cuattn_lstm_params {
        gi: ptr(gi),
        gh: ptr(gh),
        h: ptr(h),
        c: ptr(c),
        h_out: ptr(&h_out),
        c_out: ptr(&c_out),
        cache: ptr(&cache),
        ..lstm_params(batch, hidden, slice_ptr(be, &flags))
    };
    launch_lstm(be, Kernel::LstmFwd, &p, batch * hidden)?;
    Ok((h_out, c_out, cache))
}

pub(super) fn lstm_cell_backward(
    be: &Cuda,
    cache: &DeviceTensor,
    c: &DeviceTensor,
    dh_out: &DeviceTensor,
    dc_out: &DeviceTensor,
    active: Option<&[bool]>,
) -> Result<LstmCellGrads<DeviceTensor>> {
    let (batch, hidden) = rnn_ops::lstm_backward_dims(
        cache.shape(),
        c.shape(),
        dh_out.shape(),
        dc_out.shape(),
        active,
    )?;
    let mut slots: [Option<DeviceTensor>; 4] = Default::default();
    let [s0, s1, s2, s3] = &mut slots;
    let cache = be.in_compute_dtype(cache, s0)?;
    let c = be.in_compute_dtype(c, s1)?;
    let dh_out = be.in_compute_dtype(dh_out, s2)?;
    let dc_out = be.in_compute_dtype(dc_out, s3)?;
    let dgates = be.gpu().zeros(be.dtype(), &[batch, 4 * hidden])?;
    let dh = be.gpu().zeros(be.dtype(), &[batch, hidden])?;
    let dc = be.gpu().zeros(be.dtype(), &[batch, hidden])?;
    let flags = flags_on_device(be, active)?;
    let p = cuattn_lstm_params {
        c: ptr(c),
        cache: ptr(cache),
        dh_out: ptr(dh_out),
        dc_out: ptr(dc_out),
        dgates: ptr(&dgates),
        dh: ptr(&dh),
        dc: ptr(&dc),
        ..lstm_params(batch, hidden, slice_ptr(be, &flags))
    };
    launch_lstm(be, Kernel::LstmBwd, &p, batch * hidden)?;
    Ok(LstmCellGrads { dgates, dh, dc })
}

/// The checked sizes of an additive-attention call, refused past the kernels' key bound.
fn additive_dims(
    q: &DeviceTensor,
    keys: &DeviceTensor,
    v: &DeviceTensor,
    values: &DeviceTensor,
    key_lens: Option<&[usize]>,
) -> Result<AdditiveDims> {
    let d = AdditiveDims::check(q.shape(), keys.shape(), v.shape(), values.shape(), key_lens)?;
    if d.len_k == 0 || d.len_k > CUATTN_ADDITIVE_MAX_KEYS as usize {
        return Err(Error::invalid(
            "keys",
            format!(
                "{} keys per sequence; additive attention on CUDA takes 1 to {}",
                d.len_k, CUATTN_ADDITIVE_MAX_KEYS
            ),
        ));
    }
    Ok(d)
}

fn lens_on_device(be: &Cuda, key_lens: Option<&[usize]>) -> Result<Option<CudaSlice<i32>>> {
    key_lens
        .map(|l| {
            let lens: Vec<i32> = l.iter().map(|&x| x as i32).collect();
            be.gpu()
                .stream()
                .clone_htod(&lens)
                .map_err(|e| Error::driver("copy key lengths to the device", e))
        })
        .transpose()
}

fn launch_additive(
    be: &Cuda,
    name: Kernel,
    p: &cuattn_additive_params,
    smem_floats: usize,
) -> Result<()> {
    let k = be.gpu().kernel(MODULE, kernel_name(name, be.dtype()))?;
    // SAFETY: the pointers are contiguous tensors of the shapes in the header, checked by
    // AdditiveDims::check (each key length ≤ len_k); len_k ≤ CUATTN_ADDITIVE_MAX_KEYS keeps the
    // dynamic shared memory (smem_floats f32) under the default 48 KiB; one block per sequence
    // of CUATTN_ADDITIVE_THREADS threads, the kernels' launch bound; the lengths are freed in
    // stream order after the kernel.
    unsafe {
        launch(
            be.gpu(),
            &k,
            p,
            (p.batch as u32, 1),
            (CUATTN_ADDITIVE_THREADS, 1),
            smem_floats * 4,
        )
    }
}

fn additive_params(
    d: &AdditiveDims,
    [q, keys, v, values]: [&DeviceTensor; 4],
    lens: u64,
) -> cuattn_additive_params {
    cuattn_additive_params {
        q: ptr(q),
        keys: ptr(keys),
        v: ptr(v),
        values: ptr(values),
        key_lens: lens,
        ctx: 0,
        alpha: 0,
        dctx: 0,
        dq: 0,
        dkeys: 0,
        dvalues: 0,
        dv_part: 0,
        batch: d.batch as i64,
        len_k: d.len_k as i32,
        dim_a: d.dim_a as i32,
        dim_v: d.dim_v as i32,
        pad_: 0,
    }
}

pub(super) fn additive_attention(
    be: &Cuda,
    q: &DeviceTensor,
    keys: &DeviceTensor,
    v: &DeviceTensor,
    values: &DeviceTensor,
    key_lens: Option<&[usize]>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let d = additive_dims(q, keys, v, values, key_lens)?;
    let mut slots: [Option<DeviceTensor>; 4] = Default::default();
    let [s0, s1, s2, s3] = &mut slots;
    let ins = [
        be.in_compute_dtype(q, s0)?,
        be.in_compute_dtype(keys, s1)?,
        be.in_compute_dtype(v, s2)?,
        be.in_compute_dtype(values, s3)?,
    ];
    let ctx = be.gpu().zeros(be.dtype(), &[d.batch, d.dim_v])?;
    let alpha = be.gpu().zeros(be.dtype(), &[d.batch, d.len_k])?;
    let lens = lens_on_device(be, key_lens)?;
    let p = cuattn_additive_params {
        ctx: ptr(&ctx),
        alpha: ptr(&alpha),
        ..additive_params(&d, ins, slice_ptr(be, &lens))
    };
    launch_additive(be, Kernel::AdditiveFwd, &p, d.len_k)?;
    Ok((ctx, alpha))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn additive_attention_backward(
    be: &Cuda,
    q: &DeviceTensor,
    keys: &DeviceTensor,
    v: &DeviceTensor,
    values: &DeviceTensor,
    alpha: &DeviceTensor,
    dctx: &DeviceTensor,
    key_lens: Option<&[usize]>,
) -> Result<AdditiveGrads<DeviceTensor>> {
    let d = additive_dims(q, keys, v, values, key_lens)?;
    if alpha.shape() != [d.batch, d.len_k] {
        let want = format!("[{}, {}]", d.batch, d.len_k);
        return Err(Error::shape("alpha", want, alpha.shape()));
    }
    if dctx.shape() != [d.batch, d.dim_v] {
        let want = format!("[{}, {}]", d.batch, d.dim_v);
        return Err(Error::shape("dctx", want, dctx.shape()));
    }
    let mut slots: [Option<DeviceTensor>; 6] = Default::default();
    let [s0, s1, s2, s3, s4, s5] = &mut slots;
    let ins = [
        be.in_compute_dtype(q, s0)?,
        be.in_compute_dtype(keys, s1)?,
        be.in_compute_dtype(v, s2)?,
        be.in_compute_dtype(values, s3)?,
    ];
    let alpha = be.in_compute_dtype(alpha, s4)?;
    let dctx = be.in_compute_dtype(dctx, s5)?;
    let dq = be.gpu().zeros(be.dtype(), &[d.batch, d.dim_a])?;
    let dkeys = be.gpu().zeros(be.dtype(), &[d.batch * d.len_k, d.dim_a])?;
    let dvalues = be.gpu().zeros(be.dtype(), &[d.batch * d.len_k, d.dim_v])?;
    let dv_part = be.gpu().zeros(DType::F32, &[d.batch, d.dim_a])?;
    let lens = lens_on_device(be, key_lens)?;
    let p = cuattn_additive_params {
        alpha: ptr(alpha),
        dctx: ptr(dctx),
        dq: ptr(&dq),
        dkeys: ptr(&dkeys),
        dvalues: ptr(&dvalues),
        dv_part: ptr(&dv_part),
        ..additive_params(&d, ins, slice_ptr(be, &lens))
    };
    launch_additive(be, Kernel::AdditiveBwd, &p, 2 * d.len_k)?;
    debug_assert_eq!(numel(&dv_part), d.batch * d.dim_a);
    let dv = be.sum_rows(&dv_part)?;
    Ok(AdditiveGrads {
        dq,
        dkeys,
        dv,
        dvalues,
    })
}
