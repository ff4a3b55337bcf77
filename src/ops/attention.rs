//! Scaled dot-product attention forward on the GPU: O = softmax(Q·Kᵀ·scale + mask)·V and the
//! per-row log-sum-exp. The CPU reference is [`crate::reference::attention`], whose docs define
//! the masks. f16/bf16 run on tensor cores (`kernels/attention_tc.cu`); f32, or any dtype on
//! request, on the exact f32 path (`kernels/attention_exact.cu`).
//!
//! Layouts are given by strides: any 4-D view [B, H, L, D] whose last dim is contiguous is read
//! as it is (BHSD, BSHD, or a slice of a larger buffer); packed variable-length batches are
//! 3-D views [total, H, D] with cumulative sequence offsets.

use super::validate;
use super::ViewInfo;
pub use crate::attention_types::CausalAlign;
use crate::attention_types::Shape;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, I32View, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_attention_fwd_params, CUATTN_ATTENTION_MAX_HEAD_DIM, CUATTN_CAUSAL_BOTTOM_RIGHT,
    CUATTN_CAUSAL_NONE, CUATTN_CAUSAL_TOP_LEFT,
};
use crate::kernels::params::{
    CUATTN_ATTN_TC_BM_HD128, CUATTN_ATTN_TC_BM_HD256, CUATTN_ATTN_TC_BM_HD64,
    CUATTN_ATTN_TC_BN_HD128, CUATTN_ATTN_TC_BN_HD256, CUATTN_ATTN_TC_BN_HD64,
    CUATTN_ATTN_TC_THREADS,
};
use crate::kernels::params::{
    CUATTN_SPARSE_BN_BS128_HD128, CUATTN_SPARSE_BN_BS128_HD64, CUATTN_SPARSE_BN_BS64_HD128,
    CUATTN_SPARSE_BN_BS64_HD256, CUATTN_SPARSE_BN_BS64_HD64,
};
pub use crate::key_band::Window;
use cudarc::driver::DevicePtr;
use std::sync::Arc;

const EXACT_MODULE: &str = "attention_exact";
const TC_MODULE: &str = "attention_tc";
/// Threads per block of the tensor-core kernel.
const TC_THREADS: u32 = CUATTN_ATTN_TC_THREADS;
/// Largest head dim (of Q/K and of V) accepted.
pub const MAX_HEAD_DIM: usize = CUATTN_ATTENTION_MAX_HEAD_DIM as usize;
/// Query rows per block of the exact kernel (one warp each).
const EXACT_ROWS_PER_BLOCK: usize = 4;

/// How the batch is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sequences<'s> {
    /// Q [B, Hq, Lq, D], K [B, Hkv, Lk, D], V [B, Hkv, Lk, Dv], O [B, Hq, Lq, Dv]; LSE
    /// [B, Hq, Lq]. `key_lens[b]` (0..=Lk) limits sequence b's keys (key padding).
    Dense { key_lens: Option<&'s [i32]> },
    /// Q [total_q, Hq, D], K [total_k, Hkv, D], V [total_k, Hkv, Dv], O [total_q, Hq, Dv];
    /// LSE [Hq, total_q]. Sequence b owns rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` (and the
    /// same of the keys); offsets start at 0 and never decrease.
    Packed {
        cu_seqlens_q: &'s [i32],
        cu_seqlens_k: &'s [i32],
    },
    /// As `Dense`, with the `batch` key lengths already on the device: the call uploads
    /// nothing (it can be captured in a CUDA graph). The host cannot check the values; the
    /// kernels clamp each to 0..=Lk.
    DenseDevice { key_lens: I32View<'s> },
    /// As `Packed`, with the batch + 1 offsets of each side on the device and the longest
    /// query and key sequence given (they size the grid; FlashAttention's `max_seqlen`). The
    /// kernels clamp every sequence into the tensors' rows and to these maxima, so wrong
    /// offsets give wrong rows, never a read or write outside the views.
    PackedDevice {
        cu_seqlens_q: I32View<'s>,
        cu_seqlens_k: I32View<'s>,
        max_len_q: usize,
        max_len_k: usize,
    },
}

impl Sequences<'_> {
    /// Whether the batch is packed ([total, H, D] tensors).
    pub fn is_packed(&self) -> bool {
        matches!(
            self,
            Sequences::Packed { .. } | Sequences::PackedDevice { .. }
        )
    }
}

/// Which kernel runs the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernel {
    /// Tensor cores for f16/bf16, the exact kernel for f32.
    #[default]
    Auto,
    /// f32 arithmetic on every element, any dtype (`kernels/attention_exact.cu`).
    Exact,
    /// mma.sync tensor cores, f16/bf16 only (`kernels/attention_tc.cu`).
    TensorCore,
    /// Hopper's wgmma/TMA kernel (`kernels/attention_hopper.cu`): compute capability 9.0,
    /// f16/bf16, D = Dv ∈ {64, 128}, dense batches. Not yet run on hardware, so never chosen by
    /// `Auto`; anything it cannot take is an error naming why.
    Hopper,
}

/// Options of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options<'s> {
    /// Multiplies Q·Kᵀ; `None` for 1/√D.
    pub scale: Option<f32>,
    pub causal: Option<CausalAlign>,
    /// Sliding-window (local) attention, as in [`crate::reference::attention`]; with `causal`
    /// the band is the intersection. Tile skipping follows the band.
    pub window: Option<Window>,
    pub sequences: Sequences<'s>,
    pub kernel: Kernel,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            scale: None,
            causal: None,
            window: None,
            sequences: Sequences::Dense { key_lens: None },
            kernel: Kernel::Auto,
        }
    }
}

/// A view's strides as (batch, head, row) in elements, after checking its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Strides {
    pub(super) batch: i64,
    pub(super) head: i64,
    pub(super) row: i64,
}

/// Checked sizes of a call (for packed batches, `len_q`/`len_k` are the longest sequence's).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Checked {
    pub(super) dtype: DType,
    pub(super) shape: Shape,
    pub(super) scale: f32,
    pub(super) q: Strides,
    pub(super) k: Strides,
    pub(super) v: Strides,
    pub(super) o: Strides,
    pub(super) lse: Option<(i64, i64)>,
    /// Rows of Q and of K/V (packed batches; 0 for dense ones).
    pub(super) total: (usize, usize),
}

