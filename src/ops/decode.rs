//! Single-token decode attention over a KV cache (`kernels/decode.cu`): for each sequence b
//! and query head h, o[b, h] = softmax(scale · q[b, h] · K[b, hk]ᵀ) · V[b, hk] over the first
//! `len_b` cache rows, hk = h / (Hq / Hkv), with the row's log-sum-exp (natural log). A
//! sequence whose cache is empty gets O = 0 and LSE = −inf.
//!
//! Shapes: q and O [B, Hq, D]; the caches K and V [B, Hkv, capacity, D], any strides with a
//! contiguous last dim (BHSD, BSHD, a slice of a larger buffer); LSE f32 [B, Hq] contiguous.
//! The keys are cut into splits (`crate::decode_plan::plan_splits` picks their number from the
//! longest cache and the GPU's size); each split's block writes a partial result into the Gpu's
//! workspace and a second kernel merges them. The CPU twin of both kernels is
//! `twin::decode::forward_kernel` (feature `testing`).

use super::validate;
use crate::decode_plan::{plan_splits, Geometry, MAX_SPLITS, SPLIT_TILE, THREADS};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{ContextId, DeviceTensor, Gpu, I32View, LoadedKernel, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_decode_params, CUATTN_DECODE_MAX_HEAD_DIM, CUATTN_DECODE_SPLIT_TILE,
    CUATTN_DECODE_THREADS,
};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::sync::Arc;

const MODULE: &str = "decode";
// The twin's constants (which the planner and the geometry use) are the header's.
const _: () = assert!(
    THREADS == CUATTN_DECODE_THREADS as usize && SPLIT_TILE == CUATTN_DECODE_SPLIT_TILE as usize
);
/// Largest head dim accepted.
pub const MAX_HEAD_DIM: usize = CUATTN_DECODE_MAX_HEAD_DIM as usize;
/// Rows (one warp each) per block of the merge kernel.
const MERGE_ROWS_PER_BLOCK: usize = 4;

/// Where the cache lengths come from.
#[derive(Clone, Copy, Debug)]
pub enum CacheLens<'s> {
    /// One length per sequence on the host, each checked to lie in 0..=capacity, uploaded by
    /// the call.
    Host(&'s [i32]),
    /// One i32 per sequence already on the device (kept there between decode steps). The host
    /// cannot check them: the kernel clamps each to 0..=capacity, so a wrong length gives a
    /// wrong answer but never a read outside the cache. `max_len` (≤ capacity) plans the
    /// splits; pass the capacity when unknown.
    Device {
        lens: &'s CudaSlice<i32>,
        max_len: usize,
    },
    /// As `Device`, for lengths in memory another runtime owns (a raw device pointer wrapped
    /// in an [`I32View`]).
    View { lens: I32View<'s>, max_len: usize },
}

/// Options of one call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Options {
    /// Multiplies q·k; `None` for 1/√D.
    pub scale: Option<f32>,
    /// Number of key splits, 1..=256; `None` lets the planner choose. A call to be captured in
    /// a CUDA graph and replayed with other lengths should fix it (the plan depends on
    /// `max_len`).
    pub splits: Option<usize>,
}

/// A view's strides (batch, head, row) in elements; row is 0 for q and O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Strides {
    batch: i64,
    head: i64,
    row: i64,
}

/// Checked sizes of a call.
#[derive(Clone, Debug, PartialEq)]
struct Checked {
    dtype: DType,
    batch: usize,
    heads_q: usize,
    heads_kv: usize,
    capacity: usize,
    dim: usize,
    scale: f32,
    q: Strides,
    k: Strides,
    v: Strides,
    o: Strides,
    /// Longest cache, for the planner.
    max_len: usize,
}

/// What the checks know of the lengths: their count and, for host lengths, the values.
struct LensInfo<'s> {
    count: usize,
    host: Option<&'s [i32]>,
    max_len: usize,
}

