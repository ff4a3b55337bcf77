//! What the driver knows about a raw device address, and whether a [`Gpu`] may use it.
//!
//! Raw addresses reach cuattn where an embedder hands over its own memory: a caller's scratch
//! (`Gpu::use_workspace`), a cuBLAS workspace (`Gemm::use_workspace`, the CUDA runtime
//! backend's `use_blas_workspace`) and every pointer of the C ABI. Each is asked of the driver
//! (`cuPointerGetAttributes`, which answers for any address, CUDA's or not) before use:
//!
//! - NULL, addresses the driver does not know (plain host memory, a freed or made-up address)
//!   and page-locked host memory are not device memory;
//! - memory allocated in a context (`cuMemAlloc`, `cudaMalloc`, managed memory) must be of the
//!   Gpu's context;
//! - memory from a stream-ordered pool (`cuMemAllocAsync`, what cudarc and candle allocate
//!   with) belongs to no context: the driver reports a null context and the device it lives
//!   on, which must be the Gpu's device.
//!
//! This catches the wrong context, device or kind of memory; it cannot prove the `bytes` that
//! follow the address are the caller's to use, which stays the `unsafe` caller's contract.

use super::{ContextId, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::sys;

/// The driver's answers for one address (each zero when it does not know the address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PointerFacts {
    /// `CUmemorytype` as a number: 0 unknown, 1 host, 2 device, 3 array, 4 unified.
    pub memory_type: u32,
    pub is_managed: bool,
    /// The `CUcontext` the memory was allocated in, 0 for pool memory.
    pub context: u64,
    /// The device the memory was allocated on.
    pub ordinal: i64,
}

const MEMORY_HOST: u32 = sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32;
const MEMORY_DEVICE: u32 = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
const MEMORY_UNIFIED: u32 = sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32;

/// Asks the driver about `ptr` (the caller has made a context current).
fn query(ptr: u64) -> Result<PointerFacts> {
    use sys::CUpointer_attribute as A;
    let mut attrs = [
        A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        A::CU_POINTER_ATTRIBUTE_IS_MANAGED,
        A::CU_POINTER_ATTRIBUTE_CONTEXT,
        A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
    ];
    // One zeroed 8-byte slot per attribute, wide enough for each value's type (unsigned int,
    // bool, CUcontext, int); the narrower ones land in the low bytes (CUDA hosts are
    // little-endian).
    let mut slots = [0u64; 4];
    let mut data: [*mut std::ffi::c_void; 4] = [
        (&mut slots[0] as *mut u64).cast(),
        (&mut slots[1] as *mut u64).cast(),
        (&mut slots[2] as *mut u64).cast(),
        (&mut slots[3] as *mut u64).cast(),
    ];
    // SAFETY: four attributes, four writable 8-byte slots; for an address the driver does not
    // know it writes the zero defaults and still succeeds.
    let r = unsafe {
        sys::cuPointerGetAttributes(
            attrs.len() as u32,
            attrs.as_mut_ptr(),
            data.as_mut_ptr(),
            ptr,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::driver(
            "cuPointerGetAttributes",
            cudarc::driver::DriverError(r),
        ));
    }
    Ok(PointerFacts {
        memory_type: slots[0] as u32,
        is_managed: slots[1] != 0,
        context: slots[2],
        ordinal: (slots[3] as u32 as i32) as i64,
    })
}

/// Whether memory described by `facts` may be used by a Gpu of context `ctx` on device
/// `ordinal`: [`Error::Device`] naming `arg` and the problem otherwise.
pub(crate) fn judge(
    arg: &'static str,
    ptr: u64,
    facts: &PointerFacts,
    ctx: ContextId,
    ordinal: usize,
) -> Result<()> {
    let refuse = |reason: String| Err(Error::Device { arg, reason });
    if ptr == 0 {
        return refuse("a NULL pointer is not device memory".into());
    }
    let device_memory = facts.is_managed
        || facts.memory_type == MEMORY_DEVICE
        || facts.memory_type == MEMORY_UNIFIED;
    if !device_memory {
        return refuse(match facts.memory_type {
            0 => format!(
                "0x{ptr:x} is not memory the CUDA driver knows (a host pointer, or freed memory)"
            ),
            MEMORY_HOST => format!("0x{ptr:x} is page-locked host memory, not device memory"),
            t => format!("0x{ptr:x} is not device memory (CUDA memory type {t})"),
        });
    }
    if facts.context != 0 {
        if facts.context != ctx.as_u64() {
            return refuse(format!(
                "0x{ptr:x} was allocated in CUDA context 0x{:x}, the Gpu runs on {ctx:?}",
                facts.context
            ));
        }
    } else if facts.ordinal != ordinal as i64 {
        return refuse(format!(
            "0x{ptr:x} is memory of device {}, the Gpu runs on device {ordinal}",
            facts.ordinal
        ));
    }
    Ok(())
}

