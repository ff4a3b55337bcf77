//! The transformer runtime's elementwise ops on views (`kernels/runtime_ops.cu`): bias +
//! activation in place after a GEMM (`bias_act_into`: y = act(y + bias), the bias broadcast
//! over rows) and the elementwise sum (`add_into`: out = a + b). Both are one grid-stride loop
//! over contiguous memory, f32 arithmetic, one rounding to the dtype on store; the runtime's
//! CUDA backend (`runtime::cuda`) calls these, and so can an embedder on its own memory.
//!
//! As every op: contexts, dtypes, shapes and the memory behind each view are checked before the
//! launch (typed [`Error`]s naming the argument), the kernel is queued on the handle's stream,
//! nothing is synchronised or allocated, and no scratch is used.

use super::{launch, validate};
use crate::activation::Activation;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, I32View, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_add_params, cuattn_bias_act_params, cuattn_gather_rows_params, CUATTN_ACT_GELU_ERF,
    CUATTN_ACT_GELU_TANH, CUATTN_ACT_NONE, CUATTN_ACT_RELU, CUATTN_ACT_TANH,
};
use crate::tensor::Layout;

const MODULE: &str = "runtime_ops";
const THREADS: u32 = 256;

/// Blocks of a grid-stride loop over `elems`: enough to fill the device (8 per SM), no more.
fn grid(gpu: &Gpu, elems: usize) -> u32 {
    let resident = gpu.info().multiprocessors as usize * 8;
    elems.div_ceil(THREADS as usize).clamp(1, resident.max(1)) as u32
}

fn contiguous(arg: &'static str, layout: &Layout) -> Result<()> {
    if layout.is_contiguous() {
        Ok(())
    } else {
        Err(Error::layout(arg, "must be contiguous (row-major)"))
    }
}

/// Checks `y` (contiguous, any rank ≥ 1, its last dim the columns) and `bias` (`cols` elements
/// of y's dtype); returns (rows, cols).
fn check_bias_act(y: &TensorMut, bias: Option<&TensorRef>) -> Result<(usize, usize)> {
    let yi = y.info("y");
    validate::memory(&yi)?;
    contiguous("y", &y.layout)?;
    let cols = match y.shape().last() {
        Some(&c) => c,
        None => return Err(Error::shape("y", "[rows, cols]", y.shape())),
    };
    let rows = y.layout.numel().checked_div(cols).unwrap_or(0);
    if let Some(b) = bias {
        let bi = b.info("bias");
        validate::dtype(&bi, y.dtype)?;
        validate::vector(&bi, cols, "one per column of y")?;
    }
    Ok((rows, cols))
}

/// Checks `a`, `b` and `out`: one shape, one dtype, contiguous; returns the element count.
fn check_add(a: &TensorRef, b: &TensorRef, out: &TensorMut) -> Result<usize> {
    for (info, layout) in [
        (a.info("a"), &a.layout),
        (b.info("b"), &b.layout),
        (out.info("out"), &out.layout),
    ] {
        validate::dtype(&info, a.dtype)?;
        validate::memory(&info)?;
        contiguous(info.arg, layout)?;
    }
    for (arg, shape) in [("b", b.shape()), ("out", out.shape())] {
        if shape != a.shape() {
            return Err(Error::shape(
                arg,
                format!("{:?} (a's shape)", a.shape()),
                shape,
            ));
        }
    }
    Ok(a.layout.numel())
}

/// The kernels' code of an activation (`CUATTN_ACT_*`).
/// `[table_rows, width]` table, `[ids, width]` output of its dtype, both contiguous; ids 4-byte
/// aligned. Returns (table_rows, width).
fn check_gather(table: &TensorRef, ids: &I32View, out: &TensorMut) -> Result<(usize, usize)> {
    let (ti, oi) = (table.info("table"), out.info("out"));
    for (info, layout) in [(&ti, &table.layout), (&oi, &out.layout)] {
        validate::memory(info)?;
        contiguous(info.arg, layout)?;
    }
    validate::dtype(&oi, table.dtype)?;
    let [table_rows, width] = table.shape()[..] else {
        return Err(Error::shape("table", "[rows, width]", table.shape()));
    };
    if out.shape() != [ids.len(), width] {
        return Err(Error::shape(
            "out",
            format!("[{}, {width}] (one row per id)", ids.len()),
            out.shape(),
        ));
    }
    if !ids.device_ptr().is_multiple_of(4) {
        return Err(Error::Alignment {
            arg: "ids",
            ptr: ids.device_ptr(),
            align: 4,
        });
    }
    Ok((table_rows, width))
}

