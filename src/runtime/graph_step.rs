//! A decoder-only model's one-token decoding step captured in a CUDA graph (GPT-2, GPT-Neo).
//!
//! Why: a decoding step of GPT-2 124M at batch 1 is about 150 small kernels (12 layers of two
//! LayerNorms, four GEMMs with their bias/activation kernels, the KV append and the attention,
//! then the final LayerNorm and the LM head). Each takes a few microseconds of GPU time, about
//! what the host needs to launch it, so launched one by one the step is bound by the launches
//! and the host's bookkeeping between them. Replaying a graph launches them all with one call.
//!
//! How: [`StepMeta`] is the step's metadata, one `i32` array `[ids; positions; start; count;
//! lens]` (each `batch` long). The host writes it into **page-locked (pinned) host memory**;
//! the graph's first node copies it into a device array, and every other node reads its part
//! there: the embedding gathers (ids, positions), the KV-cache append of each layer (start,
//! count) and the attention over the cache (lens as device key lengths). The copy has to come
//! from pinned memory: a graph's copy node reads its host source by DMA when the graph runs,
//! which only page-locked memory allows. A copy from pageable memory is staged by the driver
//! through its own buffer at the moment it is issued, so there is nothing a replay could
//! repeat, and CUDA does not allow capturing one (the existing `DeviceKvCache` copies its
//! step array from a pageable `Vec` on every eager step, which is fine outside a graph). The
//! host writes the pinned array only between steps: every step ends with the blocking read of
//! its logits on the same stream, so no replay that reads the array is still running.
//!
//! Every intermediate lives in a static buffer sized once for (batch, capacity) and written
//! in full by the step (nothing is zero-filled per step); the residual stream alternates
//! between two buffers through the LayerNorm's fused residual add (`x + residual` rounded to
//! the dtype, then normalized: the same arithmetic as the eager path's add followed by its
//! LayerNorm). The step's GEMMs use a cuBLAS handle with a fixed workspace and the decode
//! kernel a reserved scratch buffer of the step's own [`crate::gpu::Gpu`] handle (the model
//! backend's context, a stream of its own that waits for the model's stream before each
//! step; handle, workspace and stream are kept by the model's backend from one generation
//! call to the next), so the step allocates nothing and is capturable; its first run
//! executes the calls eagerly (loading every kernel and cuBLAS's state, and producing that
//! step's logits) and then captures them; later steps write the metadata and replay. The graph is bound to the KV-cache buffers it was captured on: if
//! they change (the cache was reordered), it is captured again; when finished rows leave the
//! batch, the generation loop makes a new step for the smaller batch.
//!
//! Where it does not apply, generation keeps the eager path ([`StackFacts::applies`] says
//! why): post-LayerNorm stacks (GPT-1), beam search (it reorders the cache after every step,
//! see `generate::Stepper`), weights stored in another dtype than the backend's (a GEMM
//! would convert them into a temporary inside the step), and the opt-out: the environment
//! variable [`ENV`] set to `0` (or `Cuda::set_decode_graph(false)`).

use super::backend::Backend;
use super::decoder_only::{DecoderOnly, Norm};
use crate::error::{Error, Result};
use std::ops::Range;

/// The environment variable that turns the graph step off: `0`, `off`, `false` or `no`.
pub const ENV: &str = "CUATTN_DECODE_GRAPH";

/// Whether the graph step is on for a value of [`ENV`] (`None`: unset, on).
pub fn graph_enabled_by_env(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "off" | "false" | "no")
    )
}

/// The step's metadata for `batch` sequences: one `i32` array of [`StepMeta::len`] values,
/// `[ids; positions; start; count; lens]`, each field `batch` long. start and count sit side by
/// side because the KV append reads them as one `[start; count]` array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepMeta {
    pub batch: usize,
}

/// The limits a step's metadata is checked against.
#[derive(Clone, Copy, Debug)]
pub struct MetaLimits {
    pub vocab: usize,
    pub n_positions: usize,
    pub capacity: usize,
}

impl StepMeta {
    const FIELDS: usize = 5;

    /// Values in the array.
    pub fn len(&self) -> usize {
        Self::FIELDS * self.batch
    }

    pub fn is_empty(&self) -> bool {
        self.batch == 0
    }

    fn field(&self, i: usize, n: usize) -> Range<usize> {
        i * self.batch..(i + n) * self.batch
    }