impl Gpu {
    /// Checks that `ptr`, given as argument `arg`, is device memory this Gpu may use: not
    /// NULL, not host memory, allocated in this Gpu's context or (pool memory, which has no
    /// context) on its device. [`Error::Device`] names the problem otherwise. The `unsafe`
    /// entry points that take a caller's raw address make this check first.
    pub fn check_device_pointer(&self, arg: &'static str, ptr: u64) -> Result<()> {
        if ptr == 0 {
            return judge(arg, ptr, &PointerFacts::default(), self.context_id(), 0);
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::driver("cuCtxSetCurrent", e))?;
        let facts = query(ptr)?;
        judge(arg, ptr, &facts, self.context_id(), self.info.ordinal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: u64 = 0x5000;

    fn ours() -> ContextId {
        ContextId::from_raw(CTX as sys::CUcontext)
    }

    fn reason(r: Result<()>) -> String {
        match r {
            Err(Error::Device {
                arg: "workspace",
                reason,
            }) => reason,
            other => panic!("expected Error::Device for `workspace`, got {other:?}"),
        }
    }

    fn device(context: u64, ordinal: i64) -> PointerFacts {
        PointerFacts {
            memory_type: MEMORY_DEVICE,
            is_managed: false,
            context,
            ordinal,
        }
    }

    #[test]
    fn null_is_refused_whatever_the_driver_says() {
        let r = reason(judge("workspace", 0, &device(CTX, 0), ours(), 0));
        assert!(r.contains("NULL"), "{r}");
    }

    #[test]
    fn host_and_unknown_addresses_are_not_device_memory() {
        let unknown = PointerFacts::default();
        let r = reason(judge("workspace", 0x7fff_0000, &unknown, ours(), 0));
        assert!(r.contains("not memory the CUDA driver knows"), "{r}");
        let pinned = PointerFacts {
            memory_type: MEMORY_HOST,
            context: CTX,
            ..PointerFacts::default()
        };
        let r = reason(judge("workspace", 0x7fff_0000, &pinned, ours(), 0));
        assert!(r.contains("page-locked host memory"), "{r}");
        let array = PointerFacts {
            memory_type: sys::CUmemorytype::CU_MEMORYTYPE_ARRAY as u32,
            context: CTX,
            ..PointerFacts::default()
        };
        reason(judge("workspace", 0x1000, &array, ours(), 0));
    }

    #[test]
    fn memory_of_another_context_is_refused_and_of_ours_taken() {
        let r = reason(judge("workspace", 0x1000, &device(CTX + 8, 0), ours(), 0));
        assert!(r.contains("allocated in CUDA context 0x5008"), "{r}");
        assert!(judge("workspace", 0x1000, &device(CTX, 0), ours(), 0).is_ok());
        // The device ordinal does not matter once the context matches.
        assert!(judge("workspace", 0x1000, &device(CTX, 3), ours(), 1).is_ok());
    }

    #[test]
    fn pool_memory_is_judged_by_its_device() {
        assert!(judge("workspace", 0x1000, &device(0, 1), ours(), 1).is_ok());
        let r = reason(judge("workspace", 0x1000, &device(0, 0), ours(), 1));
        assert!(
            r.contains("memory of device 0, the Gpu runs on device 1"),
            "{r}"
        );
    }

    #[test]
    fn managed_memory_counts_as_device_memory_of_its_context() {
        let managed = PointerFacts {
            memory_type: MEMORY_HOST,
            is_managed: true,
            context: CTX,
            ordinal: 0,
        };
        assert!(judge("workspace", 0x1000, &managed, ours(), 0).is_ok());
        let foreign = PointerFacts {
            context: CTX + 8,
            ..managed
        };
        reason(judge("workspace", 0x1000, &foreign, ours(), 0));
    }
}
