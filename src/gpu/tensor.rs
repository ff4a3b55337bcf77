//! Device tensors and the borrowed views the ops take.
//!
//! A [`DeviceTensor`] owns its memory. Ops take a [`TensorRef`] (read) or [`TensorMut`]
//! (write): a device address, its size in bytes, a dtype, a layout and the context the memory
//! belongs to. Views made from a `DeviceTensor` borrow it; views over memory owned by another
//! runtime (candle, a custom engine) are made with the `unsafe` `from_raw` constructors, whose
//! caller vouches for the address and names its context. Either way every op checks the view's
//! context against its Gpu's, and its layout against its byte size, before a launch.

use super::Gpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{HostTensor, Layout};
use cudarc::driver::{CudaContext, CudaSlice, DevicePtr};
use std::marker::PhantomData;
use std::sync::Arc;

/// Which CUDA context a view's memory belongs to (the `CUcontext` handle as a number). Views
/// carry one so that an op refuses memory of another context with [`Error::Device`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContextId(u64);

impl ContextId {
    /// The id of a cudarc context.
    pub fn of(ctx: &CudaContext) -> ContextId {
        ContextId(ctx.cu_ctx() as u64)
    }

    /// The id of a raw `CUcontext` (as C callers pass it).
    pub fn from_raw(ctx: cudarc::driver::sys::CUcontext) -> ContextId {
        ContextId(ctx as u64)
    }

    /// The raw handle as a number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Debug for ContextId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

/// A read-only view of `len` i32 values in device memory: key lengths, cumulative sequence
/// offsets or cache lengths that stay on the device, so that a call uploads nothing (and can
/// be captured in a CUDA graph).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct I32View<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) ctx: ContextId,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> I32View<'a> {
    /// A view of a cudarc buffer of `gpu`'s context.
    pub fn new(gpu: &Gpu, buf: &'a CudaSlice<i32>) -> I32View<'a> {
        let (ptr, _sync) = buf.device_ptr(gpu.stream());
        I32View {
            ptr,
            len: buf.len(),
            ctx: ContextId::of(buf.context()),
            _borrow: PhantomData,
        }
    }

    /// A view over device memory owned elsewhere.
    ///
    /// # Safety
    /// `ptr` must be a device address of context `ctx`, 4-byte aligned, valid for reads of
    /// `len` i32 for the lifetime `'a`, with no writes to it while the op's stream may read it.
    pub unsafe fn from_raw(ctx: ContextId, ptr: u64, len: usize) -> I32View<'a> {
        I32View {
            ptr,
            len,
            ctx,
            _borrow: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    pub fn context(&self) -> ContextId {
        self.ctx
    }
}

/// A tensor in device memory, owned.
pub struct DeviceTensor {
    buf: CudaSlice<u8>,
    dtype: DType,
    layout: Layout,
    gpu: Arc<Gpu>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("dtype", &self.dtype)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// A read-only view of device memory holding one tensor.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    pub(crate) dtype: DType,
    pub(crate) layout: Layout,
    pub(crate) ctx: ContextId,
    _borrow: PhantomData<&'a ()>,
}

/// A writable view of device memory holding one tensor.
#[derive(Debug)]
pub struct TensorMut<'a> {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    pub(crate) dtype: DType,
    pub(crate) layout: Layout,
    pub(crate) ctx: ContextId,
    _borrow: PhantomData<&'a mut ()>,
}

impl<'a> TensorRef<'a> {
    /// A view over device memory owned elsewhere, in context `ctx` (see [`Gpu::context_id`],
    /// [`ContextId::of`]); an op on a Gpu of another context refuses it.
    ///
    /// # Safety
    /// `ptr` must be a device address of context `ctx`, valid for reads of `bytes` bytes for
    /// the lifetime `'a`, with no writes to it by other streams while the op's stream may
    /// read it.
    pub unsafe fn from_raw(
        ctx: ContextId,
        ptr: u64,
        bytes: usize,
        dtype: DType,
        layout: Layout,
    ) -> Self {
        TensorRef {
            ptr,
            bytes,
            dtype,
            layout,
            ctx,
            _borrow: PhantomData,
        }
    }

