//! Safe wrappers around the kernels. Each op validates every argument (dtype, shape, strides,
//! alignment, size of the memory behind each view), picks a launch configuration, and makes
//! one `unsafe` launch whose soundness rests on those checks.

pub mod attention;
pub mod layernorm;
mod validate;

pub(crate) use validate::ViewInfo;
