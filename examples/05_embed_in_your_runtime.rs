//! cuattn inside another runtime, in Rust: the runtime owns the stream and the memory; cuattn
//! gets a handle on that stream, views of the runtime's buffers, device-side lengths and a
//! workspace sized up front, so the calls queue kernels and nothing else (no upload, no
//! allocation, no synchronisation). docs/embedding.md explains each step.
//!
//! `cargo run --release --example 05_embed_in_your_runtime`: on a machine without a GPU it runs the CPU
//! reference and says the GPU part was skipped.

use cuattn::gpu::{ContextId, Gpu, I32View, TensorMut, TensorRef};
use cuattn::ops::{attention, decode};
use cuattn::reference::attention as reference;
use cuattn::{DType, HostTensor, Layout, Result};

fn main() -> Result<()> {
    let (b, h, l, d) = (2usize, 4usize, 64usize, 64usize);
    let values = |seed: usize, n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0) - 1.0)
            .collect()
    };
    let n = b * h * l * d;
    let (q, k, v) = (values(1, n), values(2, n), values(3, n));

    // The CPU reference is an ordinary function returning Result: bad sizes are errors.
    let shape = reference::Shape::new(b, h, h, l, l, d, d);
    let opts = reference::Options {
        causal: Some(reference::CausalAlign::BottomRight),
        key_lens: Some(vec![64, 17]),
        ..reference::Options::new(d)
    };
    let want = reference::forward(&q, &k, &v, &shape, &opts)?;
    println!("CPU reference: {} outputs", want.o.len());

    let gpu = match Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            println!("GPU part skipped: {e}");
            return Ok(());
        }
    };

    // 1. The runtime's stream (here a new one; a raw CUstream goes through on_raw_stream).
    let stream = gpu
        .context()
        .new_stream()
        .map_err(|e| cuattn::Error::driver("stream", e))?;
    let run = gpu.on_stream(stream)?;

    // 2. The runtime's buffers (here allocated by cuattn; any device pointer of this context
    //    works through TensorRef::from_raw with the context's id).
    let up = |x: &[f32]| run.upload(&HostTensor::from_f32(DType::F16, &[b, h, l, d], x)?);
    let (dq, dk, dv) = (up(&q)?, up(&k)?, up(&v)?);
    let dout = run.zeros(DType::F16, &[b, h, l, d])?;
    let ctx: ContextId = run.context_id();
    let layout = Layout::contiguous(&[b, h, l, d]);
    // SAFETY: each pointer is a live allocation of `ctx` of n f16 values, borrowed for the
    // calls below, and only this stream touches them meanwhile.
    let (qv, kv, vv, mut ov) = unsafe {
        (
            TensorRef::from_raw(
                ctx,
                dq.view().device_ptr(),
                n * 2,
                DType::F16,
                layout.clone(),
            ),
            TensorRef::from_raw(
                ctx,
                dk.view().device_ptr(),
                n * 2,
                DType::F16,
                layout.clone(),
            ),
            TensorRef::from_raw(
                ctx,
                dv.view().device_ptr(),
                n * 2,
                DType::F16,
                layout.clone(),
            ),
            TensorMut::from_raw(ctx, dout.view().device_ptr(), n * 2, DType::F16, layout),
        )
    };

    // 3. Key lengths that live on the device: the call uploads nothing.
    let lens = run
        .stream()
        .clone_htod(&[64i32, 17])
        .map_err(|e| cuattn::Error::driver("upload lengths", e))?;
    let options = attention::Options {
        causal: Some(attention::CausalAlign::BottomRight),
        sequences: attention::Sequences::DenseDevice {
            key_lens: I32View::new(&run, &lens),
        },
        ..Default::default()
    };
    attention::forward_into(&run, &qv, &kv, &vv, &mut ov, None, &options)?;

    // 4. Decode's scratch sized and reserved once: later calls allocate nothing.
    let splits = 4;
    run.reserve_workspace(decode::workspace_bytes(b, h, d, splits))?;

    let got = dout.to_f32_vec()?; // synchronizes the stream
    let worst = got
        .iter()
        .zip(&want.o)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    println!("GPU attention on the caller's stream: max |kernel − reference| = {worst:.2e}");
    Ok(())
}