#[allow(clippy::too_many_arguments)]
fn check(
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorMut,
    lse: Option<&TensorMut>,
    lens: &LensInfo,
    opts: &Options,
) -> Result<Checked> {
    let dtype = q.dtype;
    let (qi, ki, vi, oi) = (q.info("q"), k.info("k"), v.info("v"), o.info("o"));
    for x in [&ki, &vi, &oi] {
        validate::dtype(x, dtype)?;
    }
    let (qs, qst) = validate::strided(&qi, 3, "[batch, heads_q, dim]")?;
    let (ks, kst) = validate::strided(&ki, 4, "[batch, heads_kv, capacity, dim]")?;
    let (vs, vst) = validate::strided(&vi, 4, "[batch, heads_kv, capacity, dim]")?;
    let (os, ost) = validate::strided(&oi, 3, "[batch, heads_q, dim]")?;
    let (batch, heads_q, dim) = (qs[0], qs[1], qs[2]);
    let (heads_kv, capacity) = (ks[1], ks[2]);
    validate::size_in("q", "head dim", dim, MAX_HEAD_DIM)?;
    let cache = [batch, heads_kv, capacity, dim];
    if ks != cache {
        return Err(Error::shape("k", format!("{cache:?}"), ks));
    }
    if vs != cache {
        return Err(Error::shape("v", format!("{cache:?} (the shape of k)"), vs));
    }
    if os != qs {
        return Err(Error::shape("o", format!("{qs:?} (the shape of q)"), os));
    }
    if heads_q % heads_kv != 0 {
        return Err(Error::invalid(
            "k",
            format!("query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})"),
        ));
    }
    if capacity > i32::MAX as usize {
        return Err(Error::invalid(
            "k",
            format!("a cache of {capacity} rows exceeds the kernel's 32-bit row index"),
        ));
    }
    if lens.count != batch {
        return Err(Error::shape(
            "cache_lens",
            format!("{batch} lengths (one per sequence)"),
            &[lens.count],
        ));
    }
    if let Some(host) = lens.host {
        if let Some((b, &l)) = host
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l as usize > capacity)
        {
            return Err(Error::invalid(
                "cache_lens",
                format!("sequence {b} has length {l}, outside 0..={capacity} (the cache)"),
            ));
        }
    } else if lens.max_len > capacity {
        return Err(Error::invalid(
            "cache_lens",
            format!(
                "max_len {} is larger than the cache ({capacity} rows)",
                lens.max_len
            ),
        ));
    }
    if let Some(l) = lse {
        let info = l.info("lse");
        validate::dtype(&info, DType::F32)?;
        validate::vector(&info, batch * heads_q, "one per sequence and query head")?;
        if l.shape() != [batch, heads_q] {
            return Err(Error::shape(
                "lse",
                format!("[{batch}, {heads_q}]"),
                l.shape(),
            ));
        }
    }
    let scale = opts.scale.unwrap_or(1.0 / (dim as f32).sqrt());
    // The kernel's running maximum is of raw scores times a positive scale.
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(
            "scale",
            format!("must be positive and finite, got {scale}"),
        ));
    }
    if let Some(s) = opts.splits {
        if s == 0 || s > MAX_SPLITS {
            return Err(Error::invalid(
                "splits",
                format!("must be in 1..={MAX_SPLITS}, got {s}"),
            ));
        }
    }
    let s3 = |st: &[usize]| Strides {
        batch: st[0] as i64,
        head: st[1] as i64,
        row: 0,
    };
    let s4 = |st: &[usize]| Strides {
        batch: st[0] as i64,
        head: st[1] as i64,
        row: st[2] as i64,
    };
    Ok(Checked {
        dtype,
        batch,
        heads_q,
        heads_kv,
        capacity,
        dim,
        scale,
        q: s3(qst),
        k: s4(kst),
        v: s4(vst),
        o: s3(ost),
        max_len: lens.max_len,
    })
}

