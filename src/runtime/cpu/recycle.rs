//! Large f32 buffers kept for reuse between ops, while a [`KeepOpBuffers`] is alive. Every
//! CPU op allocates its output; a training step frees hundreds of megabytes of activations at
//! its end and allocates them again in the next step. glibc hands memory that large back to
//! the kernel between the two (the top of its heap is trimmed, bigger blocks are unmapped), so
//! every page of the next step's outputs was faulted in and zeroed by the kernel again: about a
//! tenth of a one-thread fine-tuning step. Here a dropped [`CpuTensor`](super::CpuTensor)'s
//! buffer of at least [`MIN_LEN`] values goes to a small pool instead, and [`zeroed`] takes the
//! best-fitting one back (cleared by a memset, which costs far less than the faults).
//!
//! The pool is bounded ([`MAX_KEPT_BYTES`], [`MAX_KEPT`] buffers; the oldest go first), and
//! off unless asked for. Each lane (see the CPU backend's `run_lanes`) has a pool of its own,
//! under the same bounds. A training loop reuses the same shapes step after step and keeps up
//! to the full bound. Inference keeps less: with the full bound, embedding 512 sentences of
//! mixed lengths peaked at 1.85× the resident memory (318 against 171 MB); with
//! [`KeepOpBuffers::with_limit`] at 32 MiB, 1.10× (189 MB), and the page faults fell from 164k
//! to 66k (system time 0.5 → 0.2–0.27 s of a 10 s one-thread run).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// While one is alive (any thread), the CPU backend keeps the buffers of dropped tensors of
/// at least 256 KiB (up to 64 of them, 256 MiB, or less with [`KeepOpBuffers::with_limit`];
/// each per lane) and gives them to later op outputs, instead of returning them to the
/// allocator. Training loops hold one (`cuattn finetune` does), and so does sentence
/// embedding with a smaller limit; when the last one is dropped, the kept buffers are freed.
#[must_use = "buffers are kept only while the guard is alive"]
pub struct KeepOpBuffers(());

static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// The largest limit asked for by a guard alive now (0 when none is).
static LIMIT: AtomicUsize = AtomicUsize::new(0);

impl KeepOpBuffers {
    /// Keeps up to [`MAX_KEPT_BYTES`].
    pub fn new() -> KeepOpBuffers {
        KeepOpBuffers::with_limit(MAX_KEPT_BYTES)
    }

    /// Keeps up to `bytes` (at most [`MAX_KEPT_BYTES`]) while this guard is alive; with
    /// several guards alive, the largest limit holds.
    pub fn with_limit(bytes: usize) -> KeepOpBuffers {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        LIMIT.fetch_max(bytes.min(MAX_KEPT_BYTES), Ordering::SeqCst);
        KeepOpBuffers(())
    }
}

impl Default for KeepOpBuffers {
    fn default() -> Self {
        KeepOpBuffers::new()
    }
}

impl Drop for KeepOpBuffers {
    fn drop(&mut self) {
        if ACTIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
            LIMIT.store(0, Ordering::SeqCst);
            let kept = std::mem::take(&mut *pools());
            drop(kept); // freed outside the lock
        }
    }
}

fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed) > 0
}

/// Buffers below 256 KiB (64 Ki values) come from malloc's own caches; not kept.
pub const MIN_LEN: usize = 64 * 1024;
/// At most this many bytes of buffers are kept.
pub const MAX_KEPT_BYTES: usize = 256 << 20;
/// At most this many buffers are kept.
pub const MAX_KEPT: usize = 64;

struct Pool {
    bufs: VecDeque<Vec<f32>>,
    bytes: usize,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            bufs: VecDeque::new(),
            bytes: 0,
        }
    }

    /// The smallest kept buffer whose capacity is between `n` and `2n`, removed. When none
    /// fits, the kept buffers smaller than `n` are returned in `Err` for the caller to free:
    /// the shapes have grown past them (batches sorted by length grow), and keeping them
    /// would only add to the peak footprint.
    fn take(&mut self, n: usize) -> Result<Vec<f32>, Vec<Vec<f32>>> {
        let best = (self.bufs.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= n && b.capacity() / 2 <= n)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(b) = best.and_then(|i| self.bufs.remove(i)) {
            self.bytes -= bytes_of(&b);
            return Ok(b);
        }
        let (small, keep) = std::mem::take(&mut self.bufs)
            .into_iter()
            .partition(|b| b.capacity() < n);
        self.bufs = keep;
        self.bytes = self.bufs.iter().map(bytes_of).sum();
        Err(small.into_iter().collect())
    }

    /// Keeps `v`, returning the oldest buffers that had to go to stay within the bounds
    /// (`limit` bytes, [`MAX_KEPT`] buffers); `v` itself when it is larger than `limit`.
    fn put(&mut self, v: Vec<f32>, limit: usize) -> Vec<Vec<f32>> {
        let bytes = bytes_of(&v);
        if bytes > limit {
            return vec![v];
        }
        let mut evicted = Vec::new();
        while self.bufs.len() >= MAX_KEPT || self.bytes + bytes > limit {
            match self.bufs.pop_front() {
                Some(old) => {
                    self.bytes -= bytes_of(&old);
                    evicted.push(old);
                }
                None => break,
            }
        }
        self.bytes += bytes;
        self.bufs.push_back(v);
        evicted
    }
}