    pub fn ids(&self) -> Range<usize> {
        self.field(0, 1)
    }
    pub fn positions(&self) -> Range<usize> {
        self.field(1, 1)
    }
    /// `[start; count]`, what the KV append reads.
    pub fn start_count(&self) -> Range<usize> {
        self.field(2, 2)
    }
    pub fn lens(&self) -> Range<usize> {
        self.field(4, 1)
    }

    /// Writes one step's metadata into `out` ([`StepMeta::len`] values), after checking it:
    /// every id in the vocabulary, every position in the context, count 0 or 1 (one token
    /// per sequence after the prefill, none for a finished one), start + count = lens ≤ the
    /// capacity. The device code would tolerate other values (the gather gives NaN rows for
    /// an id outside the table, the append skips rows outside the cache, the attention clamps
    /// lengths to the capacity); the check turns them into a typed error before the step.
    pub fn fill(
        &self,
        out: &mut [i32],
        (ids, positions): (&[u32], &[u32]),
        (start, count, lens): (&[usize], &[usize], &[usize]),
        limits: MetaLimits,
    ) -> Result<()> {
        let b = self.batch;
        if out.len() != self.len() {
            return Err(Error::shape(
                "meta",
                format!("[{}]", self.len()),
                &[out.len()],
            ));
        }
        for (arg, n) in [
            ("ids", ids.len()),
            ("positions", positions.len()),
            ("start", start.len()),
            ("count", count.len()),
            ("lens", lens.len()),
        ] {
            if n != b {
                return Err(Error::shape(arg, format!("[{b}]"), &[n]));
            }
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= limits.vocab) {
            return Err(Error::invalid(
                "ids",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    limits.vocab
                ),
            ));
        }
        if let Some(&bad) = positions
            .iter()
            .find(|&&p| p as usize >= limits.n_positions)
        {
            return Err(Error::invalid(
                "positions",
                format!(
                    "position {bad} is past the context of {} positions",
                    limits.n_positions
                ),
            ));
        }
        // The capacity bounds every length, and the device cache checked it fits i32.
        if limits.capacity > i32::MAX as usize {
            return Err(Error::invalid(
                "kv_cache",
                "a capacity past i32::MAX does not fit the kernels' lengths",
            ));
        }
        for s in 0..b {
            if count[s] > 1 || start[s] + count[s] != lens[s] || lens[s] > limits.capacity {
                return Err(Error::invalid(
                    "kv_cache",
                    format!(
                        "sequence {s}: start {}, count {}, length {} do not make one step in a \
                         cache of {}",
                        start[s], count[s], lens[s], limits.capacity
                    ),
                ));
            }
        }
        // Every value was bounded above by the vocabulary, the context or the capacity,
        // each at most i32::MAX (the table and position rows are device rows).
        let as_i32 = |v: usize| v.min(i32::MAX as usize) as i32;
        for s in 0..b {
            out[self.ids().start + s] = as_i32(ids[s] as usize);
            out[self.positions().start + s] = as_i32(positions[s] as usize);
            out[self.start_count().start + s] = as_i32(start[s]);
            out[self.start_count().start + b + s] = as_i32(count[s]);
            out[self.lens().start + s] = as_i32(lens[s]);
        }
        Ok(())
    }
}

/// What the graph step needs to know about a decoder-only stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackFacts {
    pub norm: Norm,
    pub has_final_norm: bool,
    /// Every block's attention is self-attention with one fused Q/K/V projection of
    /// 3·heads·dim outputs, heads·dim = the model width.
    pub fused_self_attention: bool,
    pub layers: usize,
    pub width: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// The widest feed-forward hidden layer.
    pub ffn: usize,
    pub vocab: usize,
    pub n_positions: usize,
}

impl StackFacts {
    pub fn of<B: Backend>(be: &B, lm: &DecoderOnly<B>) -> StackFacts {
        let width = be.shape(&lm.wte.table).get(1).copied().unwrap_or(0);
        let first = lm.blocks.first();
        let (heads, head_dim) = first.map_or((0, 0), |b| (b.attn.heads, b.attn.head_dim));
        let fused_self_attention = lm.blocks.iter().all(|b| {
            b.attn.heads * b.attn.head_dim == width
                && b.attn.heads == heads
                && b.attn.head_dim == head_dim
                && b.attn
                    .self_qkv()
                    .is_some_and(|q| q.out_features == 3 * width && q.in_features == width)
                && b.attn.out.out_features == width
                && b.mlp.up.in_features == width
                && b.mlp.down.out_features == width
        });
        StackFacts {
            norm: lm.norm,
            has_final_norm: lm.ln_f.is_some(),
            fused_self_attention,
            layers: lm.blocks.len(),
            width,
            heads,
            head_dim,
            ffn: lm
                .blocks
                .iter()
                .map(|b| b.mlp.up.out_features)
                .max()
                .unwrap_or(0),
            vocab: lm.vocab_size,
            n_positions: lm.n_positions,
        }
    }

