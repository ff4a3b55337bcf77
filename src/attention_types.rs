//! Types every attention layer shares (the references, the key band, the sparse layouts, the
//! ops and the runtime): which corner a causal mask is aligned to, and the sizes of a call.
//! They live here, below all of them, so that no two of those modules import each other.

/// Which corner the causal mask is aligned to when Lq ≠ Lk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CausalAlign {
    /// Keep j ≤ i (PyTorch SDPA `is_causal=True`, FlashAttention ≤ 2.0).
    TopLeft,
    /// Keep j ≤ i + (key_len − Lq) (FlashAttention ≥ 2.1, KV caches).
    BottomRight,
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub dim_qk: usize,
    pub dim_v: usize,
}

impl Shape {
    pub fn new(
        batch: usize,
        heads_q: usize,
        heads_kv: usize,
        len_q: usize,
        len_k: usize,
        dim_qk: usize,
        dim_v: usize,
    ) -> Self {
        Shape {
            batch,
            heads_q,
            heads_kv,
            len_q,
            len_k,
            dim_qk,
            dim_v,
        }
    }

    pub fn q_len(&self) -> usize {
        self.batch * self.heads_q * self.len_q * self.dim_qk
    }
    pub fn k_len(&self) -> usize {
        self.batch * self.heads_kv * self.len_k * self.dim_qk
    }
    pub fn v_len(&self) -> usize {
        self.batch * self.heads_kv * self.len_k * self.dim_v
    }
    pub fn o_len(&self) -> usize {
        self.batch * self.heads_q * self.len_q * self.dim_v
    }
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads_q * self.len_q
    }
}
