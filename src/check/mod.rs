//! GPU-vs-reference checks: each runs a kernel on random inputs and holds every output to the
//! f64 CPU reference under [`crate::tolerance`]. The property tests drive these with random
//! cases; `cuattn check` runs a fixed list of them.
//!
//! Outputs are poisoned with NaN before each launch, inputs carry NaN in the gaps between rows,
//! and a kernel that writes outside its rows fails the check.

pub mod attention;
pub mod attention_backward;
pub mod decode;
pub mod layernorm;
pub mod sparse;
pub mod sparse_backward;
pub mod training;

use crate::dtype::DType;
use crate::gpu::{DeviceTensor, Gpu, TensorMut, TensorRef};
use crate::tensor::{HostTensor, Layout};
use rand::rngs::SmallRng;
use rand::Rng;
use std::sync::Arc;

/// Why a check failed (or could not run).
pub type CheckResult<T = ()> = std::result::Result<T, String>;

/// How a row tensor sits in its buffer, to exercise strided and misaligned access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Extra elements after each row.
    pub row_pad: usize,
    /// Elements before the first row (1 breaks 16-byte alignment).
    pub offset: usize,
}

impl Placement {
    pub const DENSE: Placement = Placement {
        row_pad: 0,
        offset: 0,
    };

    pub fn layout(&self, rows: usize, hidden: usize) -> Layout {
        Layout::strided("t", &[rows, hidden], &[hidden + self.row_pad, 1]).expect("rank 2")
    }

    pub fn buffer_len(&self, rows: usize, hidden: usize) -> usize {
        self.offset + rows * (hidden + self.row_pad)
    }
}

/// A rows × hidden tensor placed in a larger buffer.
pub struct RowTensor {
    pub buf: DeviceTensor,
    pub placement: Placement,
    pub rows: usize,
    pub hidden: usize,
}

fn gpu_err(e: crate::Error) -> String {
    e.to_string()
}

impl RowTensor {
    /// Uploads `values` (rows·hidden, already rounded to `dtype`); the gaps hold NaN, so a
    /// kernel that reads them shows it.
    pub fn upload(
        gpu: &Arc<Gpu>,
        dtype: DType,
        p: Placement,
        rows: usize,
        hidden: usize,
        values: &[f32],
    ) -> CheckResult<Self> {
        let mut storage = vec![f32::NAN; p.buffer_len(rows, hidden)];
        for r in 0..rows {
            let dst = p.offset + r * (hidden + p.row_pad);
            storage[dst..dst + hidden].copy_from_slice(&values[r * hidden..(r + 1) * hidden]);
        }
        let host = HostTensor::from_f32(dtype, &[storage.len()], &storage).map_err(gpu_err)?;
        Ok(RowTensor {
            buf: gpu.upload(&host).map_err(gpu_err)?,
            placement: p,
            rows,
            hidden,
        })
    }

    /// An output buffer poisoned with NaN everywhere.
    pub fn poisoned(
        gpu: &Arc<Gpu>,
        dtype: DType,
        p: Placement,
        rows: usize,
        hidden: usize,
    ) -> CheckResult<Self> {
        Ok(RowTensor {
            buf: gpu
                .full(dtype, &[p.buffer_len(rows, hidden)], f32::NAN)
                .map_err(gpu_err)?,
            placement: p,
            rows,
            hidden,
        })
    }

    pub fn view(&self) -> TensorRef<'_> {
        self.buf
            .view_at(
                self.placement.offset,
                self.placement.layout(self.rows, self.hidden),
            )
            .expect("placement fits its buffer by construction")
    }

    pub fn view_mut(&mut self) -> TensorMut<'_> {
        let layout = self.placement.layout(self.rows, self.hidden);
        self.buf
            .view_mut_at(self.placement.offset, layout)
            .expect("placement fits its buffer by construction")
    }

    /// The logical values row-major; fails if any gap element is no longer NaN.
    pub fn read(&self, what: &str) -> CheckResult<Vec<f32>> {
        let storage = self.buf.to_host().map_err(gpu_err)?.storage_f32();
        let p = self.placement;
        let mut values = Vec::with_capacity(self.rows * self.hidden);
        let mut inside = vec![false; storage.len()];
        for r in 0..self.rows {
            let s = p.offset + r * (self.hidden + p.row_pad);
            values.extend_from_slice(&storage[s..s + self.hidden]);
            inside[s..s + self.hidden]
                .iter_mut()
                .for_each(|b| *b = true);
        }
        let touched = storage
            .iter()
            .zip(&inside)
            .filter(|(v, &i)| !i && !v.is_nan())
            .count();
        if touched > 0 {
            return Err(format!(
                "the kernel wrote {touched} elements outside the rows of `{what}`"
            ));
        }
        Ok(values)
    }
}

/// Uniform random values in [center − spread, center + spread], rounded to `dtype`.
pub fn random_values(
    rng: &mut SmallRng,
    dtype: DType,
    n: usize,
    center: f32,
    spread: f32,
) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(center + spread * rng.gen_range(-1.0f32..1.0)))
        .collect()
}

/// Uploads a contiguous vector, or nothing.
pub fn upload_vec(
    gpu: &Arc<Gpu>,
    dtype: DType,
    v: Option<&[f32]>,
) -> CheckResult<Option<DeviceTensor>> {
    v.map(|v| {
        let host = HostTensor::from_f32(dtype, &[v.len()], v).map_err(gpu_err)?;
        gpu.upload(&host).map_err(gpu_err)
    })
    .transpose()
}

/// Reads a contiguous device tensor as f32.
pub fn read_vec(t: &DeviceTensor) -> CheckResult<Vec<f32>> {
    t.to_f32_vec().map_err(gpu_err)
}

pub use crate::tolerance::expect_close;

/// The GPU for a test, or `None` after printing a visible `SKIPPED (no CUDA device)` line.
/// With `CUATTN_REQUIRE_GPU=1` a missing GPU panics (fails the test) instead.
pub fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    use std::io::Write;
    match Gpu::shared() {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            if std::env::var("CUATTN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: CUATTN_REQUIRE_GPU=1 but {e}");
            }
            // To the real stderr, not libtest's captured output, so that it shows.
            let line = format!("SKIPPED (no CUDA device): {test}: {e}\n");
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            None
        }
    }
}
