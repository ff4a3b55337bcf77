//! Checks the f64 training-op references (`cuattn::reference::training`) against math they do
//! not share: central finite differences of the forwards, PyTorch's decomposition of the
//! label-smoothed loss, a one-hot matrix product for the embedding gradient, AdamW's closed
//! form under a constant gradient, and the rescale of dropout. CPU only.

use cuattn::reference::training::{
    adamw_step, bias_gelu_backward, bias_gelu_forward, clip_coefficient, column_sums,
    cross_entropy, dropout, embedding_backward, gelu, gelu_grad, global_norm, AdamWConfig, Gelu,
};
use cuattn::rng::Dropout;
use rand::{rngs::SmallRng, Rng, SeedableRng};

#[track_caller]
fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    let err = (got - want).abs();
    assert!(
        err <= tol,
        "{what}: got {got}, want {want}, |err| {err:e} > {tol:e}"
    );
}

fn random_vec(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// A step that is exact in f32 for |v| < 8 (a multiple of every ulp there).
const H32: f32 = 1.0 / 1024.0;

#[test]
fn gelu_grad_matches_central_differences_of_gelu() {
    for kind in [Gelu::Erf, Gelu::Tanh] {
        for k in -80..=80 {
            let u = k as f64 * 0.1;
            let h = 1e-5;
            let fd = (gelu(u + h, kind) - gelu(u - h, kind)) / (2.0 * h);
            assert_close(gelu_grad(u, kind), fd, 1e-8, &format!("{kind:?} at {u}"));
        }
    }
}

#[test]
fn gelu_forms_agree_to_the_tanh_approximations_error_and_have_known_values() {
    for k in -60..=60 {
        let u = k as f64 * 0.1;
        assert_close(gelu(u, Gelu::Erf), gelu(u, Gelu::Tanh), 1e-3, "erf vs tanh");
    }
    // gelu(0) = 0, gelu(u) − gelu(−u) = u (Φ(u) + Φ(−u) = 1), gelu(1) = Φ(1).
    assert_eq!(gelu(0.0, Gelu::Erf), 0.0);
    assert_close(
        gelu(1.3, Gelu::Erf) - gelu(-1.3, Gelu::Erf),
        1.3,
        1e-15,
        "odd part",
    );
    assert_close(gelu(1.0, Gelu::Erf), 0.841_344_746_068_542_9, 1e-15, "Φ(1)");
}

#[test]
fn bias_gelu_backward_dbias_matches_finite_differences_of_the_weighted_output() {
    let mut rng = SmallRng::seed_from_u64(1);
    let (rows, cols) = (5, 7);
    let x = random_vec(&mut rng, rows * cols, -3.0, 3.0);
    let bias = random_vec(&mut rng, cols, -1.0, 1.0);
    let dy = random_vec(&mut rng, rows * cols, -1.0, 1.0);
    for kind in [Gelu::Erf, Gelu::Tanh] {
        let loss = |b: &[f32]| -> f64 {
            bias_gelu_forward(&x, Some(b), cols, kind)
                .iter()
                .zip(&dy)
                .map(|(y, &g)| y * g as f64)
                .sum()
        };
        let (dx, dbias) = bias_gelu_backward(&dy, &x, Some(&bias), cols, kind);
        for c in 0..cols {
            let (mut bp, mut bm) = (bias.clone(), bias.clone());
            bp[c] += H32;
            bm[c] -= H32;
            let fd = (loss(&bp) - loss(&bm)) / (bp[c] - bm[c]) as f64;
            assert_close(dbias[c], fd, 1e-5, &format!("{kind:?} dbias[{c}]"));
        }
        // dbias is the column sum of dx.
        for c in 0..cols {
            let s: f64 = (0..rows).map(|r| dx[r * cols + c]).sum();
            assert_close(dbias[c], s, 1e-12, "dbias = Σ dx");
        }
    }
}

#[test]
fn column_sums_add_each_column_over_the_rows() {
    let v = [1.0f32, 2.0, 3.0, 10.0, 20.0, 30.0];
    assert_eq!(column_sums(&v, 3), vec![11.0, 22.0, 33.0]);
    assert_eq!(
        column_sums(&v, 2),
        vec![1.0 + 3.0 + 20.0, 2.0 + 10.0 + 30.0]
    );
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    // Independent of the reference's max-shifted form: log of the plain quotient in f64.
    let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
    row.iter().map(|&v| ((v as f64).exp() / z).ln()).collect()
}

#[test]
fn cross_entropy_matches_pytorchs_decomposition_of_the_smoothed_loss() {
    let mut rng = SmallRng::seed_from_u64(2);
    let (rows, classes, ignore) = (9, 11, -100);
    let logits = random_vec(&mut rng, rows * classes, -4.0, 4.0);
    let mut labels: Vec<i32> = (0..rows)
        .map(|_| rng.gen_range(0..classes as i32))
        .collect();
    labels[2] = ignore;
    labels[7] = ignore;
    let kept: Vec<usize> = (0..rows).filter(|&r| labels[r] != ignore).collect();
    // (1 − ε)·NLL + ε·mean_j(−log p_j), each averaged over the kept rows.
    let mut nll = 0.0;
    let mut uniform = 0.0;
    for &r in &kept {
        let lp = log_softmax(&logits[r * classes..][..classes]);
        nll -= lp[labels[r] as usize];
        uniform -= lp.iter().sum::<f64>() / classes as f64;
    }
    let n = kept.len() as f64;
    for eps in [0.0, 0.1, 0.3] {
        let (loss, _) = cross_entropy(&logits, classes, &labels, ignore, eps);
        let want = (1.0 - eps) * nll / n + eps * uniform / n;
        assert_close(loss, want, 1e-12, &format!("loss at smoothing {eps}"));
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences_and_ignores_rows() {
    let mut rng = SmallRng::seed_from_u64(3);
    let (rows, classes, ignore) = (4, 6, 5);
    let logits = random_vec(&mut rng, rows * classes, -3.0, 3.0);
    let labels = vec![1, 5, 0, 3]; // row 1 carries the ignore index (also a valid class id)
    for eps in [0.0, 0.2] {
        let (_, d) = cross_entropy(&logits, classes, &labels, ignore, eps);
        for i in 0..logits.len() {
            let (mut p, mut m) = (logits.clone(), logits.clone());
            p[i] += H32;
            m[i] -= H32;
            let fd = (cross_entropy(&p, classes, &labels, ignore, eps).0
                - cross_entropy(&m, classes, &labels, ignore, eps).0)
                / (p[i] - m[i]) as f64;
            assert_close(d[i], fd, 2e-6, &format!("dlogits[{i}] at smoothing {eps}"));
        }
        assert!(d[classes..2 * classes].iter().all(|&g| g == 0.0));
        for row in d.chunks(classes) {
            assert_close(row.iter().sum(), 0.0, 1e-15, "a row's gradient sums to 0");
        }
    }
}

#[test]
fn cross_entropy_over_only_ignored_rows_is_nan_as_in_pytorch() {
    let (loss, d) = cross_entropy(&[1.0, 2.0, 3.0, 4.0], 2, &[-1, -1], -1, 0.0);
    assert!(loss.is_nan());
    assert!(d.iter().all(|&g| g == 0.0));
}

#[test]
fn embedding_backward_equals_the_one_hot_matrix_product() {
    let mut rng = SmallRng::seed_from_u64(4);
    let (tokens, width, vocab) = (13, 5, 7);
    let dy = random_vec(&mut rng, tokens * width, -1.0, 1.0);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.gen_range(0..vocab as u32))
        .collect();
    let got = embedding_backward(&dy, width, &ids, vocab);
    // dtable = onehot(ids)ᵀ · dy, with onehot [tokens, vocab].
    for v in 0..vocab {
        for c in 0..width {
            let want: f64 = (0..tokens)
                .map(|t| if ids[t] as usize == v { 1.0 } else { 0.0 } * dy[t * width + c] as f64)
                .sum();
            assert_close(got[v * width + c], want, 1e-12, "dtable");
        }
    }
}

#[test]
fn adamw_under_a_constant_gradient_moves_each_weight_by_lr_times_its_sign() {
    // With m0 = v0 = 0 and a constant g, the bias-corrected moments are exactly g and g², so
    // every step is p ← p·(1 − lr·wd) − lr·g/(|g| + eps).
    let cfg = AdamWConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let g = [0.5, -2.0, 1e-3, 0.0];
    for decay in [false, true] {
        let mut p = vec![1.0, -1.0, 0.25, 3.0];
        let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
        let mut want = p.clone();
        for step in 1..=5 {
            adamw_step(&cfg, step, decay, &mut p, &g, &mut m, &mut v);
            for (w, &gi) in want.iter_mut().zip(&g) {
                if decay {
                    *w *= 1.0 - cfg.lr * cfg.weight_decay;
                }
                *w -= cfg.lr * gi / (gi.abs() + cfg.eps);
            }
            for i in 0..4 {
                assert_close(p[i], want[i], 1e-12, &format!("step {step} weight {i}"));
            }
        }
    }
}

#[test]
fn global_norm_and_clip_coefficient_follow_clip_grad_norm() {
    let a = [3.0f32];
    let b = [0.0f32, 4.0];
    let norm = global_norm(&[&a, &b]);
    assert_eq!(norm, 5.0);
    assert_close(
        clip_coefficient(norm, 1.0),
        1.0 / (5.0 + 1e-6),
        1e-15,
        "clip",
    );
    assert_eq!(clip_coefficient(norm, 10.0), 1.0);
}

#[test]
fn dropout_reference_rescales_kept_elements_by_one_over_one_minus_p() {
    let x: Vec<f32> = (0..4096).map(|i| 1.0 + (i % 7) as f32).collect();
    let d = Dropout::new(0.25).unwrap();
    let y = dropout(&x, &d, 5, 9);
    let mut kept = 0;
    for (i, (&yi, &xi)) in y.iter().zip(&x).enumerate() {
        if d.keeps(5, 9, i as u64) {
            kept += 1;
            assert_close(yi, xi as f64 / 0.75, 1e-12, "kept element");
        } else {
            assert_eq!(yi, 0.0);
        }
    }
    assert!(
        kept > 2800 && kept < 3350,
        "{kept} of 4096 kept at p = 0.25"
    );
    // The f32 CPU twin (src/rng.rs) agrees to its rounding.
    let mut y32 = vec![f32::NAN; x.len()];
    d.apply(5, 9, 0, &x, &mut y32);
    for (a, b) in y32.iter().zip(&y) {
        assert_close(*a as f64, *b, 1e-6 * b.abs(), "rng::Dropout::apply");
    }
}

/// PyTorch's own results on small f64 cases (`scripts/make_fixtures.py --only training`).
fn torch_fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/training-ops.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("training-ops fixture"))
        .expect("fixture JSON")
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[track_caller]
fn assert_all_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close(*g, *w, tol * (1.0 + w.abs()), &format!("{what}[{i}]"));
    }
}

