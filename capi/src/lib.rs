//! The C ABI of cuattn (`include/cuattn.h` is generated from this file by cbindgen).
//!
//! Conventions, for every function:
//! - The return value is [`CUATTN_OK`] (0) or a `CUATTN_ERROR_*` code (the
//!   [`cuattn::Error::code`] of what went wrong); [`cuattn_last_error`] gives this thread's last
//!   message. Nothing unwinds into C: a panic becomes [`CUATTN_ERROR_PANIC`].
//! - GPU ops take a `cuattn_gpu` handle (one device's primary context, the one the CUDA runtime
//!   API uses), the caller's `CUstream` (NULL: the legacy default stream) and tensors on device
//!   pointers; they queue their kernels on that stream and return without synchronizing.
//!   Every device pointer is checked to belong to the handle's context. An op that needs
//!   scratch memory uses the caller's (`workspace`, `workspace_bytes`, sized by the op's
//!   `*_workspace_bytes` query) or, when given none, allocates it in stream order.
//! - The CPU references take contiguous host f32 arrays and compute in f64.

#![allow(non_camel_case_types)]
// Every pointer an `extern "C"` function dereferences is documented as the caller's contract
// in the header; the functions stay safe to call from C (Rust callers use cuattn itself).
#![allow(clippy::not_unsafe_ptr_arg_deref)]
// The entry points mirror C signatures: one argument per tensor, as C callers pass them.
#![allow(clippy::too_many_arguments)]

use cuattn::gpu::{Gpu, TensorMut, TensorRef};
use cuattn::ops::{attention, decode, layernorm};
use cuattn::reference;
use cuattn::{DType, Error, Layout, Result};
use cudarc::driver::sys;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;

/// Success.
pub const CUATTN_OK: i32 = 0;
/// A tensor has the wrong shape.
pub const CUATTN_ERROR_SHAPE: i32 = 1;
/// A tensor has the wrong element type.
pub const CUATTN_ERROR_DTYPE: i32 = 2;
/// A tensor's strides or memory size do not fit.
pub const CUATTN_ERROR_LAYOUT: i32 = 3;
/// A tensor has no elements where the op needs some.
pub const CUATTN_ERROR_EMPTY: i32 = 4;
/// A scalar argument or a NULL pointer where one is required.
pub const CUATTN_ERROR_INVALID_ARGUMENT: i32 = 5;
/// A device pointer is not aligned as the kernel needs.
pub const CUATTN_ERROR_ALIGNMENT: i32 = 6;
/// A pointer is not device memory of the handle's context.
pub const CUATTN_ERROR_DEVICE: i32 = 7;
/// No CUDA driver or device.
pub const CUATTN_ERROR_NO_DEVICE: i32 = 8;
/// The library was built without its GPU layer.
pub const CUATTN_ERROR_CUDA_DISABLED: i32 = 9;
/// A CUDA driver call failed (the message names the CUresult).
pub const CUATTN_ERROR_DRIVER: i32 = 10;
/// A cuBLAS call failed.
pub const CUATTN_ERROR_BLAS: i32 = 11;
/// A Rust panic was caught at the boundary (a bug in cuattn: please report it).
pub const CUATTN_ERROR_PANIC: i32 = 99;

/// Element types of `cuattn_tensor::dtype`.
pub const CUATTN_DTYPE_F32: i32 = 0;
pub const CUATTN_DTYPE_F16: i32 = 1;
pub const CUATTN_DTYPE_BF16: i32 = 2;

/// Causal masks (`cuattn_attention_options::causal`, `window_align`).
pub const CUATTN_MASK_NONE: i32 = 0;
/// Key j visible to query i iff j <= i.
pub const CUATTN_MASK_TOP_LEFT: i32 = 1;
/// Key j visible to query i iff j <= i + key_len - len_q (the KV-cache convention).
pub const CUATTN_MASK_BOTTOM_RIGHT: i32 = 2;

