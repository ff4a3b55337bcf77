//! The training ops, the linear-layer GEMMs, the runtime's fused ops and the CUDA training
//! backend's ops refuse memory of another context (a non-primary context on the same device)
//! with `Error::Device` naming the argument, as attention does, and leave the device usable;
//! and each op's workspace query is exactly the scratch it takes (a caller workspace of that
//! size works, one 4 bytes smaller is refused).

use cuattn::check::gpu_or_skip;
use cuattn::gpu::{DeviceTensor, Gpu};
use cuattn::ops::gemm::{Gemm, WeightGradOptions};
use cuattn::ops::training::bias_gelu::{
    bias_gelu_backward_into, bias_gelu_forward_into, column_sums_into, column_sums_workspace_bytes,
    BiasGeluOptions, ColumnSumOptions,
};
use cuattn::ops::training::cross_entropy::{
    cross_entropy_into, cross_entropy_workspace_bytes, CrossEntropyOptions,
};
use cuattn::ops::training::dropout::{dropout_into, DropoutOptions};
use cuattn::ops::training::embedding::{embedding_backward_into, EmbeddingBackwardOptions};
use cuattn::ops::training::optimizer::{
    clip_grad_norm, grad_norm, grad_norm_workspace_bytes, ClipOptions,
};
use cuattn::runtime::backend::{Activation, AttentionMask, Backend, Heads};
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::train::{AdamWStep, CrossEntropy, DropoutSite, Op, TrainBackend};
use cuattn::{DType, Error, Result};
use cudarc::driver::CudaContext;
use std::sync::Arc;

fn refused<T>(what: &str, r: Result<T>, arg: &str) {
    match r {
        Err(Error::Device { arg: a, .. }) if a == arg => {}
        Err(e) => panic!("{what}: expected Error::Device naming `{arg}`, got {e:?}"),
        Ok(_) => panic!("{what}: expected Error::Device naming `{arg}`, got Ok"),
    }
}

fn t(gpu: &Arc<Gpu>, dtype: DType, shape: &[usize]) -> DeviceTensor {
    gpu.full(dtype, shape, 0.5).unwrap()
}

