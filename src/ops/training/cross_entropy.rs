//! Softmax cross-entropy, forward and backward in one pass over the logits: the loss is the
//! mean over rows whose label is not `ignore_index`, with optional label smoothing (PyTorch's
//! `F.cross_entropy` semantics); the gradient may overwrite the logits.

use super::{by_dtype, kernel, same_or_disjoint};
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, TensorMut, TensorRef};
use crate::kernels::params::{cuattn_sum_params, cuattn_xent_params};
use crate::ops::launch;
use crate::ops::validate::{self, Rows};
use cudarc::driver::DevicePtr;
use std::sync::Arc;

/// Options of the cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows with this label add nothing to the loss and get zero gradients (PyTorch: -100).
    pub ignore_index: i32,
    /// ε in [0, 1]: the target is (1 − ε)·onehot + ε/classes.
    pub label_smoothing: f32,
    /// The upstream gradient of the loss (1 for a loss that is minimised directly; a loss scale
    /// or 1/accumulation steps otherwise): dlogits = grad_scale · dloss/dlogits.
    pub grad_scale: f32,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: -100,
            label_smoothing: 0.0,
            grad_scale: 1.0,
        }
    }
}

/// The loss of one call.
#[derive(Debug)]
pub struct CrossEntropyLoss {
    /// `[1]` f32 on the device: the mean loss (NaN when every row is ignored, as in PyTorch).
    /// Queued, not waited for: read it with `to_f32_vec` when needed.
    pub loss: DeviceTensor,
    /// Rows that count (label ≠ ignore_index).
    pub valid_rows: usize,
}

const ROW_THREADS_MAX: u32 = 1024;
const SUM_THREADS: u32 = 1024;

/// Scratch bytes [`cross_entropy_into`] takes from the Gpu's workspace for `rows` rows: one
/// f32 loss per row before the mean.
pub fn cross_entropy_workspace_bytes(rows: usize) -> usize {
    rows * 4
}

/// Loss of `logits` (`[rows, classes]`, any leading dims, last dim contiguous; f32/f16/bf16)
/// against host `labels` (one per row, each in [0, classes) or `ignore_index`), and, when
/// `dlogits` is given (logits' shape and dtype, disjoint or the very same view: in place),
/// its gradient.
pub fn cross_entropy_into(
    gpu: &Arc<Gpu>,
    opts: &CrossEntropyOptions,
    logits: &TensorRef,
    labels: &[i32],
    dlogits: Option<&mut TensorMut>,
) -> Result<CrossEntropyLoss> {
    gpu.check_contexts(
        std::iter::once(("logits", logits.ctx)).chain(dlogits.as_ref().map(|d| ("dlogits", d.ctx))),
    )?;
    let li = logits.info("logits");
    let rows = validate::rows(&li)?;
    let d = match &dlogits {
        Some(d) => {
            let di = d.info("dlogits");
            validate::dtype(&di, logits.dtype)?;
            validate::same_shape(&li, &di)?;
            same_or_disjoint(&li, &di)?;
            Some(validate::rows(&di)?)
        }
        None => None,
    };
    run(gpu, opts, logits.dtype, rows, labels, d)
}

/// [`cross_entropy_into`] writing the gradient over the logits.
pub fn cross_entropy_in_place(
    gpu: &Arc<Gpu>,
    opts: &CrossEntropyOptions,
    logits: &mut TensorMut,
    labels: &[i32],
) -> Result<CrossEntropyLoss> {
    gpu.check_context("logits", logits.ctx)?;
    let rows = validate::rows(&logits.info("logits"))?;
    run(gpu, opts, logits.dtype, rows, labels, Some(rows))
}

fn run(
    gpu: &Arc<Gpu>,
    opts: &CrossEntropyOptions,
    dtype: crate::DType,
    x: Rows,
    labels: &[i32],
    dlogits: Option<Rows>,
) -> Result<CrossEntropyLoss> {
    if !(0.0..=1.0).contains(&opts.label_smoothing) {
        return Err(Error::invalid(
            "label_smoothing",
            format!("must be in [0, 1], got {}", opts.label_smoothing),
        ));
    }
    if !opts.grad_scale.is_finite() {
        return Err(Error::invalid(
            "grad_scale",
            format!("must be finite, got {}", opts.grad_scale),
        ));
    }
    if labels.len() != x.rows {
        return Err(Error::shape(
            "labels",
            format!("{} labels (one per row of the logits)", x.rows),
            &[labels.len()],
        ));
    }
    if x.cols > i32::MAX as usize {
        return Err(Error::invalid(
            "logits",
            format!("{} classes exceed i32 labels", x.cols),
        ));
    }
    if let Some((r, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l != opts.ignore_index && (l < 0 || l as usize >= x.cols))
    {
        return Err(Error::invalid(
            "labels",
            format!(
                "row {r} has label {l}: neither a class in [0, {}) nor ignore_index {}",
                x.cols, opts.ignore_index
            ),
        ));
    }
    let valid = labels.iter().filter(|&&l| l != opts.ignore_index).count();
    let inv_valid = if valid > 0 {
        1.0 / valid as f32
    } else {
        f32::NAN
    };
    let loss = gpu.full(crate::DType::F32, &[1], f32::NAN)?;
    let stream = gpu.stream();
    let labels_dev = stream
        .clone_htod(labels)
        .map_err(|e| Error::driver("copy labels to the device", e))?;
    let row_threads = (x.cols.next_power_of_two() as u32).clamp(32, ROW_THREADS_MAX);
    let xent = kernel(gpu, by_dtype(dtype, ["xent_f32", "xent_f16", "xent_bf16"]))?;
    let sum = kernel(gpu, "sum_f32")?;
    let grid = x.rows.min(gpu.info().multiprocessors as usize * 16) as u32;
    let loss_ptr = loss.view().device_ptr();
    gpu.with_workspace(cross_entropy_workspace_bytes(x.rows), |ws| {
        let p = cuattn_xent_params {
            logits: x.ptr,
            labels: labels_dev.device_ptr(stream).0,
            dlogits: dlogits.map_or(0, |d| d.ptr),
            row_loss: ws,
            rows: x.rows as i64,
            classes: x.cols as i64,
            logits_row_stride: x.row_stride as i64,
            dlogits_row_stride: dlogits.map_or(0, |d| d.row_stride) as i64,
            ignore_index: opts.ignore_index,
            smoothing: opts.label_smoothing,
            // No valid row: every gradient is 0 (the kernel never multiplies an ignored row).
            grad_scale: if valid > 0 {
                opts.grad_scale * inv_valid
            } else {
                0.0
            },
        };
        let s = cuattn_sum_params {
            values: ws,
            out: loss_ptr,
            n: x.rows as i64,
            scale: inv_valid,
            max_norm: 0.0,
            finish_norm: 0,
        };
        // SAFETY: logits (and dlogits, same shape, disjoint or identical) are row views checked
        // against their memory; labels_dev holds one label per row, each in [0, classes) or the
        // ignore index (checked above), and is freed in stream order after the kernel; the
        // workspace holds one f32 per row, all written by the row kernel before `sum_f32`
        // reads them; loss holds one f32.
        unsafe {
            launch(gpu, &xent, &p, (grid, 1), (row_threads, 1), 0)?;
            launch(gpu, &sum, &s, (1, 1), (SUM_THREADS, 1), 0)
        }
    })?;
    Ok(CrossEntropyLoss {
        loss,
        valid_rows: valid,
    })
}