/// Kernel choice (`cuattn_attention_options::kernel`).
pub const CUATTN_KERNEL_AUTO: i32 = 0;
pub const CUATTN_KERNEL_EXACT: i32 = 1;
pub const CUATTN_KERNEL_TENSOR_CORE: i32 = 2;

/// A tensor: `data` is a device address (GPU ops) of `bytes` bytes; `rank` (1..=4) dims of
/// `shape`, with `strides` in elements (all zero: contiguous row-major).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cuattn_tensor {
    pub data: u64,
    pub bytes: u64,
    pub dtype: i32,
    pub rank: i32,
    pub shape: [i64; 4],
    pub strides: [i64; 4],
}

/// Options of attention (GPU and CPU reference).
///
/// Dense batches: Q [B, Hq, Lq, D], K [B, Hkv, Lk, D], V [B, Hkv, Lk, Dv], O [B, Hq, Lq, Dv],
/// LSE f32 [B, Hq, Lq]. Packed batches (`cu_seqlens_q` != 0): Q [total_q, Hq, D], K/V
/// [total_k, Hkv, D/Dv], O [total_q, Hq, Dv], LSE [Hq, total_q].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cuattn_attention_options {
    /// Multiplies Q·Kᵀ; 0 for 1/√D.
    pub scale: f32,
    /// CUATTN_MASK_*.
    pub causal: i32,
    /// Sliding window: keys i + off − left ..= i + off + right; -1 on both sides: no window,
    /// -1 on one side: that side open.
    pub window_left: i64,
    pub window_right: i64,
    /// CUATTN_MASK_TOP_LEFT or _BOTTOM_RIGHT: the diagonal the window is centred on.
    pub window_align: i32,
    /// CUATTN_KERNEL_*.
    pub kernel: i32,
    /// Dense: device int32 [B] valid keys per sequence (clamped to 0..=Lk), or 0.
    pub key_lens: u64,
    /// Packed: device int32 [batch + 1] offsets of each side, or 0 for a dense batch.
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    /// Packed: the number of sequences and the longest of each side.
    pub batch: i64,
    pub max_len_q: i64,
    pub max_len_k: i64,
}

/// Options of decode: q and O [B, Hq, D], caches [B, Hkv, capacity, D], LSE f32 [B, Hq].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cuattn_decode_options {
    /// Multiplies q·k; 0 for 1/√D.
    pub scale: f32,
    /// Key splits, 1..=256; 0: planned from `max_len` (fix it for CUDA-graph capture).
    pub splits: i32,
    /// Device int32 [B]: cache rows per sequence (clamped to 0..=capacity).
    pub cache_lens: u64,
    /// The longest cache length (≤ capacity; plans the splits).
    pub max_len: i64,
}

/// Sizes of a dense attention call for the CPU reference (contiguous BHSD arrays).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cuattn_attention_shape {
    pub batch: i64,
    pub heads_q: i64,
    pub heads_kv: i64,
    pub len_q: i64,
    pub len_k: i64,
    pub dim_qk: i64,
    pub dim_v: i64,
}

/// A handle on one GPU (its primary context); opaque to C.
pub struct cuattn_gpu {
    gpu: Arc<Gpu>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning its error or a panic into a code and this thread's last message.
fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            CUATTN_OK
        }
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            e.code()
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(&format!("internal error (panic): {what}"));
            CUATTN_ERROR_PANIC
        }
    }
}

fn null(arg: &'static str) -> Error {
    Error::invalid(arg, "must not be NULL")
}

fn deref<'p, T>(arg: &'static str, p: *const T) -> Result<&'p T> {
    // SAFETY: a non-NULL pointer from C points at a live T (the header's contract).
    unsafe { p.as_ref() }.ok_or_else(|| null(arg))
}

fn gpu_of<'p>(gpu: *const cuattn_gpu) -> Result<&'p Arc<Gpu>> {
    Ok(&deref("gpu", gpu)?.gpu)
}