    /// The context the memory belongs to.
    pub fn context(&self) -> ContextId {
        self.ctx
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl<'a> TensorMut<'a> {
    /// A writable view over device memory owned elsewhere, in context `ctx`.
    ///
    /// # Safety
    /// As [`TensorRef::from_raw`], and valid for writes, with no other reader or writer of the
    /// range while the op's stream may write it.
    pub unsafe fn from_raw(
        ctx: ContextId,
        ptr: u64,
        bytes: usize,
        dtype: DType,
        layout: Layout,
    ) -> Self {
        TensorMut {
            ptr,
            bytes,
            dtype,
            layout,
            ctx,
            _borrow: PhantomData,
        }
    }

    /// The context the memory belongs to.
    pub fn context(&self) -> ContextId {
        self.ctx
    }

    /// A read-only view of the same memory.
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef {
            ptr: self.ptr,
            bytes: self.bytes,
            dtype: self.dtype,
            layout: self.layout.clone(),
            ctx: self.ctx,
            _borrow: PhantomData,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl Gpu {
    /// Uploads a host tensor (same dtype, layout and bytes).
    pub fn upload(self: &Arc<Self>, host: &HostTensor) -> Result<DeviceTensor> {
        let buf = self
            .stream
            .clone_htod(host.bytes())
            .map_err(|e| Error::driver("copy host to device", e))?;
        Ok(DeviceTensor {
            buf,
            dtype: host.dtype(),
            layout: host.layout().clone(),
            gpu: self.clone(),
        })
    }

    /// A contiguous device tensor of `shape` with every element set to `fill` (rounded to
    /// `dtype`). Tests fill outputs with NaN so that unwritten elements show.
    pub fn full(
        self: &Arc<Self>,
        dtype: DType,
        shape: &[usize],
        fill: f32,
    ) -> Result<DeviceTensor> {
        let n: usize = shape.iter().product();
        let host = HostTensor::from_f32(dtype, shape, &vec![fill; n])?;
        self.upload(&host)
    }

    /// A contiguous device tensor of `shape` with every byte zero: a device-side memset, no
    /// host buffer (the runtime's outputs; [`Gpu::full`] uploads its fill from the host).
    pub fn zeros(self: &Arc<Self>, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
        let n: usize = shape.iter().product();
        let buf = self
            .stream
            .alloc_zeros::<u8>((n * dtype.size_bytes()).max(1))
            .map_err(|e| Error::driver("alloc_zeros", e))?;
        Ok(DeviceTensor {
            buf,
            dtype,
            layout: Layout::contiguous(shape),
            gpu: self.clone(),
        })
    }

    /// A device tensor with `layout` over a buffer of `len_elems` elements, all set to `fill`.
    pub fn full_strided(
        self: &Arc<Self>,
        dtype: DType,
        layout: Layout,
        len_elems: usize,
        fill: f32,
    ) -> Result<DeviceTensor> {
        let bytes = crate::dtype::encode(dtype, &vec![fill; len_elems]);
        let host = HostTensor::from_bytes(dtype, layout, bytes)?;
        self.upload(&host)
    }
}

impl DeviceTensor {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The context the tensor's memory belongs to (its Gpu's).
    pub fn context_id(&self) -> ContextId {
        self.gpu.context_id()
    }

    /// Same memory, new shape and strides; checked against the buffer's size.
    pub fn reshape(mut self, layout: Layout) -> Result<Self> {
        layout.check_fits("tensor", self.buf.len() / self.dtype.size_bytes())?;
        self.layout = layout;
        Ok(self)
    }

    fn raw_ptr(&self) -> u64 {
        let (ptr, _sync) = self.buf.device_ptr(self.gpu.stream());
        ptr
    }

    pub fn view(&self) -> TensorRef<'_> {
        TensorRef {
            ptr: self.raw_ptr(),
            bytes: self.buf.len(),
            dtype: self.dtype,
            layout: self.layout.clone(),
            ctx: self.gpu.context_id(),
            _borrow: PhantomData,
        }
    }

    pub fn view_mut(&mut self) -> TensorMut<'_> {
        TensorMut {
            ptr: self.raw_ptr(),
            bytes: self.buf.len(),
            dtype: self.dtype,
            layout: self.layout.clone(),
            ctx: self.gpu.context_id(),
            _borrow: PhantomData,
        }
    }

    /// Copies the whole buffer back (waits for queued work first) as a host tensor with the
    /// same layout.
    pub fn to_host(&self) -> Result<HostTensor> {
        let bytes = self
            .gpu
            .stream()
            .clone_dtoh(&self.buf)
            .map_err(|e| Error::driver("copy device to host", e))?;
        // A copy into pageable memory returns when done; synchronizing also surfaces any
        // asynchronous error of an earlier launch here rather than later.
        self.gpu.synchronize()?;
        HostTensor::from_bytes(self.dtype, self.layout.clone(), bytes)
    }

    /// Overwrites the buffer with `host` (same dtype and byte size), queued on the tensor's
    /// Gpu stream: the memory keeps its address, so views, device lengths and captured CUDA
    /// graphs that point at it see the new values.
    pub fn write(&mut self, host: &HostTensor) -> Result<()> {
        if host.dtype() != self.dtype {
            return Err(Error::DType {
                arg: "host",
                expected: self.dtype,
                got: host.dtype(),
            });
        }
        if host.bytes().len() != self.buf.len() {
            return Err(Error::invalid(
                "host",
                format!(
                    "{} bytes do not fill the tensor's {} bytes",
                    host.bytes().len(),
                    self.buf.len()
                ),
            ));
        }
        self.gpu
            .stream()
            .memcpy_htod(host.bytes(), &mut self.buf)
            .map_err(|e| Error::driver("copy host to device", e))
    }

    /// The logical elements in row-major order, as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.to_f32_vec())
    }
}

impl TensorRef<'_> {
    pub(crate) fn info(&self, arg: &'static str) -> crate::ops::ViewInfo<'_> {
        crate::ops::ViewInfo {
            arg,
            ptr: self.ptr,
            bytes: self.bytes,
            dtype: self.dtype,
            layout: &self.layout,
        }
    }
}

impl TensorMut<'_> {
    pub(crate) fn info(&self, arg: &'static str) -> crate::ops::ViewInfo<'_> {
        crate::ops::ViewInfo {
            arg,
            ptr: self.ptr,
            bytes: self.bytes,
            dtype: self.dtype,
            layout: &self.layout,
        }
    }
}

impl DeviceTensor {
    /// A view of part of this buffer: `layout` starting `offset_elems` elements in, checked to
    /// lie inside the buffer. Lets a caller address sub-tensors or misaligned starts.
    pub fn view_at(&self, offset_elems: usize, layout: Layout) -> Result<TensorRef<'_>> {
        let (ptr, bytes) = self.sub_range(offset_elems, &layout)?;
        Ok(TensorRef {
            ptr,
            bytes,
            dtype: self.dtype,
            layout,
            ctx: self.gpu.context_id(),
            _borrow: PhantomData,
        })
    }

