//! The device layer: finding a GPU without panicking, one context and stream per [`Gpu`],
//! modules loaded once, kernel handles whose dynamic shared-memory limit is raised once, and
//! device tensors with borrowed views that the ops take.
//!
//! A [`Gpu`] is an execution handle: a context, one stream, the kernels loaded in that context
//! and a scratch buffer. Every op launches on `gpu.stream()` only, never synchronizes, and
//! allocates only what the caller did not supply. To run ops on a stream of your own (a
//! cudarc stream or a raw `CUstream`), make a handle for it with [`Gpu::on_stream`],
//! [`Gpu::on_raw_stream`] or, for a context your runtime owns, [`Gpu::from_context`]; handles
//! of one context share their loaded kernels, and each has its own scratch buffer, so two
//! streams never share scratch memory.
//!
//! The handle [`Gpu::new`] makes owns its context and puts all its work on one stream, so
//! cudarc's per-buffer event tracking is switched off there: stream order alone makes every
//! read follow the write before it. Ordering work between streams is the caller's job (events).

mod pointer;
mod tensor;

pub use tensor::{ContextId, DeviceTensor, I32View, TensorMut, TensorRef};

use crate::error::{Error, Result};
use crate::kernels;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What `probe` found about a GPU.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    pub multiprocessors: u32,
    /// Largest dynamic shared memory one block may opt into.
    pub max_shared_per_block_optin: u32,
}