/// Whether K and V can be read as 16-byte packs: aligned bases, strides (elements) and head
/// dim multiples of a pack.
fn vectorized(c: &Checked, k_ptr: u64, v_ptr: u64) -> bool {
    let pack = (16 / c.dtype.size_bytes()) as i64;
    k_ptr.is_multiple_of(16)
        && v_ptr.is_multiple_of(16)
        && [c.k, c.v]
            .iter()
            .all(|s| [s.batch, s.head, s.row].iter().all(|x| x % pack == 0))
        && c.dim as i64 % pack == 0
}

macro_rules! split_names {
    ($dt:literal) => {
        [
            [
                concat!("decode_split_", $dt, "_hd64_h1"),
                concat!("decode_split_", $dt, "_hd64_h2"),
                concat!("decode_split_", $dt, "_hd64_h4"),
                concat!("decode_split_", $dt, "_hd64_h8"),
            ],
            [
                concat!("decode_split_", $dt, "_hd128_h1"),
                concat!("decode_split_", $dt, "_hd128_h2"),
                concat!("decode_split_", $dt, "_hd128_h4"),
                concat!("decode_split_", $dt, "_hd128_h8"),
            ],
            [
                concat!("decode_split_", $dt, "_hd256_h1"),
                concat!("decode_split_", $dt, "_hd256_h2"),
                concat!("decode_split_", $dt, "_hd256_h4"),
                concat!("decode_split_", $dt, "_hd256_h8"),
            ],
        ]
    };
}

/// Split kernels by dtype (f32, f16, bf16), head-dim tile (64, 128, 256) and heads per block
/// (1, 2, 4, 8).
const SPLIT_KERNELS: [[[&str; 4]; 3]; 3] = [
    split_names!("f32"),
    split_names!("f16"),
    split_names!("bf16"),
];

fn split_kernel_name(dtype: DType, geo: &Geometry) -> &'static str {
    let d = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    let hd = match geo.head_dim_tile {
        64 => 0,
        128 => 1,
        _ => 2,
    };
    SPLIT_KERNELS[d][hd][geo.heads_per_block.trailing_zeros() as usize]
}

fn merge_kernel_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "decode_merge_f32",
        DType::F16 => "decode_merge_f16",
        DType::BF16 => "decode_merge_bf16",
    }
}

/// The planner's split count for `base_blocks` blocks per split on this GPU.
fn planned(
    gpu: &Gpu,
    split_kernel: &LoadedKernel,
    base_blocks: usize,
    max_len: usize,
) -> Result<usize> {
    let resident = gpu.blocks_per_sm(split_kernel, THREADS as u32, 0)? as usize
        * gpu.info().multiprocessors as usize;
    Ok(plan_splits(base_blocks, max_len, resident.max(1)))
}

/// The number of splits a call of these sizes gets when `Options::splits` is `None`.
pub fn planned_splits(
    gpu: &Gpu,
    dtype: DType,
    (batch, heads_q, heads_kv, dim): (usize, usize, usize, usize),
    max_len: usize,
) -> Result<usize> {
    let group = heads_q / heads_kv.max(1);
    let geo = Geometry::new(dtype.size_bytes(), dim, group);
    let kernel = gpu.kernel(MODULE, split_kernel_name(dtype, &geo))?;
    planned(
        gpu,
        &kernel,
        batch * heads_kv * geo.head_chunks(group),
        max_len,
    )
}

/// Bytes of workspace a call with `splits` splits uses: B·Hq·splits·(D + 1) floats (none for
/// one split, which writes O directly).
pub fn workspace_bytes(batch: usize, heads_q: usize, dim: usize, splits: usize) -> usize {
    if splits <= 1 {
        0
    } else {
        batch * heads_q * splits * (dim + 1) * 4
    }
}

