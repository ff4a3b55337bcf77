//! Dropout with a counter-based mask: element i of stream (seed, offset) is kept iff its
//! Philox4x32-10 word is at least round(p·2^32), and kept elements are scaled by 1/(1 − p).
//! No mask is stored: the backward calls the same op on dy with the same (seed, offset), and
//! the CPU backend gets the same mask from [`crate::rng::Dropout`].

use super::{by_dtype, contiguous_rows, kernel, same_or_disjoint, stride_grid};
use crate::error::Result;
use crate::gpu::{Gpu, TensorMut, TensorRef};
use crate::kernels::params::cuattn_dropout_params;
use crate::ops::launch;
use crate::ops::validate;
use crate::rng::Dropout;

/// Options of [`dropout_into`]: the probability and the stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutOptions {
    /// Drop probability in [0, 1] (checked by [`Dropout::new`]).
    pub p: f32,
    pub seed: u64,
    /// Distinct per dropout site and step (the same for a site's forward and backward).
    pub offset: u64,
}

const THREADS: u32 = 256;

/// y = mask ⊙ x / (1 − p) over a contiguous `x` (f32/f16/bf16), element indices in row-major
/// order. Forward (x → y) and backward (dy → dx) are the same call. `y` has x's shape and
/// dtype and may be the very same view (in place).
pub fn dropout_into(
    gpu: &Gpu,
    opts: &DropoutOptions,
    x: &TensorRef,
    y: &mut TensorMut,
) -> Result<()> {
    gpu.check_contexts([("x", x.ctx), ("y", y.ctx)])?;
    let d = Dropout::new(opts.p)?;
    let (xi, yi) = (x.info("x"), y.info("y"));
    let r = contiguous_rows(&xi, x.dtype)?;
    validate::same_shape(&xi, &yi)?;
    contiguous_rows(&yi, x.dtype)?;
    same_or_disjoint(&xi, &yi)?;
    let n = r.rows * r.cols;
    let align = 4 * x.dtype.size_bytes() as u64;
    let p = cuattn_dropout_params {
        x: x.ptr,
        y: y.ptr,
        n: n as i64,
        seed: opts.seed,
        offset: opts.offset,
        threshold: d.threshold(),
        scale: d.scale(),
        vectorized: (x.ptr.is_multiple_of(align) && y.ptr.is_multiple_of(align)) as i32,
    };
    let k = kernel(
        gpu,
        by_dtype(x.dtype, ["dropout_f32", "dropout_f16", "dropout_bf16"]),
    )?;
    // SAFETY: x and y are contiguous views of n elements inside their memory, identical or
    // disjoint; each 4-element block belongs to one thread; vector accesses only when both
    // pointers are 4-element aligned.
    unsafe {
        launch(
            gpu,
            &k,
            &p,
            (stride_grid(gpu, n.div_ceil(4), THREADS), 1),
            (THREADS, 1),
            0,
        )
    }
}
