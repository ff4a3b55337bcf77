//! Decode attention benchmark: one query token per sequence against a KV cache, as in token
//! by token generation. Head dim 128, 32 query heads sharing 8 key/value heads (GQA), cache
//! lengths 4k to 128k, batch 1 and 8, BHSD caches. The kernel streams K and V once, so it is
//! judged by bandwidth: bytes = K + V read (B·Hkv·L·D each) + q read + O written, against the
//! measured device-to-device copy bandwidth.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::decode::{self as decode, CacheLens, Options};
use serde::Serialize;
use std::sync::Arc;

/// One benchmark row; `cuattn bench decode --json` prints a list of these.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub op: &'static str,
    pub dtype: DType,
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub len: usize,
    pub dim: usize,
    /// Key splits the planner chose.
    pub splits: usize,
    pub bytes: f64,
    pub time_us: f64,
    pub gbs: f64,
    pub pct_copy: f64,
}

pub const HEADS_Q: usize = 32;
pub const HEADS_KV: usize = 8;
pub const DIM: usize = 128;

/// (batch, cache length) of every benchmark shape.
pub fn shapes(quick: bool) -> Vec<(usize, usize)> {
    let lens: &[usize] = if quick {
        &[4096, 8192]
    } else {
        &[4096, 8192, 16384, 32768, 65536, 131072]
    };
    let batches: &[usize] = if quick { &[1] } else { &[1, 8] };
    batches
        .iter()
        .flat_map(|&b| lens.iter().map(move |&l| (b, l)))
        .collect()
}

/// Bytes one call moves at the minimum: K and V read once, q read, O written.
pub fn bytes(dtype: DType, batch: usize, len: usize) -> f64 {
    let e = dtype.size_bytes() as f64;
    let kv = 2.0 * (batch * HEADS_KV * len * DIM) as f64 * e;
    let qo = 2.0 * (batch * HEADS_Q * DIM) as f64 * e;
    kv + qo
}

/// Times every (dtype, batch, length).
pub fn run(gpu: &Arc<Gpu>, dtypes: &[DType], quick: bool, copy_gbs: f64) -> Result<Vec<Row>> {
    let (warmup, iters) = if quick { (1, 3) } else { (3, 20) };
    let mut out = Vec::new();
    for &dt in dtypes {
        for (batch, len) in shapes(quick) {
            let cache = [batch, HEADS_KV, len, DIM];
            let k = gpu.random(dt, &cache, 21, 0.0, 1.0)?;
            let v = gpu.random(dt, &cache, 22, 0.0, 1.0)?;
            let q = gpu.random(dt, &[batch, HEADS_Q, DIM], 23, 0.0, 1.0)?;
            let mut o = gpu.full(dt, &[batch, HEADS_Q, DIM], 0.0)?;
            let mut lse = gpu.full(DType::F32, &[batch, HEADS_Q], 0.0)?;
            // Lengths stay on the device, as in a generation loop.
            let lens = gpu
                .stream()
                .clone_htod(&vec![len as i32; batch])
                .map_err(|e| Error::driver("copy host to device", e))?;
            let lens = CacheLens::Device {
                lens: &lens,
                max_len: len,
            };
            let (qv, kv, vv) = (q.view(), k.view(), v.view());
            let opts = Options::default();
            let us = super::time_us(gpu, warmup, iters, || {
                decode::forward_into(
                    gpu,
                    &qv,
                    &kv,
                    &vv,
                    lens,
                    &mut o.view_mut(),
                    Some(&mut lse.view_mut()),
                    &opts,
                )
            })?;
            let b = bytes(dt, batch, len);
            let gbs = b / (us * 1e-6) / 1e9;
            out.push(Row {
                op: "decode",
                dtype: dt,
                batch,
                heads_q: HEADS_Q,
                heads_kv: HEADS_KV,
                len,
                dim: DIM,
                splits: decode::planned_splits(gpu, dt, (batch, HEADS_Q, HEADS_KV, DIM), len)?,
                bytes: b,
                time_us: us,
                gbs,
                pct_copy: 100.0 * gbs / copy_gbs,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_4k_to_128k_at_batch_1_and_8() {
        let s = shapes(false);
        assert_eq!(s.len(), 12);
        assert!(s.contains(&(1, 4096)) && s.contains(&(8, 131072)));
        // f16, B = 1, 4k: K and V 2·8·4096·128·2 bytes, q and O 2·32·128·2.
        assert_eq!(bytes(DType::F16, 1, 4096), 16_777_216.0 + 16_384.0);
    }
}
