//! The device layer: finding a GPU without panicking, one context and stream per [`Gpu`],
//! modules loaded once, kernel handles whose dynamic shared-memory limit is raised once, and
//! device tensors with borrowed views that the ops take.
//!
//! All work of a [`Gpu`] goes to its one stream, in order, so cudarc's per-buffer event
//! tracking is switched off: stream order alone makes every read follow the write before it.

mod tensor;

pub use tensor::{DeviceTensor, TensorMut, TensorRef};

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
    // SAFETY: only tries to dlopen libcuda by its usual names; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
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

/// A loaded kernel: the function, with its dynamic shared-memory limit already raised to the
/// device's opt-in maximum.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub(crate) func: CudaFunction,
    pub name: &'static str,
    /// Dynamic shared memory one block of this kernel may use (opt-in maximum minus static).
    pub max_dynamic_smem: usize,
}

/// One GPU: a context, the stream all cuattn work goes to, and the loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    kernels: Mutex<HashMap<&'static str, Kernel>>,
    workspace: Mutex<Option<CudaSlice<u8>>>,
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
            modules: Mutex::new(HashMap::new()),
            kernels: Mutex::new(HashMap::new()),
            workspace: Mutex::new(None),
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
    pub fn kernel(&self, module: &'static str, name: &'static str) -> Result<Kernel> {
        if let Some(k) = self.kernels.lock().unwrap().get(name) {
            return Ok(k.clone());
        }
        let module_handle = {
            let mut modules = self.modules.lock().unwrap();
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
        let k = Kernel {
            func,
            name,
            max_dynamic_smem: max_dynamic_smem.max(0) as usize,
        };
        self.kernels.lock().unwrap().insert(name, k.clone());
        Ok(k)
    }

    /// Blocks of `kernel` that fit on one multiprocessor with `threads` threads and
    /// `dynamic_smem` bytes each.
    pub fn blocks_per_sm(&self, kernel: &Kernel, threads: u32, dynamic_smem: usize) -> Result<u32> {
        kernel
            .func
            .occupancy_max_active_blocks_per_multiprocessor(threads, dynamic_smem, None)
            .map_err(|e| Error::driver(format!("occupancy of `{}`", kernel.name), e))
    }

    /// Runs `enqueue` with the device address of at least `bytes` bytes of scratch memory
    /// owned by this Gpu (ops that need a workspace use it when the caller passes none).
    ///
    /// The lock is held while `enqueue` queues its kernels, so one op's kernels stand together
    /// in the stream: another thread's op cannot slip in between and overwrite the scratch, and
    /// a reallocation (whose free is stream-ordered) comes after every earlier user's kernels.
    pub(crate) fn with_workspace<R>(
        &self,
        bytes: usize,
        enqueue: impl FnOnce(u64) -> Result<R>,
    ) -> Result<R> {
        let mut ws = self
            .workspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ws.as_ref().is_none_or(|w| w.len() < bytes) {
            // SAFETY: the buffer is scratch; every kernel that uses it writes before it reads.
            let buf = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
                .map_err(|e| Error::driver(format!("allocating a {bytes}-byte workspace"), e))?;
            *ws = Some(buf);
        }
        let (ptr, _sync) = ws
            .as_ref()
            .expect("allocated above")
            .device_ptr(&self.stream);
        enqueue(ptr)
    }
}