    /// `Ok` when the graph step can run this stack; otherwise why not (generation then keeps
    /// the eager path).
    pub fn applies(&self) -> std::result::Result<(), &'static str> {
        if self.norm != Norm::Pre {
            return Err("post-LayerNorm stacks (GPT-1) keep the eager path");
        }
        if !self.has_final_norm {
            return Err("a pre-LayerNorm stack without a final LayerNorm");
        }
        if !self.fused_self_attention {
            return Err("a block without one fused Q/K/V projection of the model's width");
        }
        if self.layers == 0 || self.width == 0 || self.vocab == 0 {
            return Err("an empty stack");
        }
        Ok(())
    }

    /// The static buffers of a step for `batch` sequences, (name, shape), in the order the
    /// step writes them.
    pub fn buffers(&self, batch: usize) -> Vec<(&'static str, [usize; 2])> {
        let (w, b) = (self.width, batch);
        vec![
            ("token rows", [b, w]),
            ("position rows", [b, w]),
            ("residual x", [b, w]),
            ("residual sum", [b, w]),
            ("normalized", [b, w]),
            ("qkv", [b, 3 * w]),
            ("attention", [b, w]),
            ("attention out", [b, w]),
            ("ffn up", [b, self.ffn]),
            ("ffn down", [b, w]),
            ("logits", [b, self.vocab]),
        ]
    }

    /// Bytes of [`StackFacts::buffers`] at `elem_bytes` per element.
    pub fn buffer_bytes(&self, batch: usize, elem_bytes: usize) -> usize {
        self.buffers(batch)
            .iter()
            .map(|(_, [r, c])| r * c * elem_bytes)
            .sum()
    }
}

