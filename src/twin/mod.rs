//! CPU twins of the kernels: each runs its kernel's block loop, thread ownership, reduction
//! order and memory layouts on the CPU in f32, so the algorithm and its index arithmetic are
//! proven against the f64 references on machines without a GPU.

pub mod attention;
pub mod attention_backward;
pub mod decode;
pub mod hopper_pipeline;
pub mod kv_append;
pub mod layernorm;
pub mod rnn;
pub mod sparse_attention;
pub mod training;