/// Number of CUDA devices, or why there are none. Never panics: cudarc panics when libcuda is
/// missing, so the library's presence is checked first.
pub fn device_count() -> Result<usize> {
    if !driver_library_present() {
        return Err(Error::NoDevice(
            "the CUDA driver library (libcuda.so) is not installed".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(Error::NoDevice("the CUDA driver reports 0 devices".into())),
        Err(e) => Err(Error::NoDevice(format!("the CUDA driver reports {e:?}"))),
    }
}

/// Whether libcuda can be used. cudarc normally loads it at run time (cuattn asks for
/// `fallback-dynamic-loading`) and panics on first use when it is missing, so its presence is
/// probed first.
#[cfg(not(feature = "candle-cuda"))]
fn driver_library_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// With `candle-cuda`, candle's CUDA backend makes cudarc link the libraries instead
/// (`dynamic-linking`, to which the fallback gives way): the loader resolved them before the
/// program started, and cudarc has no probe to call.
#[cfg(feature = "candle-cuda")]
fn driver_library_present() -> bool {
    true
}

/// [`driver_library_present`] for cuBLAS.
#[cfg(not(feature = "candle-cuda"))]
pub(crate) fn blas_library_present() -> bool {
    // SAFETY: only tries to dlopen libcublas by its usual names; no cuBLAS call is made.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// [`driver_library_present`] for cuBLAS (linked with `candle-cuda`).
#[cfg(feature = "candle-cuda")]
pub(crate) fn blas_library_present() -> bool {
    true
}

/// A loaded kernel: the function, with its dynamic shared-memory limit already raised to the
/// device's opt-in maximum.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub(crate) func: CudaFunction,
    pub name: &'static str,
    /// Dynamic shared memory one block of this kernel may use (opt-in maximum minus static).
    pub max_dynamic_smem: usize,
}

/// Modules and kernels loaded in one context, shared by every [`Gpu`] handle of it.
#[derive(Default)]
struct Loaded {
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    kernels: Mutex<HashMap<&'static str, LoadedKernel>>,
}

/// One GPU execution handle: a context, the stream this handle's work goes to, the loaded
/// kernels (shared with the other handles of the context) and a scratch buffer of its own.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    loaded: Arc<Loaded>,
    workspace: Mutex<Scratch>,
}

/// A Gpu handle's scratch memory.
enum Scratch {
    /// Allocated on first need, grown when a call needs more.
    Owned(Option<CudaSlice<u8>>),
    /// Memory the caller supplied ([`Gpu::use_workspace`]): never grown, never freed here.
    Borrowed { ptr: u64, bytes: usize },
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal` with its own stream.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested but only {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::driver("cuCtxCreate", e))?;
        // SAFETY: every launch and copy of this Gpu goes to `stream` below (one stream), so
        // stream order already orders all accesses; no cross-stream events are needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::driver("cuStreamCreate", e))?;
        Self::with(ctx, stream, ordinal)
    }

    /// A handle on a context and stream the caller's runtime owns (candle's, a C++ engine's).
    /// cuattn leaves the context's settings (event tracking included) as they are. The stream
    /// must belong to `ctx`.
    pub fn from_context(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Arc<Gpu>> {
        if stream.context().cu_ctx() != ctx.cu_ctx() {
            return Err(Error::Device {
                arg: "stream",
                reason: "the stream belongs to another context".into(),
            });
        }
        let ordinal = ctx.ordinal();
        Self::with(ctx, stream, ordinal)
    }

    /// A handle on the same context and loaded kernels whose ops go to `stream` (a stream of
    /// this context), with its own scratch buffer. Cheap: no driver call; make one per stream
    /// and keep it.
    pub fn on_stream(&self, stream: Arc<CudaStream>) -> Result<Arc<Gpu>> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Device {
                arg: "stream",
                reason: "the stream belongs to another context than this Gpu's".into(),
            });
        }
        Ok(Arc::new(Gpu {
            ctx: self.ctx.clone(),
            stream,
            info: self.info.clone(),
            loaded: self.loaded.clone(),
            workspace: Mutex::new(Scratch::Owned(None)),
        }))
    }

    /// [`Gpu::on_stream`] for a raw `CUstream` another library created.
    ///
    /// # Safety
    /// `stream` must be a live stream of this Gpu's context (or the null stream) and stay
    /// alive while the returned handle is used; dropping the handle does not destroy it.
    pub unsafe fn on_raw_stream(&self, stream: cudarc::driver::sys::CUstream) -> Result<Arc<Gpu>> {
        if !stream.is_null() {
            let mut owner: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
            // SAFETY: `stream` is a live stream (the caller's contract); the query writes one
            // CUcontext.
            let r = unsafe { cudarc::driver::sys::cuStreamGetCtx(stream, &mut owner) };
            if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                return Err(Error::driver(
                    "cuStreamGetCtx",
                    cudarc::driver::DriverError(r),
                ));
            }
            if ContextId::from_raw(owner) != self.context_id() {
                return Err(Error::Device {
                    arg: "stream",
                    reason: "the stream belongs to another context than this Gpu's".into(),
                });
            }
        }
        // SAFETY: a live stream of this context (checked above; NULL is the legacy default
        // stream), kept alive by the caller while the handle is used.
        let wrapped = unsafe { self.ctx.wrap_borrowed_stream(stream) };
        self.on_stream(wrapped)
    }

    /// The identity of this Gpu's context, which views made for it carry.
    pub fn context_id(&self) -> ContextId {
        ContextId::of(&self.ctx)
    }

    /// Checks that a view given as `arg` belongs to this Gpu's context: memory of another
    /// context is an [`Error::Device`], never a launch.
    pub fn check_context(&self, arg: &'static str, view: ContextId) -> Result<()> {
        if view != self.context_id() {
            return Err(Error::Device {
                arg,
                reason: format!(
                    "the view belongs to context {view:?}, the op runs on {:?}",
                    self.context_id()
                ),
            });
        }
        Ok(())
    }

    /// [`Gpu::check_context`] for each `(argument, context)` of an op's views, in order: the
    /// one check every op (attention, decode, LayerNorm, the training ops, the GEMMs, the
    /// runtime's fused ops) makes before any launch.
    pub fn check_contexts(
        &self,
        views: impl IntoIterator<Item = (&'static str, ContextId)>,
    ) -> Result<()> {
        views
            .into_iter()
            .try_for_each(|(arg, ctx)| self.check_context(arg, ctx))
    }

    fn with(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, ordinal: usize) -> Result<Arc<Gpu>> {
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| Error::driver("cuDeviceGetAttribute", e))
        };
        let info = DeviceInfo {
            ordinal,
            name: ctx
                .name()
                .map_err(|e| Error::driver("cuDeviceGetName", e))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(|e| Error::driver("compute capability", e))?,
            total_memory_bytes: ctx
                .total_mem()
                .map_err(|e| Error::driver("cuDeviceTotalMem", e))?,
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
            max_shared_per_block_optin: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as u32,
        };
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            info,
            loaded: Arc::new(Loaded::default()),
            workspace: Mutex::new(Scratch::Owned(None)),
        }))
    }

    /// The process-wide handle to device 0, opened on first use.
    pub fn shared() -> Result<Arc<Gpu>> {
        static SHARED: OnceLock<std::result::Result<Arc<Gpu>, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                Gpu::new(0).map_err(|e| match e {
                    Error::NoDevice(reason) => reason,
                    other => other.to_string(),
                })
            })
            .clone()
            .map_err(Error::NoDevice)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for all work queued on this Gpu's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::driver("cuStreamSynchronize", e))
    }

    /// The kernel `name` from module `module` (a `kernels/<module>.cu` file), loading the module
    /// and raising the function's dynamic shared-memory limit on first use only.
    pub fn kernel(&self, module: &'static str, name: &'static str) -> Result<LoadedKernel> {
        fn lock_err<T>(_: T) -> Error {
            Error::invalid("module", "a thread panicked while loading kernels")
        }
        if let Some(k) = self.loaded.kernels.lock().map_err(lock_err)?.get(name) {
            return Ok(k.clone());
        }
        let module_handle = {
            let mut modules = self.loaded.modules.lock().map_err(lock_err)?;
            match modules.get(module) {
                Some(m) => m.clone(),
                None => {
                    let image = kernels::modules()
                        .iter()
                        .find(|m| m.name == module)
                        .ok_or_else(|| {
                            Error::invalid("module", format!("no compiled module `{module}`"))
                        })?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(image.fatbin.to_vec()))
                        .map_err(|e| Error::driver(format!("loading module `{module}`"), e))?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        let func = module_handle
            .load_function(name)
            .map_err(|e| Error::driver(format!("cuModuleGetFunction `{name}`"), e))?;
        let static_smem = func
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .map_err(|e| Error::driver("cuFuncGetAttribute", e))?;
        let max_dynamic_smem = self.info.max_shared_per_block_optin as i32 - static_smem;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            max_dynamic_smem,
        )
        .map_err(|e| Error::driver(format!("raising the shared-memory limit of `{name}`"), e))?;
        let k = LoadedKernel {
            func,
            name,
            max_dynamic_smem: max_dynamic_smem.max(0) as usize,
        };
        self.loaded
            .kernels
            .lock()
            .map_err(lock_err)?
            .insert(name, k.clone());
        Ok(k)
    }

    /// Blocks of `kernel` that fit on one multiprocessor with `threads` threads and
    /// `dynamic_smem` bytes each.
    pub fn blocks_per_sm(
        &self,
        kernel: &LoadedKernel,
        threads: u32,
        dynamic_smem: usize,
    ) -> Result<u32> {
        kernel
            .func
            .occupancy_max_active_blocks_per_multiprocessor(threads, dynamic_smem, None)
            .map_err(|e| Error::driver(format!("occupancy of `{}`", kernel.name), e))
    }

    /// Allocates this handle's scratch buffer now, at least `bytes` bytes (an op's
    /// `workspace_bytes` query gives the size), so that later calls needing no more allocate
    /// nothing (a requirement for capturing them in a CUDA graph).
    pub fn reserve_workspace(&self, bytes: usize) -> Result<()> {
        self.with_workspace(bytes, |_| Ok(()))
    }

    /// Makes `bytes` bytes at `ptr` this handle's scratch memory, replacing its own: ops never
    /// allocate scratch again, and a call that needs more is an error. `ptr` must be 16-byte
    /// aligned ([`Error::Alignment`]) and device memory of this Gpu's context or device
    /// ([`Gpu::check_device_pointer`]: NULL, host memory and another context's memory are
    /// [`Error::Device`]).
    ///
    /// # Safety
    /// `ptr` must be a device allocation usable by this Gpu's context, valid for reads and
    /// writes of `bytes` bytes for as long as this handle is used, and touched by nothing else
    /// while work of this handle's stream may use it.
    pub unsafe fn use_workspace(&self, ptr: u64, bytes: usize) -> Result<()> {
        if !ptr.is_multiple_of(16) {
            return Err(Error::Alignment {
                arg: "workspace",
                ptr,
                align: 16,
            });
        }
        self.check_device_pointer("workspace", ptr)?;
        *self.scratch()? = Scratch::Borrowed { ptr, bytes };
        Ok(())
    }

    fn scratch(&self) -> Result<std::sync::MutexGuard<'_, Scratch>> {
        // A panic while the lock was held (only in `enqueue`) leaves the buffer valid.
        Ok(self
            .workspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Runs `enqueue` with the device address of at least `bytes` bytes of scratch memory
    /// owned by this handle (ops that need a workspace use it).
    ///
    /// The lock is held while `enqueue` queues its kernels, so one op's kernels stand together
    /// in the stream: another thread's op cannot slip in between and overwrite the scratch, and
    /// a reallocation (whose free is stream-ordered) comes after every earlier user's kernels.
    pub(crate) fn with_workspace<R>(
        &self,
        bytes: usize,
        enqueue: impl FnOnce(u64) -> Result<R>,
    ) -> Result<R> {
        let mut ws = self.scratch()?;
        let ptr = match &mut *ws {
            Scratch::Borrowed { ptr, bytes: have } => {
                if *have < bytes {
                    return Err(Error::invalid(
                        "workspace",
                        format!(
                            "the call needs {bytes} bytes of scratch, the caller's workspace has {have}"
                        ),
                    ));
                }
                *ptr
            }
            Scratch::Owned(buf) => {
                if buf.as_ref().is_none_or(|w| w.len() < bytes) {
                    *buf = None; // the old buffer's free is stream-ordered before the new one
                                 // SAFETY: the buffer is scratch; every kernel that uses it writes before
                                 // it reads.
                    let fresh = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
                        Error::driver(format!("allocating a {bytes}-byte workspace"), e)
                    })?;
                    *buf = Some(fresh);
                }
                let Some(b) = buf.as_ref() else {
                    return Err(Error::invalid("workspace", "no workspace buffer"));
                };
                b.device_ptr(&self.stream).0
            }
        };
        enqueue(ptr)
    }
}