/// Checks cumulative offsets: batch + 1 entries, starting at 0, never decreasing, ending
/// within `rows`. Returns the longest sequence.
fn check_offsets(arg: &'static str, cu: &[i32], batch: usize, rows: usize) -> Result<usize> {
    if cu.len() != batch + 1 {
        return Err(Error::shape(
            arg,
            format!("{} offsets (batch + 1)", batch + 1),
            &[cu.len()],
        ));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(
            arg,
            format!("offsets must start at 0, got {}", cu[0]),
        ));
    }
    let mut longest = 0usize;
    for (b, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::invalid(
                arg,
                format!("offsets decrease at sequence {b}: {} then {}", w[0], w[1]),
            ));
        }
        longest = longest.max((w[1] - w[0]) as usize);
    }
    let last = cu[batch] as usize;
    if last > rows {
        return Err(Error::invalid(
            arg,
            format!("last offset {last} is past the {rows} rows of the tensor"),
        ));
    }
    Ok(longest)
}

pub(super) fn check(
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorMut,
    lse: Option<&TensorMut>,
    opts: &Options,
) -> Result<Checked> {
    let lse = lse.map(|l| l.info("lse"));
    check_views(
        &q.info("q"),
        &k.info("k"),
        &v.info("v"),
        &o.info("o"),
        lse.as_ref(),
        opts,
    )
}

/// [`check`] on views of any kind (the backward reads O and LSE instead of writing them).
pub(super) fn check_views(
    qi: &ViewInfo,
    ki: &ViewInfo,
    vi: &ViewInfo,
    oi: &ViewInfo,
    lse: Option<&ViewInfo>,
    opts: &Options,
) -> Result<Checked> {
    let dtype = qi.dtype;
    for x in [ki, vi, oi] {
        validate::dtype(x, dtype)?;
    }
    let packed = opts.sequences.is_packed();
    let rank = if packed { 3 } else { 4 };
    let what = if packed {
        "[total, heads, dim]"
    } else {
        "[batch, heads, len, dim]"
    };
    let (qs, qst) = validate::strided(qi, rank, what)?;
    let (ks, kst) = validate::strided(ki, rank, what)?;
    let (vs, vst) = validate::strided(vi, rank, what)?;
    let (os, ost) = validate::strided(oi, rank, what)?;
    // Dense dims (b, h, l, d) or packed (t, h, d).
    let (hq, hkv) = (qs[1], ks[1]); // heads are dim 1 in both layouts
    let (dim_qk, dim_v) = (qs[rank - 1], vs[rank - 1]);
    validate::size_in("q", "head dim", dim_qk, MAX_HEAD_DIM)?;
    validate::size_in("v", "head dim", dim_v, MAX_HEAD_DIM)?;
    if hq % hkv != 0 {
        return Err(Error::invalid(
            "k",
            format!("query heads ({hq}) must be a multiple of key/value heads ({hkv})"),
        ));
    }
    if ks[rank - 1] != dim_qk {
        return Err(Error::shape(
            "k",
            format!("head dim {dim_qk} (that of q)"),
            ks,
        ));
    }
    let expect = |arg: &'static str, got: &[usize], want: Vec<usize>| {
        if got != want.as_slice() {
            Err(Error::shape(arg, format!("{want:?}"), got))
        } else {
            Ok(())
        }
    };
    // Packed: rows are dim 0 and heads dim 1; dense: heads dim 1 and rows dim 2.
    let head_stride = |st: &[usize]| st[1] as i64;
    let (batch, len_q, len_k, q_strides, k_strides, v_strides, o_strides);
    let packed_strides = |st: &[usize]| Strides {
        batch: 0,
        head: head_stride(st),
        row: st[0] as i64,
    };
    match opts.sequences {
        Sequences::DenseDevice { key_lens } => {
            batch = qs[0];
            (len_q, len_k) = (qs[2], ks[2]);
            expect("k", ks, vec![batch, hkv, len_k, dim_qk])?;
            expect("v", vs, vec![batch, hkv, len_k, dim_v])?;
            expect("o", os, vec![batch, hq, len_q, dim_v])?;
            device_i32("key_lens", &key_lens, batch, "one per sequence")?;
            let s = |st: &[usize]| Strides {
                batch: st[0] as i64,
                head: head_stride(st),
                row: st[2] as i64,
            };
            (q_strides, k_strides, v_strides, o_strides) = (s(qst), s(kst), s(vst), s(ost));
        }
        Sequences::PackedDevice {
            cu_seqlens_q,
            cu_seqlens_k,
            max_len_q,
            max_len_k,
        } => {
            batch = cu_seqlens_q.len().saturating_sub(1);
            if batch == 0 {
                return Err(Error::invalid(
                    "cu_seqlens_q",
                    "a packed batch needs at least one sequence",
                ));
            }
            device_i32(
                "cu_seqlens_q",
                &cu_seqlens_q,
                batch + 1,
                "batch + 1 offsets",
            )?;
            device_i32(
                "cu_seqlens_k",
                &cu_seqlens_k,
                batch + 1,
                "batch + 1 offsets",
            )?;
            for (arg, max, rows) in [
                ("max_len_q", max_len_q, qs[0]),
                ("max_len_k", max_len_k, ks[0]),
            ] {
                if max > rows || max > i32::MAX as usize {
                    return Err(Error::invalid(
                        arg,
                        format!("{max} is longer than the tensor's {rows} rows"),
                    ));
                }
            }
            (len_q, len_k) = (max_len_q, max_len_k);
            expect("v", vs, vec![ks[0], hkv, dim_v])?;
            expect("o", os, vec![qs[0], hq, dim_v])?;
            (q_strides, k_strides, v_strides, o_strides) = (
                packed_strides(qst),
                packed_strides(kst),
                packed_strides(vst),
                packed_strides(ost),
            );
        }
        Sequences::Dense { key_lens } => {
            batch = qs[0];
            (len_q, len_k) = (qs[2], ks[2]);
            expect("k", ks, vec![batch, hkv, len_k, dim_qk])?;
            expect("v", vs, vec![batch, hkv, len_k, dim_v])?;
            expect("o", os, vec![batch, hq, len_q, dim_v])?;
            if let Some(lens) = key_lens {
                if lens.len() != batch {
                    return Err(Error::shape(
                        "key_lens",
                        format!("{batch} lengths (one per sequence)"),
                        &[lens.len()],
                    ));
                }
                if let Some((b, &l)) = lens
                    .iter()
                    .enumerate()
                    .find(|(_, &l)| l < 0 || l as usize > len_k)
                {
                    return Err(Error::invalid(
                        "key_lens",
                        format!("sequence {b} has {l} keys, outside 0..={len_k}"),
                    ));
                }
            }
            let s = |st: &[usize]| Strides {
                batch: st[0] as i64,
                head: head_stride(st),
                row: st[2] as i64,
            };
            (q_strides, k_strides, v_strides, o_strides) = (s(qst), s(kst), s(vst), s(ost));
        }
        Sequences::Packed {
            cu_seqlens_q,
            cu_seqlens_k,
        } => {
            batch = cu_seqlens_q.len().saturating_sub(1);
            if batch == 0 {
                return Err(Error::invalid(
                    "cu_seqlens_q",
                    "a packed batch needs at least one sequence",
                ));
            }
            len_q = check_offsets("cu_seqlens_q", cu_seqlens_q, batch, qs[0])?;
            len_k = check_offsets("cu_seqlens_k", cu_seqlens_k, batch, ks[0])?;
            expect("v", vs, vec![ks[0], hkv, dim_v])?;
            expect("o", os, vec![qs[0], hq, dim_v])?;
            (q_strides, k_strides, v_strides, o_strides) = (
                packed_strides(qst),
                packed_strides(kst),
                packed_strides(vst),
                packed_strides(ost),
            );
        }
    }
    if batch == 0 {
        return Err(Error::invalid("q", "batch must be at least 1"));
    }
    let lse = match lse {
        None => None,
        Some(info) => {
            validate::dtype(info, DType::F32)?;
            let (want, strides) = if packed {
                (vec![hq, qs[0]], (0, qs[0] as i64))
            } else {
                (vec![batch, hq, len_q], ((hq * len_q) as i64, len_q as i64))
            };
            validate::vector(info, want.iter().product(), "one per query row and head")?;
            if info.layout.shape() != want.as_slice() {
                return Err(Error::shape(
                    info.arg,
                    format!("{want:?}"),
                    info.layout.shape(),
                ));
            }
            Some(strides)
        }
    };
    let scale = opts.scale.unwrap_or(1.0 / (dim_qk as f32).sqrt());
    // The kernels track the running maximum of raw scores, which is the maximum of scaled
    // scores only for a positive scale.
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(
            "scale",
            format!("must be positive and finite, got {scale}"),
        ));
    }
    Ok(Checked {
        dtype,
        shape: Shape::new(batch, hq, hkv, len_q, len_k, dim_qk, dim_v),
        scale,
        q: q_strides,
        k: k_strides,
        v: v_strides,
        o: o_strides,
        lse,
        total: if packed { (qs[0], ks[0]) } else { (0, 0) },
    })
}

