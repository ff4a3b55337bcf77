//! Block-sparse attention forward on tensor cores: the dense kernel's block loop
//! (`kernels/attention_tc.cu`, `attention_sparse_*` entries) run over the kept blocks of a
//! [`BlockLayout`] only, so the cost follows the number of blocks kept. Full blocks run without
//! element masking; partial blocks apply their band or bitmask (and key padding) by element.
//!
//! f32 (or any dtype with `Kernel::Exact`) runs the exact kernel over the same kept blocks, key by
//! key. Everything else is as in [`super::attention`]: head dims 1–256, GQA, BHSD or
//! BSHD through strides, key padding (`Sequences::Dense { key_lens }`), LSE, fully-masked rows
//! giving O = 0 and LSE = −inf. Causal and sliding-window masks belong in the layout
//! ([`crate::sparse::patterns`]), so `Options::causal`/`window` must be `None` here; packed
//! batches are not supported. Layout block sizes on tensor cores: 64 for every head dim, 128 for
//! head dims up to 128; the exact kernel takes any supported block size.

use super::attention::{check, launch_forward, Options, Sequences, SparseArgs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, TensorMut, TensorRef};
use crate::sparse::BlockLayout;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use std::sync::Arc;

/// A block-sparse layout uploaded once and reused by every call with the same layout.
pub struct DeviceBlockLayout {
    layout: BlockLayout,
    words_per_row: usize,
    ints: [CudaSlice<i32>; 6],
    bits: CudaSlice<u64>,
    bits_union: CudaSlice<u64>,
}

impl DeviceBlockLayout {
    /// Copies the layout's arrays (and, per bitmask block, the union of its rows, which says
    /// which K/V rows any query of the block may see) to the device.
    pub fn upload(gpu: &Gpu, layout: &BlockLayout) -> Result<DeviceBlockLayout> {
        let d = layout.to_device()?;
        let wpr = layout.words_per_row();
        let bs = layout.block_size();
        let unions: Vec<u64> = d
            .bits
            .chunks(bs * wpr)
            .flat_map(|block| {
                (0..wpr).map(move |w| block.chunks(wpr).fold(0u64, |acc, row| acc | row[w]))
            })
            .collect();
        let up_i32 = |v: Vec<i32>| upload_nonempty(gpu, v);
        let up_u64 = |v: Vec<u64>| upload_nonempty(gpu, v);
        Ok(DeviceBlockLayout {
            layout: layout.clone(),
            words_per_row: wpr,
            ints: [
                up_i32(d.row_offsets)?,
                up_i32(d.col_indices)?,
                up_i32(d.mask_kind)?,
                up_i32(d.band_lo)?,
                up_i32(d.band_hi)?,
                up_i32(d.bits_index)?,
            ],
            bits: up_u64(d.bits)?,
            bits_union: up_u64(unions)?,
        })
    }

    /// The host layout this was uploaded from.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }
}

/// Copies `v` to the device; an empty array becomes one unread 0 (device buffers need at least
/// one element).
fn upload_nonempty<T: DeviceRepr + Default>(gpu: &Gpu, mut v: Vec<T>) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        v.push(T::default());
    }
    gpu.stream()
        .clone_htod(&v)
        .map_err(|e| Error::driver("copying a sparse layout", e))
}

/// Block-sparse attention into caller-owned views (see the module docs); `lse` as in
/// [`super::attention::forward_into`].
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a>(
    gpu: &Gpu,
    q: &TensorRef<'a>,
    k: &TensorRef<'a>,
    v: &TensorRef<'a>,
    o: &mut TensorMut<'a>,
    lse: Option<&mut TensorMut<'a>>,
    layout: &DeviceBlockLayout,
    opts: &Options,
) -> Result<()> {
    if opts.causal.is_some() || opts.window.is_some() {
        return Err(Error::invalid(
            "options",
            "block-sparse attention takes its causal/window masks from the layout \
             (crate::sparse::patterns); set Options::causal and window to None",
        ));
    }
    if !matches!(
        opts.sequences,
        Sequences::Dense { .. } | Sequences::DenseDevice { .. }
    ) {
        return Err(Error::invalid(
            "sequences",
            "block-sparse attention takes dense batches (key padding allowed), not packed ones",
        ));
    }
    let c = check(q, k, v, o, lse.as_deref(), opts)?;
    let l = &layout.layout;
    l.check_call(&c.shape, l.block_size())?;
    gpu.check_context("layout", crate::gpu::ContextId::of(layout.bits.context()))?;
    let stream = gpu.stream();
    let mut ptrs = [0u64; 8];
    for (p, buf) in ptrs.iter_mut().zip(&layout.ints) {
        *p = buf.device_ptr(stream).0;
    }
    ptrs[6] = layout.bits.device_ptr(stream).0;
    ptrs[7] = layout.bits_union.device_ptr(stream).0;
    let args = SparseArgs {
        block_size: l.block_size(),
        stored_heads: l.heads().stored() as i32,
        q_blocks: l.q_blocks() as i32,
        words_per_row: layout.words_per_row as i32,
        ptrs,
    };
    launch_forward(gpu, q, k, v, o, lse, opts, &c, Some(&args))
}

/// Block-sparse attention allocating O [B, Hq, Lq, Dv] and LSE [B, Hq, Lq].
pub fn forward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    layout: &DeviceBlockLayout,
    opts: &Options,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let gpu: &Arc<Gpu> = q.gpu();
    let (qs, vs) = (q.shape(), v.shape());
    if qs.len() != 4 || vs.len() != 4 {
        return Err(Error::shape("q", "4 dims [B, H, L, D], as v", qs));
    }
    let mut o = gpu.full(q.dtype(), &[qs[0], qs[1], qs[2], vs[3]], 0.0)?;
    let mut lse = gpu.full(DType::F32, &[qs[0], qs[1], qs[2]], 0.0)?;
    forward_into(
        gpu,
        &q.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        Some(&mut lse.view_mut()),
        layout,
        opts,
    )?;
    Ok((o, lse))
}
