//! KV caches for text generation ([`super::generate`]): per layer, the keys and values of every
//! position so far, in two `[batch·capacity, heads·dim]` buffers allocated once for the longest
//! sequence the call can reach, with each sequence's count of cached positions.
//!
//! A generation step is one model call. Before it, [`StepKvCache::begin_step`] learns how many
//! of the step's tokens per sequence are real (the rest is padding, or a finished sequence);
//! during it, every layer appends its keys and values through [`KvCache::append`] and its
//! queries attend to what that returns:
//! - the first step (the prefill: every prompt, right-padded to the longest) attends to its own
//!   keys, as a causal forward pass does (causality keeps the padding out of every real
//!   token's view), and stores the real rows;
//! - every later step appends one token per sequence (none for a finished one) and its query
//!   attends to the cache in place: the views handed to the attention are the cache buffers
//!   themselves (`len_k` = capacity, each sequence's length as its key length), so nothing is
//!   gathered or copied; the attention reads only each sequence's valid rows.
//!
//! [`HostKvCache`] keeps the buffers in host memory (CPU backend). `DeviceKvCache` (feature
//! `cuda`) keeps them in device memory: the append is one small kernel per layer reading the
//! step's starts and counts from a device array uploaded once per step, and the one-token
//! attention runs the split-KV decode kernel (`Cuda::attention` routes one query per
//! sequence there).

use super::backend::{Backend, Heads};
use super::cpu::{Cpu, CpuBf16, CpuTensor};
use super::layers::{CachedKv, KvCache};
use crate::error::{Error, Result};

/// A KV cache for every layer of a model, driven by a generation loop.
pub trait StepKvCache<B: Backend> {
    /// Before each model call: of the call's tokens per sequence, how many are real. Commits
    /// the new lengths, so call it exactly once per model call.
    fn begin_step(&mut self, valid_new: &[usize]) -> Result<()>;
    /// Positions cached per sequence (after `begin_step`: this step's included).
    fn lens(&self) -> &[usize];
    /// One cache per layer for this step's model call, in layer order.
    fn layers(&mut self) -> Vec<Box<dyn KvCache<B> + '_>>;
    /// Between steps: sequence r continues from sequence `src[r]` (beam search keeps the
    /// best continuations, several of which may share a parent): every layer's rows and the
    /// lengths are gathered accordingly. `src` may be shorter than the batch: the cache then
    /// holds `src.len()` sequences (finished ones dropped).
    fn reorder(&mut self, be: &B, src: &[usize]) -> Result<()>;
    /// [`Self::begin_step`] for a step the backend runs from its own copy of the step's
    /// lengths (a captured decoding step, `super::graph_step`): the lengths are committed as
    /// there, but a cache that keeps a device copy of them for its appends does not update
    /// it (the next `begin_step` does).
    fn begin_step_lengths_only(&mut self, valid_new: &[usize]) -> Result<()> {
        self.begin_step(valid_new)
    }
    /// The buffers and this step's lengths for a backend's captured decoding step
    /// (`super::graph_step`); `None` (the default) where the cache offers none.
    fn step_view(&mut self) -> Option<StepView<'_, B::Tensor>> {
        None
    }
}

/// A model's one-token decoding step run by the backend its own way, after the prefill
/// (`super::graph_step`: the CUDA backend replays it from a CUDA graph). The generation loop
/// begins the step on the cache ([`StepKvCache::begin_step_lengths_only`]) and hands over
/// the cache's [`StepView`].
pub trait DecodeStep<B: Backend> {
    /// The sequences the step was built for.
    fn batch(&self) -> usize;
    /// One token per sequence (`ids`, `positions`: `[batch]`) appended to the cache and
    /// attending to it; the logits `[batch, vocab]`.
    fn run(
        &mut self,
        cache: StepView<'_, B::Tensor>,
        ids: &[u32],
        positions: &[u32],
    ) -> Result<Vec<f32>>;
}