/// A device i32 vector of exactly `len` values, 4-byte aligned.
fn device_i32(arg: &'static str, v: &I32View, len: usize, what: &str) -> Result<()> {
    if v.len() != len {
        return Err(Error::shape(
            arg,
            format!("{len} values ({what})"),
            &[v.len()],
        ));
    }
    if !v.device_ptr().is_multiple_of(4) {
        return Err(Error::Alignment {
            arg,
            ptr: v.device_ptr(),
            align: 4,
        });
    }
    Ok(())
}

/// The tensor-core kernel's tile for given head dims (constants from `cuattn_params.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcTile {
    /// Head dim the kernel is specialised for (Q/K and V dims padded up to it with zeros).
    head_dim: usize,
    /// Query rows per block.
    rows: usize,
    /// Keys per tile.
    keys: usize,
}

impl TcTile {
    fn for_head_dims(dim_qk: usize, dim_v: usize) -> TcTile {
        let (head_dim, rows, keys) = match dim_qk.max(dim_v) {
            0..=64 => (64, CUATTN_ATTN_TC_BM_HD64, CUATTN_ATTN_TC_BN_HD64),
            65..=128 => (128, CUATTN_ATTN_TC_BM_HD128, CUATTN_ATTN_TC_BN_HD128),
            _ => (256, CUATTN_ATTN_TC_BM_HD256, CUATTN_ATTN_TC_BN_HD256),
        };
        TcTile {
            head_dim,
            rows: rows as usize,
            keys: keys as usize,
        }
    }

    /// The block-sparse entry's tile for layouts of `block_size` (what
    /// [`sparse_tc_block`] gives): query blocks of that size, key tiles of `CUATTN_SPARSE_BN_*`
    /// (cuattn_params.h).
    fn sparse(self, block_size: usize) -> Result<TcTile> {
        let keys = match (block_size, self.head_dim) {
            (64, 64) => CUATTN_SPARSE_BN_BS64_HD64,
            (64, 128) => CUATTN_SPARSE_BN_BS64_HD128,
            (64, _) => CUATTN_SPARSE_BN_BS64_HD256,
            (128, 64) => CUATTN_SPARSE_BN_BS128_HD64,
            (128, 128) => CUATTN_SPARSE_BN_BS128_HD128,
            _ => {
                return Err(Error::invalid(
                    "layout",
                    format!(
                        "block size {block_size} with head dim {} (padded): the kernels take \
                         64 for every head dim, and 128 for head dims up to 128 (others run \
                         re-blocked: sparse_tc_block)",
                        self.head_dim
                    ),
                ))
            }
        };
        Ok(TcTile {
            rows: block_size,
            keys: keys as usize,
            ..self
        })
    }

    /// Q tile plus one K and one V tile of 2-byte elements, rows padded by 8 elements.
    fn shared_bytes(self) -> usize {
        (self.rows + 2 * self.keys) * (self.head_dim + 8) * 2
    }
}

/// The block size of the layout the tensor-core sparse forward reads for a layout of
/// `block_size` and head dims `dim_qk`, `dim_v`: its own for 64, and for 128 at head dims up to
/// 128 (the native 128-row entries); [`SPARSE_TC_TILE`] otherwise, which the host reaches by
/// re-blocking ([`crate::sparse::BlockLayout::reblocked`], the same element mask). So every
/// block size runs on tensor cores at every head dim the dense forward takes.
///
/// Why blocks of 128 keep their own entries up to head dim 128: a full block of 128 costs the
/// same MMAs either way, but 128-row query blocks stream each kept K/V tile once per 128 rows
/// instead of once per 64 (half the K/V traffic per kept element; the dense forward chose
/// 128-row blocks for this reason, 294 against 251 TFLOP/s at HD 128 in the tile sweep of
/// `kernels/attention_tc.cu`'s header), and `cuattn bench sparse` measured these entries. Re-blocking
/// wins only in partial blocks whose 64-quarters hold nothing (a causal diagonal block keeps 3
/// of 4), a minority of any layout's kept elements. At head dim 256 there is no 128-row entry
/// (its registers and shared memory are the dense HD 256 kernel's 64×32 tile), so 128 re-blocks.
pub fn sparse_tc_block(block_size: usize, dim_qk: usize, dim_v: usize) -> usize {
    let head_dim = TcTile::for_head_dims(dim_qk, dim_v).head_dim;
    if block_size == 128 && head_dim <= 128 {
        128
    } else {
        SPARSE_TC_TILE
    }
}

