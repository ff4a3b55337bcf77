//! A cuattn kernel (LayerNorm) on device memory the caller owns: wrap the pointers as views
//! and call the `*_with` form (tensors, then one options struct). Here the buffers come from cuattn's own allocator for brevity;
//! any allocation in the same CUDA context works the same way. Without a GPU it says so.
//!
//!     cargo run --release --example 04_kernel_on_your_buffers

use cuattn::gpu::{TensorMut, TensorRef};
use cuattn::ops::layernorm;
use cuattn::{DType, HostTensor, Layout};

fn main() -> cuattn::Result<()> {
    let gpu = match cuattn::gpu::Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: {e}");
            return Ok(());
        }
    };
    let (rows, hidden) = (4, 768);
    let values: Vec<f32> = (0..rows * hidden).map(|i| (i % 17) as f32 - 8.0).collect();
    let x_buf = gpu.upload(&HostTensor::from_f32(
        DType::BF16,
        &[rows, hidden],
        &values,
    )?)?;
    let mut y_buf = gpu.full(DType::BF16, &[rows, hidden], 0.0)?;
    let bytes = rows * hidden * DType::BF16.size_bytes();
    let (x_ptr, y_ptr) = (x_buf.view().device_ptr(), y_buf.view_mut().device_ptr());
    // A view names the context its memory belongs to: an op on another context refuses it.
    let ctx = gpu.context_id();
    // SAFETY: both pointers are live allocations of `bytes` bytes in gpu's context (x_buf and
    // y_buf outlive the views), and nothing else reads or writes them during the call.
    let x = unsafe {
        TensorRef::from_raw(
            ctx,
            x_ptr,
            bytes,
            DType::BF16,
            Layout::contiguous(&[rows, hidden]),
        )
    };
    let mut y = unsafe {
        TensorMut::from_raw(
            ctx,
            y_ptr,
            bytes,
            DType::BF16,
            Layout::contiguous(&[rows, hidden]),
        )
    };
    // The tensors, then one options struct (no affine parameters here; eps as BERT's).
    layernorm::forward_with(
        &gpu,
        &x,
        &mut y,
        layernorm::ForwardOptions {
            eps: 1e-5,
            ..Default::default()
        },
    )?;
    let out = y_buf.to_f32_vec()?;
    let mean: f32 = out[..hidden].iter().sum::<f32>() / hidden as f32;
    println!(
        "row 0 after LayerNorm: mean {mean:.3} (≈ 0), first values {:?}",
        &out[..4]
    );
    Ok(())
}
