//! Views at fake device addresses for the ops' argument-validation tests: validation only reads
//! an address as a number, so these are never dereferenced and need no GPU.

use crate::dtype::DType;
use crate::gpu::{ContextId, TensorMut, TensorRef};
use crate::tensor::Layout;

/// Where the fake addresses start (offsets `at` are added to it).
pub(crate) const BASE: u64 = 0x7f00_0000_0000;

/// The context the fake views claim (validation never compares it).
pub(crate) fn fake_ctx() -> ContextId {
    ContextId::from_raw(std::ptr::null_mut())
}

/// A read-only contiguous view of `shape` at `BASE + at`.
pub(crate) fn fake_ref(dtype: DType, shape: &[usize], at: u64) -> TensorRef<'static> {
    let layout = Layout::contiguous(shape);
    let bytes = layout.numel() * dtype.size_bytes();
    // SAFETY: validation only reads the address as a number; it is never dereferenced.
    unsafe { TensorRef::from_raw(fake_ctx(), BASE + at, bytes, dtype, layout) }
}

/// A writable contiguous view of `shape` at `BASE + at`.
pub(crate) fn fake_mut(dtype: DType, shape: &[usize], at: u64) -> TensorMut<'static> {
    let layout = Layout::contiguous(shape);
    let bytes = layout.numel() * dtype.size_bytes();
    // SAFETY: as in `fake_ref`.
    unsafe { TensorMut::from_raw(fake_ctx(), BASE + at, bytes, dtype, layout) }
}
