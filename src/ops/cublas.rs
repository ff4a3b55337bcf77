//! A cuBLAS handle on a Gpu's stream and the workspace it computes in: the one implementation
//! behind [`super::gemm::Gemm`] (the linear layer's GEMMs), the unfused attention baseline
//! ([`super::attention_unfused::Unfused`]) and the CUDA runtime backend (`runtime::cuda::Cuda`,
//! whose linear layers and batched products run on cuBLAS).
//!
//! Left alone, a cuBLAS handle draws its scratch from a pool cuBLAS manages and may allocate
//! when a call needs more, which a CUDA graph capture cannot hold. A fixed workspace
//! (`cublasSetWorkspace`) makes every later GEMM allocate nothing: either allocated here once
//! ([`BlasHandle::reserve_workspace`]) or the caller's memory ([`BlasHandle::use_workspace`]).
//! cuBLAS has no per-call size query for `cublasGemmEx`: [`workspace_bytes`] is NVIDIA's
//! recommended size for the device (what its default pool holds); a smaller one of at least
//! [`MIN_WORKSPACE_BYTES`] works but may make cuBLAS pick slower kernels.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// The smallest cuBLAS workspace a `use_workspace` or `reserve_workspace` accepts: cuBLAS
/// documents 16 KiB as enough for no routine to fail for lack of workspace.
pub const MIN_WORKSPACE_BYTES: usize = 16 << 10;

/// Alignment cuBLAS requires of a workspace address (it refuses a less aligned one).
pub const WORKSPACE_ALIGN: u64 = 256;

/// The cuBLAS workspace to give a handle on `gpu`'s device: NVIDIA's recommended size, the
/// size of cuBLAS's default pool (32 MiB from Hopper, sm_90, on; 4 MiB before).
pub fn workspace_bytes(gpu: &Gpu) -> usize {
    recommended_workspace_bytes(gpu.info().compute_capability)
}

fn recommended_workspace_bytes((major, _minor): (i32, i32)) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

