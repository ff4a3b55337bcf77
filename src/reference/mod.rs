//! CPU references for every kernel: plain Rust, f64 accumulation, written for clarity rather
//! than speed. GPU kernels are held to these by the property tests, and the references are in
//! turn checked against independent formulas and finite differences (tests/reference_*.rs).

pub mod attention;
pub mod attention_backward;
pub mod layernorm;
pub mod runtime;
pub mod training;