    /// Writable form of [`DeviceTensor::view_at`].
    pub fn view_mut_at(&mut self, offset_elems: usize, layout: Layout) -> Result<TensorMut<'_>> {
        let (ptr, bytes) = self.sub_range(offset_elems, &layout)?;
        Ok(TensorMut {
            ptr,
            bytes,
            dtype: self.dtype,
            layout,
            ctx: self.gpu.context_id(),
            _borrow: PhantomData,
        })
    }

    fn sub_range(&self, offset_elems: usize, layout: &Layout) -> Result<(u64, usize)> {
        let size = self.dtype.size_bytes();
        let len = self.buf.len() / size;
        if offset_elems > len {
            return Err(Error::invalid(
                "offset",
                format!("offset {offset_elems} is past the buffer's {len} elements"),
            ));
        }
        layout.check_fits("view", len - offset_elems)?;
        Ok((
            self.raw_ptr() + (offset_elems * size) as u64,
            (len - offset_elems) * size,
        ))
    }
}

impl Gpu {
    /// A contiguous tensor of uniform random values in [center − spread, center + spread]
    /// (benchmarks' inputs: never zeros). A block of up to 4M values is drawn on the host and
    /// tiled on the device, so gigabyte tensors are made in milliseconds.
    pub fn random(
        self: &Arc<Self>,
        dtype: DType,
        shape: &[usize],
        seed: u64,
        center: f32,
        spread: f32,
    ) -> Result<DeviceTensor> {
        use rand::{Rng, SeedableRng};
        let n: usize = shape.iter().product();
        let block = n.clamp(1, 1 << 22);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..block)
            .map(|_| center + spread * rng.gen_range(-1.0f32..1.0))
            .collect();
        let head = self.upload(&HostTensor::from_f32(dtype, &[block], &values)?)?;
        if n <= block {
            return head.reshape(Layout::contiguous(shape));
        }
        let size = dtype.size_bytes();
        // SAFETY: allocation only; every byte is written by the copies below before any read.
        let buf =
            unsafe { self.stream.alloc::<u8>(n * size) }.map_err(|e| Error::driver("alloc", e))?;
        let out = DeviceTensor {
            buf,
            dtype,
            layout: Layout::contiguous(shape),
            gpu: self.clone(),
        };
        let (src, dst) = (head.raw_ptr(), out.raw_ptr());
        let mut done = 0usize;
        while done < n {
            let count = block.min(n - done);
            // SAFETY: src holds `block` ≥ `count` elements and dst has room for `count` more
            // elements at `done`; both are allocations of this Gpu, used on its one stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst + (done * size) as u64,
                    src,
                    count * size,
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| Error::driver("copy device to device", e))?;
            done += count;
        }
        self.synchronize()?;
        Ok(out)
    }
}
