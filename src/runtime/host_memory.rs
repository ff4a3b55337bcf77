//! Large host buffers (model weights, the CPU backend's recycled activations), backed by 2 MiB
//! pages where the kernel allows.
//!
//! Why: a CPU decoding step reads every weight once (about 500 MB for GPT-2 124M in f32), so
//! the few-row kernel is a stream from memory, and with 4 KiB pages that stream also walks a
//! new page-table entry every 4 KiB: 120k TLB misses per token. On Linux, transparent huge
//! pages are often enabled for `madvise`d ranges only (as on the machine behind
//! BENCHMARKS.md), so an ordinary allocation never gets them. Measured there (two threads,
//! alternating runs, one GPT-2-124M step of weights): 18.7–20.0 GB/s from 4 KiB pages against
//! 21.1–21.9 GB/s from huge pages.
//!
//! Activations: the CPU backend's kept buffers (`cpu::recycle`) are allocated the same way,
//! so a GEMM's output faults in 2 MiB at a time instead of 4 KiB.
//!
//! The advice is given on the reserved, not yet written capacity, so the pages are faulted in
//! as huge pages when the values are first written; only the 2 MiB-aligned interior of the
//! buffer can be advised (the allocator picks the start). Elsewhere, or when the kernel
//! refuses, the buffer is an ordinary one.

use std::collections::TryReserveError;

/// Advise only buffers of at least this many bytes (smaller ones hold no aligned 2 MiB page
/// worth the split of the allocator's mapping).
const MIN_BYTES: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// An empty vector with room for exactly `len` values, its aligned interior advised for huge
/// pages (Linux; a no-op elsewhere). Fails instead of aborting when the memory is not there.
pub(crate) fn huge_page_buffer<T>(len: usize) -> Result<Vec<T>, TryReserveError> {
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(len)?;
    advise_huge_pages(&mut v);
    Ok(v)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &mut Vec<T>) {
    let bytes = v.capacity().saturating_mul(std::mem::size_of::<T>());
    if bytes < MIN_BYTES {
        return;
    }
    let start = v.as_mut_ptr() as usize;
    let (lo, hi) = (
        start.next_multiple_of(HUGE_PAGE),
        (start + bytes) / HUGE_PAGE * HUGE_PAGE,
    );
    if hi <= lo {
        return;
    }
    // SAFETY: [lo, hi) lies inside the allocation `v` owns (its reserved capacity), and
    // MADV_HUGEPAGE only changes which page size the kernel backs that range with; it never
    // changes the contents or the mapping, so nothing any reference sees can change. The
    // result is ignored: a refusal leaves ordinary pages.
    let _ = unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_v: &mut Vec<T>) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer has exactly the room asked for, holds what is written into it, and an
    /// impossible size is an error, not an abort.
    #[test]
    fn huge_page_buffers_reserve_exactly_and_refuse_impossible_sizes() {
        for len in [0usize, 7, MIN_BYTES / 4 - 1, 3 * MIN_BYTES / 4 + 5] {
            let mut v = huge_page_buffer::<f32>(len).expect("reserve");
            assert!(v.is_empty() && v.capacity() == len, "len {len}");
            v.extend((0..len).map(|i| i as f32));
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        assert!(huge_page_buffer::<u64>(usize::MAX / 4).is_err());
    }
}
