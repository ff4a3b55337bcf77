//! Argument checks shared by the ops. Each returns an [`Error`] naming the argument.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Layout;

/// What an op needs to know about one device view.
pub(crate) struct ViewInfo<'l> {
    pub arg: &'static str,
    pub ptr: u64,
    pub bytes: usize,
    pub dtype: DType,
    pub layout: &'l Layout,
}

/// A view seen as evenly spaced contiguous rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl Rows {
    /// Whether every row starts on a 16-byte boundary.
    pub fn rows_16b_aligned(&self, dtype: DType) -> bool {
        self.ptr.is_multiple_of(16)
            && (self.rows <= 1 || (self.row_stride * dtype.size_bytes()).is_multiple_of(16))
    }
}

pub(crate) fn dtype(v: &ViewInfo, expected: DType) -> Result<()> {
    if v.dtype != expected {
        return Err(Error::DType {
            arg: v.arg,
            expected,
            got: v.dtype,
        });
    }
    Ok(())
}

/// Checks the view's layout fits its memory and its address is aligned to its element size.
pub(crate) fn memory(v: &ViewInfo) -> Result<()> {
    let size = v.dtype.size_bytes();
    if !v.ptr.is_multiple_of(size as u64) {
        return Err(Error::Alignment {
            arg: v.arg,
            ptr: v.ptr,
            align: size,
        });
    }
    v.layout.check_fits(v.arg, v.bytes / size)
}

/// The view as rows (outer dims collapsed), non-empty, with its memory checked.
pub(crate) fn rows(v: &ViewInfo) -> Result<Rows> {
    if v.layout.numel() == 0 {
        return Err(Error::Empty {
            arg: v.arg,
            shape: v.layout.shape().to_vec(),
        });
    }
    memory(v)?;
    let (rows, cols, row_stride) = v.layout.as_rows(v.arg)?;
    Ok(Rows {
        ptr: v.ptr,
        rows,
        cols,
        row_stride,
    })
}

/// A contiguous vector of exactly `len` elements (any shape whose numel is `len`).
pub(crate) fn vector(v: &ViewInfo, len: usize, what: &str) -> Result<()> {
    if v.layout.numel() != len {
        return Err(Error::shape(
            v.arg,
            format!("{len} elements ({what})"),
            v.layout.shape(),
        ));
    }
    if !v.layout.is_contiguous() {
        return Err(Error::layout(
            v.arg,
            format!("must be contiguous, got strides {:?}", v.layout.strides()),
        ));
    }
    memory(v)
}

/// A size that must be in 1..=max, named `what` in the error.
pub(crate) fn size_in(arg: &'static str, what: &str, value: usize, max: usize) -> Result<()> {
    if value == 0 || value > max {
        return Err(Error::invalid(
            arg,
            format!("{what} must be in 1..={max}, got {value}"),
        ));
    }
    Ok(())
}

/// Two views must have the same shape.
pub(crate) fn same_shape(a: &ViewInfo, b: &ViewInfo) -> Result<()> {
    if a.layout.shape() != b.layout.shape() {
        return Err(Error::shape(
            b.arg,
            format!("{:?} (the shape of `{}`)", a.layout.shape(), a.arg),
            b.layout.shape(),
        ));
    }
    Ok(())
}

/// A view of `rank` dims, non-empty, contiguous in its last dim, inside its memory: its shape
/// and strides.
pub(crate) fn strided<'l>(
    v: &'l ViewInfo<'l>,
    rank: usize,
    what: &str,
) -> Result<(&'l [usize], &'l [usize])> {
    let (shape, strides) = (v.layout.shape(), v.layout.strides());
    if shape.len() != rank {
        return Err(Error::shape(v.arg, format!("{rank} dims {what}"), shape));
    }
    if shape.contains(&0) {
        return Err(Error::Empty {
            arg: v.arg,
            shape: shape.to_vec(),
        });
    }
    if shape[rank - 1] > 1 && strides[rank - 1] != 1 {
        return Err(Error::layout(
            v.arg,
            format!("the last dim must be contiguous (stride 1), got strides {strides:?}"),
        ));
    }
    memory(v)?;
    Ok((shape, strides))
}
