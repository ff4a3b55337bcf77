//! The training-op twins (`cuattn::twin::training`, the kernels' loops in f32) against the f64
//! references, on random shapes and values, with the project's tolerance rule: column sums and
//! the fused bias + GELU backward under every row chunking, cross-entropy with smoothing and
//! ignored rows at several block sizes, the grouped embedding backward, AdamW and the gradient
//! norm over the multi-tensor chunk table (vectorized and scalar walks). CPU only.

use cuattn::dtype::DType;
use cuattn::reference::training as reference;
use cuattn::reference::training::{AdamWConfig, Gelu};
use cuattn::tolerance::{expect_close, Tolerance};
use cuattn::training::{colsum_split, group_tokens, mt_chunks, MT_CHUNK};
use cuattn::twin::training as twin;
use proptest::prelude::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};

fn values(rng: &mut SmallRng, dtype: DType, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(rng.gen_range(-spread..spread)))
        .collect()
}

fn dtype_of(i: usize) -> DType {
    DType::ALL[i % 3]
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn column_sums_and_the_fused_bias_gelu_backward_match_the_reference(
        rows in 1usize..90, cols in 1usize..80, d in 0usize..3, target in 1usize..40,
        gelu in 0usize..3, seed in any::<u64>(),
    ) {
        let dtype = dtype_of(d);
        let mut rng = SmallRng::seed_from_u64(seed);
        let dy = values(&mut rng, dtype, rows * cols, 1.0);
        let x = values(&mut rng, dtype, rows * cols, 3.0);
        let bias = values(&mut rng, dtype, cols, 1.0);
        let (_, rows_per_chunk) = colsum_split(rows, cols, target);
        let kind = [Gelu::Erf, Gelu::Tanh][gelu % 2];
        let (dx, sums) = if gelu == 2 {
            twin::colsum(dtype, &dy, None, rows, cols, rows_per_chunk)
        } else {
            twin::colsum(dtype, &dy, Some(twin::GeluInput { x: &x, bias: Some(&bias), kind }), rows, cols, rows_per_chunk)
        };
        let (want_dx, want_sums) = if gelu == 2 {
            (Vec::new(), reference::column_sums(&dy, cols))
        } else {
            reference::bias_gelu_backward(&dy, &x, Some(&bias), cols, kind)
        };
        // Every term is at most |dy|·max|gelu'| ≤ 1.2: the sums' scale is rows·1.2.
        let scale = rows as f64 * 1.2;
        expect_close("column sums", &sums, &want_sums,
            Tolerance::for_output(DType::F32, rows, scale)).map_err(TestCaseError::fail)?;
        if gelu != 2 {
            expect_close("dx", &dx, &want_dx,
                Tolerance::for_output(dtype, 16, max_abs(&want_dx))).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn cross_entropy_matches_the_reference(
        rows in 1usize..12, classes in 1usize..300, d in 0usize..3, warps in 1usize..9,
        smoothing in 0.0f32..0.5, ignored in proptest::collection::vec(any::<bool>(), 12),
        seed in any::<u64>(),
    ) {
        let dtype = dtype_of(d);
        let mut rng = SmallRng::seed_from_u64(seed);
        let logits = values(&mut rng, dtype, rows * classes, 6.0);
        let ignore = -100;
        let mut labels: Vec<i32> = (0..rows).map(|_| rng.gen_range(0..classes as i32)).collect();
        for (r, l) in labels.iter_mut().enumerate() {
            if ignored[r] && r > 0 {
                *l = ignore;
            }
        }
        let (loss, d) = twin::cross_entropy(dtype, &logits, classes, &labels, ignore, smoothing,
            32 * warps);
        let (want_loss, want_d) =
            reference::cross_entropy(&logits, classes, &labels, ignore, smoothing as f64);
        let valid = labels.iter().filter(|&&l| l != ignore).count() as f64;
        let n = classes + rows;
        expect_close("loss", &[loss], &[want_loss],
            Tolerance::for_output(DType::F32, n, 14.0 + (classes as f64).ln()))
            .map_err(TestCaseError::fail)?;
        expect_close("dlogits", &d, &want_d, Tolerance::for_output(dtype, n, 7.0 / valid))
            .map_err(TestCaseError::fail)?;
    }

    #[test]
    fn grouped_embedding_backward_matches_the_reference(
        tokens in 1usize..120, width in 1usize..40, vocab in 1usize..30, d in 0usize..3,
        same_dtype in any::<bool>(), seed in any::<u64>(),
    ) {
        let dtype = dtype_of(d);
        let table_dtype = if same_dtype { dtype } else { DType::F32 };
        let mut rng = SmallRng::seed_from_u64(seed);
        let dy = values(&mut rng, dtype, tokens * width, 1.0);
        let ids: Vec<u32> = (0..tokens).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let groups = group_tokens(&ids, vocab).unwrap();
        let mut table = vec![0.0f32; vocab * width];
        twin::embedding_backward(table_dtype, &dy, width, &groups, &mut table);
        let want = reference::embedding_backward(&dy, width, &ids, vocab);
        expect_close("dtable", &table, &want,
            Tolerance::for_output(table_dtype, tokens, tokens as f64))
            .map_err(TestCaseError::fail)?;
    }
}

/// Tensors of these sizes with random weights, zero moments and a model copy.
fn host_params(rng: &mut SmallRng, numels: &[usize], vectorized: bool) -> Vec<twin::HostParam> {
    numels
        .iter()
        .enumerate()
        .map(|(k, &n)| twin::HostParam {
            param: values(rng, DType::F32, n, 1.0),
            grad: vec![0.0; n],
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            model: vec![f32::NAN; n],
            weight_decay: k % 2 == 0,
            vectorized: vectorized && k != 1,
        })
        .collect()
}

#[test]
fn multi_tensor_adamw_matches_torchs_formula_over_several_steps() {
    let mut rng = SmallRng::seed_from_u64(11);
    // Sizes around the chunk edge and the 4-element packs.
    let numels = [3, MT_CHUNK + 5, 1, 2 * MT_CHUNK, 4097];
    let chunks = mt_chunks(&numels).unwrap();
    let cfg = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    for model_dtype in [DType::F16, DType::BF16] {
        let mut tensors = host_params(&mut rng, &numels, true);
        let mut want: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = tensors
            .iter()
            .map(|t| {
                let p = t.param.iter().map(|&v| v as f64).collect();
                (p, vec![0.0; t.param.len()], vec![0.0; t.param.len()])
            })
            .collect();
        for step in 1..=3 {
            let grad_scale = if step == 2 { 0.5 } else { 1.0 };
            for (t, w) in tensors.iter_mut().zip(&mut want) {
                t.grad = values(&mut rng, DType::F32, t.param.len(), 2.0);
                let g: Vec<f64> = t
                    .grad
                    .iter()
                    .map(|&v| v as f64 * grad_scale as f64)
                    .collect();
                reference::adamw_step(&cfg, step, t.weight_decay, &mut w.0, &g, &mut w.1, &mut w.2);
            }
            twin::adamw(&cfg, step, grad_scale, model_dtype, &mut tensors, &chunks);
        }
        for (k, (t, w)) in tensors.iter().zip(&want).enumerate() {
            let what = format!("tensor {k} ({model_dtype} copy)");
            expect_close(
                &what,
                &t.param,
                &w.0,
                Tolerance::for_output(DType::F32, 16, 1.1),
            )
            .unwrap();
            expect_close(
                &what,
                &t.exp_avg,
                &w.1,
                Tolerance::for_output(DType::F32, 16, 2.0),
            )
            .unwrap();
            expect_close(
                &what,
                &t.exp_avg_sq,
                &w.2,
                Tolerance::for_output(DType::F32, 16, 4.0),
            )
            .unwrap();
            expect_close(
                &what,
                &t.model,
                &w.0,
                Tolerance::for_output(model_dtype, 16, 1.1),
            )
            .unwrap();
        }
    }
}

#[test]
fn gradient_norm_over_the_chunk_table_matches_the_reference_either_walk() {
    let mut rng = SmallRng::seed_from_u64(12);
    let numels = [7, MT_CHUNK + 3, 2 * MT_CHUNK - 1, 64];
    let chunks = mt_chunks(&numels).unwrap();
    let grads: Vec<Vec<f32>> = numels
        .iter()
        .map(|&n| values(&mut rng, DType::F32, n, 1.0))
        .collect();
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let want = reference::global_norm(&refs);
    let total: usize = numels.iter().sum();
    for vectorized in [false, true] {
        let with_flags: Vec<(&[f32], bool)> = refs.iter().map(|&g| (g, vectorized)).collect();
        for max_norm in [1.0f32, 1e6] {
            let (norm, coef) = twin::grad_norm(&with_flags, &chunks, max_norm);
            expect_close(
                "norm",
                &[norm],
                &[want],
                Tolerance::for_output(DType::F32, total, want),
            )
            .unwrap();
            let want_coef = reference::clip_coefficient(want, max_norm as f64);
            expect_close(
                "coef",
                &[coef],
                &[want_coef],
                Tolerance::for_output(DType::F32, total, 1.0),
            )
            .unwrap();
        }
    }
}

#[test]
fn block_sum_adds_in_a_fixed_order_whatever_the_values() {
    // Same inputs, same bits; and the warp butterfly leaves every lane equal (checked inside).
    let v: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
    assert_eq!(twin::block_sum(&v).to_bits(), twin::block_sum(&v).to_bits());
    let exact: f64 = v.iter().map(|&x| x as f64).sum();
    assert!((twin::block_sum(&v) as f64 - exact).abs() < 1e-3);
}
