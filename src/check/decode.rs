//! Decode attention ([`crate::ops::decode`]) against [`crate::reference::attention`] with one
//! query row per head and the cache lengths as key padding, under
//! [`crate::tolerance::attention`]. O and LSE are poisoned with NaN before the launch, and every
//! cache row at or past a sequence's length holds NaN: a kernel that reads one shows it.

use super::attention::{expect_o_and_lse, poison_keys, upload_4d};
use super::{random_values, CheckResult};
use crate::dtype::DType;
use crate::gpu::Gpu;
use crate::ops::decode::{self as decode, CacheLens, Options};
use crate::reference::attention::{self as reference, Shape};
use crate::tolerance::attention as tolerances;
use rand::SeedableRng;
use std::sync::Arc;

/// One randomized decode check.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub capacity: usize,
    pub dim: usize,
    /// Cache length per sequence (0..=capacity).
    pub lens: Vec<usize>,
    /// Lay the caches out as [B, capacity, Hkv, D] memory (read through strides).
    pub bshd: bool,
    /// Force the number of splits; `None`: the planner's choice.
    pub splits: Option<usize>,
    /// Pass the lengths as a device buffer (`CacheLens::Device`, max_len = capacity), each
    /// shifted by the offset given here: lengths outside 0..=capacity must act clamped.
    pub device_lens: Option<Vec<i32>>,
    pub seed: u64,
}

impl Case {
    pub fn new(
        dtype: DType,
        (batch, heads_q, heads_kv, dim): (usize, usize, usize, usize),
        lens: Vec<usize>,
    ) -> Case {
        let capacity = lens.iter().copied().max().unwrap_or(0).max(1);
        Case {
            dtype,
            batch,
            heads_q,
            heads_kv,
            capacity,
            dim,
            seed: 0xdec0de ^ (capacity * 131 + dim) as u64,
            lens,
            bshd: false,
            splits: None,
            device_lens: None,
        }
    }
}

fn err(e: crate::Error) -> String {
    e.to_string()
}

/// Runs the case and checks O and LSE.
pub fn forward(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let ctx = |what: &str| {
        format!(
            "{what} for {} B{} Hq{} Hkv{} cap{} D{} lens {:?} bshd {} splits {:?} device {:?}",
            c.dtype,
            c.batch,
            c.heads_q,
            c.heads_kv,
            c.capacity,
            c.dim,
            c.lens,
            c.bshd,
            c.splits,
            c.device_lens
        )
    };
    if c.lens.len() != c.batch {
        return Err(ctx("one length per sequence needed"));
    }
    let s = Shape::new(c.batch, c.heads_q, c.heads_kv, 1, c.capacity, c.dim, c.dim);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(c.seed);
    let q = random_values(&mut rng, c.dtype, s.q_len(), 0.0, 2.0);
    let k = random_values(&mut rng, c.dtype, s.k_len(), 0.0, 2.0);
    let v = random_values(&mut rng, c.dtype, s.v_len(), 0.0, 1.0);
    // Rows at or past each sequence's length: NaN in the copies uploaded to the device.
    let (mut kp, mut vp) = (k.clone(), v.clone());
    poison_keys(&mut kp, &mut vp, &s, |b, j| j >= c.lens[b]);
    let cache = [c.batch, c.heads_kv, c.capacity, c.dim];
    let kd = upload_4d(gpu, c.dtype, cache, c.bshd, Some(&kp), f32::NAN)?;
    let vd = upload_4d(gpu, c.dtype, cache, c.bshd, Some(&vp), f32::NAN)?;
    let qd = upload_4d(
        gpu,
        c.dtype,
        [c.batch, c.heads_q, 1, c.dim],
        false,
        Some(&q),
        0.0,
    )?;
    let q_view = qd
        .view_at(
            0,
            crate::tensor::Layout::contiguous(&[c.batch, c.heads_q, c.dim]),
        )
        .map_err(err)?;
    let mut od = gpu
        .full(c.dtype, &[c.batch, c.heads_q, c.dim], f32::NAN)
        .map_err(err)?;
    let mut lse = gpu
        .full(DType::F32, &[c.batch, c.heads_q], f32::NAN)
        .map_err(err)?;
    let host_lens: Vec<i32> = c.lens.iter().map(|&l| l as i32).collect();
    let device_lens = match &c.device_lens {
        None => None,
        Some(offsets) => {
            let shifted: Vec<i32> = host_lens.iter().zip(offsets).map(|(l, o)| l + o).collect();
            Some(
                gpu.stream()
                    .clone_htod(&shifted)
                    .map_err(|e| ctx(&format!("upload lengths: {e:?}")))?,
            )
        }
    };
    let lens = match &device_lens {
        None => CacheLens::Host(&host_lens),
        Some(d) => CacheLens::Device {
            lens: d,
            max_len: c.capacity,
        },
    };
    let opts = Options {
        scale: None,
        splits: c.splits,
    };
    decode::forward_into(
        gpu,
        &q_view,
        &kd.view(),
        &vd.view(),
        lens,
        &mut od.view_mut(),
        Some(&mut lse.view_mut()),
        &opts,
    )
    .map_err(|e| ctx(&e.to_string()))?;
    // The expected lengths: a device length outside 0..=capacity acts clamped.
    let effective: Vec<usize> = match &c.device_lens {
        None => c.lens.clone(),
        Some(offsets) => host_lens
            .iter()
            .zip(offsets)
            .map(|(l, o)| (l + o).clamp(0, c.capacity as i32) as usize)
            .collect(),
    };
    let ropts = reference::Options {
        key_lens: Some(effective),
        ..reference::Options::new(c.dim)
    };
    let want = reference::forward(&q, &k, &v, &s, &ropts).map_err(|e| e.to_string())?;
    let tol = tolerances::bounds(&q, &k, &v, &s, ropts.scale, c.dtype);
    expect_o_and_lse(&ctx, (&od, &lse), &want, &tol)
}

/// The fixed list `cuattn check` runs.
pub fn standard_cases() -> Vec<(String, Case)> {
    let mut out = Vec::new();
    for dt in DType::ALL {
        out.push((
            format!("{dt} gqa 32/8 d128 len 4096"),
            Case::new(dt, (1, 32, 8, 128), vec![4096]),
        ));
        out.push((
            format!("{dt} mha 12 d64 lens 0..1000 bshd"),
            Case {
                bshd: true,
                ..Case::new(dt, (4, 12, 12, 64), vec![1000, 0, 1, 517])
            },
        ));
        out.push((
            format!("{dt} gqa 8/1 d80 len 20000, 1"),
            Case::new(dt, (2, 8, 1, 80), vec![20000, 1]),
        ));
    }
    out
}
