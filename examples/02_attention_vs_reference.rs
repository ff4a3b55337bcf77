//! The fused attention kernel on random f16 inputs, compared with the f64 CPU reference.
//! Without a GPU it says so and exits cleanly.
//!
//!     cargo run --release --example 02_attention_vs_reference

use cuattn::ops::attention::{forward, Options};
use cuattn::reference::attention as reference;
use cuattn::{DType, HostTensor};
use rand::{Rng, SeedableRng};

fn main() -> cuattn::Result<()> {
    let gpu = match cuattn::gpu::Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: {e}");
            return Ok(());
        }
    };
    // [batch, heads, len, dim] for Q, K and V.
    let (b, h, l, d) = (2, 4, 128, 64);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
    let mut random = |n: usize| -> cuattn::Result<HostTensor> {
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        HostTensor::from_f32(DType::F16, &[b, h, l, d], &v)
    };
    let n = b * h * l * d;
    let (q, k, v) = (random(n)?, random(n)?, random(n)?);
    let (o, _lse) = forward(
        &gpu.upload(&q)?,
        &gpu.upload(&k)?,
        &gpu.upload(&v)?,
        &Options::default(),
    )?;
    let got = o.to_f32_vec()?;
    // The reference sees the same f16-rounded inputs, in f64.
    let shape = reference::Shape::new(b, h, h, l, l, d, d);
    let want = reference::forward(
        &q.to_f32_vec(),
        &k.to_f32_vec(),
        &v.to_f32_vec(),
        &shape,
        &reference::Options::new(d),
    )?;
    let max_err = got
        .iter()
        .zip(&want.o)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    println!(
        "attention {b}x{h}x{l}x{d} f16 on {}: max |kernel - reference| = {max_err:.2e}",
        gpu.info().name
    );
    Ok(())
}