/// One pool per lane ([`set_lane`]), each bounded as above; index 0 serves threads outside
/// lanes. Lanes run different batches at once, so sharing one pool would let one lane's
/// request free the smaller buffers another lane is about to reuse (measured: twice the
/// system time of one lane and 60% more resident memory, embedding on two lanes).
static POOLS: Mutex<Vec<Pool>> = Mutex::new(Vec::new());

std::thread_local! {
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Puts the calling thread in `lane` (1, 2, …): its op outputs take and give back buffers in
/// that lane's pool. Called when a lane's threads start (see the CPU backend's `run_lanes`).
pub(crate) fn set_lane(lane: usize) {
    LANE.with(|l| l.set(lane));
}

fn pools() -> std::sync::MutexGuard<'static, Vec<Pool>> {
    // A panic while holding the lock leaves the pools consistent (push/pop only): keep going.
    POOLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `f` on the calling thread's lane's pool.
fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    let lane = LANE.with(|l| l.get());
    let mut pools = pools();
    if pools.len() <= lane {
        pools.resize_with(lane + 1, Pool::new);
    }
    f(&mut pools[lane])
}

fn bytes_of(v: &Vec<f32>) -> usize {
    v.capacity() * std::mem::size_of::<f32>()
}

/// An empty buffer for `n` values: a kept one when one fits (capacity between `n` and `2n`,
/// the smallest such), else a new one reserving `2n`. Only the pages written are backed by
/// memory, so the reserve costs nothing until a later, larger output of the same op reuses
/// the buffer.
fn buffer(n: usize) -> Vec<f32> {
    match kept(n) {
        Some(mut v) => {
            v.clear();
            v
        }
        None => fresh(n),
    }
}

/// A new empty buffer reserving `2n`, in huge pages where the kernel allows (fewer faults,
/// fewer TLB misses). On a failed reservation the caller's fill reports the missing memory
/// as any allocation does.
fn fresh(n: usize) -> Vec<f32> {
    crate::runtime::host_memory::huge_page_buffer(n.saturating_mul(2)).unwrap_or_default()
}

/// A kept buffer that fits `n` values, as it was given back (its old values), if any.
fn kept(n: usize) -> Option<Vec<f32>> {
    let taken = with_pool(|p| p.take(n));
    match taken {
        Ok(v) => Some(v),
        Err(stale) => {
            // Freed outside the lock.
            drop(stale);
            None
        }
    }
}

/// `n` zeros, in a recycled buffer (see [`buffer`]) from [`MIN_LEN`] values up.
pub fn zeroed(n: usize) -> Vec<f32> {
    if n < MIN_LEN || !active() {
        return vec![0.0; n];
    }
    let mut v = buffer(n);
    v.resize(n, 0.0);
    v
}

/// `n` values of no particular content, for an output its op overwrites whole: a kept
/// buffer keeps an earlier op's values (no clearing pass over memory the op is about to
/// write); only values past its old length, or a new buffer's, are zeroed.
pub fn scratch(n: usize) -> Vec<f32> {
    if n < MIN_LEN || !active() {
        return vec![0.0; n];
    }
    let mut v = kept(n).unwrap_or_else(|| fresh(n));
    v.truncate(n);
    v.resize(n, 0.0);
    v
}

/// A copy of `src`, in a recycled buffer (see [`buffer`]) from [`MIN_LEN`] values up.
pub fn copied(src: &[f32]) -> Vec<f32> {
    if src.len() < MIN_LEN || !active() {
        return src.to_vec();
    }
    let mut v = buffer(src.len());
    v.extend_from_slice(src);
    v
}

