//! Benchmarks shared by `cuattn bench` and the criterion benches: CUDA-event timing, the
//! measured device-to-device copy bandwidth (the ceiling of memory-bound kernels), and one
//! module per kernel family.

pub mod attention;
pub mod attention_backward;
pub mod decode;
pub mod layernorm;
pub mod sparse;
pub mod training_ops;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::DevicePtr;
use std::sync::Arc;

/// Bytes written before each timed run to evict the previous run's data from L2 (60 MB on an
/// H200), as `triton.testing.do_bench` does for the PyTorch baseline.
const L2_FLUSH_BYTES: usize = 256 << 20;

/// Median time in microseconds of `iters` runs of `f`, each bracketed by CUDA events on the
/// Gpu's stream and preceded (outside the events) by a write of 256 MiB that flushes L2, after
/// `warmup` untimed runs.
pub fn time_us(
    gpu: &Gpu,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    // SAFETY: scratch that is only ever written (by the memset below), never read.
    let flush = unsafe { gpu.stream().alloc::<u8>(L2_FLUSH_BYTES) }
        .map_err(|e| Error::driver("alloc", e))?;
    let (flush_ptr, _sync) = flush.device_ptr(gpu.stream());
    let ctx = gpu.context();
    let ev = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::driver("cuEventCreate", e))
    };
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        // SAFETY: `flush` holds L2_FLUSH_BYTES bytes, allocated on this stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                flush_ptr,
                0,
                L2_FLUSH_BYTES,
                gpu.stream().cu_stream(),
            )
        }
        .map_err(|e| Error::driver("cuMemsetD8Async", e))?;
        let (start, end) = (ev()?, ev()?);
        start
            .record(gpu.stream())
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        f()?;
        end.record(gpu.stream())
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        end.synchronize()
            .map_err(|e| Error::driver("cuEventSynchronize", e))?;
        times.push(
            start
                .elapsed_ms(&end)
                .map_err(|e| Error::driver("cuEventElapsedTime", e))? as f64
                * 1e3,
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written, 10^9), measured on a
/// `bytes`-byte buffer: the ceiling every memory-bound kernel is compared with.
pub fn copy_bandwidth_gbs(gpu: &Arc<Gpu>, bytes: usize) -> Result<f64> {
    let src = gpu.random(crate::DType::F32, &[bytes / 4], 7, 0.0, 1.0)?;
    let dst = gpu.random(crate::DType::F32, &[bytes / 4], 8, 0.0, 1.0)?;
    let (s, d) = (src.view().device_ptr(), dst.view().device_ptr());
    let us = time_us(gpu, 3, 20, || {
        // SAFETY: both buffers hold `bytes / 4 * 4` bytes and belong to this Gpu's stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(d, s, bytes / 4 * 4, gpu.stream().cu_stream())
        }
        .map_err(|e| Error::driver("copy device to device", e))
    })?;
    Ok(2.0 * (bytes / 4 * 4) as f64 / (us * 1e-6) / 1e9)
}