/// A cache's buffers and the lengths of the step just begun, for a decoding step that writes
/// the buffers itself (`super::graph_step`: one CUDA graph per step).
pub struct StepView<'a, T> {
    /// Per layer: keys and values `[batch·capacity, width]`.
    pub layers: Vec<(&'a mut T, &'a mut T)>,
    /// Positions cached per sequence before this step.
    pub start: &'a [usize],
    /// This step's new positions per sequence (0 or 1 after the prefill).
    pub count: &'a [usize],
    /// start + count.
    pub lens: &'a [usize],
    pub capacity: usize,
    /// The step follows the prefill (queries attend to the cache).
    pub after_prefill: bool,
}

/// The lengths every layer of a cache shares, and this step's bookkeeping.
#[derive(Debug)]
struct StepLens {
    batch: usize,
    capacity: usize,
    width: usize,
    /// Positions cached before this step.
    start: Vec<usize>,
    /// This step's real tokens per sequence.
    valid: Vec<usize>,
    /// start + valid.
    lens: Vec<usize>,
    /// Nothing was cached before this step: it attends to its own keys.
    prefill: bool,
}

impl StepLens {
    fn new(batch: usize, capacity: usize, width: usize) -> Result<Self> {
        if batch == 0 || capacity == 0 || width == 0 {
            return Err(Error::invalid(
                "kv_cache",
                format!(
                    "a cache needs sequences, positions and width (got batch {batch}, capacity \
                     {capacity}, width {width})"
                ),
            ));
        }
        Ok(StepLens {
            batch,
            capacity,
            width,
            start: vec![0; batch],
            valid: vec![0; batch],
            lens: vec![0; batch],
            prefill: true,
        })
    }

    fn begin(&mut self, valid_new: &[usize]) -> Result<()> {
        if valid_new.len() != self.batch {
            return Err(Error::shape(
                "valid_new",
                format!("[{}]", self.batch),
                &[valid_new.len()],
            ));
        }
        for (b, (&len, &n)) in self.lens.iter().zip(valid_new).enumerate() {
            if len + n > self.capacity {
                return Err(Error::invalid(
                    "kv_cache",
                    format!(
                        "sequence {b} would hold {} positions, past the cache's {}",
                        len + n,
                        self.capacity
                    ),
                ));
            }
        }
        self.prefill = self.lens.iter().all(|&l| l == 0);
        self.start.copy_from_slice(&self.lens);
        self.valid.copy_from_slice(valid_new);
        for (l, &n) in self.lens.iter_mut().zip(valid_new) {
            *l += n;
        }
        Ok(())
    }

    /// Checks a reorder and applies it to the lengths; returns, for the buffers, the source row
    /// of every destination row (`[src.len()·capacity]`). `src` may name fewer sequences than
    /// the batch: the cache then holds only those (finished rows leave it).
    fn reorder(&mut self, src: &[usize]) -> Result<Vec<u32>> {
        if src.is_empty() || src.len() > self.batch {
            return Err(Error::shape(
                "src",
                format!("[1 ..= {}]", self.batch),
                &[src.len()],
            ));
        }
        if let Some(&bad) = src.iter().find(|&&s| s >= self.batch) {
            return Err(Error::invalid(
                "src",
                format!("sequence {bad} is outside the cache's {}", self.batch),
            ));
        }
        if self.capacity.saturating_mul(self.batch) > u32::MAX as usize {
            return Err(Error::invalid("kv_cache", "too many rows to reorder"));
        }
        self.lens = src.iter().map(|&s| self.lens[s]).collect();
        self.start = src.iter().map(|&s| self.start[s]).collect();
        self.valid = src.iter().map(|&s| self.valid[s]).collect();
        self.batch = src.len();
        let cap = self.capacity;
        Ok(src
            .iter()
            .flat_map(|&s| (0..cap).map(move |t| (s * cap + t) as u32))
            .collect())
    }

