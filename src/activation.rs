//! The elementwise activations of the feed-forward blocks, named once for the runtime (whose
//! CPU arithmetic is in `runtime::backend`) and the GPU ops (`ops::elementwise`), which both use
//! it; it lives here, below both, so that neither imports the other.

/// Elementwise activations of the feed-forward blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity (a bias add only).
    None,
    /// GELU with the exact erf: x·Φ(x) (BERT's `gelu`).
    GeluErf,
    /// GELU's tanh approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (GPT-2's `gelu_new`).
    GeluTanh,
    Relu,
    /// tanh (BERT's pooler).
    Tanh,
}
