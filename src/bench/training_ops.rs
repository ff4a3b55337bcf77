//! `cuattn bench training-ops`: every training op at the sizes a BERT-base / GPT-2-small
//! training step uses, as time, GB/s (bytes each kernel must move, 10^9/s) and percent of the
//! measured copy bandwidth. The AdamW target is ≥ 80 % of copy.

use super::time_us;
use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::training::bias_gelu::{self, BiasGeluOptions, ColumnSumOptions};
use crate::ops::training::cross_entropy::{self, CrossEntropyOptions};
use crate::ops::training::dropout::{self, DropoutOptions};
use crate::ops::training::embedding::{self, EmbeddingBackwardOptions};
use crate::ops::training::optimizer::{self, AdamWOptions, AdamWTensor, ClipOptions};
use crate::reference::training::Gelu;
use std::sync::Arc;

/// One measured op.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub op: String,
    pub dtype: DType,
    pub shape: String,
    pub time_us: f64,
    /// Bytes the op must read and write (what the GB/s divides).
    pub bytes: f64,
    pub gbs: f64,
    pub pct_copy: f64,
}

fn row(op: &str, dtype: DType, shape: String, bytes: f64, us: f64, copy_gbs: f64) -> Row {
    let gbs = bytes / us / 1e3;
    Row {
        op: op.into(),
        dtype,
        shape,
        time_us: us,
        bytes,
        gbs,
        pct_copy: 100.0 * gbs / copy_gbs,
    }
}

