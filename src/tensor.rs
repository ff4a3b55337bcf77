//! Tensors: a [`Layout`] (shape and strides in elements) over bytes of one [`DType`].
//!
//! [`HostTensor`] owns host memory; `gpu::DeviceTensor` owns device memory and hands out
//! borrowed views that the ops take. Every op checks the layouts it is given against what its
//! kernel can read before anything is launched.

use crate::dtype::{self, DType};
use crate::error::{Error, Result};

/// Shape and strides of a tensor, both counted in elements (never bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl Layout {
    /// Row-major contiguous layout of `shape`.
    pub fn contiguous(shape: &[usize]) -> Self {
        let mut strides = vec![0; shape.len()];
        let mut acc = 1usize;
        for (s, &d) in strides.iter_mut().zip(shape).rev() {
            *s = acc;
            acc = acc.saturating_mul(d);
        }
        Layout {
            shape: shape.to_vec(),
            strides,
        }
    }

    /// A layout with explicit strides (in elements). `arg` names the tensor in errors.
    pub fn strided(arg: &'static str, shape: &[usize], strides: &[usize]) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::layout(
                arg,
                format!(
                    "{} dims in shape {shape:?} but {} strides {strides:?}",
                    shape.len(),
                    strides.len()
                ),
            ));
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether this is the row-major contiguous layout of its shape.
    pub fn is_contiguous(&self) -> bool {
        *self == Layout::contiguous(&self.shape)
    }

    /// One past the largest element offset the layout addresses (0 when empty), or an error if
    /// it overflows `usize`.
    pub fn span_elems(&self, arg: &'static str) -> Result<usize> {
        if self.numel() == 0 {
            return Ok(0);
        }
        let mut last = 0usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            let step = (d - 1)
                .checked_mul(s)
                .ok_or_else(|| Error::layout(arg, "offset of the last element overflows"))?;
            last = last
                .checked_add(step)
                .ok_or_else(|| Error::layout(arg, "offset of the last element overflows"))?;
        }
        Ok(last + 1)
    }

    /// Checks that every element lies inside a buffer of `len_elems` elements.
    pub fn check_fits(&self, arg: &'static str, len_elems: usize) -> Result<()> {
        let span = self.span_elems(arg)?;
        if span > len_elems {
            return Err(Error::layout(
                arg,
                format!(
                    "shape {:?} with strides {:?} reaches element {} but the buffer holds {len_elems}",
                    self.shape,
                    self.strides,
                    span - 1
                ),
            ));
        }
        Ok(())
    }

    /// Views this layout as a matrix of `rows × last_dim` whose rows are contiguous and evenly
    /// spaced: returns (rows, cols, row_stride_elems). The outer dims must collapse into one
    /// stride (as a contiguous batch of rows does).
    pub fn as_rows(&self, arg: &'static str) -> Result<(usize, usize, usize)> {
        let Some((&cols, outer)) = self.shape.split_last() else {
            return Err(Error::layout(
                arg,
                "a scalar has no rows; expected at least one dimension",
            ));
        };
        let col_stride = *self.strides.last().expect("rank >= 1");
        if cols > 1 && col_stride != 1 {
            return Err(Error::layout(
                arg,
                format!(
                    "the last dimension must be contiguous (stride 1), got stride {col_stride}"
                ),
            ));
        }
        let rows: usize = outer.iter().product();
        // Collapse the outer dims: walking from the innermost outer dim, each must step by the
        // previous dim's stride times its size. Dims of size 1 place no constraint.
        let mut row_stride: Option<usize> = None;
        let mut expected_next: Option<usize> = None;
        for (&d, &s) in outer.iter().zip(&self.strides).rev() {
            if d == 1 {
                continue;
            }
            match expected_next {
                None => row_stride = Some(s),
                Some(e) if e == s => {}
                Some(e) => {
                    return Err(Error::layout(
                        arg,
                        format!(
                            "rows are not evenly spaced: shape {:?}, strides {:?} (a dim has stride {s}, expected {e})",
                            self.shape, self.strides
                        ),
                    ))
                }
            }
            expected_next = Some(s.saturating_mul(d));
        }
        let row_stride = row_stride.unwrap_or(cols.max(1));
        if rows > 1 && row_stride < cols {
            return Err(Error::layout(
                arg,
                format!("rows overlap: row stride {row_stride} is less than the row length {cols}"),
            ));
        }
        Ok((rows, cols, row_stride))
    }
}