/// The library version, e.g. "0.1.0" (static storage).
#[no_mangle]
pub extern "C" fn cuattn_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// This thread's message for the last call that failed ("" after a success). Valid until the
/// thread's next cuattn call.
#[no_mangle]
pub extern "C" fn cuattn_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Opens device `device` (its primary context). On success `*out` is a handle to release
/// with [`cuattn_gpu_close`]; without a driver or device the code is CUATTN_ERROR_NO_DEVICE.
#[no_mangle]
pub extern "C" fn cuattn_gpu_open(device: i32, out: *mut *mut cuattn_gpu) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        let ordinal = usize::try_from(device)
            .map_err(|_| Error::invalid("device", format!("{device} is negative")))?;
        let gpu = Gpu::new(ordinal)?;
        let handle = Box::into_raw(Box::new(cuattn_gpu { gpu }));
        // SAFETY: `out` is non-NULL and points at writable storage for one pointer.
        unsafe { *out = handle };
        Ok(())
    })
}

/// Releases a handle from [`cuattn_gpu_open`] (NULL is ignored). Work it queued must be done
/// or stay ordered by the caller's streams.
#[no_mangle]
pub extern "C" fn cuattn_gpu_close(gpu: *mut cuattn_gpu) {
    if !gpu.is_null() {
        // SAFETY: `gpu` came from `cuattn_gpu_open` and is released once.
        drop(unsafe { Box::from_raw(gpu) });
    }
}

/// Allocates `bytes` of device memory in the handle's context (synchronously, `cuMemAlloc`).
#[no_mangle]
pub extern "C" fn cuattn_malloc(gpu: *const cuattn_gpu, bytes: usize, out: *mut u64) -> i32 {
    guard(|| {
        let gpu = gpu_of(gpu)?;
        if out.is_null() {
            return Err(null("out"));
        }
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::driver("cuCtxSetCurrent", e))?;
        // SAFETY: a plain allocation in the bound context.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }
            .map_err(|e| Error::driver(format!("cuMemAlloc of {bytes} bytes"), e))?;
        // SAFETY: `out` is non-NULL and writable.
        unsafe { *out = ptr };
        Ok(())
    })
}

/// Frees memory from [`cuattn_malloc`] (after synchronizing the context).
#[no_mangle]
pub extern "C" fn cuattn_free(gpu: *const cuattn_gpu, ptr: u64) -> i32 {
    guard(|| {
        let gpu = gpu_of(gpu)?;
        gpu.context()
            .synchronize()
            .map_err(|e| Error::driver("cuCtxSynchronize", e))?;
        // SAFETY: `ptr` came from `cuattn_malloc` of this context and is freed once.
        unsafe { cudarc::driver::result::free_sync(ptr) }.map_err(|e| Error::driver("cuMemFree", e))
    })
}

/// Copies `bytes` from host `src` to device `dst`, synchronously.
#[no_mangle]
pub extern "C" fn cuattn_memcpy_htod(
    gpu: *const cuattn_gpu,
    dst: u64,
    src: *const c_void,
    bytes: usize,
) -> i32 {
    guard(|| {
        let gpu = gpu_of(gpu)?;
        if src.is_null() {
            return Err(null("src"));
        }
        gpu.check_device_pointer("dst", dst)?;
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::driver("cuCtxSetCurrent", e))?;
        // SAFETY: `src` holds `bytes` readable bytes (the caller's contract).
        let host = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), bytes) };
        // SAFETY: `dst` is device memory of this context (checked) with room for `bytes`.
        unsafe { cudarc::driver::result::memcpy_htod_sync(dst, host) }
            .map_err(|e| Error::driver("cuMemcpyHtoD", e))
    })
}

/// Copies `bytes` from device `src` to host `dst`, synchronously (after the context's work).
#[no_mangle]
pub extern "C" fn cuattn_memcpy_dtoh(
    gpu: *const cuattn_gpu,
    dst: *mut c_void,
    src: u64,
    bytes: usize,
) -> i32 {
    guard(|| {
        let gpu = gpu_of(gpu)?;
        if dst.is_null() {
            return Err(null("dst"));
        }
        gpu.check_device_pointer("src", src)?;
        gpu.context()
            .synchronize()
            .map_err(|e| Error::driver("cuCtxSynchronize", e))?;
        // SAFETY: `dst` holds `bytes` writable bytes (the caller's contract).
        let host = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), bytes) };
        // SAFETY: `src` is device memory of this context (checked) holding `bytes`.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(host, src) }
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))
    })
}

