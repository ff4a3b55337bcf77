//! The training ops on the GPU (`kernels/training_ops.cu`, docs/kernels/training-ops.md):
//! fused bias + GELU forward/backward and column sums ([`bias_gelu`]), softmax cross-entropy
//! ([`cross_entropy`]), the embedding backward ([`embedding`]), multi-tensor AdamW, gradient
//! norm and clipping ([`optimizer`]), and Philox dropout ([`dropout`]). CPU references:
//! [`crate::reference::training`]; host plans: [`crate::training`].
//!
//! Each op takes one options struct, validates every view (dtype, shape, contiguity, memory,
//! aliasing) with a typed [`crate::Error`], and queues its kernels on the Gpu's stream without
//! waiting. Every result is bitwise repeatable on one device: no float atomics anywhere.

pub mod bias_gelu;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod optimizer;

use super::validate::{self, Rows, ViewInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, LoadedKernel};

const MODULE: &str = "training_ops";

fn kernel(gpu: &Gpu, name: &'static str) -> Result<LoadedKernel> {
    gpu.kernel(MODULE, name)
}

/// The name for `dtype` out of the [f32, f16, bf16] instantiations.
fn by_dtype(dtype: DType, names: [&'static str; 3]) -> &'static str {
    match dtype {
        DType::F32 => names[0],
        DType::F16 => names[1],
        DType::BF16 => names[2],
    }
}

/// A non-empty, row-major contiguous view of `dtype`, as [rows, last dim].
fn contiguous_rows(v: &ViewInfo, dtype: DType) -> Result<Rows> {
    validate::dtype(v, dtype)?;
    let rows = validate::rows(v)?;
    if !v.layout.is_contiguous() {
        return Err(Error::layout(
            v.arg,
            format!(
                "must be contiguous, got shape {:?} strides {:?}",
                v.layout.shape(),
                v.layout.strides()
            ),
        ));
    }
    Ok(rows)
}

/// Bytes [start, end) a view addresses.
fn byte_range(v: &ViewInfo) -> Result<(u64, u64)> {
    let span = v.layout.span_elems(v.arg)? as u64 * v.dtype.size_bytes() as u64;
    Ok((v.ptr, v.ptr + span))
}

/// `out` may be exactly `input` (same address, dtype and layout: in place) or disjoint from
/// it, never a partial overlap, which would let one thread's write reach another's input.
fn same_or_disjoint(input: &ViewInfo, out: &ViewInfo) -> Result<()> {
    let (a0, a1) = byte_range(input)?;
    let (b0, b1) = byte_range(out)?;
    let identical = a0 == b0 && input.dtype == out.dtype && input.layout == out.layout;
    if !identical && a0 < b1 && b0 < a1 {
        return Err(Error::layout(
            out.arg,
            format!(
                "overlaps `{}` without being the same view (in place needs the same address \
                 and layout)",
                input.arg
            ),
        ));
    }
    Ok(())
}

/// Grid of a grid-stride loop over `items` with `threads` per block: enough blocks to fill
/// the GPU (8 per multiprocessor), no more than the items need.
fn stride_grid(gpu: &Gpu, items: usize, threads: u32) -> u32 {
    let resident = gpu.info().multiprocessors as usize * 8;
    items.div_ceil(threads as usize).clamp(1, resident) as u32
}
