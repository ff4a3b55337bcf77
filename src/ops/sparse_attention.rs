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
//!
//! The backward ([`backward_into`], [`backward`]) is the dense backward's kernels
//! (`kernels/attention_bwd.cu`, `attention_bwd_sparse_*` entries) walking the kept blocks: dQ
//! per query block over its kept key blocks, dK/dV per key block over the query blocks that
//! keep it (the layout's transposed index, [`crate::sparse::ColumnIndex`], uploaded with the
//! layout). Options, modes and the exact path are the dense backward's
//! ([`super::attention_backward`]); the same restrictions as the forward apply. On tensor cores
//! every block size (16, 32, 64, 128) and head dims up to 256 (the dense backward's column
//! split) run: the kernels' tile is 64, and a layout of another block size runs as its
//! re-blocked copy ([`BlockLayout::reblocked`], same element mask, uploaded once per layout),
//! so the work follows the kept 64-tiles.

use super::attention::{check, launch_forward, Options, Sequences, SparseArgs};
use super::attention_backward;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, TensorMut, TensorRef};
use crate::sparse::{BlockLayout, ColumnIndex};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use std::sync::{Arc, OnceLock};

/// A block-sparse layout uploaded once and reused by every call with the same layout: its
/// compressed rows, bitmasks and their row unions (the forward and backward), and its
/// transposed index (the backward's dK/dV pass; [`ColumnIndex::device_bytes`] bytes). The
/// tensor-core backward reads layouts of its tile
/// ([`attention_backward::SPARSE_TC_BLOCK_SIZE`]); for another block size its first call
/// uploads the layout re-blocked to that tile ([`BlockLayout::reblocked`]: the same element
/// mask), kept here for the later calls.
pub struct DeviceBlockLayout {
    layout: BlockLayout,
    arrays: DeviceArrays,
    /// The layout re-blocked to the tensor-core backward's tile (block sizes other than it).
    tiles: OnceLock<DeviceArrays>,
}

/// One layout's arrays on the device.
struct DeviceArrays {
    block_size: usize,
    stored_heads: i32,
    q_blocks: i32,
    k_blocks: i32,
    words_per_row: usize,
    ints: [CudaSlice<i32>; 6],
    bits: CudaSlice<u64>,
    bits_union: CudaSlice<u64>,
    /// Column offsets, query blocks, kept-block positions.
    columns: [CudaSlice<i32>; 3],
    column_bytes: usize,
}

/// The transposed index on the device, for the backward's launch.
#[derive(Clone, Copy)]
pub(super) struct ColumnArgs {
    pub(super) ptrs: [u64; 3],
    pub(super) k_blocks: i32,
}

impl DeviceArrays {
    /// Copies the layout's arrays (and, per bitmask block, the union of its rows, which says
    /// which K/V rows any query of the block may see) to the device.
    fn upload(gpu: &Gpu, layout: &BlockLayout) -> Result<DeviceArrays> {
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
        let cols: ColumnIndex = layout.columns();
        let column_bytes = cols.device_bytes();
        let [offsets, q_blocks, blocks] = cols.to_device()?;
        Ok(DeviceArrays {
            block_size: bs,
            stored_heads: d.stored_heads,
            q_blocks: d.q_blocks,
            k_blocks: d.k_blocks,
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
            columns: [up_i32(offsets)?, up_i32(q_blocks)?, up_i32(blocks)?],
            column_bytes,
        })
    }

    /// The device pointers of the rows (as the forward takes them) and of the columns.
    fn args(&self, gpu: &Gpu) -> (SparseArgs, ColumnArgs) {
        let stream = gpu.stream();
        let mut ptrs = [0u64; 8];
        for (p, buf) in ptrs.iter_mut().zip(&self.ints) {
            *p = buf.device_ptr(stream).0;
        }
        ptrs[6] = self.bits.device_ptr(stream).0;
        ptrs[7] = self.bits_union.device_ptr(stream).0;
        let rows = SparseArgs {
            block_size: self.block_size,
            stored_heads: self.stored_heads,
            q_blocks: self.q_blocks,
            words_per_row: self.words_per_row as i32,
            ptrs,
        };
        let mut cptrs = [0u64; 3];
        for (p, buf) in cptrs.iter_mut().zip(&self.columns) {
            *p = buf.device_ptr(stream).0;
        }
        let cols = ColumnArgs {
            ptrs: cptrs,
            k_blocks: self.k_blocks,
        };
        (rows, cols)
    }
}