#[cfg(feature = "cuda")]
pub use device::CudaGraphStep;

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use crate::gpu::{DeviceTensor, Gpu, I32View};
    use crate::runtime::backend::{Activation, AttentionMask, CausalAlign, Heads};
    use crate::runtime::cuda::{AttentionIntoOptions, Cuda};
    use crate::runtime::decoder_only::DecoderStepBackend;
    use crate::runtime::kv_cache::{DecodeStep, StepView};
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
    use std::sync::Arc;

    /// The static buffers (see [`StackFacts::buffers`]).
    struct Buffers {
        tok: DeviceTensor,
        pos: DeviceTensor,
        x: DeviceTensor,
        sum: DeviceTensor,
        h: DeviceTensor,
        qkv: DeviceTensor,
        ctx: DeviceTensor,
        attn: DeviceTensor,
        up: DeviceTensor,
        down: DeviceTensor,
        logits: DeviceTensor,
    }

    /// A decoder-only model's decoding step for `batch` sequences of up to `capacity`
    /// positions, replayed from a CUDA graph (see the module docs).
    pub struct CudaGraphStep<'m> {
        lm: &'m DecoderOnly<Cuda>,
        /// The model backend's stream: the prefill's cache writes are queued there.
        model_stream: Arc<CudaStream>,
        facts: StackFacts,
        /// The step's own backend: the model backend's context, its own stream, its own
        /// scratch (reserved) and a cuBLAS handle with a fixed workspace. Taken from the
        /// model backend's keeping when one is there, and handed back when the step goes
        /// (`None` only then).
        be: Option<Box<Cuda>>,
        /// The model's backend, which keeps `be` between steps.
        model_be: &'m Cuda,
        meta: StepMeta,
        capacity: usize,
        host_meta: PinnedHostSlice<i32>,
        /// `host_meta`'s address, the source of the graph's copy node.
        host_ptr: *const i32,
        /// Kept alive for the graph, which reads it at `dev_ptr`.
        _dev_meta: CudaSlice<i32>,
        /// `dev_meta`'s device address, taken once outside any capture.
        dev_ptr: u64,
        bufs: Buffers,
        /// The graph and the KV-cache buffers (device addresses) it was captured on.
        graph: Option<(CudaGraph, Vec<u64>)>,
        /// Steps run, and how many of them replayed the graph.
        steps: usize,
        replays: usize,
    }

    impl std::fmt::Debug for CudaGraphStep<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CudaGraphStep")
                .field("batch", &self.meta.batch)
                .field("capacity", &self.capacity)
                .field("captured", &self.graph.is_some())
                .finish_non_exhaustive()
        }
    }

    impl Drop for CudaGraphStep<'_> {
        fn drop(&mut self) {
            // Before the fields go: a step that failed half-way may have left work queued that
            // reads the pinned array or the buffers. An error here has nowhere to go; the next
            // call on the context reports a sticky fault (and the backend is not kept).
            if let Some(be) = self.be.take() {
                if be.gpu().synchronize().is_ok() {
                    self.model_be.keep_step_backend(be);
                }
            }
        }
    }

    impl DecoderStepBackend for Cuda {
        fn decoder_step<'m>(
            &'m self,
            lm: &'m DecoderOnly<Cuda>,
            batch: usize,
            capacity: usize,
        ) -> Result<Option<Box<dyn DecodeStep<Cuda> + 'm>>> {
            Ok(CudaGraphStep::new(self, lm, batch, capacity)?
                .map(|s| Box::new(s) as Box<dyn DecodeStep<Cuda>>))
        }
    }

    /// Every parameter tensor of the stack, for the dtype check.
    fn parameters(lm: &DecoderOnly<Cuda>) -> Vec<&DeviceTensor> {
        let mut all = vec![&lm.wte.table, &lm.wpe.table];
        for b in &lm.blocks {
            for ln in [&b.ln_1, &b.ln_2] {
                all.extend([&ln.gamma, &ln.beta]);
            }
            let lins = b
                .attn
                .self_qkv()
                .into_iter()
                .chain([&b.attn.out, &b.mlp.up, &b.mlp.down]);
            for l in lins {
                all.push(&l.weight);
                all.extend(l.bias.as_ref());
            }
        }
        if let Some(ln) = &lm.ln_f {
            all.extend([&ln.gamma, &ln.beta]);
        }
        if let Some(h) = &lm.lm_head {
            all.push(&h.weight);
            all.extend(h.bias.as_ref());
        }
        all
    }

    impl<'m> CudaGraphStep<'m> {
        /// The step for `lm` on `model_be`'s GPU, or `None` where it does not apply (the
        /// backend's [`Cuda::decode_graph`] off, or [`StackFacts::applies`], or parameters in
        /// another dtype than the backend's).
        pub fn new(
            model_be: &'m Cuda,
            lm: &'m DecoderOnly<Cuda>,
            batch: usize,
            capacity: usize,
        ) -> Result<Option<Self>> {
            if !model_be.decode_graph() {
                return Ok(None);
            }
            let facts = StackFacts::of(model_be, lm);
            if facts.applies().is_err() {
                return Ok(None);
            }
            let dtype = model_be.dtype();
            if parameters(lm).iter().any(|t| t.dtype() != dtype) {
                return Ok(None);
            }
            if batch == 0 || capacity == 0 || capacity > i32::MAX as usize {
                return Err(Error::invalid(
                    "batch",
                    format!("a decoding step needs sequences and positions (batch {batch}, capacity {capacity})"),
                ));
            }
            let outer = model_be.gpu();
            let be = match model_be.take_step_backend() {
                Some(kept) => kept,
                None => {
                    // A stream of its own: a capture takes in whatever any thread queues on
                    // the capturing stream, and other users of the model's Gpu (other
                    // threads' calls on the shared handle) must not land in the graph.
                    let own = outer
                        .stream()
                        .fork()
                        .map_err(|e| Error::driver("create the decoding step's stream", e))?;
                    let mut be = Cuda::new(outer.on_stream(own)?, dtype)?;
                    be.reserve_blas_workspace(be.blas_workspace_bytes())?;
                    Box::new(be)
                }
            };
            let gpu: Arc<Gpu> = be.gpu().clone();
            let (heads, dim) = (facts.heads, facts.head_dim);
            let scratch =
                be.attention_workspace_bytes((batch, 1, capacity), (heads, heads), (dim, dim))?;
            if scratch > 0 {
                gpu.reserve_workspace(scratch)?;
            }
            let meta = StepMeta { batch };
            // SAFETY: the memory is written in full (zeros) right below, before any read.
            let mut host_meta =
                unsafe { gpu.context().alloc_pinned_with_flags::<i32>(meta.len(), 0) }
                    .map_err(|e| Error::driver("allocate the step's pinned metadata", e))?;
            host_meta
                .as_mut_slice()
                .map_err(|e| Error::driver("write the step's pinned metadata", e))?
                .fill(0);
            let host_ptr = host_meta
                .as_ptr()
                .map_err(|e| Error::driver("address the step's pinned metadata", e))?;
            let dev_meta = gpu
                .stream()
                .alloc_zeros::<i32>(meta.len())
                .map_err(|e| Error::driver("allocate the step's device metadata", e))?;
            let dev_ptr = {
                let (ptr, _record) = dev_meta.device_ptr(gpu.stream());
                ptr
            };
            let z = |[r, c]: [usize; 2]| gpu.zeros(dtype, &[r, c]);
            let shapes: Vec<[usize; 2]> = facts.buffers(batch).iter().map(|(_, s)| *s).collect();
            let bufs = Buffers {
                tok: z(shapes[0])?,
                pos: z(shapes[1])?,
                x: z(shapes[2])?,
                sum: z(shapes[3])?,
                h: z(shapes[4])?,
                qkv: z(shapes[5])?,
                ctx: z(shapes[6])?,
                attn: z(shapes[7])?,
                up: z(shapes[8])?,
                down: z(shapes[9])?,
                logits: z(shapes[10])?,
            };
            Ok(Some(CudaGraphStep {
                lm,
                model_be,
                model_stream: outer.stream().clone(),
                facts,
                be: Some(be),
                meta,
                capacity,
                host_meta,
                host_ptr,
                dev_ptr,
                _dev_meta: dev_meta,
                bufs,
                graph: None,
                steps: 0,
                replays: 0,
            }))
        }

        fn be(&self) -> Result<&Cuda> {
            self.be
                .as_deref()
                .ok_or_else(|| Error::invalid("graph", "the step's backend is gone"))
        }

        /// Steps run so far, and how many of them replayed the captured graph (all but the
        /// first on the same cache buffers).
        pub fn counts(&self) -> (usize, usize) {
            (self.steps, self.replays)
        }

        /// The captured graph, once there is one (tests count its nodes).
        pub fn graph(&self) -> Option<&CudaGraph> {
            self.graph.as_ref().map(|(g, _)| g)
        }

        /// Queues the whole step on the stream: the metadata copy from pinned memory, then
        /// every layer. Called once eagerly and once under capture per set of cache buffers.
        fn record(&mut self, layers: &mut [(&mut DeviceTensor, &mut DeviceTensor)]) -> Result<()> {
            let gpu = self.be()?.gpu().clone();
            let stream = gpu.stream();
            let (b, w) = (self.meta.batch, self.facts.width);
            let base = self.dev_ptr;
            // SAFETY: `host_ptr` is the page-locked allocation of `host_meta` (`meta.len()`
            // i32) and `dev_meta` a device array of as many, both owned by this step and alive
            // as long as its graph; the host writes the pinned array only between steps, when
            // the stream is idle (see the module docs). The raw pointer, taken when the step
            // was made, keeps cudarc's accessors (which wait on an event) out of the capture.
            unsafe {
                cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                    base,
                    self.host_ptr.cast(),
                    self.meta.len() * std::mem::size_of::<i32>(),
                    stream.cu_stream(),
                )
            }
            .result()
            .map_err(|e| Error::driver("copy the step's metadata", e))?;
            let ctx = crate::gpu::ContextId::of(gpu.context());
            // SAFETY: each range lies inside `dev_meta` (StepMeta's layout), alive and written
            // only by the copy above, which stream order puts before every reader.
            let part = |r: Range<usize>| unsafe {
                I32View::from_raw(ctx, base + 4 * r.start as u64, r.len())
            };
            let (ids, positions) = (part(self.meta.ids()), part(self.meta.positions()));
            let (start_count, lens) = (part(self.meta.start_count()), part(self.meta.lens()));
            let Some(be) = self.be.as_deref() else {
                return Err(Error::invalid("graph", "the step's backend is gone"));
            };
            let (lm, bf) = (self.lm, &mut self.bufs);
            crate::ops::elementwise::gather_rows_into(
                &gpu,
                &lm.wte.table.view(),
                &ids,
                &mut bf.tok.view_mut(),
            )?;
            crate::ops::elementwise::gather_rows_into(
                &gpu,
                &lm.wpe.table.view(),
                &positions,
                &mut bf.pos.view_mut(),
            )?;
            let none = Activation::None;
            let (heads, dim) = (self.facts.heads, self.facts.head_dim);
            for (i, (block, (kc, vc))) in lm.blocks.iter().zip(layers.iter_mut()).enumerate() {
                // The residual stream enters in `x` (tok + pos for the first block).
                let ln1 = &block.ln_1;
                if i == 0 {
                    let res = Some((&bf.pos, &mut bf.x));
                    be.layer_norm_into(&bf.tok, res, &ln1.gamma, &ln1.beta, ln1.eps, &mut bf.h)?;
                } else {
                    let res = Some((&bf.sum, &mut bf.x));
                    be.layer_norm_into(&bf.down, res, &ln1.gamma, &ln1.beta, ln1.eps, &mut bf.h)?;
                }
                let Some(qkv) = block.attn.self_qkv() else {
                    return Err(Error::invalid("attn", "not a self-attention layer"));
                };
                be.linear_into(&bf.h, &qkv.weight, qkv.bias.as_ref(), none, &mut bf.qkv)?;
                let at = |tensor, col| Heads {
                    tensor,
                    col,
                    heads,
                    dim,
                };
                let caches = (&mut **kc, &mut **vc);
                be.append_kv_view(
                    at(&bf.qkv, w),
                    at(&bf.qkv, 2 * w),
                    caches,
                    (start_count, None),
                    b,
                    1,
                )?;
                let mask = AttentionMask {
                    batch: b,
                    len_q: 1,
                    len_k: self.capacity,
                    key_lens: None,
                    causal: Some(CausalAlign::BottomRight),
                    window: block.attn.window(CausalAlign::BottomRight),
                    scale: block.attn.scale,
                };
                let opts = AttentionIntoOptions {
                    device_key_lens: Some(lens),
                    lse: None,
                };
                be.attention_into(
                    at(&bf.qkv, 0),
                    at(&**kc, 0),
                    at(&**vc, 0),
                    &mask,
                    &mut bf.ctx,
                    opts,
                )?;
                let out = &block.attn.out;
                be.linear_into(&bf.ctx, &out.weight, out.bias.as_ref(), none, &mut bf.attn)?;
                // sum = x + attention; h = LN2(sum).
                let ln2 = &block.ln_2;
                let res = Some((&bf.x, &mut bf.sum));
                be.layer_norm_into(&bf.attn, res, &ln2.gamma, &ln2.beta, ln2.eps, &mut bf.h)?;
                let (up, down) = (&block.mlp.up, &block.mlp.down);
                be.linear_into(
                    &bf.h,
                    &up.weight,
                    up.bias.as_ref(),
                    block.mlp.act,
                    &mut bf.up,
                )?;
                be.linear_into(&bf.up, &down.weight, down.bias.as_ref(), none, &mut bf.down)?;
                // The next block (or the final LayerNorm) adds `down` to `sum` into `x`.
            }
            let Some(ln_f) = &lm.ln_f else {
                return Err(Error::invalid("ln_f", "the stack has no final LayerNorm"));
            };
            let res = Some((&bf.sum, &mut bf.x));
            be.layer_norm_into(&bf.down, res, &ln_f.gamma, &ln_f.beta, ln_f.eps, &mut bf.h)?;
            let (head_w, head_b) = match &lm.lm_head {
                Some(head) => (&head.weight, head.bias.as_ref()),
                None => (&lm.wte.table, None),
            };
            be.linear_into(&bf.h, head_w, head_b, none, &mut bf.logits)
        }

        /// Runs the step eagerly on `layers`, then captures it into a graph bound to them.
        fn run_and_capture(
            &mut self,
            layers: &mut [(&mut DeviceTensor, &mut DeviceTensor)],
            ptrs: Vec<u64>,
        ) -> Result<()> {
            self.graph = None;
            self.record(layers)?;
            let stream = self.be()?.gpu().stream().clone();
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| Error::driver("begin capturing the decoding step", e))?;
            let recorded = self.record(layers);
            // The capture ends whatever happened inside it.
            let graph = stream.end_capture(CUgraphInstantiate_flags(0));
            recorded?;
            let graph = graph
                .map_err(|e| Error::driver("capture the decoding step", e))?
                .ok_or_else(|| Error::invalid("graph", "the capture produced no graph"))?;
            self.graph = Some((graph, ptrs));
            Ok(())
        }
    }

    impl DecodeStep<Cuda> for CudaGraphStep<'_> {
        fn batch(&self) -> usize {
            self.meta.batch
        }

        fn run(
            &mut self,
            cache: StepView<'_, DeviceTensor>,
            ids: &[u32],
            positions: &[u32],
        ) -> Result<Vec<f32>> {
            let StepView {
                mut layers,
                start,
                count,
                lens,
                capacity,
                after_prefill,
            } = cache;
            if !after_prefill {
                return Err(Error::invalid(
                    "kv_cache",
                    "the graph step runs after the prefill only",
                ));
            }
            let (b, w) = (self.meta.batch, self.facts.width);
            if capacity != self.capacity || layers.len() != self.facts.layers {
                return Err(Error::invalid(
                    "kv_cache",
                    format!(
                        "a cache of {} layers and {capacity} positions for a step built for \
                         {} and {}",
                        layers.len(),
                        self.facts.layers,
                        self.capacity
                    ),
                ));
            }
            for (k, v) in &layers {
                for t in [&**k, &**v] {
                    if t.shape() != [b * capacity, w] {
                        return Err(Error::shape(
                            "kv_cache",
                            format!("[{}, {w}]", b * capacity),
                            t.shape(),
                        ));
                    }
                }
            }
            let limits = MetaLimits {
                vocab: self.facts.vocab,
                n_positions: self.facts.n_positions,
                capacity,
            };
            let meta = self.meta;
            let host = self
                .host_meta
                .as_mut_slice()
                .map_err(|e| Error::driver("write the step's pinned metadata", e))?;
            meta.fill(host, (ids, positions), (start, count, lens), limits)?;
            let ptrs: Vec<u64> = layers
                .iter()
                .flat_map(|(k, v)| [k.view().device_ptr(), v.view().device_ptr()])
                .collect();
            self.steps += 1;
            // The step's stream waits for the model's: the cache rows the prefill (or any
            // other work of the model's backend) wrote. The other way round needs no event:
            // the step ends with a blocking read of its stream, before the host queues
            // anything else.
            self.be()?
                .gpu()
                .stream()
                .join(&self.model_stream)
                .map_err(|e| {
                    Error::driver("order the decoding step after the model's stream", e)
                })?;
            match &self.graph {
                Some((graph, bound)) if *bound == ptrs => {
                    graph
                        .launch()
                        .map_err(|e| Error::driver("replay the decoding step", e))?;
                    self.replays += 1;
                }
                _ => self.run_and_capture(&mut layers, ptrs)?,
            }
            // Blocking: after it the stream is idle and the pinned metadata free to rewrite.
            self.bufs.logits.to_f32_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cpu::Cpu;
    use crate::runtime::gpt1::Gpt1;
    use crate::runtime::gpt2::Gpt2;
    use crate::runtime::gpt_neo::GptNeo;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    const LIMITS: MetaLimits = MetaLimits {
        vocab: 100,
        n_positions: 64,
        capacity: 20,
    };

    #[test]
    fn the_env_opt_out_turns_the_graph_off_only_for_its_off_values() {
        assert!(graph_enabled_by_env(None));
        for on in ["1", "on", "yes", "", "2"] {
            assert!(graph_enabled_by_env(Some(on)), "{on:?}");
        }
        for off in ["0", "off", "false", "no", " OFF ", "False"] {
            assert!(!graph_enabled_by_env(Some(off)), "{off:?}");
        }
    }

    #[test]
    fn step_metadata_fields_tile_one_array_and_fill_puts_each_value_in_its_field() {
        for batch in [1usize, 3, 8] {
            let m = StepMeta { batch };
            assert_eq!(m.len(), 5 * batch);
            let mut seen = vec![0u8; m.len()];
            for r in [m.ids(), m.positions(), m.start_count(), m.lens()] {
                r.for_each(|i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&n| n == 1), "batch {batch}: {seen:?}");
            assert_eq!(m.start_count().len(), 2 * batch);
        }
        let m = StepMeta { batch: 3 };
        let mut out = vec![-7; m.len()];
        m.fill(
            &mut out,
            (&[5, 99, 0], &[4, 0, 63]),
            (&[4, 0, 19], &[1, 1, 0], &[5, 1, 19]),
            LIMITS,
        )
        .unwrap();
        assert_eq!(&out[m.ids()], &[5, 99, 0]);
        assert_eq!(&out[m.positions()], &[4, 0, 63]);
        assert_eq!(&out[m.start_count()], &[4, 0, 19, 1, 1, 0]);
        assert_eq!(&out[m.lens()], &[5, 1, 19]);
    }

    #[test]
    fn step_metadata_outside_the_model_or_the_cache_is_a_typed_error() {
        let m = StepMeta { batch: 2 };
        let mut out = vec![0; m.len()];
        let ok_lens: (&[usize], &[usize], &[usize]) = (&[3, 4], &[1, 1], &[4, 5]);
        let mut fill = |ids: &[u32], pos: &[u32], lens| m.fill(&mut out, (ids, pos), lens, LIMITS);
        let e = fill(&[1, 100], &[0, 0], ok_lens);
        assert!(
            matches!(e, Err(Error::InvalidArgument { arg: "ids", .. })),
            "{e:?}"
        );
        let e = fill(&[1, 2], &[64, 0], ok_lens);
        assert!(
            matches!(
                e,
                Err(Error::InvalidArgument {
                    arg: "positions",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = fill(&[1], &[0, 0], ok_lens);
        assert!(matches!(e, Err(Error::Shape { arg: "ids", .. })), "{e:?}");
        for bad in [
            (&[3usize, 4][..], &[2usize, 1][..], &[5usize, 5][..]), // two tokens in one step
            (&[3, 4], &[1, 1], &[4, 6]),                            // lens ≠ start + count
            (&[19, 4], &[1, 1], &[20, 5]),                          // fits (boundary) ...
        ] {
            let r = fill(&[1, 2], &[0, 0], bad);
            if bad.2[0] == 20 {
                assert!(r.is_ok(), "a cache filled to its capacity: {r:?}");
            } else {
                assert!(
                    matches!(
                        r,
                        Err(Error::InvalidArgument {
                            arg: "kv_cache",
                            ..
                        })
                    ),
                    "{r:?}"
                );
            }
        }
        let r = fill(&[1, 2], &[0, 0], (&[20, 4], &[1, 1], &[21, 5]));
        assert!(
            matches!(
                r,
                Err(Error::InvalidArgument {
                    arg: "kv_cache",
                    ..
                })
            ),
            "past the capacity: {r:?}"
        );
        let mut short = vec![0; m.len() - 1];
        let r = m.fill(&mut short, (&[1, 2], &[0, 0]), ok_lens, LIMITS);
        assert!(matches!(r, Err(Error::Shape { arg: "meta", .. })), "{r:?}");
    }

    #[test]
    fn gpt2_and_gpt_neo_stacks_take_the_graph_step_and_gpt1_keeps_the_eager_path() {
        let be = Cpu;
        let gpt2 = Gpt2::from_folder(&be, &fixture("tiny-gpt2")).unwrap();
        let facts = StackFacts::of(&be, gpt2.decoder());
        assert_eq!(facts.applies(), Ok(()));
        assert_eq!(
            (
                facts.layers,
                facts.width,
                facts.heads,
                facts.head_dim,
                facts.ffn,
                facts.vocab
            ),
            (2, 16, 2, 8, 64, 50257)
        );
        let neo = GptNeo::from_folder(&be, &fixture("tiny-gpt-neo")).unwrap();
        assert_eq!(StackFacts::of(&be, neo.decoder()).applies(), Ok(()));
        let gpt1 = Gpt1::from_folder(&be, &fixture("tiny-gpt1")).unwrap();
        let facts1 = StackFacts::of(&be, gpt1.decoder());
        assert_eq!(facts1.norm, Norm::Post);
        assert!(facts1.applies().is_err());
        // A stack without its final LayerNorm or with a cross-attention-shaped block.
        let mut no_final = facts.clone();
        no_final.has_final_norm = false;
        assert!(no_final.applies().is_err());
        let mut unfused = facts.clone();
        unfused.fused_self_attention = false;
        assert!(unfused.applies().is_err());
    }

    #[test]
    fn static_buffers_are_sized_by_batch_width_ffn_and_vocabulary() {
        // GPT-2 124M's shape.
        let facts = StackFacts {
            norm: Norm::Pre,
            has_final_norm: true,
            fused_self_attention: true,
            layers: 12,
            width: 768,
            heads: 12,
            head_dim: 64,
            ffn: 3072,
            vocab: 50257,
            n_positions: 1024,
        };
        for batch in [1usize, 8] {
            let bufs = facts.buffers(batch);
            assert_eq!(bufs.len(), 11);
            assert!(bufs.iter().all(|(_, [r, _])| *r == batch));
            // 8 of width, qkv 3·width, the FFN's hidden layer, the logits.
            let elems = batch * (8 * 768 + 3 * 768 + 3072 + 50257);
            assert_eq!(facts.buffer_bytes(batch, 2), 2 * elems);
        }
        // At batch 1 in f16 the buffers are about 0.1 MB, the logits most of it.
        assert_eq!(facts.buffer_bytes(1, 2), 2 * (11 * 768 + 3072 + 50257));
    }
}