/// Waits for the work queued on `stream` (NULL: the legacy default stream).
#[no_mangle]
pub extern "C" fn cuattn_stream_synchronize(gpu: *const cuattn_gpu, stream: *mut c_void) -> i32 {
    guard(|| on_stream(gpu_of(gpu)?, stream)?.synchronize())
}

/// A handle of `gpu` on the caller's stream.
fn on_stream(gpu: &Arc<Gpu>, stream: *mut c_void) -> Result<Arc<Gpu>> {
    // SAFETY: the caller passes a live stream of the handle's context (or NULL); the Gpu
    // checks the stream's context before use.
    unsafe { gpu.on_raw_stream(stream as sys::CUstream) }
}

fn dtype_of(arg: &'static str, code: i32) -> Result<DType> {
    match code {
        CUATTN_DTYPE_F32 => Ok(DType::F32),
        CUATTN_DTYPE_F16 => Ok(DType::F16),
        CUATTN_DTYPE_BF16 => Ok(DType::BF16),
        _ => Err(Error::invalid(arg, format!("unknown dtype code {code}"))),
    }
}

fn layout_of(arg: &'static str, t: &cuattn_tensor) -> Result<Layout> {
    let rank = usize::try_from(t.rank)
        .ok()
        .filter(|r| (1..=4).contains(r))
        .ok_or_else(|| Error::invalid(arg, format!("rank {} is not in 1..=4", t.rank)))?;
    let dims = |v: &[i64], what: &str| -> Result<Vec<usize>> {
        v[..rank]
            .iter()
            .map(|&x| {
                usize::try_from(x).map_err(|_| Error::invalid(arg, format!("negative {what} {x}")))
            })
            .collect()
    };
    let shape = dims(&t.shape, "size")?;
    let strides = dims(&t.strides, "stride")?;
    if strides.iter().all(|&s| s == 0) {
        Ok(Layout::contiguous(&shape))
    } else {
        Layout::strided(arg, &shape, &strides)
    }
}

/// Checked raw parts of a tensor argument.
fn parts(
    gpu: &Gpu,
    arg: &'static str,
    t: *const cuattn_tensor,
) -> Result<(u64, usize, DType, Layout)> {
    let t = deref(arg, t)?;
    let bytes = usize::try_from(t.bytes)
        .map_err(|_| Error::invalid(arg, "byte size does not fit in size_t"))?;
    gpu.check_device_pointer(arg, t.data)?;
    Ok((t.data, bytes, dtype_of(arg, t.dtype)?, layout_of(arg, t)?))
}

fn tensor_ref<'a>(gpu: &Gpu, arg: &'static str, t: *const cuattn_tensor) -> Result<TensorRef<'a>> {
    let (ptr, bytes, dtype, layout) = parts(gpu, arg, t)?;
    // SAFETY: `ptr` is device memory of this context (checked above) holding `bytes` bytes
    // (the caller's contract); the op validates the layout against `bytes`.
    Ok(unsafe { TensorRef::from_raw(gpu.context_id(), ptr, bytes, dtype, layout) })
}

fn tensor_mut<'a>(gpu: &Gpu, arg: &'static str, t: *const cuattn_tensor) -> Result<TensorMut<'a>> {
    let (ptr, bytes, dtype, layout) = parts(gpu, arg, t)?;
    // SAFETY: as `tensor_ref`, and writable by the caller's contract.
    Ok(unsafe { TensorMut::from_raw(gpu.context_id(), ptr, bytes, dtype, layout) })
}

fn optional<T>(
    p: *const cuattn_tensor,
    make: impl FnOnce(*const cuattn_tensor) -> Result<T>,
) -> Result<Option<T>> {
    if p.is_null() {
        Ok(None)
    } else {
        make(p).map(Some)
    }
}

