//! Host side of the Hopper attention forward (`kernels/attention_hopper.cu`, sm_90a): the TMA
//! tensor maps over Q, K and V, the eligibility rules, and the launch.
//!
//! Reached through [`super::attention::Kernel::Hopper`] only: the kernel has not run on a GPU
//! yet, so `Kernel::Auto` keeps choosing the verified `mma.sync` kernel.
//!
//! Each tensor map describes one of Q, K, V as a 4-D array (d, row, head, batch) with byte
//! strides taken from the view (so BHSD and BSHD both work), a box of 64 columns by 128 rows,
//! the 128-byte swizzle and zero fill outside the array. Zero fill is what makes the tail tiles
//! safe: rows past the end of a head read as zeros, never as the next head's data.

use super::attention::{Checked, Options, Sequences};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, TensorMut, TensorRef};
use crate::kernels::params::*;
use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "attention_hopper";

/// A tensor map passed by value as a `__grid_constant__` kernel parameter.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(CUtensorMap);
// SAFETY: a plain 128-byte, 128-byte-aligned C struct the kernel reads as its CUtensorMap
// parameter; it holds no host pointers the kernel dereferences (only the device address).
unsafe impl DeviceRepr for TensorMap {}

/// Why a call cannot take the Hopper kernel, or None if it can.
pub(super) fn ineligible(gpu: &Gpu, c: &Checked, opts: &Options, sparse: bool) -> Option<String> {
    let cc = gpu.info().compute_capability;
    if cc != (9, 0) {
        return Some(format!(
            "needs compute capability 9.0 (its sm_90a code runs on H100/H200 only); this GPU is {}.{}",
            cc.0, cc.1
        ));
    }
    if c.dtype == DType::F32 {
        return Some("takes f16 or bf16".into());
    }
    let d = c.shape.dim_qk;
    if c.shape.dim_v != d || (d != 64 && d != 128) {
        return Some(format!(
            "takes head dims 64 or 128 with D = Dv (got D {d}, Dv {})",
            c.shape.dim_v
        ));
    }
    if sparse || !matches!(opts.sequences, Sequences::Dense { .. }) {
        return Some("takes dense batches (no packed sequences or block-sparse layouts)".into());
    }
    None
}

/// The 4-D map of one view: dims (d, rows, heads, batch), strides in bytes.
fn encode(
    ptr: u64,
    dtype: DType,
    dims: [u64; 4],
    strides_elems: [i64; 3],
    arg: &'static str,
) -> Result<TensorMap> {
    let esize = dtype.size_bytes() as u64;
    if !ptr.is_multiple_of(16) {
        return Err(Error::invalid(
            arg,
            "the Hopper kernel's TMA loads need a 16-byte aligned base",
        ));
    }
    let mut strides = [0u64; 3];
    for (s, &e) in strides.iter_mut().zip(&strides_elems) {
        // A stride of 0 (one head or batch entry) is replaced by any valid one: that dim has
        // extent 1, so the stride is never used.
        let b = if e == 0 { 16 } else { e as u64 * esize };
        if e < 0 || b % 16 != 0 || b >= 1 << 40 {
            return Err(Error::invalid(
                arg,
                format!("the Hopper kernel's TMA loads need row, head and batch strides that are multiples of 16 bytes (got {strides_elems:?} elements)"),
            ));
        }
        *s = b;
    }
    for (i, &dim) in dims.iter().enumerate() {
        if dim == 0 || dim > 1 << 32 {
            return Err(Error::invalid(
                arg,
                format!("dimension {i} of {dim} is outside TMA's 1..2^32"),
            ));
        }
    }
    let box_dim = [
        CUATTN_ATTN_HOPPER_BOX_COLS,
        CUATTN_ATTN_HOPPER_BM.max(CUATTN_ATTN_HOPPER_BN),
        1,
        1,
    ];
    let elem_strides = [1u32; 4];
    let dtype_code = match dtype {
        DType::BF16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every pointer argument points at a live local array of the length the driver
    // reads for rank 4 (4 dims, 3 strides, 4 box sizes, 4 element strides); `map` is writable
    // and 128-byte aligned by its type. Encoding only reads the device address as a number.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype_code,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dim.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::invalid(
            arg,
            format!("cuTensorMapEncodeTiled refused the view: {r:?}"),
        ));
    }
    // SAFETY: the driver filled the map on success.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

fn kernel_name(dtype: DType, d: usize) -> &'static str {
    match (dtype, d) {
        (DType::BF16, 64) => "attention_hopper_hd64_bf16",
        (DType::BF16, _) => "attention_hopper_hd128_bf16",
        (_, 64) => "attention_hopper_hd64_f16",
        _ => "attention_hopper_hd128_f16",
    }
}

/// Launches the Hopper kernel on views `check` accepted; `p` is the parameter block the
/// other kernels take (the Hopper kernel reads O, LSE, key lengths, sizes, masks and scale).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    gpu: &Gpu,
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorMut,
    c: &Checked,
    p: &cuattn_attention_fwd_params,
) -> Result<()> {
    let s = &c.shape;
    let d = s.dim_qk;
    if !o.ptr.is_multiple_of(4) || c.o.row % 2 != 0 {
        return Err(Error::invalid(
            "o",
            "the Hopper kernel stores pairs of values: O rows must be 4-byte aligned",
        ));
    }
    let map = |t: &TensorRef, st: super::attention::Strides, rows: usize, heads: usize, arg| {
        encode(
            t.ptr,
            c.dtype,
            [d as u64, rows as u64, heads as u64, s.batch as u64],
            [st.row, st.head, st.batch],
            arg,
        )
    };
    let tm_q = map(q, c.q, s.len_q, s.heads_q, "q")?;
    let tm_k = map(k, c.k, s.len_k, s.heads_kv, "k")?;
    let tm_v = map(v, c.v, s.len_k, s.heads_kv, "v")?;
    let smem = if d == 64 {
        CUATTN_ATTN_HOPPER_SMEM_HD64
    } else {
        CUATTN_ATTN_HOPPER_SMEM_HD128
    } as usize;
    let kernel = gpu.kernel(MODULE, kernel_name(c.dtype, d))?;
    if smem > kernel.max_dynamic_smem {
        return Err(Error::invalid(
            "q",
            format!(
                "needs {smem} bytes of shared memory, the GPU allows {}",
                kernel.max_dynamic_smem
            ),
        ));
    }
    let m_blocks = s.len_q.div_ceil(CUATTN_ATTN_HOPPER_BM as usize);
    if m_blocks == 0 || s.heads_q == 0 || s.batch == 0 {
        return Ok(());
    }
    if m_blocks > i32::MAX as usize || s.heads_q > 65535 || s.batch > 65535 {
        return Err(Error::invalid(
            "q",
            "the Hopper grid is (query blocks, heads ≤ 65535, batch ≤ 65535)",
        ));
    }
    let cfg = LaunchConfig {
        grid_dim: (m_blocks as u32, s.heads_q as u32, s.batch as u32),
        block_dim: (CUATTN_ATTN_HOPPER_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: `check` validated every view against the memory behind it; the tensor maps
    // describe exactly those views (their extents and strides), and TMA never reads outside a
    // map (out-of-range box parts are zero-filled). O and LSE are written only at rows < len_q
    // within the checked strides; `smem` is within the raised limit (checked above).
    unsafe {
        gpu.stream()
            .launch_builder(&kernel.func)
            .arg(p)
            .arg(&tm_q)
            .arg(&tm_k)
            .arg(&tm_v)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(|e| Error::driver(format!("launching `{}`", kernel.name), e))
}
