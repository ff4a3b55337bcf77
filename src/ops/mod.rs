//! Safe wrappers around the kernels. Each op validates every argument (dtype, shape, strides,
//! alignment, size of the memory behind each view), picks a launch configuration, and makes
//! one `unsafe` launch whose soundness rests on those checks.

pub mod attention;
pub mod attention_backward;
mod attention_hopper;
pub mod attention_unfused;
mod cublas;
pub mod decode;
pub mod elementwise;
#[cfg(test)]
mod fake_views;
pub mod gemm;
pub mod layernorm;
pub mod sparse_attention;
pub mod training;
mod validate;

pub(crate) use cublas::BlasHandle;
pub(crate) use validate::ViewInfo;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, LoadedKernel};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// Launches `kernel` with its parameter struct on the Gpu's stream.
///
/// # Safety
/// Every device address in `params` must be valid for what the kernel does with it at the
/// sizes and strides `params` gives (the op's validation establishes this), and `smem` must be
/// within the kernel's dynamic shared-memory limit.
pub(crate) unsafe fn launch<P: DeviceRepr>(
    gpu: &Gpu,
    kernel: &LoadedKernel,
    params: &P,
    grid: (u32, u32),
    block: (u32, u32),
    smem: usize,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (block.0, block.1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the caller upholds this function's contract (above).
    unsafe {
        gpu.stream()
            .launch_builder(&kernel.func)
            .arg(params)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(|e| Error::driver(format!("launching `{}`", kernel.name), e))
}