/// Decode attention into caller-owned views (shapes in the module docs). `lse`, when given,
/// receives each row's log-sum-exp (−inf for an empty cache). Uses the Gpu's workspace.
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a>(
    gpu: &Gpu,
    q: &TensorRef<'a>,
    k_cache: &TensorRef<'a>,
    v_cache: &TensorRef<'a>,
    cache_lens: CacheLens,
    o: &mut TensorMut<'a>,
    lse: Option<&mut TensorMut<'a>>,
    opts: &Options,
) -> Result<()> {
    let lens_info = match cache_lens {
        CacheLens::Host(l) => LensInfo {
            count: l.len(),
            host: Some(l),
            max_len: l.iter().map(|&x| x.max(0) as usize).max().unwrap_or(0),
        },
        CacheLens::Device { lens, max_len } => LensInfo {
            count: lens.len(),
            host: None,
            max_len,
        },
        CacheLens::View { lens, max_len } => LensInfo {
            count: lens.len(),
            host: None,
            max_len,
        },
    };
    gpu.check_contexts(
        [
            ("q", q.ctx),
            ("k_cache", k_cache.ctx),
            ("v_cache", v_cache.ctx),
            ("o", o.ctx),
        ]
        .into_iter()
        .chain(lse.as_ref().map(|l| ("lse", l.ctx))),
    )?;
    let c = check(q, k_cache, v_cache, o, lse.as_deref(), &lens_info, opts)?;
    let group = c.heads_q / c.heads_kv;
    let geo = Geometry::new(c.dtype.size_bytes(), c.dim, group);
    let chunks = geo.head_chunks(group);
    let split_kernel = gpu.kernel(MODULE, split_kernel_name(c.dtype, &geo))?;
    let base_blocks = c.batch * c.heads_kv * chunks;
    let splits = match opts.splits {
        Some(s) => s,
        None => planned(gpu, &split_kernel, base_blocks, c.max_len)?,
    };
    let blocks = base_blocks as u64 * splits as u64;
    let rows = c.batch as u64 * c.heads_q as u64;
    if blocks > i32::MAX as u64 || rows > i32::MAX as u64 {
        return Err(Error::invalid(
            "q",
            format!("{blocks} split blocks or {rows} rows exceed the grid"),
        ));
    }
    let uploaded;
    let lens_ptr = match cache_lens {
        CacheLens::Host(l) => {
            uploaded = gpu
                .stream()
                .clone_htod(l)
                .map_err(|e| Error::driver("copy host to device", e))?;
            uploaded.device_ptr(gpu.stream()).0
        }
        CacheLens::Device { lens, .. } => {
            gpu.check_context("cache_lens", ContextId::of(lens.context()))?;
            lens.device_ptr(gpu.stream()).0
        }
        CacheLens::View { lens, .. } => {
            gpu.check_context("cache_lens", lens.context())?;
            if lens.device_ptr() % 4 != 0 {
                return Err(Error::Alignment {
                    arg: "cache_lens",
                    ptr: lens.device_ptr(),
                    align: 4,
                });
            }
            lens.device_ptr()
        }
    };
    let lse_ptr = lse.as_ref().map_or(0, |l| l.ptr);
    let ws_bytes = workspace_bytes(c.batch, c.heads_q, c.dim, splits);
    let launch_all = |ws: u64| -> Result<()> {
        let p = cuattn_decode_params {
            q: q.ptr,
            k: k_cache.ptr,
            v: v_cache.ptr,
            o: o.ptr,
            lse: lse_ptr,
            cache_lens: lens_ptr,
            ws_o: ws,
            ws_lse: if ws == 0 {
                0
            } else {
                ws + (c.batch * c.heads_q * splits * c.dim * 4) as u64
            },
            q_batch_stride: c.q.batch,
            q_head_stride: c.q.head,
            k_batch_stride: c.k.batch,
            k_head_stride: c.k.head,
            k_row_stride: c.k.row,
            v_batch_stride: c.v.batch,
            v_head_stride: c.v.head,
            v_row_stride: c.v.row,
            o_batch_stride: c.o.batch,
            o_head_stride: c.o.head,
            batch: c.batch as i32,
            heads_q: c.heads_q as i32,
            heads_kv: c.heads_kv as i32,
            capacity: c.capacity as i32,
            dim: c.dim as i32,
            splits: splits as i32,
            head_chunks: chunks as i32,
            vectorized: vectorized(&c, k_cache.ptr, v_cache.ptr) as i32,
            scale: c.scale,
        };
        // SAFETY: `check` validated every view (dtypes, shapes, a contiguous last dim, that
        // each layout fits the memory behind it, element alignment); the kernel clamps every
        // cache length to 0..=capacity (host lengths were also checked), so each K/V row it
        // reads is inside its view; 16-byte loads are used only when `vectorized` established
        // their alignment; the lengths buffer holds `batch` i32 (checked count) and lives until
        // the stream-ordered free after the launch; the workspace holds `ws_bytes` bytes,
        // which cover [B, Hq, splits, D] + [B, Hq, splits] floats.
        unsafe {
            super::launch(
                gpu,
                &split_kernel,
                &p,
                (blocks as u32, 1),
                (THREADS as u32, 1),
                0,
            )?
        };
        if splits > 1 {
            let merge = gpu.kernel(MODULE, merge_kernel_name(c.dtype))?;
            let grid = rows.div_ceil(MERGE_ROWS_PER_BLOCK as u64) as u32;
            // SAFETY: reads the workspace the split kernel wrote in full (every block writes
            // its split of every head it owns, empty splits included) and writes the rows of O
            // and LSE validated above.
            unsafe {
                super::launch(
                    gpu,
                    &merge,
                    &p,
                    (grid, 1),
                    (32 * MERGE_ROWS_PER_BLOCK as u32, 1),
                    0,
                )?
            };
        }
        Ok(())
    };
    if ws_bytes == 0 {
        launch_all(0)
    } else {
        gpu.with_workspace(ws_bytes, launch_all)
    }
}

