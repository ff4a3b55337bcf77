//! The one error type of the crate. Every variant names what is wrong: which argument, what was
//! expected and what was given, so a failing call explains itself without a debugger.

use crate::dtype::DType;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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

    /// A model folder's configuration is missing, unreadable or describes something the
    /// runtime does not support.
    #[error("model config {file}: {reason}")]
    Config { file: String, reason: String },

    /// A checkpoint's tensors do not match the model: a missing, extra or mis-shaped tensor
    /// (named), an unsupported dtype, or a corrupt or truncated file.
    #[error("checkpoint {file}: {reason}")]
    Checkpoint { file: String, reason: String },

    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

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