#[test]
fn training_ops_gemm_and_runtime_ops_refuse_views_of_another_context() {
    let Some(gpu) = gpu_or_skip("foreign_context_training_ops") else {
        return;
    };
    let foreign_ctx = CudaContext::new_non_primary(gpu.info().ordinal, 0).unwrap();
    let foreign = Gpu::from_context(foreign_ctx.clone(), foreign_ctx.default_stream()).unwrap();
    let f32_ = DType::F32;
    let (rows, cols) = (8, 64);
    let x = t(&gpu, f32_, &[rows, cols]);
    let x_far = t(&foreign, f32_, &[rows, cols]);
    let bias = t(&gpu, f32_, &[cols]);
    let bias_far = t(&foreign, f32_, &[cols]);
    let mut y = t(&gpu, f32_, &[rows, cols]);
    let mut y_far = t(&foreign, f32_, &[rows, cols]);
    let mut dbias = t(&gpu, f32_, &[cols]);
    let mut dbias_far = t(&foreign, f32_, &[cols]);
    let opts = BiasGeluOptions::default();

    let r = bias_gelu_forward_into(&gpu, &opts, &x_far.view(), None, &mut y.view_mut());
    refused("bias_gelu forward", r, "x");
    let r = bias_gelu_forward_into(
        &gpu,
        &opts,
        &x.view(),
        Some(&bias_far.view()),
        &mut y.view_mut(),
    );
    refused("bias_gelu forward", r, "bias");
    let r = bias_gelu_forward_into(&gpu, &opts, &x.view(), None, &mut y_far.view_mut());
    refused("bias_gelu forward", r, "y");
    let mut dx = t(&gpu, f32_, &[rows, cols]);
    let r = bias_gelu_backward_into(
        &gpu,
        &opts,
        &x.view(),
        &x.view(),
        None,
        &mut dx.view_mut(),
        &mut dbias_far.view_mut(),
    );
    refused("bias_gelu backward", r, "dbias");
    let r = column_sums_into(
        &gpu,
        &ColumnSumOptions::default(),
        &x_far.view(),
        &mut dbias.view_mut(),
    );
    refused("column sums", r, "v");
    let d = DropoutOptions {
        p: 0.1,
        seed: 1,
        offset: 0,
    };
    refused(
        "dropout",
        dropout_into(&gpu, &d, &x.view(), &mut y_far.view_mut()),
        "y",
    );
    let mut table_far = t(&foreign, f32_, &[16, cols]);
    let ids: Vec<u32> = (0..rows as u32).collect();
    let r = embedding_backward_into(
        &gpu,
        &EmbeddingBackwardOptions::default(),
        &x.view(),
        &ids,
        &mut table_far.view_mut(),
    );
    refused("embedding backward", r, "dtable");
    let labels = vec![1i32; rows];
    let r = cross_entropy_into(
        &gpu,
        &CrossEntropyOptions::default(),
        &x_far.view(),
        &labels,
        None,
    );
    refused("cross entropy", r, "logits");
    refused(
        "grad norm",
        grad_norm(&gpu, &[x.view(), x_far.view()], 1.0),
        "grads",
    );
    let mut g_far = t(&foreign, f32_, &[cols]);
    refused(
        "clip",
        clip_grad_norm(
            &gpu,
            &ClipOptions { max_norm: 1.0 },
            &mut [g_far.view_mut()],
        ),
        "grads",
    );

    // The linear-layer GEMMs (skipped without cuBLAS, as the GEMM tests are).
    if let Ok(gemm) = Gemm::new(&gpu) {
        let w = t(&gpu, f32_, &[cols, cols]);
        let w_far = t(&foreign, f32_, &[cols, cols]);
        refused(
            "linear forward",
            gemm.linear_forward(&x.view(), &w_far.view(), &mut y.view_mut()),
            "w",
        );
        refused(
            "linear input grad",
            gemm.linear_input_grad(&x.view(), &w.view(), &mut y_far.view_mut()),
            "dx",
        );
        let mut dw = t(&gpu, f32_, &[cols, cols]);
        refused(
            "linear weight grad",
            gemm.linear_weight_grad(
                &WeightGradOptions::default(),
                &x_far.view(),
                &x.view(),
                &mut dw.view_mut(),
            ),
            "dy",
        );
        // The runtime's fused ops, on a backend of the primary context.
        let be = Cuda::new(gpu.clone(), f32_).unwrap();
        refused(
            "runtime linear",
            be.linear(&x, &w_far, None, Activation::GeluErf),
            "w",
        );
        refused("runtime add", be.add(&x, &x_far), "b");
        refused("runtime gather", be.gather_rows(&x_far, &[0, 1]), "table");
        let g1 = t(&gpu, f32_, &[cols]);
        refused(
            "runtime layer norm",
            be.layer_norm(&x_far, None, &g1, &bias, 1e-5),
            "x",
        );
    }
    gpu.synchronize().unwrap();
}