impl DeviceBlockLayout {
    /// Copies the layout's arrays to the device (see [`DeviceBlockLayout`]).
    pub fn upload(gpu: &Gpu, layout: &BlockLayout) -> Result<DeviceBlockLayout> {
        Ok(DeviceBlockLayout {
            layout: layout.clone(),
            arrays: DeviceArrays::upload(gpu, layout)?,
            tiles: OnceLock::new(),
        })
    }

    /// Device bytes of the transposed index (see [`ColumnIndex`]), of the layout as uploaded
    /// (a re-blocked copy for the tensor-core backward adds its own).
    pub fn column_index_bytes(&self) -> usize {
        self.arrays.column_bytes
    }

    /// The device pointers of the rows (as the forward takes them) and of the columns, after
    /// checking that the layout lives in `gpu`'s context.
    pub(super) fn args(&self, gpu: &Gpu) -> Result<(SparseArgs, ColumnArgs)> {
        gpu.check_context(
            "layout",
            crate::gpu::ContextId::of(self.arrays.bits.context()),
        )?;
        Ok(self.arrays.args(gpu))
    }

    /// As [`Self::args`], for the layout in blocks of `tile`: the uploaded arrays when the
    /// block size is `tile`, else the re-blocked layout's (uploaded on first use).
    pub(super) fn tile_args(&self, gpu: &Gpu, tile: usize) -> Result<(SparseArgs, ColumnArgs)> {
        gpu.check_context(
            "layout",
            crate::gpu::ContextId::of(self.arrays.bits.context()),
        )?;
        if self.layout.block_size() == tile {
            return Ok(self.arrays.args(gpu));
        }
        if let Some(t) = self.tiles.get() {
            debug_assert_eq!(t.block_size, tile);
            return Ok(t.args(gpu));
        }
        let built = DeviceArrays::upload(gpu, &self.layout.reblocked(tile)?)?;
        // Another thread may have stored its copy first: both hold the same arrays.
        Ok(self.tiles.get_or_init(|| built).args(gpu))
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
    check_sparse_options(opts)?;
    let c = check(q, k, v, o, lse.as_deref(), opts)?;
    let l = &layout.layout;
    l.check_call(&c.shape, l.block_size())?;
    let (args, _) = layout.args(gpu)?;
    launch_forward(gpu, q, k, v, o, lse, opts, &c, Some(&args))
}

/// What a block-sparse call's options may hold (forward and backward alike): no causal or
/// window mask (they belong in the layout), dense batches.
fn check_sparse_options(opts: &Options) -> Result<()> {
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
    Ok(())
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

/// Block-sparse attention backward into caller-owned views: dQ, dK, dV of [`forward_into`] run
/// with the same `layout` and `opts.forward` (see [`attention_backward::backward_into`] for the
/// views and modes). Errors as the forward for options and layouts that do not fit the call;
/// every block size runs on tensor cores (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn backward_into(
    gpu: &Arc<Gpu>,
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorRef,
    lse: &TensorRef,
    d_o: &TensorRef,
    dq: &mut TensorMut,
    dk: &mut TensorMut,
    dv: &mut TensorMut,
    layout: &DeviceBlockLayout,
    opts: &attention_backward::Options,
) -> Result<()> {
    check_sparse_options(&opts.forward)?;
    attention_backward::launch_backward(gpu, q, k, v, o, lse, d_o, dq, dk, dv, opts, Some(layout))
}

/// Block-sparse attention backward, allocating dQ, dK, dV (contiguous, shaped like Q, K, V).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    d_o: &DeviceTensor,
    layout: &DeviceBlockLayout,
    opts: &attention_backward::Options,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let gpu: &Arc<Gpu> = q.gpu();
    let mut dq = gpu.zeros(q.dtype(), q.shape())?;
    let mut dk = gpu.zeros(k.dtype(), k.shape())?;
    let mut dv = gpu.zeros(v.dtype(), v.shape())?;
    backward_into(
        gpu,
        &q.view(),
        &k.view(),
        &v.view(),
        &o.view(),
        &lse.view(),
        &d_o.view(),
        &mut dq.view_mut(),
        &mut dk.view_mut(),
        &mut dv.view_mut(),
        layout,
        opts,
    )?;
    Ok((dq, dk, dv))
}
