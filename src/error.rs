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
///
/// New variants may be added in later versions (`#[non_exhaustive]`): match the ones you handle
/// and keep a `_` arm. [`Error::code`] maps every variant to a stable integer (the C ABI's
/// return codes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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

    /// A CUDA driver call failed. `code` is the driver's `CUresult` (for example 2,
    /// `CUDA_ERROR_OUT_OF_MEMORY`, which a caller may recover from by freeing memory, against
    /// 700, `CUDA_ERROR_ILLEGAL_ADDRESS`, which leaves the context unusable); see
    /// [`Error::is_out_of_memory`] and [`Error::is_sticky`].
    #[error("CUDA driver error in {context}: {message} (CUresult {code})")]
    Driver {
        context: String,
        code: u32,
        message: String,
    },

    /// A cuBLAS call failed; `status` is its `cublasStatus_t`.
    #[error("cuBLAS error in {context}: {message} (cublasStatus_t {status})")]
    Blas {
        context: String,
        status: u32,
        message: String,
    },

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

/// `CUDA_ERROR_OUT_OF_MEMORY`.
const CUDA_ERROR_OUT_OF_MEMORY: u32 = 2;
/// `CUBLAS_STATUS_ALLOC_FAILED`.
const CUBLAS_STATUS_ALLOC_FAILED: u32 = 3;

impl Error {
    /// Whether a device allocation failed (driver or cuBLAS): the context is still usable and the
    /// call may succeed after memory is freed.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Driver { code, .. } if *code == CUDA_ERROR_OUT_OF_MEMORY)
            || matches!(self, Error::Blas { status, .. } if *status == CUBLAS_STATUS_ALLOC_FAILED)
    }

    /// Whether the driver reported a fault that poisons the context (an illegal address, a
    /// misaligned access, a trap or a launch failure inside a kernel, codes 700-720): every
    /// later call on that context fails too, and the process must create a new one.
    pub fn is_sticky(&self) -> bool {
        matches!(self, Error::Driver { code, .. } if (700..=720).contains(code))
    }

    /// A stable integer for each kind of error, the C ABI's return codes (0 is success there).
    pub fn code(&self) -> i32 {
        match self {
            Error::Shape { .. } => 1,
            Error::DType { .. } => 2,
            Error::Layout { .. } => 3,
            Error::Empty { .. } => 4,
            Error::InvalidArgument { .. } => 5,
            Error::Alignment { .. } => 6,
            Error::Device { .. } => 7,
            Error::NoDevice(_) => 8,
            Error::CudaDisabled => 9,
            Error::Driver { .. } => 10,
            Error::Blas { .. } => 11,
            Error::SparseLayout(_) => 12,
            Error::Config { .. } => 13,
            Error::Checkpoint { .. } => 14,
            Error::Tokenizer(_) => 15,
            Error::Io { .. } => 16,
            Error::NonFinite { .. } => 17,
            Error::Data { .. } => 18,
        }
    }
}

#[cfg(feature = "cuda")]
impl Error {
    /// Wraps a cudarc driver error with the name of the call that produced it, keeping its
    /// `CUresult`.
    pub fn driver(context: impl Into<String>, err: cudarc::driver::DriverError) -> Self {
        // The enum's name (`CUDA_ERROR_OUT_OF_MEMORY`), not cuGetErrorString: no driver call
        // while reporting an error.
        Error::Driver {
            context: context.into(),
            code: err.0 as u32,
            message: format!("{:?}", err.0),
        }
    }

    /// Wraps a cuBLAS error with the name of the call that produced it, keeping its status.
    pub fn blas(context: impl Into<String>, err: cudarc::cublas::result::CublasError) -> Self {
        Error::Blas {
            context: context.into(),
            status: err.0 as u32,
            message: format!("{:?}", err.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(code: u32) -> Error {
        Error::Driver {
            context: "test".into(),
            code,
            message: String::new(),
        }
    }

    #[test]
    fn out_of_memory_and_sticky_faults_are_told_apart_by_their_codes() {
        assert!(driver(2).is_out_of_memory() && !driver(2).is_sticky());
        assert!(driver(700).is_sticky() && !driver(700).is_out_of_memory());
        assert!(driver(719).is_sticky());
        assert!(!driver(1).is_sticky() && !driver(1).is_out_of_memory());
        let blas_alloc = Error::Blas {
            context: "test".into(),
            status: 3,
            message: String::new(),
        };
        assert!(blas_alloc.is_out_of_memory() && !blas_alloc.is_sticky());
        assert_eq!(blas_alloc.code(), 11);
        assert_eq!(driver(2).code(), 10);
    }

    #[test]
    fn every_kind_has_its_own_nonzero_code() {
        let io = std::io::Error::other("x");
        let all = [
            Error::shape("a", "b", &[1]),
            Error::DType {
                arg: "a",
                expected: DType::F16,
                got: DType::F32,
            },
            Error::layout("a", "b"),
            Error::Empty {
                arg: "a",
                shape: vec![0],
            },
            Error::invalid("a", "b"),
            Error::Alignment {
                arg: "a",
                ptr: 1,
                align: 2,
            },
            Error::Device {
                arg: "a",
                reason: "b".into(),
            },
            Error::NoDevice("x".into()),
            Error::CudaDisabled,
            driver(2),
            Error::Blas {
                context: "c".into(),
                status: 1,
                message: String::new(),
            },
            Error::SparseLayout(SparseLayoutError::RowOffsets { reason: "r".into() }),
            Error::Config {
                file: "f".into(),
                reason: "r".into(),
            },
            Error::Checkpoint {
                file: "f".into(),
                reason: "r".into(),
            },
            Error::Tokenizer("t".into()),
            Error::Io {
                path: "p".into(),
                source: io,
            },
        ];
        let mut codes: Vec<i32> = all.iter().map(Error::code).collect();
        assert!(codes.iter().all(|&c| c > 0));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_wrapped_driver_error_keeps_its_cuda_result() {
        use cudarc::driver::sys::CUresult;
        let e = Error::driver(
            "cuMemAlloc",
            cudarc::driver::DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
        );
        assert!(e.is_out_of_memory(), "{e}");
        assert!(e.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY"), "{e}");
        let e = Error::driver(
            "kernel",
            cudarc::driver::DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
        );
        assert!(e.is_sticky(), "{e}");
    }
}