fn align(code: i32, arg: &'static str) -> Result<Option<attention::CausalAlign>> {
    match code {
        CUATTN_MASK_NONE => Ok(None),
        CUATTN_MASK_TOP_LEFT => Ok(Some(attention::CausalAlign::TopLeft)),
        CUATTN_MASK_BOTTOM_RIGHT => Ok(Some(attention::CausalAlign::BottomRight)),
        _ => Err(Error::invalid(arg, format!("unknown mask code {code}"))),
    }
}

fn window(o: &cuattn_attention_options) -> Result<Option<attention::Window>> {
    if o.window_left < 0 && o.window_right < 0 {
        return Ok(None);
    }
    let side = |x: i64| if x < 0 { usize::MAX } else { x as usize };
    let al = align(o.window_align, "window_align")?.unwrap_or(attention::CausalAlign::TopLeft);
    Ok(Some(attention::Window::new(
        side(o.window_left),
        side(o.window_right),
        al,
    )))
}

fn scale(s: f32) -> Option<f32> {
    (s != 0.0).then_some(s)
}

fn len(arg: &'static str, x: i64) -> Result<usize> {
    usize::try_from(x).map_err(|_| Error::invalid(arg, format!("{x} is negative")))
}

/// Attention forward on device pointers, queued on `stream` (see
/// [`cuattn_attention_options`] for shapes). `lse` may be NULL.
#[no_mangle]
pub extern "C" fn cuattn_attention_fwd(
    gpu: *const cuattn_gpu,
    stream: *mut c_void,
    q: *const cuattn_tensor,
    k: *const cuattn_tensor,
    v: *const cuattn_tensor,
    o: *const cuattn_tensor,
    lse: *const cuattn_tensor,
    options: *const cuattn_attention_options,
) -> i32 {
    guard(|| {
        let g = gpu_of(gpu)?;
        let opts = deref("options", options)?;
        let run = on_stream(g, stream)?;
        let (q, k, v) = (
            tensor_ref(&run, "q", q)?,
            tensor_ref(&run, "k", k)?,
            tensor_ref(&run, "v", v)?,
        );
        let mut o = tensor_mut(&run, "o", o)?;
        let mut lse = optional(lse, |p| tensor_mut(&run, "lse", p))?;
        let view = |arg: &'static str, ptr: u64, n: usize| -> Result<cuattn::gpu::I32View<'_>> {
            run.check_device_pointer(arg, ptr)?;
            // SAFETY: device memory of this context (checked); `n` values by the options'
            // contract; the kernels clamp every value they read.
            Ok(unsafe { cuattn::gpu::I32View::from_raw(run.context_id(), ptr, n) })
        };
        let sequences = if opts.cu_seqlens_q != 0 || opts.cu_seqlens_k != 0 {
            let batch = len("batch", opts.batch)?;
            attention::Sequences::PackedDevice {
                cu_seqlens_q: view("cu_seqlens_q", opts.cu_seqlens_q, batch + 1)?,
                cu_seqlens_k: view("cu_seqlens_k", opts.cu_seqlens_k, batch + 1)?,
                max_len_q: len("max_len_q", opts.max_len_q)?,
                max_len_k: len("max_len_k", opts.max_len_k)?,
            }
        } else if opts.key_lens != 0 {
            let batch = q.shape().first().copied().unwrap_or(0);
            attention::Sequences::DenseDevice {
                key_lens: view("key_lens", opts.key_lens, batch)?,
            }
        } else {
            attention::Sequences::Dense { key_lens: None }
        };
        let kernel = match opts.kernel {
            CUATTN_KERNEL_AUTO => attention::Kernel::Auto,
            CUATTN_KERNEL_EXACT => attention::Kernel::Exact,
            CUATTN_KERNEL_TENSOR_CORE => attention::Kernel::TensorCore,
            other => return Err(Error::invalid("kernel", format!("unknown kernel {other}"))),
        };
        let options = attention::Options {
            scale: scale(opts.scale),
            causal: align(opts.causal, "causal")?,
            window: window(opts)?,
            sequences,
            kernel,
        };
        attention::forward_into(&run, &q, &k, &v, &mut o, lse.as_mut(), &options)
    })
}