/// The tensor-core sparse forward's tile for re-blocked layouts (its `attention_sparse_bs64_*`
/// entries, one per head-dim tile).
pub const SPARSE_TC_TILE: usize = 64;

fn tc_kernel_name(dtype: DType, head_dim_tile: usize) -> &'static str {
    match (dtype, head_dim_tile) {
        (DType::F16, 64) => "attention_tc_hd64_f16",
        (DType::F16, 128) => "attention_tc_hd128_f16",
        (DType::F16, _) => "attention_tc_hd256_f16",
        (DType::BF16, 64) => "attention_tc_hd64_bf16",
        (DType::BF16, 128) => "attention_tc_hd128_bf16",
        _ => "attention_tc_hd256_bf16",
    }
}

fn sparse_kernel_name(dtype: DType, block_size: usize, head_dim_tile: usize) -> &'static str {
    let f16 = dtype == DType::F16;
    match (block_size, head_dim_tile) {
        (64, 64) if f16 => "attention_sparse_bs64_hd64_f16",
        (64, 128) if f16 => "attention_sparse_bs64_hd128_f16",
        (64, _) if f16 => "attention_sparse_bs64_hd256_f16",
        (_, 64) if f16 => "attention_sparse_bs128_hd64_f16",
        (_, _) if f16 => "attention_sparse_bs128_hd128_f16",
        (64, 64) => "attention_sparse_bs64_hd64_bf16",
        (64, 128) => "attention_sparse_bs64_hd128_bf16",
        (64, _) => "attention_sparse_bs64_hd256_bf16",
        (_, 64) => "attention_sparse_bs128_hd64_bf16",
        _ => "attention_sparse_bs128_hd128_bf16",
    }
}

fn kernel_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "attention_exact_f32",
        DType::F16 => "attention_exact_f16",
        DType::BF16 => "attention_exact_bf16",
    }
}

/// Attention forward into caller-owned views (see the module docs for layouts). `lse` (f32),
/// when given, receives each row's log-sum-exp in natural-log units (−inf for a fully masked
/// row, whose output is 0).
pub fn forward_into<'a>(
    gpu: &Gpu,
    q: &TensorRef<'a>,
    k: &TensorRef<'a>,
    v: &TensorRef<'a>,
    o: &mut TensorMut<'a>,
    lse: Option<&mut TensorMut<'a>>,
    opts: &Options,
) -> Result<()> {
    let c = check(q, k, v, o, lse.as_deref(), opts)?;
    launch_forward(gpu, q, k, v, o, lse, opts, &c, None)
}

/// The block-sparse layout arrays on the device, for [`launch_forward`].
pub(super) struct SparseArgs {
    pub(super) block_size: usize,
    pub(super) stored_heads: i32,
    pub(super) q_blocks: i32,
    pub(super) words_per_row: i32,
    /// row_offsets, col_indices, mask_kind, band_lo, band_hi, bits_index (i32); bits,
    /// bits_union (u64).
    pub(super) ptrs: [u64; 8],
}

/// Launches the dense kernels, or with `sparse` the block-sparse entries, on checked views.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_forward(
    gpu: &Gpu,
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &mut TensorMut,
    lse: Option<&mut TensorMut>,
    opts: &Options,
    c: &Checked,
    sparse: Option<&SparseArgs>,
) -> Result<()> {
    gpu.check_contexts(
        [("q", q.ctx), ("k", k.ctx), ("v", v.ctx), ("o", o.ctx)]
            .into_iter()
            .chain(lse.as_ref().map(|l| ("lse", l.ctx))),
    )?;
    let tensor_cores = match opts.kernel {
        Kernel::Hopper => {
            if let Some(why) = super::attention_hopper::ineligible(gpu, c, opts, sparse.is_some()) {
                return Err(Error::invalid("kernel", format!("Kernel::Hopper {why}")));
            }
            true
        }
        Kernel::Auto => c.dtype != DType::F32,
        Kernel::Exact => false,
        Kernel::TensorCore if c.dtype == DType::F32 => {
            return Err(Error::DType {
                arg: "q",
                expected: DType::BF16,
                got: DType::F32,
            })
        }
        Kernel::TensorCore => true,
    };
    let mut tile = TcTile::for_head_dims(c.shape.dim_qk, c.shape.dim_v);
    if let (Some(sp), true) = (sparse, tensor_cores) {
        tile = tile.sparse(sp.block_size)?;
    }
    let rows_per_block = if tensor_cores {
        tile.rows
    } else {
        EXACT_ROWS_PER_BLOCK
    };
    let row_blocks = c.shape.len_q.div_ceil(rows_per_block);
    let blocks = row_blocks as u64 * c.shape.heads_q as u64 * c.shape.batch as u64;
    if blocks == 0 {
        return Ok(()); // every sequence is empty: nothing to write
    }
    if blocks > i32::MAX as u64 {
        return Err(Error::invalid(
            "q",
            format!("{blocks} blocks of {rows_per_block} query rows exceed the grid"),
        ));
    }
    // 16-byte tile loads need every row start aligned: base addresses, all strides (elements)
    // and both head dims.
    let vectorized = [q.ptr, k.ptr, v.ptr].iter().all(|p| p % 16 == 0)
        && [c.q, c.k, c.v]
            .iter()
            .all(|s| [s.batch, s.head, s.row].iter().all(|x| x % 8 == 0))
        && c.shape.dim_qk.is_multiple_of(8)
        && c.shape.dim_v.is_multiple_of(8);
    let seqs = SequenceArrays::upload(gpu, opts)?;
    let lse_ptr = match (&lse, c.lse) {
        (Some(l), Some(_)) => l.ptr,
        _ => 0,
    };
    let p = fwd_params(
        gpu,
        [q.ptr, k.ptr, v.ptr, o.ptr, lse_ptr],
        opts,
        c,
        &seqs,
        sparse,
        rows_per_block,
        vectorized,
    );
    if opts.kernel == Kernel::Hopper {
        return super::attention_hopper::launch(gpu, q, k, v, o, c, &p);
    }
    let (kernel, smem) = if tensor_cores {
        let name = match sparse {
            Some(_) => sparse_kernel_name(c.dtype, tile.rows, tile.head_dim),
            None => tc_kernel_name(c.dtype, tile.head_dim),
        };
        (gpu.kernel(TC_MODULE, name)?, tile.shared_bytes())
    } else {
        (gpu.kernel(EXACT_MODULE, kernel_name(c.dtype))?, 0)
    };
    if smem > kernel.max_dynamic_smem {
        return Err(Error::invalid(
            "q",
            format!(
                "needs {smem} bytes of shared memory, the GPU allows {}",
                kernel.max_dynamic_smem
            ),
        ));
    }
    let threads = if tensor_cores {
        TC_THREADS
    } else {
        32 * EXACT_ROWS_PER_BLOCK as u32
    };
    // SAFETY: `check` validated every view (dtypes, shapes, a contiguous last dim, that each
    // layout fits the memory behind it, alignment) and the sequence lengths/offsets, so every
    // address the kernel forms from these strides and lengths is inside its view; 16-byte
    // loads are used only when `vectorized` established their alignment, and `smem` is within
    // the function's raised dynamic shared-memory limit (checked above).
    unsafe { super::launch(gpu, &kernel, &p, (blocks as u32, 1), (threads, 1), smem) }
}