/// A tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    data: Vec<u8>,
    dtype: DType,
    layout: Layout,
}

impl HostTensor {
    /// A contiguous tensor of `shape` holding `values` rounded to `dtype`.
    pub fn from_f32(dtype: DType, shape: &[usize], values: &[f32]) -> Result<Self> {
        let layout = Layout::contiguous(shape);
        if layout.numel() != values.len() {
            return Err(Error::shape(
                "values",
                format!("{} values for shape {shape:?}", layout.numel()),
                &[values.len()],
            ));
        }
        Ok(HostTensor {
            data: dtype::encode(dtype, values),
            dtype,
            layout,
        })
    }

    /// A tensor over raw little-endian bytes with an explicit layout; checks the layout fits.
    pub fn from_bytes(dtype: DType, layout: Layout, data: Vec<u8>) -> Result<Self> {
        if !data.len().is_multiple_of(dtype.size_bytes()) {
            return Err(Error::invalid(
                "data",
                format!(
                    "{} bytes is not a whole number of {dtype} elements",
                    data.len()
                ),
            ));
        }
        layout.check_fits("data", data.len() / dtype.size_bytes())?;
        Ok(HostTensor {
            data,
            dtype,
            layout,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// All stored elements (the whole buffer, in storage order) as f32.
    pub fn storage_f32(&self) -> Vec<f32> {
        dtype::decode(self.dtype, &self.data)
    }

    /// The logical elements in row-major order of the shape, as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let storage = self.storage_f32();
        if self.layout.is_contiguous() {
            return storage[..self.layout.numel()].to_vec();
        }
        let shape = self.layout.shape();
        let strides = self.layout.strides();
        let mut out = Vec::with_capacity(self.layout.numel());
        let mut idx = vec![0usize; shape.len()];
        for _ in 0..self.layout.numel() {
            let off: usize = idx.iter().zip(strides).map(|(i, s)| i * s).sum();
            out.push(storage[off]);
            for d in (0..shape.len()).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_rows_collapse_outer_dims() {
        let l = Layout::contiguous(&[2, 3, 5]);
        assert_eq!(l.as_rows("x").unwrap(), (6, 5, 5));
    }

    #[test]
    fn padded_rows_keep_their_stride() {
        let l = Layout::strided("x", &[4, 5], &[8, 1]).unwrap();
        assert_eq!(l.as_rows("x").unwrap(), (4, 5, 8));
        assert_eq!(l.span_elems("x").unwrap(), 3 * 8 + 5);
    }

    #[test]
    fn non_contiguous_row_is_rejected() {
        let l = Layout::strided("x", &[4, 5], &[1, 4]).unwrap();
        let err = l.as_rows("x").unwrap_err();
        assert!(matches!(err, Error::Layout { arg: "x", .. }), "{err}");
    }

    #[test]
    fn unevenly_spaced_rows_are_rejected() {
        // A [2,3,4] tensor whose middle dim was sliced out of a larger one: rows are not evenly spaced.
        let l = Layout::strided("x", &[2, 3, 4], &[20, 4, 1]).unwrap();
        assert!(l.as_rows("x").is_err());
    }

    #[test]
    fn strided_view_reads_the_right_elements() {
        // A transposed 2x3 view over a contiguous 3x2 buffer.
        let t = HostTensor::from_bytes(
            DType::F32,
            Layout::strided("t", &[2, 3], &[1, 2]).unwrap(),
            dtype::encode(DType::F32, &[0., 1., 2., 3., 4., 5.]),
        )
        .unwrap();
        assert_eq!(t.to_f32_vec(), vec![0., 2., 4., 1., 3., 5.]);
    }

    #[test]
    fn layout_that_overruns_its_buffer_is_rejected() {
        let r = HostTensor::from_bytes(
            DType::F16,
            Layout::strided("t", &[2, 4], &[5, 1]).unwrap(),
            vec![0u8; 2 * 8],
        );
        assert!(matches!(r, Err(Error::Layout { .. })));
    }
}