/// Bytes of scratch [`cuattn_decode_fwd`] needs with `splits` splits (0 for one split).
#[no_mangle]
pub extern "C" fn cuattn_decode_workspace_bytes(
    batch: usize,
    heads_q: usize,
    dim: usize,
    splits: usize,
) -> usize {
    decode::workspace_bytes(batch, heads_q, dim, splits)
}

/// Decode attention over a KV cache on device pointers, queued on `stream`. `lse` may be
/// NULL. `workspace` (16-byte aligned, `workspace_bytes` long) is the scratch; 0 lets the call
/// allocate it in stream order.
#[no_mangle]
pub extern "C" fn cuattn_decode_fwd(
    gpu: *const cuattn_gpu,
    stream: *mut c_void,
    q: *const cuattn_tensor,
    k_cache: *const cuattn_tensor,
    v_cache: *const cuattn_tensor,
    o: *const cuattn_tensor,
    lse: *const cuattn_tensor,
    options: *const cuattn_decode_options,
    workspace: u64,
    workspace_bytes: usize,
) -> i32 {
    guard(|| {
        let g = gpu_of(gpu)?;
        let opts = deref("options", options)?;
        let run = on_stream(g, stream)?;
        let (q, k, v) = (
            tensor_ref(&run, "q", q)?,
            tensor_ref(&run, "k_cache", k_cache)?,
            tensor_ref(&run, "v_cache", v_cache)?,
        );
        let mut o = tensor_mut(&run, "o", o)?;
        let mut lse = optional(lse, |p| tensor_mut(&run, "lse", p))?;
        if workspace != 0 {
            // SAFETY: `workspace_bytes` bytes used only by this call's stream (the caller's
            // contract); `use_workspace` checks it is device memory of this context.
            unsafe { run.use_workspace(workspace, workspace_bytes)? };
        }
        run.check_device_pointer("cache_lens", opts.cache_lens)?;
        let batch = q.shape().first().copied().unwrap_or(0);
        // SAFETY: device memory of this context (checked), `batch` i32 by contract; the
        // kernel clamps each length to the cache.
        let lens =
            unsafe { cuattn::gpu::I32View::from_raw(run.context_id(), opts.cache_lens, batch) };
        let options = decode::Options {
            scale: scale(opts.scale),
            splits: match opts.splits {
                0 => None,
                s => Some(len("splits", s as i64)?),
            },
        };
        decode::forward_into(
            &run,
            &q,
            &k,
            &v,
            decode::CacheLens::View {
                lens,
                max_len: len("max_len", opts.max_len)?,
            },
            &mut o,
            lse.as_mut(),
            &options,
        )
    })
}

/// LayerNorm forward on device pointers over the last dim: y = (x − mean)·rstd·γ + β.
/// `gamma`, `beta`, `mean`, `rstd` may be NULL (γ = 1, β = 0, statistics not written).
#[no_mangle]
pub extern "C" fn cuattn_layernorm_fwd(
    gpu: *const cuattn_gpu,
    stream: *mut c_void,
    x: *const cuattn_tensor,
    gamma: *const cuattn_tensor,
    beta: *const cuattn_tensor,
    eps: f32,
    y: *const cuattn_tensor,
    mean: *const cuattn_tensor,
    rstd: *const cuattn_tensor,
) -> i32 {
    guard(|| {
        let run = on_stream(gpu_of(gpu)?, stream)?;
        let x = tensor_ref(&run, "x", x)?;
        let gamma = optional(gamma, |p| tensor_ref(&run, "gamma", p))?;
        let beta = optional(beta, |p| tensor_ref(&run, "beta", p))?;
        let mut y = tensor_mut(&run, "y", y)?;
        let mut mean = optional(mean, |p| tensor_mut(&run, "mean", p))?;
        let mut rstd = optional(rstd, |p| tensor_mut(&run, "rstd", p))?;
        layernorm::forward_into(
            &run,
            &x,
            gamma.as_ref(),
            beta.as_ref(),
            eps,
            &mut y,
            mean.as_mut(),
            rstd.as_mut(),
            Default::default(),
        )
    })
}