/// A call's key lengths or packed offsets on the device: host slices are copied (the copies
/// must outlive the launches that read them; the stream orders the copy before the kernels),
/// device views are used where they are, after checking they belong to this context.
pub(super) struct SequenceArrays {
    key_lens: Option<cudarc::driver::CudaSlice<i32>>,
    cu_q: Option<cudarc::driver::CudaSlice<i32>>,
    cu_k: Option<cudarc::driver::CudaSlice<i32>>,
    /// Device pointers of caller-owned arrays: key_lens, cu_seqlens_q, cu_seqlens_k (0: none).
    device: [u64; 3],
}

impl SequenceArrays {
    pub(super) fn upload(gpu: &Gpu, opts: &Options) -> Result<Self> {
        let upload = |a: &[i32]| {
            gpu.stream()
                .clone_htod(a)
                .map_err(|e| Error::driver("copy host to device", e))
        };
        let mut s = SequenceArrays {
            key_lens: None,
            cu_q: None,
            cu_k: None,
            device: [0; 3],
        };
        match opts.sequences {
            Sequences::Dense { key_lens } => s.key_lens = key_lens.map(upload).transpose()?,
            Sequences::Packed {
                cu_seqlens_q,
                cu_seqlens_k,
            } => {
                s.cu_q = Some(upload(cu_seqlens_q)?);
                s.cu_k = Some(upload(cu_seqlens_k)?);
            }
            Sequences::DenseDevice { key_lens } => {
                gpu.check_context("key_lens", key_lens.context())?;
                s.device[0] = key_lens.device_ptr();
            }
            Sequences::PackedDevice {
                cu_seqlens_q,
                cu_seqlens_k,
                ..
            } => {
                gpu.check_context("cu_seqlens_q", cu_seqlens_q.context())?;
                gpu.check_context("cu_seqlens_k", cu_seqlens_k.context())?;
                s.device[1] = cu_seqlens_q.device_ptr();
                s.device[2] = cu_seqlens_k.device_ptr();
            }
        }
        Ok(s)
    }
}

/// The forward's launch parameters for checked views: `ptrs` are Q, K, V, O and LSE (0: none).
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_params(
    gpu: &Gpu,
    ptrs: [u64; 5],
    opts: &Options,
    c: &Checked,
    seqs: &SequenceArrays,
    sparse: Option<&SparseArgs>,
    rows_per_block: usize,
    vectorized: bool,
) -> cuattn_attention_fwd_params {
    let ptr = |b: &Option<cudarc::driver::CudaSlice<i32>>, dev: u64| {
        b.as_ref().map_or(dev, |b| b.device_ptr(gpu.stream()).0)
    };
    let (lse_bs, lse_hs) = match (ptrs[4], c.lse) {
        (0, _) | (_, None) => (0, 0),
        (_, Some(s)) => s,
    };
    cuattn_attention_fwd_params {
        q: ptrs[0],
        k: ptrs[1],
        v: ptrs[2],
        o: ptrs[3],
        lse: ptrs[4],
        key_lens: ptr(&seqs.key_lens, seqs.device[0]),
        cu_seqlens_q: ptr(&seqs.cu_q, seqs.device[1]),
        cu_seqlens_k: ptr(&seqs.cu_k, seqs.device[2]),
        q_batch_stride: c.q.batch,
        q_head_stride: c.q.head,
        q_row_stride: c.q.row,
        k_batch_stride: c.k.batch,
        k_head_stride: c.k.head,
        k_row_stride: c.k.row,
        v_batch_stride: c.v.batch,
        v_head_stride: c.v.head,
        v_row_stride: c.v.row,
        o_batch_stride: c.o.batch,
        o_head_stride: c.o.head,
        o_row_stride: c.o.row,
        lse_batch_stride: lse_bs,
        lse_head_stride: lse_hs,
        batch: c.shape.batch as i32,
        heads_q: c.shape.heads_q as i32,
        heads_kv: c.shape.heads_kv as i32,
        len_q: c.shape.len_q as i32,
        len_k: c.shape.len_k as i32,
        dim_qk: c.shape.dim_qk as i32,
        dim_v: c.shape.dim_v as i32,
        causal: match opts.causal {
            None => CUATTN_CAUSAL_NONE,
            Some(CausalAlign::TopLeft) => CUATTN_CAUSAL_TOP_LEFT,
            Some(CausalAlign::BottomRight) => CUATTN_CAUSAL_BOTTOM_RIGHT,
        } as i32,
        scale: c.scale,
        rows_per_block: rows_per_block as i32,
        vectorized: vectorized as i32,
        window_left: opts
            .window
            .map_or(-1, |w| w.left.min(i32::MAX as usize) as i32),
        window_right: opts
            .window
            .map_or(-1, |w| w.right.min(i32::MAX as usize) as i32),
        window_align: match opts.window.map(|w| w.align) {
            Some(CausalAlign::BottomRight) => CUATTN_CAUSAL_BOTTOM_RIGHT,
            _ => CUATTN_CAUSAL_TOP_LEFT,
        } as i32,
        sp_row_offsets: sparse.map_or(0, |s| s.ptrs[0]),
        sp_col_indices: sparse.map_or(0, |s| s.ptrs[1]),
        sp_mask_kind: sparse.map_or(0, |s| s.ptrs[2]),
        sp_band_lo: sparse.map_or(0, |s| s.ptrs[3]),
        sp_band_hi: sparse.map_or(0, |s| s.ptrs[4]),
        sp_bits_index: sparse.map_or(0, |s| s.ptrs[5]),
        sp_bits: sparse.map_or(0, |s| s.ptrs[6]),
        sp_bits_union: sparse.map_or(0, |s| s.ptrs[7]),
        sp_block_size: sparse.map_or(0, |s| s.block_size as i32),
        sp_stored_heads: sparse.map_or(0, |s| s.stored_heads),
        sp_q_blocks: sparse.map_or(0, |s| s.q_blocks),
        sp_words_per_row: sparse.map_or(0, |s| s.words_per_row),
        total_q: c.total.0 as i64,
        total_k: c.total.1 as i64,
    }
}