/// Decode attention, allocating O ([B, Hq, D], q's dtype) and LSE ([B, Hq], f32).
pub fn forward(
    q: &DeviceTensor,
    k_cache: &DeviceTensor,
    v_cache: &DeviceTensor,
    cache_lens: CacheLens,
    opts: &Options,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let gpu: &Arc<Gpu> = q.gpu();
    let qs = q.shape();
    if qs.len() != 3 {
        return Err(Error::shape("q", "3 dims [batch, heads_q, dim]", qs));
    }
    let mut o = gpu.full(q.dtype(), qs, 0.0)?;
    let mut lse = gpu.full(DType::F32, &qs[..2], 0.0)?;
    forward_into(
        gpu,
        &q.view(),
        &k_cache.view(),
        &v_cache.view(),
        cache_lens,
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

    fn host(l: &[i32]) -> LensInfo<'_> {
        LensInfo {
            count: l.len(),
            host: Some(l),
            max_len: l.iter().map(|&x| x.max(0) as usize).max().unwrap_or(0),
        }
    }

    /// q/o [b, hq, d], caches [b, hkv, cap, d], LSE [b, hq].
    fn call(
        (b, hq, hkv, cap, d): (usize, usize, usize, usize, usize),
        lens: &[i32],
        opts: &Options,
    ) -> Result<Checked> {
        let dt = DType::F16;
        let (q, k, v) = (
            r(dt, &[b, hq, d], 0),
            r(dt, &[b, hkv, cap, d], 1 << 32),
            r(dt, &[b, hkv, cap, d], 2 << 32),
        );
        let o = w(dt, &[b, hq, d], 3 << 32);
        let lse = w(DType::F32, &[b, hq], 4 << 32);
        check(&q, &k, &v, &o, Some(&lse), &host(lens), opts)
    }

    #[test]
    fn every_decode_kernel_was_compiled_for_sm80_and_sm90_without_spills() {
        let built = crate::kernels::resources();
        let mut names: Vec<&str> = SPLIT_KERNELS.iter().flatten().flatten().copied().collect();
        names.extend(DType::ALL.map(merge_kernel_name));
        assert_eq!(names.len(), 39);
        for name in names {
            for arch in ["sm_80", "sm_90"] {
                let r = built.iter().find(|r| r.kernel == name && r.arch == arch);
                let r = r.unwrap_or_else(|| panic!("{name} was not compiled for {arch}"));
                assert_eq!(
                    (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes),
                    (0, 0, 0),
                    "{name} on {arch}"
                );
            }
        }
    }

    #[test]
    fn kernel_names_follow_dtype_head_dim_tile_and_heads_per_block() {
        let name = |dt: DType, dim, group| {
            split_kernel_name(dt, &Geometry::new(dt.size_bytes(), dim, group))
        };
        assert_eq!(name(DType::F16, 128, 4), "decode_split_f16_hd128_h4");
        assert_eq!(name(DType::BF16, 64, 1), "decode_split_bf16_hd64_h1");
        assert_eq!(name(DType::F32, 80, 3), "decode_split_f32_hd128_h4");
        assert_eq!(name(DType::F16, 200, 12), "decode_split_f16_hd256_h8");
        assert_eq!(name(DType::F32, 256, 2), "decode_split_f32_hd256_h2");
    }

    #[test]
    fn good_arguments_pass_with_gqa() {
        let c = call((2, 8, 2, 100, 64), &[100, 0], &Options::default()).unwrap();
        assert_eq!(
            (c.batch, c.heads_q, c.heads_kv, c.capacity, c.dim, c.max_len),
            (2, 8, 2, 100, 64, 100)
        );
        assert_eq!(
            c.k,
            Strides {
                batch: 2 * 100 * 64,
                head: 100 * 64,
                row: 64
            }
        );
        assert!((c.scale - 0.125).abs() < 1e-7);
    }

    #[test]
    fn lengths_must_be_one_per_sequence_and_fit_the_cache() {
        let dims = (2, 2, 1, 50, 16);
        let o = Options::default();
        assert!(matches!(
            call(dims, &[51, 3], &o),
            Err(Error::InvalidArgument {
                arg: "cache_lens",
                ..
            })
        ));
        assert!(matches!(
            call(dims, &[-1, 3], &o),
            Err(Error::InvalidArgument {
                arg: "cache_lens",
                ..
            })
        ));
        assert!(matches!(
            call(dims, &[3], &o),
            Err(Error::Shape {
                arg: "cache_lens",
                ..
            })
        ));
        assert!(call(dims, &[50, 0], &o).is_ok());
    }

    #[test]
    fn device_lengths_need_max_len_within_the_cache() {
        let dt = DType::F32;
        let (q, k, v) = (
            r(dt, &[1, 1, 8], 0),
            r(dt, &[1, 1, 10, 8], 1 << 32),
            r(dt, &[1, 1, 10, 8], 2 << 32),
        );
        let o = w(dt, &[1, 1, 8], 3 << 32);
        let lens = |max_len| LensInfo {
            count: 1,
            host: None,
            max_len,
        };
        let opts = Options::default();
        assert!(check(&q, &k, &v, &o, None, &lens(10), &opts).is_ok());
        assert!(matches!(
            check(&q, &k, &v, &o, None, &lens(11), &opts),
            Err(Error::InvalidArgument {
                arg: "cache_lens",
                ..
            })
        ));
    }

    #[test]
    fn shapes_heads_dims_scale_and_splits_are_checked() {
        let o = Options::default();
        assert!(matches!(
            call((1, 6, 4, 8, 16), &[8], &o),
            Err(Error::InvalidArgument { arg: "k", .. })
        ));
        assert!(matches!(
            call((1, 1, 1, 8, 257), &[8], &o),
            Err(Error::InvalidArgument { arg: "q", .. })
        ));
        assert!(matches!(
            call((0, 1, 1, 8, 16), &[], &o),
            Err(Error::Empty { .. })
        ));
        for scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let opts = Options {
                scale: Some(scale),
                ..o
            };
            assert!(matches!(
                call((1, 1, 1, 8, 16), &[8], &opts),
                Err(Error::InvalidArgument { arg: "scale", .. })
            ));
        }
        for splits in [0, MAX_SPLITS + 1] {
            let opts = Options {
                splits: Some(splits),
                ..o
            };
            assert!(matches!(
                call((1, 1, 1, 8, 16), &[8], &opts),
                Err(Error::InvalidArgument { arg: "splits", .. })
            ));
        }
    }

    #[test]
    fn mismatched_dtypes_shapes_and_lse_are_errors() {
        let dt = DType::BF16;
        let q = r(dt, &[1, 2, 16], 0);
        let k = r(dt, &[1, 1, 8, 16], 1 << 32);
        let o = w(dt, &[1, 2, 16], 3 << 32);
        let lens = host(&[4]);
        let opts = Options::default();
        let v_f32 = r(DType::F32, &[1, 1, 8, 16], 2 << 32);
        assert!(matches!(
            check(&q, &k, &v_f32, &o, None, &lens, &opts),
            Err(Error::DType { arg: "v", .. })
        ));
        let v_short = r(dt, &[1, 1, 7, 16], 2 << 32);
        assert!(matches!(
            check(&q, &k, &v_short, &o, None, &lens, &opts),
            Err(Error::Shape { arg: "v", .. })
        ));
        let v = r(dt, &[1, 1, 8, 16], 2 << 32);
        let o_bad = w(dt, &[1, 2, 8], 3 << 32);
        assert!(matches!(
            check(&q, &k, &v, &o_bad, None, &lens, &opts),
            Err(Error::Shape { arg: "o", .. })
        ));
        let lse_f16 = w(dt, &[1, 2], 4 << 32);
        assert!(matches!(
            check(&q, &k, &v, &o, Some(&lse_f16), &lens, &opts),
            Err(Error::DType { arg: "lse", .. })
        ));
        let lse_short = w(DType::F32, &[1, 1], 4 << 32);
        assert!(matches!(
            check(&q, &k, &v, &o, Some(&lse_short), &lens, &opts),
            Err(Error::Shape { arg: "lse", .. })
        ));
        let q4 = r(dt, &[1, 2, 1, 16], 0);
        assert!(matches!(
            check(&q4, &k, &v, &o, None, &lens, &opts),
            Err(Error::Shape { arg: "q", .. })
        ));
    }

    #[test]
    fn a_bshd_cache_is_read_through_strides_and_vectorised_only_when_aligned() {
        let dt = DType::F16;
        // BSHD memory [1, 10 rows, 2 heads, 64] seen as [B, H, L, D].
        let bshd = Layout::strided("k", &[1, 2, 10, 64], &[1280, 64, 128, 1]).unwrap();
        // SAFETY: never dereferenced.
        let k = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE + (1 << 32),
                1280 * 2,
                dt,
                bshd.clone(),
            )
        };
        // SAFETY: as above.
        let v = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE + (2 << 32),
                1280 * 2,
                dt,
                bshd,
            )
        };
        let q = r(dt, &[1, 4, 64], 0);
        let o = w(dt, &[1, 4, 64], 3 << 32);
        let c = check(&q, &k, &v, &o, None, &host(&[10]), &Options::default()).unwrap();
        assert_eq!(
            c.k,
            Strides {
                batch: 1280,
                head: 64,
                row: 128
            }
        );
        assert!(vectorized(&c, k.ptr, v.ptr));
        assert!(!vectorized(&c, k.ptr + 2, v.ptr));
        // A head dim that is not a multiple of 8 f16 elements: element loads.
        let c = call((1, 1, 1, 8, 12), &[8], &Options::default()).unwrap();
        assert!(!vectorized(&c, BASE, BASE));
        let transposed = Layout::strided("k", &[1, 2, 10, 64], &[1280, 640, 1, 10]).unwrap();
        // SAFETY: never dereferenced.
        let kt = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE,
                1280 * 2,
                dt,
                transposed,
            )
        };
        assert!(matches!(
            check(&q, &kt, &v, &o, None, &host(&[10]), &Options::default()),
            Err(Error::Layout { arg: "k", .. })
        ));
    }

    #[test]
    fn workspace_covers_partial_outputs_and_lses() {
        assert_eq!(workspace_bytes(2, 8, 128, 1), 0);
        assert_eq!(workspace_bytes(2, 8, 128, 4), 2 * 8 * 4 * 129 * 4);
    }
}