/// `out[r, :] = table[ids[r], :]` (an embedding lookup) with the ids in device memory, so
/// nothing is uploaded and the call can be captured in a CUDA graph. Ids are not checked on the
/// host: an id outside `0..table_rows` (negative ones included) gives a row of NaN, never a read
/// outside the table.
pub fn gather_rows_into(
    gpu: &Gpu,
    table: &TensorRef,
    ids: &I32View,
    out: &mut TensorMut,
) -> Result<()> {
    gpu.check_contexts([("table", table.ctx), ("ids", ids.ctx), ("out", out.ctx)])?;
    let (table_rows, width) = check_gather(table, ids, out)?;
    if ids.is_empty() || width == 0 {
        return Ok(());
    }
    let p = cuattn_gather_rows_params {
        table: table.ptr,
        ids: ids.device_ptr(),
        out: out.ptr,
        rows: ids.len() as i64,
        width: width as i64,
        table_rows: table_rows as i64,
    };
    let k = gpu.kernel(MODULE, kernel_name("gather_rows", table.dtype))?;
    // SAFETY: the kernel reads ids.len() i32 (4-byte aligned) from `ids`, reads only rows
    // id < table_rows of the contiguous [table_rows, width] table, and writes the contiguous
    // [ids.len(), width] output of the same dtype (all checked above).
    unsafe {
        launch(
            gpu,
            &k,
            &p,
            (grid(gpu, ids.len() * width), 1),
            (THREADS, 1),
            0,
        )
    }
}

pub(crate) fn act_code(act: Activation) -> i32 {
    (match act {
        Activation::None => CUATTN_ACT_NONE,
        Activation::GeluErf => CUATTN_ACT_GELU_ERF,
        Activation::GeluTanh => CUATTN_ACT_GELU_TANH,
        Activation::Relu => CUATTN_ACT_RELU,
        Activation::Tanh => CUATTN_ACT_TANH,
    }) as i32
}

fn kernel_name(op: &str, dtype: DType) -> &'static str {
    match (op, dtype) {
        ("bias_act", DType::F32) => "rt_bias_act_f32",
        ("bias_act", DType::F16) => "rt_bias_act_f16",
        ("bias_act", DType::BF16) => "rt_bias_act_bf16",
        ("gather_rows", DType::F32) => "rt_gather_rows_f32",
        ("gather_rows", DType::F16) => "rt_gather_rows_f16",
        ("gather_rows", DType::BF16) => "rt_gather_rows_bf16",
        (_, DType::F32) => "rt_add_f32",
        (_, DType::F16) => "rt_add_f16",
        (_, DType::BF16) => "rt_add_bf16",
    }
}

/// `y = act(y + bias)` in place, the bias (`[cols]`, y's dtype, optional) added to every row of
/// the contiguous `y` (`[..., cols]`).
pub fn bias_act_into(
    gpu: &Gpu,
    y: &mut TensorMut,
    bias: Option<&TensorRef>,
    act: Activation,
) -> Result<()> {
    gpu.check_contexts(
        [("y", y.ctx)]
            .into_iter()
            .chain(bias.map(|b| ("bias", b.ctx))),
    )?;
    let (rows, cols) = check_bias_act(y, bias)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let p = cuattn_bias_act_params {
        x: y.ptr,
        bias: bias.map_or(0, |b| b.ptr),
        rows: rows as i64,
        cols: cols as i64,
        act: act_code(act),
    };
    let k = gpu.kernel(MODULE, kernel_name("bias_act", y.dtype))?;
    // SAFETY: y is contiguous with rows·cols elements of its dtype inside its memory, and the
    // bias (when given) cols elements of the same dtype (checked above); the kernel touches
    // exactly those.
    unsafe { launch(gpu, &k, &p, (grid(gpu, rows * cols), 1), (THREADS, 1), 0) }
}