/// Attention forward, allocating O (contiguous, q's layout order: dense [B, Hq, Lq, Dv] or
/// packed [total_q, Hq, Dv]) and LSE.
pub fn forward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    opts: &Options,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let gpu: &Arc<Gpu> = q.gpu();
    let (qs, vs) = (q.shape(), v.shape());
    let (o_shape, lse_shape) = match opts.sequences {
        Sequences::Dense { .. } | Sequences::DenseDevice { .. }
            if qs.len() == 4 && vs.len() == 4 =>
        {
            (vec![qs[0], qs[1], qs[2], vs[3]], vec![qs[0], qs[1], qs[2]])
        }
        Sequences::Packed { .. } | Sequences::PackedDevice { .. }
            if qs.len() == 3 && vs.len() == 3 =>
        {
            (vec![qs[0], qs[1], vs[2]], vec![qs[1], qs[0]])
        }
        _ => {
            return Err(Error::shape(
                "q",
                "4 dims (dense) or 3 dims (packed), as q and v",
                qs,
            ))
        }
    };
    let mut o = gpu.full(q.dtype(), &o_shape, 0.0)?;
    let mut lse = gpu.full(DType::F32, &lse_shape, 0.0)?;
    forward_into(
        gpu,
        &q.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        Some(&mut lse.view_mut()),
        opts,
    )?;
    Ok((o, lse))
}

#[cfg(test)]
mod tests {
    //! Argument validation without a GPU: fake addresses, never dereferenced.
    use super::*;

    use crate::ops::fake_views::{fake_mut as w, fake_ref as r, BASE};
    use crate::tensor::Layout;

    fn dense(
        b: usize,
        hq: usize,
        hkv: usize,
        lq: usize,
        lk: usize,
        d: usize,
        dv: usize,
    ) -> Result<Checked> {
        let dt = DType::BF16;
        let (q, k, v) = (
            r(dt, &[b, hq, lq, d], 0),
            r(dt, &[b, hkv, lk, d], 1 << 32),
            r(dt, &[b, hkv, lk, dv], 2 << 32),
        );
        let o = w(dt, &[b, hq, lq, dv], 3 << 32);
        let lse = w(DType::F32, &[b, hq, lq], 4 << 32);
        check(&q, &k, &v, &o, Some(&lse), &Options::default())
    }

    #[test]
    fn every_block_size_and_head_dim_has_a_tensor_core_sparse_entry() {
        use crate::sparse::SUPPORTED_BLOCK_SIZES;
        // The re-blocked copy kept per layout serves the forward and the backward alike.
        assert_eq!(
            SPARSE_TC_TILE,
            super::super::attention_backward::SPARSE_TC_BLOCK_SIZE
        );
        for &bs in &SUPPORTED_BLOCK_SIZES {
            for (d, dv) in [
                (64, 64),
                (8, 1),
                (128, 128),
                (72, 100),
                (256, 256),
                (136, 8),
            ] {
                let block = sparse_tc_block(bs, d, dv);
                let tile = TcTile::for_head_dims(d, dv).sparse(block).unwrap();
                assert_eq!(tile.rows, block);
                assert_eq!(tile.rows % tile.keys, 0, "a kept block is whole key tiles");
                // Blocks of 64, and of 128 up to head dim 128, run as they are.
                let native = bs == 64 || (bs == 128 && d.max(dv) <= 128);
                assert_eq!(block == bs, native, "blocks of {bs}, d {d}/{dv}");
                assert!(block == bs || block == SPARSE_TC_TILE);
                let name = sparse_kernel_name(DType::BF16, tile.rows, tile.head_dim);
                let want = format!("attention_sparse_bs{}_hd{}_bf16", tile.rows, tile.head_dim);
                assert_eq!(name, want);
            }
        }
        #[cfg(feature = "testing")]
        for &bs in &SUPPORTED_BLOCK_SIZES {
            for (d, dv) in [(64, 64), (128, 100), (200, 64)] {
                assert_eq!(
                    sparse_tc_block(bs, d, dv),
                    crate::twin::sparse_attention::kernel_block_size(bs, d, dv)
                );
            }
        }
    }

    #[test]
    fn the_attention_kernels_were_compiled_for_sm80_and_sm90_within_their_spill_budget() {
        let built = crate::kernels::resources();
        // The exact kernels must not spill. The tensor-core tiles for head dims 64 and 128 spill
        // ~100-200 bytes at 255 registers: measured faster than the spill-free half-size key
        // tiles (kernels/attention_tc.cu), so they get a small budget that catches a blow-up.
        let mut names: Vec<(&str, u32)> =
            DType::ALL.iter().map(|&dt| (kernel_name(dt), 0)).collect();
        for dt in [DType::F16, DType::BF16] {
            names.extend([64, 128, 256].map(|hd| (tc_kernel_name(dt, hd), 256)));
        }
        for (name, budget) in names {
            for arch in ["sm_80", "sm_90"] {
                let r = built.iter().find(|r| r.kernel == name && r.arch == arch);
                let r = r.unwrap_or_else(|| panic!("{name} was not compiled for {arch}"));
                assert!(
                    r.spill_store_bytes <= budget
                        && r.spill_load_bytes <= budget
                        && r.stack_bytes <= budget,
                    "{name} on {arch}: spills {} / {} bytes, stack {} (budget {budget})",
                    r.spill_store_bytes,
                    r.spill_load_bytes,
                    r.stack_bytes
                );
            }
        }
    }

