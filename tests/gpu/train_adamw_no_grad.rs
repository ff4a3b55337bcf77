//! AdamW with parameters that have no gradient in a step, on the CUDA training backend (its
//! per-tensor AdamW launches with each parameter's own step count), against
//! `torch.optim.AdamW` (`tests/fixtures/adamw-no-grad.json`; the CPU side is
//! `tests/train_adamw_no_grad.rs`). Bound: the CPU test's, 4·u32·(|w| + lr) per step, doubled
//! because nvcc contracts the kernel's multiply-adds into FMAs (different roundings from
//! torch's separate operations).

use crate::adamw_no_grad::{replay, torch, worst};
use cuattn::check::gpu_or_skip;
use cuattn::runtime::cuda::Cuda;
use cuattn::DType;
use std::sync::Arc;

#[test]
fn cuda_adamw_skips_parameters_without_a_gradient_as_torch_does() {
    let Some(gpu) = gpu_or_skip("cuda_adamw_no_grad") else {
        return;
    };
    let be = Cuda::new(Arc::clone(&gpu), DType::F32).unwrap();
    let t = torch();
    let ours = replay(&be, true);
    assert_eq!(ours.param_steps, t.steps);
    let u = DType::F32.unit_roundoff();
    let (r, at) = worst(&ours, &t, |w, steps| {
        2.0 * steps as f64 * 4.0 * u * (w.abs() + t.lr)
    });
    eprintln!("CUDA AdamW with missing gradients vs torch: worst {r:.3} of the bound ({at})");
    assert!(r <= 1.0, "{r:.3} of the bound at {at}");
    // Zero gradients in their place (decayed, moments moved) are far off.
    let zeros = replay(&be, false);
    let (r, at) = worst(&zeros, &t, |w, steps| {
        2.0 * steps as f64 * 4.0 * u * (w.abs() + t.lr)
    });
    assert!(r > 100.0, "zero gradients only {r:.3} of the bound at {at}");
}