/// The CUDA training backend (and the inference backend's LayerNorm and attention) refuse a
/// tensor of another context at every entry, before the conversions and copies that launch on
/// raw addresses: an f16 backend, so the f32 parameters given (a foreign γ, a foreign weight)
/// would be converted first. Afterwards the device still runs a good call (no sticky fault).
#[test]
fn training_backend_ops_refuse_tensors_of_another_context() {
    let Some(gpu) = gpu_or_skip("foreign_context_training_backend") else {
        return;
    };
    let foreign_ctx = CudaContext::new_non_primary(gpu.info().ordinal, 0).unwrap();
    let foreign = Gpu::from_context(foreign_ctx.clone(), foreign_ctx.default_stream()).unwrap();
    let (f16_, f32_) = (DType::F16, DType::F32);
    let be = Cuda::new(gpu.clone(), f16_).unwrap();
    let (rows, cols) = (16, 64);
    let x = t(&gpu, f16_, &[rows, cols]);
    let x_far = t(&foreign, f16_, &[rows, cols]);
    let w_far = t(&foreign, f32_, &[cols, cols]);
    let gamma = t(&gpu, f32_, &[cols]);
    let gamma_far = t(&foreign, f32_, &[cols]);

    refused("cast", be.cast(&w_far, f16_), "t");
    let mut acc = t(&gpu, f32_, &[rows, cols]);
    refused("accumulate", be.accumulate(&mut acc, &x_far), "x");
    let mut x_far_mut = t(&foreign, f16_, &[rows, cols]);
    refused("scale", be.scale(&mut x_far_mut, 2.0), "x");
    refused("matmul", be.matmul(&x, Op::N, &w_far, Op::T), "b");
    refused("sum_rows", be.sum_rows(&x_far), "x");
    refused("sum_squares_all", be.sum_squares_all(&[&x, &x_far]), "xs");
    refused("mul", be.mul(&x, &x_far), "b");
    refused("activate", be.activate(&x_far, Activation::Relu), "x");
    refused("slice_cols", be.slice_cols(&x_far, 0, 8), "x");
    refused("concat_cols", be.concat_cols(&[&x, &x_far]), "parts");
    refused(
        "layer_norm_backward",
        be.layer_norm_backward(&x, &gamma_far, 1e-5, &x),
        "gamma",
    );
    let ids: Vec<u32> = (0..rows as u32).collect();
    refused(
        "gather_rows_backward",
        be.gather_rows_backward(&x_far, &ids, rows, None),
        "dy",
    );
    let site = DropoutSite {
        p: 0.1,
        seed: 7,
        offset: 0,
    };
    refused("dropout", be.dropout(&x_far, site), "x");
    let labels = vec![1i64; rows];
    refused(
        "cross_entropy",
        be.cross_entropy(&x_far, &labels, &CrossEntropy::default()),
        "logits",
    );
    let (mut p, g, mut v) = (
        t(&gpu, f32_, &[cols]),
        t(&gpu, f32_, &[cols]),
        t(&gpu, f32_, &[cols]),
    );
    let mut m_far = t(&foreign, f32_, &[cols]);
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
    };
    refused(
        "adamw_step",
        be.adamw_step(&mut p, &g, &mut m_far, &mut v, &hp),
        "m",
    );

    // Attention: one sequence of 16 tokens, 2 heads of 32 side by side in [16, 64].
    fn heads(tensor: &DeviceTensor) -> Heads<'_, DeviceTensor> {
        Heads {
            tensor,
            col: 0,
            heads: 2,
            dim: 32,
        }
    }
    let mask = AttentionMask {
        batch: 1,
        len_q: rows,
        len_k: rows,
        key_lens: None,
        causal: None,
        window: None,
        scale: None,
    };
    refused(
        "attention_with_lse",
        be.attention_with_lse(heads(&x), heads(&x_far), heads(&x), &mask, None),
        "k",
    );
    let (o, lse) = be
        .attention_with_lse(heads(&x), heads(&x), heads(&x), &mask, None)
        .unwrap();
    let lse_far = foreign.upload(&lse.to_host().unwrap()).unwrap();
    refused(
        "attention_backward",
        be.attention_backward(
            heads(&x),
            heads(&x),
            heads(&x),
            &o,
            &lse_far,
            &o,
            &mask,
            None,
        ),
        "lse",
    );
    refused(
        "runtime attention",
        be.attention(heads(&x), heads(&x), heads(&x_far), &mask),
        "v",
    );
    refused(
        "runtime layer norm",
        be.layer_norm(&x, None, &gamma_far, &gamma, 1e-5),
        "gamma",
    );

    // The recurrent ops: a GRU step of hidden 16 and additive attention over 4 keys.
    let (batch, hidden) = (4, 16);
    let gi = t(&gpu, f16_, &[batch, 3 * hidden]);
    let h_far = t(&foreign, f16_, &[batch, hidden]);
    refused("gru_cell", be.gru_cell(&gi, &gi, &h_far, None), "h");
    let (q, keys, va) = (
        t(&gpu, f16_, &[batch, hidden]),
        t(&gpu, f16_, &[batch * 4, hidden]),
        t(&gpu, f32_, &[hidden]),
    );
    let values_far = t(&foreign, f16_, &[batch * 4, hidden]);
    refused(
        "additive_attention",
        be.additive_attention(&q, &keys, &va, &values_far, None),
        "values",
    );

    // Nothing was launched on the foreign memory: the context has no sticky fault, and a good
    // call runs and gives finite numbers.
    let y = be.matmul(&x, Op::N, &x, Op::T).unwrap();
    let got = y.to_f32_vec().unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "x·xᵀ after the refusals");
    gpu.synchronize().unwrap();
    foreign.synchronize().unwrap();
}