    /// Checks one layer's append against the step: `batch` sequences of `len_new` rows, key
    /// and value blocks `width` wide inside their tensors, no more valid rows than the step
    /// has, and one token per sequence after the prefill.
    fn check_append<B: Backend>(
        &self,
        be: &B,
        k: &Heads<'_, B::Tensor>,
        v: &Heads<'_, B::Tensor>,
        batch: usize,
        len_new: usize,
    ) -> Result<()> {
        let fits = |h: &Heads<'_, B::Tensor>| {
            let s = be.shape(h.tensor);
            h.heads * h.dim == self.width
                && s.len() == 2
                && s[0] == batch * len_new
                && h.col + self.width <= s[1]
        };
        if batch != self.batch || !fits(k) || !fits(v) {
            return Err(Error::invalid(
                "kv_cache",
                format!(
                    "a cache for {} sequences of width {} got {batch} sequences of {len_new} \
                     rows, key tensor {:?} (heads {}×{} at column {}), value tensor {:?} \
                     (heads {}×{} at column {})",
                    self.batch,
                    self.width,
                    be.shape(k.tensor),
                    k.heads,
                    k.dim,
                    k.col,
                    be.shape(v.tensor),
                    v.heads,
                    v.dim,
                    v.col
                ),
            ));
        }
        if let Some(b) = (0..batch).find(|&b| self.valid[b] > len_new) {
            return Err(Error::invalid(
                "kv_cache",
                format!(
                    "sequence {b}: {} valid tokens but the step has {len_new}",
                    self.valid[b]
                ),
            ));
        }
        if !self.prefill && len_new != 1 {
            return Err(Error::invalid(
                "kv_cache",
                format!("after the prefill a step appends 1 token per sequence, not {len_new}"),
            ));
        }
        Ok(())
    }

    /// What the step's queries attend to: during the prefill the step's own keys; after it,
    /// the whole cache with each sequence's length as its key length.
    fn attend<'a, T>(
        &'a self,
        (k, v): (Heads<'a, T>, Heads<'a, T>),
        (k_cache, v_cache): (&'a T, &'a T),
        len_new: usize,
    ) -> CachedKv<'a, T> {
        if self.prefill {
            return CachedKv {
                k,
                v,
                len_k: len_new,
                key_lens: None,
            };
        }
        let at = |tensor, h: Heads<'a, T>| Heads {
            tensor,
            col: 0,
            ..h
        };
        CachedKv {
            k: at(k_cache, k),
            v: at(v_cache, v),
            len_k: self.capacity,
            key_lens: Some(&self.lens),
        }
    }
}

/// Keys and values of every layer in host memory (the cache of the CPU backends, whose
/// tensors are [`CpuTensor`]s).
#[derive(Debug)]
pub struct HostKvCache {
    step: StepLens,
    /// Per layer: keys and values `[batch·capacity, width]`.
    layers: Vec<(CpuTensor, CpuTensor)>,
}

impl HostKvCache {
    /// A cache of `layers` layers for `batch` sequences of up to `capacity` positions, rows
    /// `width` (heads·dim) wide.
    pub fn new(layers: usize, batch: usize, capacity: usize, width: usize) -> Result<Self> {
        let step = StepLens::new(batch, capacity, width)?;
        let zeros = || {
            CpuTensor::new(
                &[batch * capacity, width],
                vec![0.0; batch * capacity * width],
            )
        };
        Ok(HostKvCache {
            step,
            layers: (0..layers)
                .map(|_| Ok((zeros()?, zeros()?)))
                .collect::<Result<_>>()?,
        })
    }
}

impl HostKvCache {
    /// The per-layer views for any backend whose tensors are [`CpuTensor`]s.
    fn host_layers<B: Backend<Tensor = CpuTensor>>(&mut self) -> Vec<Box<dyn KvCache<B> + '_>> {
        let step = &self.step;
        self.layers
            .iter_mut()
            .map(|(k, v)| Box::new(HostLayer { step, k, v }) as Box<dyn KvCache<B>>)
            .collect()
    }
}

impl StepKvCache<Cpu> for HostKvCache {
    fn begin_step(&mut self, valid_new: &[usize]) -> Result<()> {
        self.step.begin(valid_new)
    }

    fn lens(&self) -> &[usize] {
        &self.step.lens
    }

    fn layers(&mut self) -> Vec<Box<dyn KvCache<Cpu> + '_>> {
        self.host_layers()
    }

    fn reorder(&mut self, be: &Cpu, src: &[usize]) -> Result<()> {
        self.reorder_rows(be, src)
    }
}