pub(crate) fn check_workspace_size(bytes: usize) -> Result<()> {
    if bytes < MIN_WORKSPACE_BYTES {
        return Err(Error::invalid(
            "workspace",
            format!(
                "{bytes} bytes is below the {MIN_WORKSPACE_BYTES} cuBLAS needs to run every GEMM"
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_workspace_align(ptr: u64) -> Result<()> {
    if !ptr.is_multiple_of(WORKSPACE_ALIGN) {
        return Err(Error::Alignment {
            arg: "workspace",
            ptr,
            align: WORKSPACE_ALIGN as usize,
        });
    }
    Ok(())
}

/// Where a handle takes its scratch from.
enum Workspace {
    /// cuBLAS's own pool.
    Library,
    /// Allocated by [`BlasHandle::reserve_workspace`]; freed in stream order when replaced or
    /// dropped (after the handle, which is declared first).
    Owned(CudaSlice<u8>),
    /// The caller's memory ([`BlasHandle::use_workspace`]).
    Borrowed { bytes: usize },
}

/// A cuBLAS handle bound to a Gpu's stream, with its workspace.
pub(crate) struct BlasHandle {
    gpu: Arc<Gpu>,
    // Declared before `workspace`: the handle is destroyed before a buffer of ours is freed.
    blas: CudaBlas,
    workspace: Workspace,
}

impl BlasHandle {
    /// Loads cuBLAS (it must be on the library path) and makes a handle on the Gpu's stream.
    pub(crate) fn new(gpu: &Arc<Gpu>) -> Result<BlasHandle> {
        // cudarc panics on the first cuBLAS call when the library cannot be loaded: check first.
        if !crate::gpu::blas_library_present() {
            return Err(Error::NoDevice(
                "cuBLAS 13 (libcublas.so.13) was not found: put its folder (e.g. PyTorch's \
                 site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(gpu.stream().clone())
            .map_err(|e| Error::blas("creating a cuBLAS handle", e))?;
        Ok(BlasHandle {
            gpu: gpu.clone(),
            blas,
            workspace: Workspace::Library,
        })
    }

    /// The raw handle, for the `cublas*Ex` calls.
    pub(crate) fn handle(&self) -> &blas_sys::cublasHandle_t {
        self.blas.handle()
    }

    /// The size of the fixed workspace, or `None` while the handle draws from cuBLAS's pool.
    pub(crate) fn workspace(&self) -> Option<usize> {
        match &self.workspace {
            Workspace::Library => None,
            Workspace::Owned(buf) => Some(buf.len()),
            Workspace::Borrowed { bytes } => Some(*bytes),
        }
    }

    /// Allocates `bytes` of device memory (at least [`MIN_WORKSPACE_BYTES`]) and makes it the
    /// handle's workspace. A workspace allocated here before is freed in stream order, after
    /// the GEMMs already queued.
    pub(crate) fn reserve_workspace(&mut self, bytes: usize) -> Result<()> {
        check_workspace_size(bytes)?;
        let buf =
            self.gpu.stream().alloc_zeros::<u8>(bytes).map_err(|e| {
                Error::driver(format!("allocating a {bytes}-byte cuBLAS workspace"), e)
            })?;
        let ptr = buf.device_ptr(self.gpu.stream()).0;
        // The driver's allocations are aligned far beyond cuBLAS's 256 bytes; checked anyway.
        check_workspace_align(ptr)?;
        // SAFETY: `buf` is a fresh allocation on this handle's stream of `bytes` bytes; it is
        // kept in `self.workspace` (below) for as long as the handle uses it, and only this
        // handle's GEMMs, on this handle's stream, touch it.
        unsafe { self.bind_workspace(ptr, bytes) }?;
        self.workspace = Workspace::Owned(buf);
        Ok(())
    }

    /// Makes `bytes` at `ptr` (the caller's memory) the handle's workspace. Refused before
    /// cuBLAS sees it: `bytes` below [`MIN_WORKSPACE_BYTES`] ([`Error::InvalidArgument`]),
    /// `ptr` not 256-byte aligned ([`Error::Alignment`]), `ptr` NULL, host memory or memory of
    /// another context or device ([`Error::Device`], by [`Gpu::check_device_pointer`]).
    ///
    /// # Safety
    /// `ptr` must be device memory usable by the Gpu's context, valid for reads and writes of
    /// `bytes` bytes for as long as the handle uses it (until it is dropped or another
    /// workspace replaces this one), and touched by nothing else while GEMMs of the handle's
    /// stream may use it.
    pub(crate) unsafe fn use_workspace(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        check_workspace_size(bytes)?;
        check_workspace_align(ptr)?;
        self.gpu.check_device_pointer("workspace", ptr)?;
        // SAFETY: the caller's contract above.
        unsafe { self.bind_workspace(ptr, bytes) }?;
        // A buffer of our own that this replaces is freed in stream order, after its users.
        self.workspace = Workspace::Borrowed { bytes };
        Ok(())
    }

    /// `cublasSetWorkspace` on the handle. It binds the memory to the handle's current stream,
    /// which never changes here (a `cublasSetStream` would reset it to cuBLAS's pool).
    ///
    /// # Safety
    /// As [`BlasHandle::use_workspace`].
    unsafe fn bind_workspace(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the handle is live (owned by `self.blas`); `ptr`/`bytes` is device memory of
        // its context, aligned and valid while the handle uses it (this fn's contract).
        unsafe { blas_sys::cublasSetWorkspace_v2(*self.blas.handle(), ptr as *mut c_void, bytes) }
            .result()
            .map_err(|e| Error::blas("cublasSetWorkspace", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommended_workspace_is_32_mib_from_hopper_on_and_4_mib_before() {
        assert_eq!(recommended_workspace_bytes((8, 0)), 4 << 20);
        assert_eq!(recommended_workspace_bytes((8, 9)), 4 << 20);
        assert_eq!(recommended_workspace_bytes((9, 0)), 32 << 20);
        assert_eq!(recommended_workspace_bytes((10, 0)), 32 << 20);
        assert!(recommended_workspace_bytes((7, 5)) >= MIN_WORKSPACE_BYTES);
    }

    #[test]
    fn a_workspace_below_the_minimum_or_misaligned_is_refused() {
        assert!(matches!(
            check_workspace_size(MIN_WORKSPACE_BYTES - 1),
            Err(Error::InvalidArgument {
                arg: "workspace",
                ..
            })
        ));
        assert!(check_workspace_size(MIN_WORKSPACE_BYTES).is_ok());
        assert!(matches!(
            check_workspace_align(WORKSPACE_ALIGN * 3 + 128),
            Err(Error::Alignment {
                arg: "workspace",
                align: 256,
                ..
            })
        ));
        assert!(check_workspace_align(WORKSPACE_ALIGN * 3).is_ok());
        // NULL passes both (it is aligned); the pointer check refuses it
        // (gpu::pointer's tests).
        assert!(check_workspace_align(0).is_ok());
    }
}