/// `out = a + b` elementwise (one shape, one dtype, contiguous; added in f32). `out` may be
/// the memory of `a` or `b` (each element is read before it is written, by the same thread).
pub fn add_into(gpu: &Gpu, a: &TensorRef, b: &TensorRef, out: &mut TensorMut) -> Result<()> {
    gpu.check_contexts([("a", a.ctx), ("b", b.ctx), ("out", out.ctx)])?;
    let n = check_add(a, b, out)?;
    if n == 0 {
        return Ok(());
    }
    let p = cuattn_add_params {
        a: a.ptr,
        b: b.ptr,
        out: out.ptr,
        n: n as i64,
    };
    let k = gpu.kernel(MODULE, kernel_name("add", a.dtype))?;
    // SAFETY: a, b and out are contiguous views of n elements of one dtype inside their
    // memory (checked above).
    unsafe { launch(gpu, &k, &p, (grid(gpu, n), 1), (THREADS, 1), 0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ContextId;
    use crate::ops::fake_views::{fake_mut, fake_ref, BASE};

    const GIB: u64 = 1 << 30;

    #[test]
    fn bias_act_takes_any_rank_and_a_bias_per_column() {
        let y = fake_mut(DType::F16, &[3, 5, 8], 0);
        let bias = fake_ref(DType::F16, &[8], GIB);
        assert_eq!(check_bias_act(&y, Some(&bias)).unwrap(), (15, 8));
        assert_eq!(check_bias_act(&y, None).unwrap(), (15, 8));
    }

    #[test]
    fn a_bias_of_the_wrong_length_or_dtype_is_refused_by_name() {
        let y = fake_mut(DType::BF16, &[4, 8], 0);
        let short = fake_ref(DType::BF16, &[7], GIB);
        let r = check_bias_act(&y, Some(&short));
        assert!(matches!(r, Err(Error::Shape { arg: "bias", .. })), "{r:?}");
        let f32_bias = fake_ref(DType::F32, &[8], GIB);
        let r = check_bias_act(&y, Some(&f32_bias));
        assert!(matches!(r, Err(Error::DType { arg: "bias", .. })), "{r:?}");
    }

    #[test]
    fn a_strided_output_or_one_larger_than_its_memory_is_refused() {
        // Rows of 8 with a stride of 16: not contiguous.
        let layout = Layout::strided("y", &[4, 8], &[16, 1]).unwrap();
        // SAFETY: validation only reads the address as a number.
        let strided = unsafe {
            TensorMut::from_raw(
                ContextId::from_raw(std::ptr::null_mut()),
                BASE,
                4 * 16 * 2,
                DType::F16,
                layout,
            )
        };
        let r = check_bias_act(&strided, None);
        assert!(matches!(r, Err(Error::Layout { arg: "y", .. })), "{r:?}");
        // SAFETY: as above.
        let small = unsafe {
            TensorMut::from_raw(
                ContextId::from_raw(std::ptr::null_mut()),
                BASE,
                4 * 8 * 2 - 2,
                DType::F16,
                Layout::contiguous(&[4, 8]),
            )
        };
        assert!(check_bias_act(&small, None).is_err());
    }

    #[test]
    fn add_needs_one_shape_and_dtype() {
        let a = fake_ref(DType::F32, &[6, 4], 0);
        let b = fake_ref(DType::F32, &[6, 4], GIB);
        let out = fake_mut(DType::F32, &[6, 4], 2 * GIB);
        assert_eq!(check_add(&a, &b, &out).unwrap(), 24);
        let b_long = fake_ref(DType::F32, &[6, 5], GIB);
        let r = check_add(&a, &b_long, &out);
        assert!(matches!(r, Err(Error::Shape { arg: "b", .. })), "{r:?}");
        let out_t = fake_mut(DType::F32, &[4, 6], 2 * GIB);
        let r = check_add(&a, &b, &out_t);
        assert!(matches!(r, Err(Error::Shape { arg: "out", .. })), "{r:?}");
        let out_h = fake_mut(DType::F16, &[6, 4], 2 * GIB);
        let r = check_add(&a, &b, &out_h);
        assert!(matches!(r, Err(Error::DType { arg: "out", .. })), "{r:?}");
    }
    /// Device ids: one output row per id, the table's width and dtype, a 2-D table, and
    /// 4-byte-aligned ids; each mismatch is refused by argument name before any launch.
    #[test]
    fn gather_needs_a_row_per_id_of_the_tables_width_and_dtype() {
        let ctx = ContextId::from_raw(std::ptr::null_mut());
        // SAFETY: validation only reads the address as a number.
        let ids = unsafe { I32View::from_raw(ctx, 3 * GIB, 3) };
        let table = fake_ref(DType::F16, &[10, 8], 0);
        let out = fake_mut(DType::F16, &[3, 8], GIB);
        assert_eq!(check_gather(&table, &ids, &out).unwrap(), (10, 8));
        let r = check_gather(&table, &ids, &fake_mut(DType::F16, &[4, 8], GIB));
        assert!(matches!(r, Err(Error::Shape { arg: "out", .. })), "{r:?}");
        let r = check_gather(&table, &ids, &fake_mut(DType::F16, &[3, 9], GIB));
        assert!(matches!(r, Err(Error::Shape { arg: "out", .. })), "{r:?}");
        let r = check_gather(&table, &ids, &fake_mut(DType::F32, &[3, 8], GIB));
        assert!(matches!(r, Err(Error::DType { arg: "out", .. })), "{r:?}");
        let r = check_gather(&fake_ref(DType::F16, &[2, 5, 8], 0), &ids, &out);
        assert!(matches!(r, Err(Error::Shape { arg: "table", .. })), "{r:?}");
        // SAFETY: as above.
        let odd = unsafe { I32View::from_raw(ctx, 3 * GIB + 2, 3) };
        let r = check_gather(&table, &odd, &out);
        assert!(
            matches!(r, Err(Error::Alignment { arg: "ids", .. })),
            "{r:?}"
        );
    }
}