impl HostKvCache {
    /// Beam search's reorder: row r of every layer's cache becomes row `src[r]`'s.
    fn reorder_rows<B: Backend<Tensor = CpuTensor>>(
        &mut self,
        be: &B,
        src: &[usize],
    ) -> Result<()> {
        let rows = self.step.reorder(src)?;
        for (k, v) in &mut self.layers {
            *k = be.gather_rows(k, &rows)?;
            *v = be.gather_rows(v, &rows)?;
        }
        Ok(())
    }
}

/// A [`HostKvCache`] for [`CpuBf16`] (the same f32 keys and values; a separate type so that
/// calls on a `HostKvCache` keep naming one backend).
#[derive(Debug)]
pub struct HostKvCacheBf16(pub HostKvCache);

impl StepKvCache<CpuBf16> for HostKvCacheBf16 {
    fn begin_step(&mut self, valid_new: &[usize]) -> Result<()> {
        self.0.step.begin(valid_new)
    }

    fn lens(&self) -> &[usize] {
        &self.0.step.lens
    }

    fn layers(&mut self) -> Vec<Box<dyn KvCache<CpuBf16> + '_>> {
        self.0.host_layers()
    }

    fn reorder(&mut self, be: &CpuBf16, src: &[usize]) -> Result<()> {
        self.0.reorder_rows(be, src)
    }
}

/// One layer of a [`HostKvCache`] during a step.
struct HostLayer<'s> {
    step: &'s StepLens,
    k: &'s mut CpuTensor,
    v: &'s mut CpuTensor,
}

impl HostLayer<'_> {
    /// Copies the step's valid rows of `src` behind each sequence's cached ones.
    fn store(step: &StepLens, dst: &mut CpuTensor, src: &Heads<'_, CpuTensor>, len_new: usize) {
        let (w, row_width) = (step.width, src.tensor.shape()[1]);
        let data = src.tensor.data();
        let dst = dst.data_mut();
        for b in 0..step.batch {
            for t in 0..step.valid[b] {
                let from = (b * len_new + t) * row_width + src.col;
                let to = (b * step.capacity + step.start[b] + t) * w;
                dst[to..to + w].copy_from_slice(&data[from..from + w]);
            }
        }
    }
}

impl<B: Backend<Tensor = CpuTensor>> KvCache<B> for HostLayer<'_> {
    fn append<'a>(
        &'a mut self,
        be: &B,
        k: Heads<'a, CpuTensor>,
        v: Heads<'a, CpuTensor>,
        batch: usize,
        len_new: usize,
    ) -> Result<CachedKv<'a, CpuTensor>> {
        self.step.check_append(be, &k, &v, batch, len_new)?;
        Self::store(self.step, self.k, &k, len_new);
        Self::store(self.step, self.v, &v, len_new);
        Ok(self.step.attend((k, v), (&*self.k, &*self.v), len_new))
    }
}