/// Keeps `v` for a later [`zeroed`] if it is large enough, dropping the oldest kept buffers
/// to stay within the bounds.
pub fn give_back(v: Vec<f32>) {
    if v.capacity() < MIN_LEN || !active() {
        return;
    }
    let limit = LIMIT.load(Ordering::Relaxed);
    let evicted = with_pool(|p| p.put(v, limit));
    // Freed outside the lock.
    drop(evicted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_fitting_buffer_is_taken_and_the_pool_stays_bounded() {
        let mut p = Pool::new();
        let cap = |v: &Vec<f32>| v.capacity();
        for n in [3 * MIN_LEN, MIN_LEN, 2 * MIN_LEN] {
            assert!(p.put(Vec::with_capacity(n), MAX_KEPT_BYTES).is_empty());
        }
        // Best fit: 2·MIN_LEN serves 1.5·MIN_LEN (3·MIN_LEN would fit too, but is larger).
        assert_eq!(p.take(MIN_LEN * 3 / 2).map(|v| cap(&v)), Ok(2 * MIN_LEN));
        assert_eq!(p.take(MIN_LEN).map(|v| cap(&v)), Ok(MIN_LEN));
        assert_eq!(p.bytes, 3 * MIN_LEN * 4);
        // Twice the size needed or more: not taken, and not dropped either.
        assert_eq!(p.take(MIN_LEN * 3 / 2 - 1).map(|v| cap(&v)), Err(vec![]));
        assert_eq!(p.bufs.len(), 1);
        // A miss above kept buffers drops those smaller than the request.
        p.put(Vec::with_capacity(MIN_LEN), MAX_KEPT_BYTES);
        let stale = p.take(4 * MIN_LEN).map(|v| cap(&v)).unwrap_err();
        let stale: Vec<usize> = stale.iter().map(cap).collect();
        assert_eq!(stale, vec![3 * MIN_LEN, MIN_LEN]);
        assert!(p.bufs.is_empty() && p.bytes == 0);
        p.put(Vec::with_capacity(3 * MIN_LEN), MAX_KEPT_BYTES);
        // Bounds: the oldest go first.
        let mut evicted = 0;
        for _ in 0..2 * MAX_KEPT {
            evicted += p.put(Vec::with_capacity(MIN_LEN), MAX_KEPT_BYTES).len();
        }
        assert_eq!(p.bufs.len(), MAX_KEPT);
        assert_eq!(evicted, MAX_KEPT + 1, "the 3·MIN_LEN buffer went first");
        assert_eq!(p.bytes, p.bufs.iter().map(bytes_of).sum::<usize>());
        let huge = MAX_KEPT_BYTES / 4 - MIN_LEN;
        p.put(Vec::with_capacity(huge), MAX_KEPT_BYTES);
        assert!(p.bytes <= MAX_KEPT_BYTES && p.bufs.len() <= MAX_KEPT);
    }

    /// A smaller limit: the kept bytes stay under it (oldest evicted first), and a buffer
    /// larger than the limit is handed straight back instead of emptying the pool.
    #[test]
    fn a_smaller_limit_bounds_the_kept_bytes() {
        let mut p = Pool::new();
        let limit = 5 * MIN_LEN * 4;
        let mut evicted = Vec::new();
        for n in [MIN_LEN, 2 * MIN_LEN, MIN_LEN, 2 * MIN_LEN] {
            evicted.extend(p.put(Vec::with_capacity(n), limit));
            assert!(p.bytes <= limit, "{} kept bytes over the limit", p.bytes);
        }
        let caps: Vec<usize> = evicted.iter().map(|v| v.capacity()).collect();
        assert_eq!(caps, vec![MIN_LEN], "the oldest buffer goes first");
        let kept = p.bufs.len();
        let back = p.put(Vec::with_capacity(6 * MIN_LEN), limit);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].capacity(), 6 * MIN_LEN);
        assert_eq!(
            p.bufs.len(),
            kept,
            "nothing evicted for a buffer that cannot stay"
        );
    }

    /// Through the global pool: a buffer given back is zeroed when handed out again, and small
    /// buffers are not kept.
    #[test]
    fn reused_buffers_come_back_zeroed() {
        let _keep = KeepOpBuffers::new();
        let n = MIN_LEN + 123;
        let mut v = zeroed(n);
        v.iter_mut().for_each(|x| *x = f32::NAN);
        give_back(v);
        give_back(vec![f32::NAN; 10]);
        let w = zeroed(n - 7);
        assert_eq!(w.len(), n - 7);
        assert!(
            w.iter().all(|&x| x == 0.0),
            "a reused buffer must be zeroed"
        );
        let small = zeroed(10);
        assert_eq!(small, vec![0.0; 10]);
        give_back(w);
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        assert_eq!(copied(&src), src);
        // A scratch buffer has the length asked for, whatever it held before.
        give_back(vec![f32::NAN; n]);
        let s = scratch(n - 3);
        assert_eq!(s.len(), n - 3);
        give_back(s);
        assert_eq!(scratch(n).len(), n);
    }
}