    #[test]
    fn the_128_row_tiles_spill_at_most_what_their_row_step_kv_loads_leave() {
        // Their K/V loads find copies by row base and column where that spills less
        // (attention_tc.cu, KvLoadForm). With the flat index they spilled (stores / loads, sm_80
        // and sm_90): HD 64 144/136 and 160/164, HD 128 76/72 and 76/84, sparse blocks of 128
        // HD 64 156/192 and 164/208, HD 128 76/72 and 84/80. Bounds: (spill stores, spill loads,
        // stack frame) in bytes, what ptxas gives now.
        let built = crate::kernels::resources();
        for dt in [DType::F16, DType::BF16] {
            for (name, arch, bound) in [
                (tc_kernel_name(dt, 64), "sm_80", (40, 40, 24)),
                (tc_kernel_name(dt, 64), "sm_90", (0, 0, 0)),
                (tc_kernel_name(dt, 128), "sm_80", (56, 56, 32)),
                (tc_kernel_name(dt, 128), "sm_90", (60, 72, 32)),
                (sparse_kernel_name(dt, 128, 64), "sm_80", (140, 144, 104)),
                (sparse_kernel_name(dt, 128, 64), "sm_90", (56, 56, 32)),
                (sparse_kernel_name(dt, 128, 128), "sm_80", (8, 8, 8)),
                (sparse_kernel_name(dt, 128, 128), "sm_90", (8, 8, 8)),
            ] {
                let r = built.iter().find(|r| r.kernel == name && r.arch == arch);
                let r = r.unwrap_or_else(|| panic!("{name} was not compiled for {arch}"));
                let got = (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes);
                assert!(
                    got.0 <= bound.0 && got.1 <= bound.1 && got.2 <= bound.2,
                    "{name} on {arch}: spill stores, spill loads, stack frame {got:?} (bound {bound:?})"
                );
            }
        }
    }

    #[test]
    fn good_dense_arguments_pass_with_gqa_and_unequal_head_dims() {
        let c = dense(2, 8, 2, 5, 7, 72, 40).unwrap();
        assert_eq!(
            (
                c.shape.batch,
                c.shape.heads_q,
                c.shape.heads_kv,
                c.shape.len_q,
                c.shape.len_k,
                c.shape.dim_qk,
                c.shape.dim_v
            ),
            (2, 8, 2, 5, 7, 72, 40)
        );
        assert_eq!(
            c.q,
            Strides {
                batch: 8 * 5 * 72,
                head: 5 * 72,
                row: 72
            }
        );
        assert!((c.scale - 1.0 / 72f32.sqrt()).abs() < 1e-7);
    }

    #[test]
    fn heads_q_not_a_multiple_of_heads_kv_is_an_error() {
        assert!(matches!(
            dense(1, 6, 4, 3, 3, 8, 8),
            Err(Error::InvalidArgument { arg: "k", .. })
        ));
    }

    #[test]
    fn head_dim_above_256_or_zero_is_an_error() {
        assert!(matches!(
            dense(1, 1, 1, 3, 3, 257, 8),
            Err(Error::InvalidArgument { arg: "q", .. })
        ));
        assert!(matches!(
            dense(1, 1, 1, 3, 3, 8, 300),
            Err(Error::InvalidArgument { arg: "v", .. })
        ));
    }

    #[test]
    fn zero_batch_or_empty_sequences_are_errors() {
        assert!(matches!(
            dense(0, 1, 1, 3, 3, 8, 8),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            dense(1, 1, 1, 0, 3, 8, 8),
            Err(Error::Empty { .. })
        ));
    }

    #[test]
    fn mismatched_dtypes_and_shapes_are_errors() {
        let dt = DType::F16;
        let (q, k) = (r(dt, &[1, 2, 3, 8], 0), r(dt, &[1, 2, 4, 8], 1 << 32));
        let v_bad = r(DType::F32, &[1, 2, 4, 8], 2 << 32);
        let o = w(dt, &[1, 2, 3, 8], 3 << 32);
        assert!(matches!(
            check(&q, &k, &v_bad, &o, None, &Options::default()),
            Err(Error::DType { arg: "v", .. })
        ));
        let v_short = r(dt, &[1, 2, 3, 8], 2 << 32);
        assert!(matches!(
            check(&q, &k, &v_short, &o, None, &Options::default()),
            Err(Error::Shape { arg: "v", .. })
        ));
        let k_dim = r(dt, &[1, 2, 4, 9], 1 << 32);
        let v = r(dt, &[1, 2, 4, 8], 2 << 32);
        assert!(matches!(
            check(&q, &k_dim, &v, &o, None, &Options::default()),
            Err(Error::Shape { arg: "k", .. })
        ));
    }