#[test]
fn references_match_pytorch_on_the_committed_fixture() {
    let fx = torch_fixture();
    for case in fx["bias_gelu"].as_array().unwrap() {
        let kind = match case["kind"].as_str().unwrap() {
            "erf" => Gelu::Erf,
            _ => Gelu::Tanh,
        };
        let cols = case["cols"].as_u64().unwrap() as usize;
        let (x, b, dy) = (f32s(&case["x"]), f32s(&case["bias"]), f32s(&case["dy"]));
        let y = bias_gelu_forward(&x, Some(&b), cols, kind);
        assert_all_close(&y, &f64s(&case["y"]), 1e-12, "gelu y");
        let (dx, db) = bias_gelu_backward(&dy, &x, Some(&b), cols, kind);
        assert_all_close(&dx, &f64s(&case["dx"]), 1e-12, "gelu dx");
        assert_all_close(&db, &f64s(&case["dbias"]), 1e-12, "gelu dbias");
    }
    for case in fx["cross_entropy"].as_array().unwrap() {
        let labels: Vec<i32> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_i64().unwrap() as i32)
            .collect();
        let (loss, d) = cross_entropy(
            &f32s(&case["logits"]),
            case["classes"].as_u64().unwrap() as usize,
            &labels,
            case["ignore_index"].as_i64().unwrap() as i32,
            case["smoothing"].as_f64().unwrap(),
        );
        assert_close(loss, case["loss"].as_f64().unwrap(), 1e-12, "xent loss");
        assert_all_close(&d, &f64s(&case["dlogits"]), 1e-12, "xent dlogits");
    }
    let e = &fx["embedding"];
    let ids: Vec<u32> = e["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let got = embedding_backward(
        &f32s(&e["dy"]),
        e["width"].as_u64().unwrap() as usize,
        &ids,
        e["vocab"].as_u64().unwrap() as usize,
    );
    assert_all_close(&got, &f64s(&e["dtable"]), 1e-12, "embedding");
    let c = &fx["clip"];
    let grads: Vec<Vec<f32>> = c["grads"].as_array().unwrap().iter().map(f32s).collect();
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let norm = global_norm(&refs);
    assert_close(norm, c["norm"].as_f64().unwrap(), 1e-12, "clip norm");
    let coef = clip_coefficient(norm, c["max_norm"].as_f64().unwrap());
    for (g, want) in grads.iter().zip(c["clipped"].as_array().unwrap()) {
        let got: Vec<f64> = g.iter().map(|&v| v as f64 * coef).collect();
        assert_all_close(&got, &f64s(want), 1e-12, "clipped grads");
    }
    let a = &fx["adamw"];
    let cfg = AdamWConfig {
        lr: a["lr"].as_f64().unwrap(),
        beta1: a["beta1"].as_f64().unwrap(),
        beta2: a["beta2"].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
    };
    let mut params: Vec<Vec<f64>> = a["start"].as_array().unwrap().iter().map(f64s).collect();
    let mut m: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut v = m.clone();
    for (step, s) in a["steps"].as_array().unwrap().iter().enumerate() {
        for k in 0..2 {
            let g = f64s(&s["grads"][k]);
            adamw_step(
                &cfg,
                step as u32 + 1,
                k == 0,
                &mut params[k],
                &g,
                &mut m[k],
                &mut v[k],
            );
            assert_all_close(
                &params[k],
                &f64s(&s["params"][k]),
                1e-12,
                &format!("adamw step {} tensor {k}", step + 1),
            );
        }
    }
}