/// Each workspace query is the scratch the op takes: a caller workspace of exactly that size
/// runs the op, 4 bytes fewer is `InvalidArgument { arg: "workspace" }`.
#[test]
fn training_op_workspace_queries_are_the_scratch_the_ops_take() {
    let Some(shared) = gpu_or_skip("training_op_workspace_queries") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let (rows, cols) = (300, 96);
    let f32_ = DType::F32;
    let x = t(&shared, f32_, &[rows, cols]);
    let labels: Vec<i32> = (0..rows as i32).map(|r| r % cols as i32).collect();
    let cases: Vec<(&str, usize)> = vec![
        (
            "column sums",
            column_sums_workspace_bytes(&shared, rows, cols),
        ),
        ("cross entropy", cross_entropy_workspace_bytes(rows)),
        (
            "grad norm",
            grad_norm_workspace_bytes(&[rows * cols, 7]).unwrap(),
        ),
    ];
    for (what, bytes) in cases {
        assert!(bytes >= 4, "{what}: {bytes}");
        let scratch = shared.stream().alloc_zeros::<u8>(bytes).unwrap();
        let ptr = {
            use cudarc::driver::DevicePtr;
            scratch.device_ptr(shared.stream()).0
        };
        shared.synchronize().unwrap();
        for (have, ok) in [(bytes, true), (bytes - 4, false)] {
            let h = shared.on_stream(stream.clone()).unwrap();
            // SAFETY: `scratch` is a live allocation of this context of `bytes` ≥ `have`
            // bytes, used only by this handle's stream until the synchronize below.
            unsafe { h.use_workspace(ptr, have) }.unwrap();
            let run = || -> Result<()> {
                match what {
                    "column sums" => {
                        let mut out = t(&h, f32_, &[cols]);
                        column_sums_into(
                            &h,
                            &ColumnSumOptions::default(),
                            &x.view(),
                            &mut out.view_mut(),
                        )
                    }
                    "cross entropy" => cross_entropy_into(
                        &h,
                        &CrossEntropyOptions::default(),
                        &x.view(),
                        &labels,
                        None,
                    )
                    .map(drop),
                    _ => {
                        let g2 = t(&h, f32_, &[7]);
                        grad_norm(&h, &[x.view(), g2.view()], 1.0).map(drop)
                    }
                }
            };
            let r = run();
            h.synchronize().unwrap();
            match (ok, r) {
                (true, Ok(())) => {}
                (
                    false,
                    Err(Error::InvalidArgument {
                        arg: "workspace", ..
                    }),
                ) => {}
                (ok, r) => panic!("{what} with {have} of {bytes} bytes (ok: {ok}): {r:?}"),
            }
        }
        drop(scratch);
    }
}