    #[test]
    fn a_bshd_view_is_read_through_its_strides_and_a_transposed_last_dim_is_rejected() {
        let dt = DType::F16;
        // BSHD memory [1, 4 rows, 2 heads, 8] seen as [B, H, L, D].
        let bshd = Layout::strided("q", &[1, 2, 4, 8], &[64, 8, 16, 1]).unwrap();
        // SAFETY: never dereferenced.
        let q = unsafe {
            TensorRef::from_raw(crate::ops::fake_views::fake_ctx(), BASE, 64 * 2, dt, bshd)
        };
        let (k, v) = (r(dt, &[1, 2, 4, 8], 1 << 32), r(dt, &[1, 2, 4, 8], 2 << 32));
        let o = w(dt, &[1, 2, 4, 8], 3 << 32);
        let c = check(&q, &k, &v, &o, None, &Options::default()).unwrap();
        assert_eq!(
            c.q,
            Strides {
                batch: 64,
                head: 8,
                row: 16
            }
        );
        let transposed = Layout::strided("q", &[1, 2, 4, 8], &[64, 32, 1, 4]).unwrap();
        // SAFETY: never dereferenced.
        let qt = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE,
                64 * 2,
                dt,
                transposed,
            )
        };
        assert!(matches!(
            check(&qt, &k, &v, &o, None, &Options::default()),
            Err(Error::Layout { arg: "q", .. })
        ));
    }

    #[test]
    fn misaligned_pointers_and_views_past_their_memory_are_errors() {
        let dt = DType::F16;
        let (k, v) = (r(dt, &[1, 1, 4, 8], 1 << 32), r(dt, &[1, 1, 4, 8], 2 << 32));
        let o = w(dt, &[1, 1, 4, 8], 3 << 32);
        let q_odd = r(dt, &[1, 1, 4, 8], 1);
        assert!(matches!(
            check(&q_odd, &k, &v, &o, None, &Options::default()),
            Err(Error::Alignment { arg: "q", .. })
        ));
        // SAFETY: never dereferenced.
        let q_short = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE,
                10,
                dt,
                Layout::contiguous(&[1, 1, 4, 8]),
            )
        };
        assert!(matches!(
            check(&q_short, &k, &v, &o, None, &Options::default()),
            Err(Error::Layout { arg: "q", .. })
        ));
    }

    #[test]
    fn scale_must_be_positive_and_finite() {
        let dt = DType::F16;
        let (q, k, v) = (
            r(dt, &[1, 1, 2, 8], 0),
            r(dt, &[1, 1, 2, 8], 1 << 32),
            r(dt, &[1, 1, 2, 8], 2 << 32),
        );
        let o = w(dt, &[1, 1, 2, 8], 3 << 32);
        for scale in [0.0, -0.5, f32::NAN, f32::INFINITY] {
            let opts = Options {
                scale: Some(scale),
                ..Options::default()
            };
            assert!(matches!(
                check(&q, &k, &v, &o, None, &opts),
                Err(Error::InvalidArgument { arg: "scale", .. })
            ));
        }
    }

    #[test]
    fn key_lengths_must_fit_the_keys() {
        let dt = DType::F32;
        let (q, k, v) = (
            r(dt, &[2, 1, 3, 4], 0),
            r(dt, &[2, 1, 5, 4], 1 << 32),
            r(dt, &[2, 1, 5, 4], 2 << 32),
        );
        let o = w(dt, &[2, 1, 3, 4], 3 << 32);
        let opts = |lens: &'static [i32]| Options {
            sequences: Sequences::Dense {
                key_lens: Some(lens),
            },
            ..Options::default()
        };
        assert!(check(&q, &k, &v, &o, None, &opts(&[5, 0])).is_ok());
        assert!(matches!(
            check(&q, &k, &v, &o, None, &opts(&[6, 1])),
            Err(Error::InvalidArgument {
                arg: "key_lens",
                ..
            })
        ));
        assert!(matches!(
            check(&q, &k, &v, &o, None, &opts(&[-1, 1])),
            Err(Error::InvalidArgument {
                arg: "key_lens",
                ..
            })
        ));
        assert!(matches!(
            check(&q, &k, &v, &o, None, &opts(&[1])),
            Err(Error::Shape {
                arg: "key_lens",
                ..
            })
        ));
    }

    #[test]
    fn packed_offsets_must_start_at_zero_never_decrease_and_stay_in_the_buffer() {
        let dt = DType::BF16;
        let (q, k, v) = (
            r(dt, &[6, 2, 8], 0),
            r(dt, &[9, 1, 8], 1 << 32),
            r(dt, &[9, 1, 8], 2 << 32),
        );
        let o = w(dt, &[6, 2, 8], 3 << 32);
        let lse = w(DType::F32, &[2, 6], 4 << 32);
        let opts = |cq: &'static [i32], ck: &'static [i32]| Options {
            sequences: Sequences::Packed {
                cu_seqlens_q: cq,
                cu_seqlens_k: ck,
            },
            ..Options::default()
        };
        let c = check(
            &q,
            &k,
            &v,
            &o,
            Some(&lse),
            &opts(&[0, 1, 1, 6], &[0, 4, 4, 9]),
        )
        .unwrap();
        assert_eq!((c.shape.batch, c.shape.len_q, c.shape.len_k), (3, 5, 5));
        assert_eq!(
            c.q,
            Strides {
                batch: 0,
                head: 8,
                row: 16
            }
        );
        let bad = [
            opts(&[1, 2, 6], &[0, 4, 9]),
            opts(&[0, 3, 2], &[0, 4, 9]),
            opts(&[0, 3, 7], &[0, 4, 9]),
            opts(&[0, 3, 6], &[0, 4, 10]),
        ];
        for o2 in bad {
            assert!(
                matches!(
                    check(&q, &k, &v, &o, None, &o2),
                    Err(Error::InvalidArgument { .. })
                ),
                "{o2:?}"
            );
        }
        assert!(matches!(
            check(&q, &k, &v, &o, None, &opts(&[0, 6], &[0, 4, 9])),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&q, &k, &v, &o, None, &opts(&[0], &[0])),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn device_lengths_are_checked_for_count_alignment_and_maxima_without_reading_them() {
        use crate::ops::fake_views::fake_ctx;
        // SAFETY (all views below): never dereferenced; validation reads addresses as numbers.
        let lens = |at: u64, n: usize| unsafe { I32View::from_raw(fake_ctx(), BASE + at, n) };
        let dt = DType::F16;
        let (q, k, v) = (
            r(dt, &[2, 1, 3, 8], 0),
            r(dt, &[2, 1, 5, 8], 1 << 32),
            r(dt, &[2, 1, 5, 8], 2 << 32),
        );
        let o = w(dt, &[2, 1, 3, 8], 3 << 32);
        let dense = |l: I32View<'static>| Options {
            sequences: Sequences::DenseDevice { key_lens: l },
            ..Options::default()
        };
        let c = check(&q, &k, &v, &o, None, &dense(lens(5 << 32, 2))).unwrap();
        assert_eq!((c.shape.len_q, c.shape.len_k, c.total), (3, 5, (0, 0)));
        assert!(matches!(
            check(&q, &k, &v, &o, None, &dense(lens(5 << 32, 3))),
            Err(Error::Shape {
                arg: "key_lens",
                ..
            })
        ));
        assert!(matches!(
            check(&q, &k, &v, &o, None, &dense(lens((5 << 32) + 2, 2))),
            Err(Error::Alignment {
                arg: "key_lens",
                ..
            })
        ));

        let (pq, pk, pv) = (
            r(dt, &[6, 2, 8], 0),
            r(dt, &[9, 1, 8], 1 << 32),
            r(dt, &[9, 1, 8], 2 << 32),
        );
        let po = w(dt, &[6, 2, 8], 3 << 32);
        let packed = |nq: usize, nk: usize, mq: usize, mk: usize| Options {
            sequences: Sequences::PackedDevice {
                cu_seqlens_q: lens(5 << 32, nq),
                cu_seqlens_k: lens(6 << 32, nk),
                max_len_q: mq,
                max_len_k: mk,
            },
            ..Options::default()
        };
        let c = check(&pq, &pk, &pv, &po, None, &packed(4, 4, 5, 7)).unwrap();
        assert_eq!((c.shape.batch, c.shape.len_q, c.shape.len_k), (3, 5, 7));
        assert_eq!(c.total, (6, 9));
        assert!(matches!(
            check(&pq, &pk, &pv, &po, None, &packed(4, 3, 5, 7)),
            Err(Error::Shape {
                arg: "cu_seqlens_k",
                ..
            })
        ));
        assert!(matches!(
            check(&pq, &pk, &pv, &po, None, &packed(4, 4, 7, 7)),
            Err(Error::InvalidArgument {
                arg: "max_len_q",
                ..
            })
        ));
        assert!(matches!(
            check(&pq, &pk, &pv, &po, None, &packed(4, 4, 5, 10)),
            Err(Error::InvalidArgument {
                arg: "max_len_k",
                ..
            })
        ));
        assert!(matches!(
            check(&pq, &pk, &pv, &po, None, &packed(1, 1, 1, 1)),
            Err(Error::InvalidArgument {
                arg: "cu_seqlens_q",
                ..
            })
        ));
    }
}
