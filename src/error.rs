//! The one error type of the crate. Every variant names what is wrong: which argument, what was
//! expected and what was given, so a failing call explains itself without a debugger.

use crate::dtype::DType;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with a block-sparse layout ([`crate::sparse::BlockLayout`]). Heads, query
/// blocks and key blocks are indices into the layout (head 0 for a layout shared by all heads).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparseLayoutError {
    /// The block size is not one the layout type (or the kernel it is used with) supports.
    #[error("block size {got} is not supported (expected one of {supported:?})")]
    BlockSize { got: usize, supported: Vec<usize> },
    /// A row of the compressed layout lists a key block after a larger one.
    #[error("head {head}, query block {q_block}: key block {next} follows {prev} (rows must be sorted ascending)")]
    Unsorted {
        head: usize,
        q_block: usize,
        prev: usize,
        next: usize,
    },
    /// A row of the compressed layout lists a key block twice.
    #[error("head {head}, query block {q_block}: key block {k_block} is listed twice")]
    Duplicate {
        head: usize,
        q_block: usize,
        k_block: usize,
    },
    /// A key block index is past the last key block.
    #[error("head {head}, query block {q_block}: key block {k_block} is out of range (the keys have {k_blocks} blocks)")]
    OutOfRange {
        head: usize,
        q_block: usize,
        k_block: usize,
        k_blocks: usize,
    },
    /// The row offsets are not a valid compressed-row index.
    #[error("row offsets: {reason}")]
    RowOffsets { reason: String },
    /// The layout was built for other sizes than the call's (`what`: len_q, len_k or heads).
    #[error("layout has {what} = {layout}, the call has {call}")]
    ShapeMismatch {
        what: &'static str,
        layout: usize,
        call: usize,
    },
    /// A pattern parameter is out of range (a zero stride, more global blocks than blocks...).
    #[error("pattern parameter `{param}`: {reason}")]
    Pattern { param: &'static str, reason: String },
    /// A value does not fit in the device's 32-bit indices.
    #[error("{what} = {value} does not fit in i32")]
    IndexOverflow { what: &'static str, value: i64 },
}

/// Everything that can go wrong in cuattn. Library code returns this; it never panics on user input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor argument has the wrong shape.
    #[error("argument `{arg}`: expected shape {expected}, got {got:?}")]
    Shape {
        arg: &'static str,
        expected: String,
        got: Vec<usize>,
    },

    /// A tensor argument has the wrong element type.
    #[error("argument `{arg}`: expected dtype {expected}, got {got}")]
    DType {
        arg: &'static str,
        expected: DType,
        got: DType,
    },

    /// A tensor argument is laid out in a way the kernel cannot read (for example a row whose
    /// elements are not contiguous).
    #[error("argument `{arg}`: unsupported layout: {reason}")]
    Layout { arg: &'static str, reason: String },

    /// A tensor argument has no elements where the op needs some.
    #[error("argument `{arg}` is empty (shape {shape:?})")]
    Empty {
        arg: &'static str,
        shape: Vec<usize>,
    },

    /// A scalar argument is out of its valid range.
    #[error("argument `{arg}`: {reason}")]
    InvalidArgument { arg: &'static str, reason: String },

    /// A device pointer does not meet the kernel's alignment requirement.
    #[error("argument `{arg}`: device pointer 0x{ptr:x} is not aligned to {align} bytes")]
    Alignment {
        arg: &'static str,
        ptr: u64,
        align: usize,
    },

    /// A tensor lives on the host where a device tensor is needed, or the reverse, or on another GPU context.
    #[error("argument `{arg}`: {reason}")]
    Device { arg: &'static str, reason: String },

    /// No usable CUDA device or driver was found.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// The crate was built without the `cuda` feature, so GPU kernels are not available.
    #[error("cuattn was built without the `cuda` feature; GPU kernels are unavailable")]
    CudaDisabled,

    /// A CUDA driver call failed.
    #[error("CUDA driver error in {context}: {message}")]
    Driver { context: String, message: String },

    /// A block-sparse layout is malformed or does not fit the call it is used with.
    #[error("block-sparse layout: {0}")]
    SparseLayout(#[from] SparseLayoutError),
    /// A model folder's configuration is missing, unreadable or describes something the
    /// runtime does not support.
    #[error("model config {file}: {reason}")]
    Config { file: String, reason: String },

    /// A checkpoint's tensors do not match the model: a missing, extra or mis-shaped tensor
    /// (named), an unsupported dtype, or a corrupt or truncated file.
    #[error("checkpoint {file}: {reason}")]
    Checkpoint { file: String, reason: String },

    /// A model produced NaN or infinite values for an input (corrupt weights, or arithmetic
    /// that overflowed); `input` counts from 1 in the order the inputs were given.
    #[error("input {input}: {reason}")]
    NonFinite { input: usize, reason: String },

    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A data file (training or evaluation examples) is unreadable, empty or has a bad row;
    /// names the file and, where there is one, the line (from 1).
    #[error("data file {file}{}: {reason}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Data {
        file: String,
        line: Option<usize>,
        reason: String,
    },

    /// An I/O error, for example while reading a model file.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(arg: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            arg,
            expected: expected.into(),
            got: got.to_vec(),
        }
    }

    /// Shorthand for [`Error::Layout`].
    pub fn layout(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::Layout {
            arg,
            reason: reason.into(),
        }
    }
}

#[cfg(feature = "cuda")]
impl Error {
    /// Wraps a cudarc driver error with the name of the call that produced it.
    pub fn driver(context: impl Into<String>, err: cudarc::driver::DriverError) -> Self {
        Error::Driver {
            context: context.into(),
            message: format!("{err:?}"),
        }
    }
}