#[cfg(feature = "cuda")]
pub use device::DeviceKvCache;

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use crate::gpu::{DeviceTensor, Gpu};
    use crate::runtime::cuda::Cuda;
    use cudarc::driver::CudaSlice;
    use std::sync::Arc;

    /// Keys and values of every layer in device memory (the CUDA backend's cache).
    pub struct DeviceKvCache {
        gpu: Arc<Gpu>,
        step: StepLens,
        /// Per layer: keys and values `[batch·capacity, width]` in the backend's dtype.
        layers: Vec<(DeviceTensor, DeviceTensor)>,
        /// This step's [start; count] per sequence, on the host and on the device.
        start_count_host: Vec<i32>,
        start_count: CudaSlice<i32>,
    }

    impl std::fmt::Debug for DeviceKvCache {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DeviceKvCache")
                .field("step", &self.step)
                .field("layers", &self.layers.len())
                .finish_non_exhaustive()
        }
    }

    impl DeviceKvCache {
        /// A cache of `layers` layers for `batch` sequences of up to `capacity` positions,
        /// rows `width` (heads·dim) wide, in `be`'s dtype on its GPU.
        pub fn new(
            be: &Cuda,
            layers: usize,
            batch: usize,
            capacity: usize,
            width: usize,
        ) -> Result<Self> {
            let step = StepLens::new(batch, capacity, width)?;
            if capacity > i32::MAX as usize {
                return Err(Error::invalid(
                    "kv_cache",
                    format!("{capacity} positions exceed the kernels' 32-bit lengths"),
                ));
            }
            let gpu = be.gpu();
            let zeros = || gpu.zeros(be.dtype(), &[batch * capacity, width]);
            let layers = (0..layers)
                .map(|_| Ok((zeros()?, zeros()?)))
                .collect::<Result<_>>()?;
            let start_count = gpu
                .stream()
                .alloc_zeros::<i32>(2 * batch)
                .map_err(|e| Error::driver("allocate the KV cache's step array", e))?;
            Ok(DeviceKvCache {
                gpu: gpu.clone(),
                step,
                layers,
                start_count_host: vec![0; 2 * batch],
                start_count,
            })
        }
    }

    impl StepKvCache<Cuda> for DeviceKvCache {
        fn begin_step(&mut self, valid_new: &[usize]) -> Result<()> {
            self.step.begin(valid_new)?;
            let (start, count) = self.start_count_host.split_at_mut(self.step.batch);
            for b in 0..self.step.batch {
                // Both ≤ capacity ≤ i32::MAX (checked in `new` and `begin`).
                start[b] = self.step.start[b] as i32;
                count[b] = self.step.valid[b] as i32;
            }
            // Stream-ordered: the previous step's appends read the old values first. From
            // pageable memory the copy is staged before the call returns, so the host array
            // may change right after.
            self.gpu
                .stream()
                .memcpy_htod(&self.start_count_host, &mut self.start_count)
                .map_err(|e| Error::driver("copy the KV cache's step array", e))
        }

        fn lens(&self) -> &[usize] {
            &self.step.lens
        }

        fn begin_step_lengths_only(&mut self, valid_new: &[usize]) -> Result<()> {
            self.step.begin(valid_new)
        }

        fn step_view(&mut self) -> Option<StepView<'_, DeviceTensor>> {
            let step = &self.step;
            Some(StepView {
                layers: self.layers.iter_mut().map(|(k, v)| (k, v)).collect(),
                start: &step.start,
                count: &step.valid,
                lens: &step.lens,
                capacity: step.capacity,
                after_prefill: !step.prefill,
            })
        }

        fn layers(&mut self) -> Vec<Box<dyn KvCache<Cuda> + '_>> {
            let (step, host, dev) = (&self.step, &self.start_count_host, &self.start_count);
            self.layers
                .iter_mut()
                .map(|(k, v)| {
                    Box::new(DeviceLayer {
                        step,
                        start_count: (dev, host),
                        k,
                        v,
                    }) as Box<dyn KvCache<Cuda>>
                })
                .collect()
        }

        fn reorder(&mut self, be: &Cuda, src: &[usize]) -> Result<()> {
            let rows = self.step.reorder(src)?;
            for (k, v) in &mut self.layers {
                *k = be.gather_rows(k, &rows)?;
                *v = be.gather_rows(v, &rows)?;
            }
            let batch = self.step.batch;
            if self.start_count_host.len() != 2 * batch {
                // Fewer sequences: the step array shrinks with them.
                self.start_count_host = vec![0; 2 * batch];
                self.start_count = self
                    .gpu
                    .stream()
                    .alloc_zeros::<i32>(2 * batch)
                    .map_err(|e| Error::driver("allocate the KV cache's step array", e))?;
            }
            Ok(())
        }
    }

    /// One layer of a [`DeviceKvCache`] during a step.
    struct DeviceLayer<'s> {
        step: &'s StepLens,
        start_count: (&'s CudaSlice<i32>, &'s [i32]),
        k: &'s mut DeviceTensor,
        v: &'s mut DeviceTensor,
    }

    impl KvCache<Cuda> for DeviceLayer<'_> {
        fn append<'a>(
            &'a mut self,
            be: &Cuda,
            k: Heads<'a, DeviceTensor>,
            v: Heads<'a, DeviceTensor>,
            batch: usize,
            len_new: usize,
        ) -> Result<CachedKv<'a, DeviceTensor>> {
            self.step.check_append(be, &k, &v, batch, len_new)?;
            be.append_kv(k, v, self.k, self.v, self.start_count, batch, len_new)?;
            Ok(self.step.attend((k, v), (&*self.k, &*self.v), len_new))
        }
    }
}
