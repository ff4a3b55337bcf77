//! Large f32 buffers kept for reuse between ops. Every CPU op allocates its output; a
//! training step frees hundreds of megabytes of activations at its end and allocates them
//! again in the next step. glibc hands memory that large back to the kernel between the two
//! (the top of its heap is trimmed, bigger blocks are unmapped), so every page of the next
//! step's outputs was faulted in and zeroed by the kernel again: about a tenth of a one-thread
//! fine-tuning step. Here a dropped [`CpuTensor`](super::CpuTensor)'s buffer of at least
//! [`MIN_LEN`] values goes to a small pool instead, and [`zeroed`] takes the best-fitting one
//! back (cleared by a memset, which costs far less than the faults).
//!
//! The pool is bounded ([`MAX_KEPT_BYTES`], [`MAX_KEPT`] buffers; the oldest go first), so it
//! adds at most that much to the process's footprint.

use std::collections::VecDeque;
use std::sync::Mutex;

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

    /// The smallest kept buffer whose capacity is between `n` and `2n`, removed.
    fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        let best = (self.bufs.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= n && b.capacity() / 2 <= n)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        let b = self.bufs.remove(best)?;
        self.bytes -= bytes_of(&b);
        Some(b)
    }

    /// Keeps `v`, returning the oldest buffers that had to go to stay within the bounds.
    fn put(&mut self, v: Vec<f32>) -> Vec<Vec<f32>> {
        let bytes = bytes_of(&v);
        let mut evicted = Vec::new();
        while self.bufs.len() >= MAX_KEPT || self.bytes + bytes > MAX_KEPT_BYTES {
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

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves the pool consistent (push/pop only): keep going.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bytes_of(v: &Vec<f32>) -> usize {
    v.capacity() * std::mem::size_of::<f32>()
}

/// `n` zeros, in a kept buffer when one fits (capacity between `n` and `2n`, the smallest
/// such), else newly allocated.
pub fn zeroed(n: usize) -> Vec<f32> {
    if n >= MIN_LEN {
        let taken = pool().take(n);
        if let Some(mut v) = taken {
            v.clear();
            v.resize(n, 0.0);
            return v;
        }
    }
    vec![0.0; n]
}

/// A copy of `src`, in a kept buffer when one fits.
pub fn copied(src: &[f32]) -> Vec<f32> {
    if src.len() >= MIN_LEN {
        let taken = pool().take(src.len());
        if let Some(mut v) = taken {
            v.clear();
            v.extend_from_slice(src);
            return v;
        }
    }
    src.to_vec()
}

/// Keeps `v` for a later [`zeroed`] if it is large enough, dropping the oldest kept buffers
/// to stay within the bounds.
pub fn give_back(v: Vec<f32>) {
    if v.capacity() < MIN_LEN || bytes_of(&v) > MAX_KEPT_BYTES {
        return;
    }
    let evicted = pool().put(v);
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
            assert!(p.put(Vec::with_capacity(n)).is_empty());
        }
        // Best fit: 2·MIN_LEN serves 1.5·MIN_LEN (3·MIN_LEN would fit too, but is larger).
        assert_eq!(p.take(MIN_LEN * 3 / 2).map(|v| cap(&v)), Some(2 * MIN_LEN));
        // Twice the size needed or more: not taken.
        assert!(p.take(MIN_LEN * 3 / 2 - 1).is_none());
        assert!(p.take(4 * MIN_LEN).is_none());
        assert_eq!(p.take(MIN_LEN).map(|v| cap(&v)), Some(MIN_LEN));
        assert_eq!(p.bytes, 3 * MIN_LEN * 4);
        // Bounds: the oldest go first.
        let mut evicted = 0;
        for _ in 0..2 * MAX_KEPT {
            evicted += p.put(Vec::with_capacity(MIN_LEN)).len();
        }
        assert_eq!(p.bufs.len(), MAX_KEPT);
        assert_eq!(evicted, MAX_KEPT + 1, "the 3·MIN_LEN buffer went first");
        assert_eq!(p.bytes, p.bufs.iter().map(bytes_of).sum::<usize>());
        let huge = MAX_KEPT_BYTES / 4 - MIN_LEN;
        p.put(Vec::with_capacity(huge));
        assert!(p.bytes <= MAX_KEPT_BYTES && p.bufs.len() <= MAX_KEPT);
    }

    /// Through the global pool: a buffer given back is zeroed when handed out again, and small
    /// buffers are not kept.
    #[test]
    fn reused_buffers_come_back_zeroed() {
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
    }
}
