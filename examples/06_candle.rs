//! cuattn's ops on candle tensors (feature `candle`): causal attention with key padding and
//! its log-sum-exp, one decode step against a KV cache, and a LayerNorm whose gradients
//! candle's autograd takes from cuattn's backward.
//!
//! `cargo run --release --features candle --example 06_candle` runs the CPU path (candle's CPU
//! storage). With `--features candle-cuda` on a machine with a GPU the same calls on
//! `Device::new_cuda(0)` run cuattn's kernels on candle's stream and memory.

use candle_core::{DType, Device, Tensor, Var};
use cuattn::candle::{self as cc, AttentionOptions, CausalAlign};

fn main() -> candle_core::Result<()> {
    let device = pick_device();
    println!("device: {device:?}");
    let (batch, heads_q, heads_kv, len, dim) = (2, 8, 2, 64, 64);

    // Grouped-query causal attention; the second sequence has 40 valid keys.
    let q = Tensor::randn(0f32, 1.0, (batch, heads_q, len, dim), &device)?.to_dtype(DType::BF16)?;
    let k =
        Tensor::randn(0f32, 1.0, (batch, heads_kv, len, dim), &device)?.to_dtype(DType::BF16)?;
    let v =
        Tensor::randn(0f32, 1.0, (batch, heads_kv, len, dim), &device)?.to_dtype(DType::BF16)?;
    let opts = AttentionOptions {
        causal: Some(CausalAlign::BottomRight),
        key_lens: Some(vec![len, 40]),
        ..Default::default()
    };
    let (o, lse) = cc::attention_with_lse(&q, &k, &v, &opts)?;
    println!(
        "attention: O {:?} {:?}, LSE {:?}",
        o.dims(),
        o.dtype(),
        lse.dims()
    );

    // One decode step: the newest query of each sequence against its cache.
    let q_step = q.narrow(2, len - 1, 1)?.squeeze(2)?;
    let o_step = cc::decode(&q_step, &k, &v, &[len, 40], None)?;
    // With bottom-right alignment, the last query row of the causal call sees the same keys.
    let last_row = o.narrow(2, len - 1, 1)?.squeeze(2)?;
    let diff = (o_step.to_dtype(DType::F32)? - last_row.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "decode: O {:?}; max |decode − last causal row| = {diff:.2e}",
        o_step.dims()
    );

    // LayerNorm through candle's autograd.
    let hidden = 256;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (16, hidden), &device)?)?;
    let gamma = Var::from_tensor(&Tensor::ones(hidden, DType::F32, &device)?)?;
    let beta = Var::from_tensor(&Tensor::zeros(hidden, DType::F32, &device)?)?;
    let y = cc::layer_norm(&x, &gamma, &beta, 1e-5)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    let dgamma = grads
        .get(gamma.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no dgamma".into()))?;
    println!(
        "layer norm: y {:?}, Σ dγ = {:.3} (≈ 2·rows·hidden: Σ x̂² per row ≈ hidden)",
        y.dims(),
        dgamma.sum_all()?.to_scalar::<f32>()?
    );
    Ok(())
}

/// The first CUDA device when the build has `candle-cuda` and one is present, else the CPU.
fn pick_device() -> Device {
    #[cfg(feature = "candle-cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}