/// Runs the table for `dtypes` (activations and gradients; optimizer state is f32).
pub fn run(gpu: &Arc<Gpu>, dtypes: &[DType], quick: bool, copy_gbs: f64) -> Result<Vec<Row>> {
    let (warmup, iters) = if quick { (1, 3) } else { (5, 30) };
    // Tokens of a step: batch 16 × 512 (quick: 8 × 128).
    let tokens = if quick { 1024 } else { 8192 };
    let (hidden, ffn, vocab) = (768usize, 3072usize, 50257usize);
    let mut out = Vec::new();
    for &dt in dtypes {
        let s = dt.size_bytes() as f64;
        // Bias + GELU over the FFN activations.
        let x = gpu.random(dt, &[tokens, ffn], 1, 0.0, 2.0)?;
        let b = gpu.random(dt, &[ffn], 2, 0.0, 1.0)?;
        let dy = gpu.random(dt, &[tokens, ffn], 3, 0.0, 1.0)?;
        let mut y = gpu.zeros(dt, &[tokens, ffn])?;
        let mut dbias = gpu.zeros(DType::F32, &[ffn])?;
        let opts = BiasGeluOptions {
            gelu: Gelu::Tanh,
            accumulate_dbias: false,
        };
        let n = (tokens * ffn) as f64;
        let us = time_us(gpu, warmup, iters, || {
            bias_gelu::bias_gelu_forward_into(
                gpu,
                &opts,
                &x.view(),
                Some(&b.view()),
                &mut y.view_mut(),
            )
        })?;
        out.push(row(
            "bias_gelu_fwd",
            dt,
            format!("{tokens}x{ffn}"),
            2.0 * n * s,
            us,
            copy_gbs,
        ));
        let us = time_us(gpu, warmup, iters, || {
            bias_gelu::bias_gelu_backward_into(
                gpu,
                &opts,
                &dy.view(),
                &x.view(),
                Some(&b.view()),
                &mut y.view_mut(),
                &mut dbias.view_mut(),
            )
        })?;
        out.push(row(
            "bias_gelu_bwd",
            dt,
            format!("{tokens}x{ffn}"),
            3.0 * n * s,
            us,
            copy_gbs,
        ));
        let us = time_us(gpu, warmup, iters, || {
            bias_gelu::column_sums_into(
                gpu,
                &ColumnSumOptions::default(),
                &dy.view(),
                &mut dbias.view_mut(),
            )
        })?;
        out.push(row(
            "column_sums",
            dt,
            format!("{tokens}x{ffn}"),
            n * s,
            us,
            copy_gbs,
        ));
        drop((x, dy, y));

        // Dropout over the hidden states.
        let h = gpu.random(dt, &[tokens, hidden], 4, 0.0, 1.0)?;
        let mut hy = gpu.zeros(dt, &[tokens, hidden])?;
        let d = DropoutOptions {
            p: 0.1,
            seed: 1,
            offset: 0,
        };
        let nh = (tokens * hidden) as f64;
        let us = time_us(gpu, warmup, iters, || {
            dropout::dropout_into(gpu, &d, &h.view(), &mut hy.view_mut())
        })?;
        out.push(row(
            "dropout",
            dt,
            format!("{tokens}x{hidden}"),
            2.0 * nh * s,
            us,
            copy_gbs,
        ));

        // Embedding backward into an f32 table (the zeroing memset is part of the op).
        let ids: Vec<u32> = (0..tokens as u32).map(|t| (t * 7919) % 30522).collect();
        let mut table = gpu.zeros(DType::F32, &[30522, hidden])?;
        let us = time_us(gpu, warmup, iters, || {
            embedding::embedding_backward_into(
                gpu,
                &EmbeddingBackwardOptions::default(),
                &h.view(),
                &ids,
                &mut table.view_mut(),
            )
        })?;
        let touched = ids.iter().collect::<std::collections::BTreeSet<_>>().len() as f64;
        let bytes = nh * s + 30522.0 * hidden as f64 * 4.0 + touched * hidden as f64 * 8.0;
        out.push(row(
            "embedding_bwd",
            dt,
            format!("{tokens}x{hidden}→30522"),
            bytes,
            us,
            copy_gbs,
        ));
        drop((h, hy, table));

        // Cross-entropy over the LM head's logits, gradient in place.
        let rows = if quick { 256 } else { 4096 };
        let mut logits = gpu.random(dt, &[rows, vocab], 5, 0.0, 4.0)?;
        let labels: Vec<i32> = (0..rows as i32).map(|r| (r * 131) % vocab as i32).collect();
        let ce = CrossEntropyOptions::default();
        let us = time_us(gpu, warmup, iters, || {
            cross_entropy::cross_entropy_in_place(gpu, &ce, &mut logits.view_mut(), &labels)
                .map(|_| ())
        })?;
        let nl = (rows * vocab) as f64;
        out.push(row(
            "cross_entropy",
            dt,
            format!("{rows}x{vocab}"),
            3.0 * nl * s,
            us,
            copy_gbs,
        ));
        drop(logits);

        // Gradient norm, clipping and AdamW over GPT-2 small's parameter count as one flat
        // tensor (split into many tensors only the chunk table changes).
        let params = if quick { 1 << 22 } else { 124_439_808 };
        let mut grads = gpu.random(dt, &[params], 6, 0.0, 1e-3)?;
        let us = time_us(gpu, warmup, iters, || {
            optimizer::grad_norm(gpu, &[grads.view()], 1.0).map(|_| ())
        })?;
        let np = params as f64;
        out.push(row(
            "grad_norm",
            dt,
            format!("{params}"),
            np * s,
            us,
            copy_gbs,
        ));
        let us = time_us(gpu, warmup, iters, || {
            optimizer::clip_grad_norm(
                gpu,
                &ClipOptions { max_norm: 1e-3 },
                &mut [grads.view_mut()],
            )
            .map(|_| ())
        })?;
        out.push(row(
            "clip_grad_norm",
            dt,
            format!("{params}"),
            3.0 * np * s,
            us,
            copy_gbs,
        ));

        // AdamW: f32 master + moments, `dt` gradients, a bf16 model copy (none for f32).
        let mut p = gpu.random(DType::F32, &[params], 7, 0.0, 1.0)?;
        let mut m = gpu.zeros(DType::F32, &[params])?;
        let mut v = gpu.zeros(DType::F32, &[params])?;
        let mut model = gpu.zeros(DType::BF16, &[params])?;
        let copy = dt != DType::F32;
        let mut step = 0u32;
        let us = time_us(gpu, warmup, iters, || {
            step += 1;
            let mut t = [AdamWTensor {
                param: p.view_mut(),
                grad: grads.view(),
                exp_avg: m.view_mut(),
                exp_avg_sq: v.view_mut(),
                model: copy.then(|| model.view_mut()),
                weight_decay: true,
            }];
            optimizer::adamw_step(gpu, &AdamWOptions::default(), step, &mut t, None)
        })?;
        let bytes = np * (12.0 + s + 12.0 + if copy { 2.0 } else { 0.0 });
        out.push(row("adamw", dt, format!("{params}"), bytes, us, copy_gbs));
    }
    Ok(out)
}

/// Prints `rows` as a table, or one JSON object with `json`.
pub fn print(gpu: &Gpu, rows: &[Row], copy_gbs: f64, json: bool) -> Result<()> {
    if json {
        let v = serde_json::json!({
            "family": "training-ops",
            "device": gpu.info().name,
            "copy_bandwidth_gbs": copy_gbs,
            "rows": rows,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "Training ops on {} (measured copy bandwidth {copy_gbs:.0} GB/s)",
        gpu.info().name
    );
    println!(
        "{:<15} {:<5} {:>22} {:>10} {:>8} {:>7}",
        "op", "dtype", "shape", "time (µs)", "GB/s", "% copy"
    );
    for r in rows {
        println!(
            "{:<15} {:<5} {:>22} {:>10.1} {:>8.0} {:>6.1}%",
            r.op, r.dtype, r.shape, r.time_us, r.gbs, r.pct_copy
        );
    }
    Ok(())
}