/// Bytes of scratch [`cuattn_layernorm_bwd`] needs for `rows` rows of `hidden` (into `*out`).
#[no_mangle]
pub extern "C" fn cuattn_layernorm_bwd_workspace_bytes(
    gpu: *const cuattn_gpu,
    dtype: i32,
    rows: usize,
    hidden: usize,
    out: *mut usize,
) -> i32 {
    guard(|| {
        let g = gpu_of(gpu)?;
        if out.is_null() {
            return Err(null("out"));
        }
        let n = layernorm::backward_workspace_bytes(g, dtype_of("dtype", dtype)?, rows, hidden)?;
        // SAFETY: `out` is non-NULL and writable.
        unsafe { *out = n };
        Ok(())
    })
}

/// LayerNorm backward on device pointers: dx, and dγ/dβ (summed over rows) when not NULL.
/// `mean`/`rstd` are the forward's statistics. `workspace` as in [`cuattn_decode_fwd`] (f32
/// scratch of [`cuattn_layernorm_bwd_workspace_bytes`]).
#[no_mangle]
pub extern "C" fn cuattn_layernorm_bwd(
    gpu: *const cuattn_gpu,
    stream: *mut c_void,
    dy: *const cuattn_tensor,
    x: *const cuattn_tensor,
    gamma: *const cuattn_tensor,
    mean: *const cuattn_tensor,
    rstd: *const cuattn_tensor,
    dx: *const cuattn_tensor,
    dgamma: *const cuattn_tensor,
    dbeta: *const cuattn_tensor,
    workspace: u64,
    workspace_bytes: usize,
) -> i32 {
    guard(|| {
        let run = on_stream(gpu_of(gpu)?, stream)?;
        let (dy, x) = (tensor_ref(&run, "dy", dy)?, tensor_ref(&run, "x", x)?);
        let gamma = optional(gamma, |p| tensor_ref(&run, "gamma", p))?;
        let (mean, rstd) = (
            tensor_ref(&run, "mean", mean)?,
            tensor_ref(&run, "rstd", rstd)?,
        );
        let mut dx = tensor_mut(&run, "dx", dx)?;
        let mut dgamma = optional(dgamma, |p| tensor_mut(&run, "dgamma", p))?;
        let mut dbeta = optional(dbeta, |p| tensor_mut(&run, "dbeta", p))?;
        let mut ws = if workspace == 0 {
            None
        } else {
            run.check_device_pointer("workspace", workspace)?;
            let n = workspace_bytes / 4;
            // SAFETY: device memory of this context (checked) of `workspace_bytes` bytes.
            Some(unsafe {
                TensorMut::from_raw(
                    run.context_id(),
                    workspace,
                    workspace_bytes,
                    DType::F32,
                    Layout::contiguous(&[n]),
                )
            })
        };
        layernorm::backward_into(
            &run,
            &dy,
            &x,
            gamma.as_ref(),
            &mean,
            &rstd,
            &mut dx,
            dgamma.as_mut(),
            dbeta.as_mut(),
            ws.as_mut(),
            Default::default(),
        )
    })
}

fn host<'a, T>(arg: &'static str, p: *const T, n: usize) -> Result<&'a [T]> {
    if p.is_null() {
        return Err(null(arg));
    }
    // SAFETY: `p` holds `n` readable values (the header's contract for this argument).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

fn host_mut<'a, T>(arg: &'static str, p: *mut T, n: usize) -> Result<&'a mut [T]> {
    if p.is_null() {
        return Err(null(arg));
    }
    // SAFETY: `p` holds `n` writable values (the header's contract for this argument).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// The CPU reference of dense attention (f64 inside), on contiguous host f32 arrays:
/// q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] → o [B, Hq, Lq, Dv] and, when not
/// NULL, lse [B, Hq, Lq] (−inf for a fully masked row, whose o is 0). `key_lens` (host, B
/// values in 0..=Lk) may be NULL. Of `options`, scale, causal and the window are used.
#[no_mangle]
pub extern "C" fn cuattn_attention_reference(
    shape: *const cuattn_attention_shape,
    q: *const f32,
    k: *const f32,
    v: *const f32,
    key_lens: *const i32,
    options: *const cuattn_attention_options,
    o: *mut f32,
    lse: *mut f32,
) -> i32 {
    guard(|| {
        let s = deref("shape", shape)?;
        let opts = deref("options", options)?;
        let dims = [
            ("batch", s.batch),
            ("heads_q", s.heads_q),
            ("heads_kv", s.heads_kv),
            ("len_q", s.len_q),
            ("len_k", s.len_k),
            ("dim_qk", s.dim_qk),
            ("dim_v", s.dim_v),
        ];
        let mut d = [0usize; 7];
        for (slot, (arg, x)) in d.iter_mut().zip(dims) {
            *slot = len(arg, x)?;
        }
        let shape = reference::attention::Shape::new(d[0], d[1], d[2], d[3], d[4], d[5], d[6]);
        let lens = if key_lens.is_null() {
            None
        } else {
            Some(
                host("key_lens", key_lens, shape.batch)?
                    .iter()
                    .map(|&l| len("key_lens", l as i64))
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        let mut ropts = reference::attention::Options::new(shape.dim_qk.max(1));
        if let Some(sc) = scale(opts.scale) {
            ropts.scale = sc as f64;
        }
        ropts.causal = align(opts.causal, "causal")?;
        ropts.window = window(opts)?;
        ropts.key_lens = lens;
        let out = reference::attention::forward(
            host("q", q, shape.q_len())?,
            host("k", k, shape.k_len())?,
            host("v", v, shape.v_len())?,
            &shape,
            &ropts,
        )?;
        for (dst, src) in host_mut("o", o, shape.o_len())?.iter_mut().zip(&out.o) {
            *dst = *src as f32;
        }
        if !lse.is_null() {
            for (dst, src) in host_mut("lse", lse, shape.lse_len())?
                .iter_mut()
                .zip(&out.lse)
            {
                *dst = *src as f32;
            }
        }
        Ok(())
    })
}

/// The CPU reference of LayerNorm (f64 inside) on `rows` × `hidden` contiguous host f32:
/// y, and mean / rstd per row when not NULL. `gamma`/`beta` (hidden values) may be NULL.
#[no_mangle]
pub extern "C" fn cuattn_layernorm_reference(
    x: *const f32,
    rows: usize,
    hidden: usize,
    gamma: *const f32,
    beta: *const f32,
    eps: f32,
    y: *mut f32,
    mean: *mut f32,
    rstd: *mut f32,
) -> i32 {
    guard(|| {
        let n = rows
            .checked_mul(hidden)
            .ok_or_else(|| Error::invalid("rows", "rows × hidden overflows"))?;
        let x = host("x", x, n)?;
        let opt = |arg, p: *const f32| -> Result<Option<&[f32]>> {
            if p.is_null() {
                Ok(None)
            } else {
                host(arg, p, hidden).map(Some)
            }
        };
        let out = reference::layernorm::forward(
            x,
            hidden,
            opt("gamma", gamma)?,
            opt("beta", beta)?,
            eps,
        )?;
        for (dst, src) in host_mut("y", y, n)?.iter_mut().zip(&out.y) {
            *dst = *src as f32;
        }
        for (p, vals, arg) in [(mean, &out.mean, "mean"), (rstd, &out.rstd, "rstd")] {
            if !p.is_null() {
                for (dst, src) in host_mut(arg, p, rows)?.iter_mut().zip(vals) {
                    *dst = *src as f32;
                }
            }
        }
        Ok(())
    })
}
