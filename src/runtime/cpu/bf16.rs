//! [`CpuBf16`]: the CPU backend with its weight matrices stored in bf16 (`--dtype bf16` on the
//! CPU). Every uploaded value is rounded to bf16 (to nearest, ties to even); matrices (linear
//! weights, embedding tables) are kept as 2 bytes per value, vectors (biases, LayerNorm gain
//! and shift: small) as the same values in f32. All arithmetic, and every activation an op
//! returns, is f32, exactly as on [`Cpu`].
//!
//! Why: decoding is a stream of the weights from memory, so half the bytes per weight is up
//! to twice the tokens per second. Matrices are stored in the few-row kernel's tile order
//! ([`super::gemv::tiles`]: one sequential stream per task, where row-major bf16 rows were
//! too short for the hardware prefetcher); that kernel ([`super::gemv`]) widens bf16 to f32 in
//! registers; a many-row GEMM (a prefill) widens the weight, back in row order, once per call.

use super::{Cpu, CpuTensor};
use crate::error::{Error, Result};
use crate::runtime::backend::{Activation, AttentionMask, Backend, Heads};

/// The CPU backend with bf16 weight matrices and f32 arithmetic.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBf16;

impl CpuBf16 {
    fn store(shape: &[usize], values: &[f32]) -> Result<CpuTensor> {
        if shape.len() == 2 {
            // Huge pages where the kernel allows: decoding streams these per token.
            let mut bits =
                crate::runtime::host_memory::huge_page_buffer(values.len()).map_err(|e| {
                    Error::invalid("values", format!("cannot allocate a bf16 matrix: {e}"))
                })?;
            let to_bits = |v: f32| half::bf16::from_f32(v).to_bits();
            match shape {
                // The order the few-row kernel streams (see `gemv::tiles`).
                &[n, k]
                    if super::gemv::tiles::applies(shape)
                        && n.checked_mul(k) == Some(values.len()) =>
                {
                    let h = super::tile_height();
                    super::gemv::tiles::append(values, (n, k), h, &mut bits, to_bits)
                }
                _ => bits.extend(values.iter().map(|&v| to_bits(v))),
            }
            CpuTensor::from_bf16_stored(shape, bits)
        } else {
            let rounded = values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            CpuTensor::new(shape, rounded)
        }
    }
}

impl Backend for CpuBf16 {
    type Tensor = CpuTensor;

    fn dtype(&self) -> crate::DType {
        crate::DType::BF16
    }

    fn describe(&self) -> String {
        format!(
            "cpu (bf16 weights, f32 arithmetic, {} threads, {})",
            rayon::current_num_threads(),
            super::isa::Isa::current().name()
        )
    }

    fn upload(&self, shape: &[usize], values: &[f32]) -> Result<CpuTensor> {
        Self::store(shape, values)
    }

    fn upload_owned(&self, shape: &[usize], values: Vec<f32>) -> Result<CpuTensor> {
        Self::store(shape, &values)
    }

    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Cpu.to_f32(t)
    }

    fn shape<'t>(&self, t: &'t CpuTensor) -> &'t [usize] {
        t.shape()
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        Cpu.linear(x, w, bias, act)
    }

    fn batched_matmul_nt(&self, a: &CpuTensor, b: &CpuTensor, batch: usize) -> Result<CpuTensor> {
        Cpu.batched_matmul_nt(a, b, batch)
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        Cpu.add(a, b)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        Cpu.layer_norm(x, residual, gamma, beta, eps)
    }

    fn gather_rows(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        Cpu.gather_rows(table, ids)
    }

    fn attention(
        &self,
        q: Heads<'_, CpuTensor>,
        k: Heads<'_, CpuTensor>,
        v: Heads<'_, CpuTensor>,
        mask: &AttentionMask<'_>,
    ) -> Result<CpuTensor> {
        Cpu.attention(q, k, v, mask)
    }

    fn attention_packed(
        &self,
        q: Heads<'_, CpuTensor>,
        k: Heads<'_, CpuTensor>,
        v: Heads<'_, CpuTensor>,
        lens: &[usize],
        window: Option<crate::runtime::backend::Window>,
        scale: Option<f32>,
    ) -> Result<Option<CpuTensor>> {
        Cpu.attention_packed(q, k, v, lens, window, scale)
    }

    fn lanes(&self) -> usize {
        Cpu.lanes()
    }

    fn run_lanes(&self, lanes: usize, work: &(dyn Fn() + Sync)) {
        Cpu.run_lanes(lanes, work)
    }
}

impl crate::runtime::generate::GenerateBackend for CpuBf16 {
    fn kv_cache(
        &self,
        layers: usize,
        batch: usize,
        capacity: usize,
        width: usize,
    ) -> Result<Option<Box<dyn crate::runtime::kv_cache::StepKvCache<Self>>>> {
        use crate::runtime::kv_cache::{HostKvCache, HostKvCacheBf16};
        let cache = HostKvCache::new(layers, batch, capacity, width)?;
        Ok(Some(Box::new(HostKvCacheBf16(cache))))
    }
}
