//! Training-op kernels held to the f64 CPU references on the GPU: random shapes, dtypes and
//! options (proptest) through `cuattn::check::training` (NaN-poisoned outputs, the tolerance
//! rule, bitwise repeats of the deterministic ops), the standard `cuattn check` list, and bad
//! input through the public API (typed errors, no launch).

use cuattn::check::gpu_or_skip;
use cuattn::check::training as check;
use cuattn::ops::training::cross_entropy::{cross_entropy_into, CrossEntropyOptions};
use cuattn::ops::training::dropout::{dropout_into, DropoutOptions};
use cuattn::ops::training::embedding::{embedding_backward_into, EmbeddingBackwardOptions};
use cuattn::ops::training::optimizer::{adamw_step, AdamWOptions};
use cuattn::reference::training::Gelu;
use cuattn::{DType, Error};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

#[test]
fn bias_gelu_forward_and_fused_backward_match_the_reference() {
    let Some(gpu) = gpu_or_skip("bias_gelu_forward_and_fused_backward_match_the_reference") else {
        return;
    };
    let s = (
        dtype(),
        any::<bool>(),
        1usize..300,
        prop_oneof![1usize..70, prop::sample::select(vec![768usize, 3072, 4099])],
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    crate::run_proptest(
        "bias_gelu",
        s,
        24,
        |(dt, f32_db, rows, cols, tanh, bias, seed)| {
            let rows = rows.min((1 << 20) / cols).max(1);
            let db = if f32_db { DType::F32 } else { dt };
            let gelu = if tanh { Gelu::Tanh } else { Gelu::Erf };
            check::bias_gelu(&gpu, dt, db, (rows, cols), gelu, bias, seed)
        },
    );
}

#[test]
fn column_sums_match_the_reference_and_accumulate() {
    let Some(gpu) = gpu_or_skip("column_sums_match_the_reference_and_accumulate") else {
        return;
    };
    let s = (
        dtype(),
        any::<bool>(),
        1usize..5000,
        1usize..1200,
        any::<u64>(),
    );
    crate::run_proptest("column_sums", s, 24, |(dt, f32_out, rows, cols, seed)| {
        let rows = rows.min((1 << 21) / cols).max(1);
        let out = if f32_out { DType::F32 } else { dt };
        check::column_sums(&gpu, dt, out, (rows, cols), seed)
    });
}

#[test]
fn cross_entropy_loss_and_gradient_match_the_reference() {
    let Some(gpu) = gpu_or_skip("cross_entropy_loss_and_gradient_match_the_reference") else {
        return;
    };
    let classes = prop_oneof![1usize..100, 100usize..5000, Just(50257usize)];
    let s = (
        dtype(),
        1usize..64,
        classes,
        prop::sample::select(vec![0.0f32, 0.1, 0.5]),
        0usize..4,
        any::<bool>(),
        any::<u64>(),
    );
    crate::run_proptest(
        "cross_entropy",
        s,
        24,
        |(dt, rows, classes, eps, ignore_every, in_place, seed)| {
            let rows = rows.min((1 << 21) / classes).max(1);
            check::cross_entropy(&gpu, dt, (rows, classes), eps, ignore_every, in_place, seed)
        },
    );
}

#[test]
fn embedding_backward_is_a_deterministic_scatter_add() {
    let Some(gpu) = gpu_or_skip("embedding_backward_is_a_deterministic_scatter_add") else {
        return;
    };
    let s = (
        dtype(),
        any::<bool>(),
        1usize..2000,
        1usize..1100,
        1usize..5000,
        any::<u64>(),
    );
    crate::run_proptest(
        "embedding_bwd",
        s,
        24,
        |(dt, f32_table, tokens, width, vocab, seed)| {
            let table = if f32_table { DType::F32 } else { dt };
            let tokens = tokens.min((1 << 20) / width).max(1);
            let vocab = vocab.min((1 << 22) / width).max(1);
            check::embedding_backward(&gpu, dt, table, (tokens, width, vocab), seed)
        },
    );
}

#[test]
fn multi_tensor_adamw_matches_torchs_formula() {
    let Some(gpu) = gpu_or_skip("multi_tensor_adamw_matches_torchs_formula") else {
        return;
    };
    let numels = prop::collection::vec(prop_oneof![1usize..100, 60000usize..140000], 1..6);
    let s = (dtype(), any::<bool>(), numels, any::<u64>());
    crate::run_proptest("adamw", s, 12, |(gd, bf16, numels, seed)| {
        let md = if bf16 { DType::BF16 } else { DType::F16 };
        check::adamw(&gpu, gd, md, &numels, 3, seed)
    });
}

#[test]
fn gradient_norm_and_clipping_match_clip_grad_norm() {
    let Some(gpu) = gpu_or_skip("gradient_norm_and_clipping_match_clip_grad_norm") else {
        return;
    };
    let numels = prop::collection::vec(prop_oneof![1usize..100, 60000usize..200000], 1..6);
    let s = (
        dtype(),
        numels,
        prop::sample::select(vec![0.5f32, 1.0, 1e6]),
        any::<u64>(),
    );
    crate::run_proptest("clip_grad_norm", s, 16, |(dt, numels, max_norm, seed)| {
        check::clip_grad_norm(&gpu, dt, &numels, max_norm, seed)
    });
}

#[test]
fn dropout_masks_equal_the_cpu_philox_and_rescale_by_one_over_one_minus_p() {
    let Some(gpu) =
        gpu_or_skip("dropout_masks_equal_the_cpu_philox_and_rescale_by_one_over_one_minus_p")
    else {
        return;
    };
    let s = (
        dtype(),
        1usize..300_000,
        prop::sample::select(vec![0.0f32, 0.1, 0.5, 0.9, 1.0]),
        any::<u64>(),
    );
    crate::run_proptest("dropout", s, 24, |(dt, n, p, seed)| {
        check::dropout(&gpu, dt, n, p, seed)
    });
}

#[test]
fn the_standard_training_checks_pass() {
    let Some(gpu) = gpu_or_skip("the_standard_training_checks_pass") else {
        return;
    };
    for (name, run) in check::standard_cases() {
        run(&gpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn training_ops_reject_bad_input_with_typed_errors() {
    let Some(gpu) = gpu_or_skip("training_ops_reject_bad_input_with_typed_errors") else {
        return;
    };
    let logits = gpu.full(DType::F32, &[2, 5], 0.0).unwrap();
    let opts = CrossEntropyOptions::default();
    let bad_label = cross_entropy_into(&gpu, &opts, &logits.view(), &[1, 5], None);
    assert!(matches!(
        bad_label,
        Err(Error::InvalidArgument { arg: "labels", .. })
    ));
    let short = cross_entropy_into(&gpu, &opts, &logits.view(), &[1], None);
    assert!(matches!(short, Err(Error::Shape { arg: "labels", .. })));
    let smoothing = CrossEntropyOptions {
        label_smoothing: 1.5,
        ..opts
    };
    assert!(matches!(
        cross_entropy_into(&gpu, &smoothing, &logits.view(), &[1, 1], None),
        Err(Error::InvalidArgument {
            arg: "label_smoothing",
            ..
        })
    ));

    let dy = gpu.full(DType::F16, &[3, 4], 0.0).unwrap();
    let mut table = gpu.full(DType::F32, &[6, 4], 0.0).unwrap();
    let far = embedding_backward_into(
        &gpu,
        &EmbeddingBackwardOptions::default(),
        &dy.view(),
        &[0, 6, 1],
        &mut table.view_mut(),
    );
    assert!(matches!(
        far,
        Err(Error::InvalidArgument { arg: "ids", .. })
    ));
    let mut narrow = gpu.full(DType::F32, &[6, 3], 0.0).unwrap();
    let width = embedding_backward_into(
        &gpu,
        &EmbeddingBackwardOptions::default(),
        &dy.view(),
        &[0, 1, 2],
        &mut narrow.view_mut(),
    );
    assert!(matches!(width, Err(Error::Shape { arg: "dtable", .. })));

    let x = gpu.full(DType::BF16, &[10], 1.0).unwrap();
    let mut y = gpu.full(DType::BF16, &[10], 0.0).unwrap();
    let p = DropoutOptions {
        p: 1.5,
        seed: 0,
        offset: 0,
    };
    assert!(matches!(
        dropout_into(&gpu, &p, &x.view(), &mut y.view_mut()),
        Err(Error::InvalidArgument { arg: "p", .. })
    ));
    let mut wrong = gpu.full(DType::F32, &[10], 0.0).unwrap();
    let p = DropoutOptions { p: 0.5, ..p };
    assert!(matches!(
        dropout_into(&gpu, &p, &x.view(), &mut wrong.view_mut()),
        Err(Error::DType { arg: "y", .. })
    ));

    assert!(matches!(
        adamw_step(&gpu, &AdamWOptions::default(), 0, &mut [], None),
        Err(Error::InvalidArgument { arg: "step", .. })
    ));
    let beta = AdamWOptions {
        beta2: 1.0,
        ..AdamWOptions::default()
    };
    assert!(matches!(
        adamw_step(&gpu, &beta, 1, &mut [], None),
        Err(Error::InvalidArgument { arg: "beta2", .. })
    ));
}
