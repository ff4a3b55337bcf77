//! The CUDA training backend (`impl TrainBackend for Cuda`, src/runtime/cuda_train/) against
//! the CPU backend: every trait op on random inputs (f32, and f16/bf16 where the op stores in
//! them), the tiny BERT classifier's whole training step (loss and every gradient, against the
//! CPU backend and PyTorch's autograd fixture), a few AdamW steps that lower the loss in every
//! dtype, and bitwise-repeatable gradients.
//!
//! Bounds: each op's output is held to the rule of `cuattn::tolerance` (the conformance
//! checks' `tolerance(dtype, n, scale, stored)`: storage rounding of the output dtype, f32
//! accumulation over n terms, `stored` chained roundings) — doubled, because both backends are
//! each within that rule of the exact result, so their difference is within twice it.
//! Attention uses the attention tolerance modules' bounds (computed from the same inputs),
//! doubled likewise and divided by 1 − p under dropout (each kept term is scaled by 1/(1 − p),
//! dropped ones vanish). Copies, slices, concatenation, casts and dropout's mask are exact.

use cuattn::check::gpu_or_skip;
use cuattn::gpu::DeviceTensor;
use cuattn::runtime::conformance::{random, tolerance};
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::train::{
    AdamW, AdamWConfig, AdamWStep, BertForSequenceClassification, CrossEntropy, DropoutSite, Head,
    Op, StepOptions, TrainBackend,
};
use cuattn::runtime::{Activation, AttentionMask, Backend, CausalAlign, Cpu, CpuTensor, Heads};
use cuattn::tolerance::{expect_close, Tolerance};
use cuattn::DType;
use std::sync::Arc;

use crate::fixture_files::{fixture, json, tiny_bert_batch};

type Check = Result<(), String>;

fn twice(t: Tolerance) -> Tolerance {
    Tolerance {
        atol: 2.0 * t.atol,
        rtol: 2.0 * t.rtol,
        rel_norm_bound: 2.0 * t.rel_norm_bound,
        ..t
    }
}

fn e(err: cuattn::Error) -> String {
    err.to_string()
}

/// The same values on both backends: the GPU tensor in `dtype`, the CPU one in f32 (the
/// values are already representable in `dtype`).
fn both(g: &Cuda, shape: &[usize], v: &[f32], dtype: DType) -> (DeviceTensor, CpuTensor) {
    (
        g.upload_as(shape, v, dtype).unwrap(),
        Cpu.upload(shape, v).unwrap(),
    )
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// `got` (stored in `dtype`) against the CPU's `want` under the doubled rule for `n` summed
/// terms and `stored` chained roundings.
fn close(
    what: &str,
    g: &Cuda,
    got: &DeviceTensor,
    want: &CpuTensor,
    (dtype, n, stored): (DType, usize, usize),
) -> Check {
    if got.dtype() != dtype {
        return Err(format!(
            "{what}: stored in {}, expected {dtype}",
            got.dtype()
        ));
    }
    if got.shape() != want.shape() {
        return Err(format!(
            "{what}: shape {:?} vs {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let r: Vec<f64> = Cpu
        .to_f32(want)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let tol = twice(tolerance(dtype, n, max_abs(&r).max(1.0), stored));
    expect_close(what, &g.to_f32(got).map_err(e)?, &r, tol)
}

fn exact(what: &str, g: &Cuda, got: &DeviceTensor, want: &[f32]) -> Check {
    let got = g.to_f32(got).map_err(e)?;
    if got.len() != want.len()
        || got
            .iter()
            .zip(want)
            .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(format!("{what}: not bit-identical"));
    }
    Ok(())
}

fn elementwise_ops(g: &Cuda, dt: DType, seed: u64) -> Check {
    let (rows, cols) = (13, 37);
    let n = rows * cols;
    let sh = [rows, cols];
    let x = random(dt, n, 2.0, seed);
    let y = random(dt, n, 2.0, seed + 1);
    let (gx, cx) = both(g, &sh, &x, dt);
    let (gy, cy) = both(g, &sh, &y, dt);

    // Casts: exact both ways for values of the dtype; a plain copy keeps the dtype.
    let as_f32 = g.cast(&gx, DType::F32).map_err(e)?;
    exact("cast to f32", g, &as_f32, &x)?;
    let back = g.cast(&as_f32, dt).map_err(e)?;
    exact("cast back", g, &back, &x)?;
    let wide = random(DType::F32, n, 2.0, seed + 2);
    let rounded: Vec<f32> = wide.iter().map(|&v| dt.round(v)).collect();
    let narrow = g
        .cast(&g.upload_as(&sh, &wide, DType::F32).map_err(e)?, dt)
        .map_err(e)?;
    exact("cast f32 -> dtype rounds to nearest", g, &narrow, &rounded)?;

    let mut acc = g.cast(&gx, dt).map_err(e)?;
    g.accumulate(&mut acc, &gy).map_err(e)?;
    let mut cacc = Cpu.cast(&cx, DType::F32).map_err(e)?;
    Cpu.accumulate(&mut cacc, &cy).map_err(e)?;
    close("accumulate", g, &acc, &cacc, (dt, 2, 0))?;
    // An f32 gradient accumulating a dtype tensor stays f32.
    let (mut acc32, mut cacc32) = both(g, &sh, &x, DType::F32);
    g.accumulate(&mut acc32, &gy).map_err(e)?;
    Cpu.accumulate(&mut cacc32, &cy).map_err(e)?;
    close(
        "accumulate into f32",
        g,
        &acc32,
        &cacc32,
        (DType::F32, 2, 0),
    )?;
    g.scale(&mut acc, -0.375).map_err(e)?;
    Cpu.scale(&mut cacc, -0.375).map_err(e)?;
    close("scale", g, &acc, &cacc, (dt, 2, 1))?;

    close(
        "mul",
        g,
        &g.mul(&gx, &gy).map_err(e)?,
        &Cpu.mul(&cx, &cy).map_err(e)?,
        (dt, 1, 0),
    )?;
    // The functions' own few-ulp f32 errors (erf, exp, tanh on each side): one stored rounding.
    for act in [
        Activation::None,
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::Relu,
        Activation::Tanh,
    ] {
        close(
            &format!("activate {act:?}"),
            g,
            &g.activate(&gx, act).map_err(e)?,
            &Cpu.activate(&cx, act).map_err(e)?,
            (dt, 1, 1),
        )?;
        close(
            &format!("activation_backward {act:?}"),
            g,
            &g.activation_backward(&gx, &gy, act).map_err(e)?,
            &Cpu.activation_backward(&cx, &cy, act).map_err(e)?,
            (dt, 2, 1),
        )?;
    }
    close(
        "sigmoid",
        g,
        &g.sigmoid(&gx).map_err(e)?,
        &Cpu.sigmoid(&cx).map_err(e)?,
        (dt, 1, 1),
    )?;
    let s: Vec<f32> = x.iter().map(|&v| dt.round(0.5 + 0.2 * v)).collect();
    let (gs, cs) = both(g, &sh, &s, dt);
    close(
        "sigmoid_backward",
        g,
        &g.sigmoid_backward(&gs, &gy).map_err(e)?,
        &Cpu.sigmoid_backward(&cs, &cy).map_err(e)?,
        (dt, 2, 0),
    )?;
    close(
        "tanh_backward",
        g,
        &g.tanh_backward(&gs, &gy).map_err(e)?,
        &Cpu.tanh_backward(&cs, &cy).map_err(e)?,
        (dt, 2, 0),
    )?;

    // Slices and concatenation: exact.
    let gsl = g.slice_cols(&gx, 5, 20).map_err(e)?;
    let csl = Cpu.slice_cols(&cx, 5, 20).map_err(e)?;
    exact("slice_cols", g, &gsl, csl.data())?;
    let gcat = g.concat_cols(&[&gsl, &gx, &gsl]).map_err(e)?;
    let ccat = Cpu.concat_cols(&[&csl, &cx, &csl]).map_err(e)?;
    exact("concat_cols", g, &gcat, ccat.data())?;
    if g.slice_cols(&gx, 30, 8).is_ok() || g.concat_cols(&[]).is_ok() {
        return Err("slice past the columns / empty concat accepted".into());
    }

    // Reductions: column sums (f32, a parameter's gradient) and sums of squares.
    close(
        "sum_rows",
        g,
        &g.sum_rows(&gx).map_err(e)?,
        &Cpu.sum_rows(&cx).map_err(e)?,
        (DType::F32, rows, 0),
    )?;
    let (ss, cs2) = (
        g.sum_squares_all(&[&gx, &gy, &acc32]).map_err(e)?,
        Cpu.sum_squares_all(&[&cx, &cy, &cacc32]).map_err(e)?,
    );
    let bound = 2.0 * 4.0 * ((3 * n) as f64).sqrt() * DType::F32.unit_roundoff() * cs2;
    if (ss - cs2).abs() > bound || !ss.is_finite() {
        return Err(format!("sum_squares_all {ss} vs {cs2} (bound {bound:.3e})"));
    }

    // Dropout: the same mask (exact zeros where the CPU drops), kept values scaled.
    let site = DropoutSite {
        p: 0.3,
        seed: seed ^ 0x5eed,
        offset: 11,
    };
    let gd = g.dropout(&gx, site).map_err(e)?;
    let cd = Cpu.dropout(&cx, site).map_err(e)?;
    let got = g.to_f32(&gd).map_err(e)?;
    let differs = (0..n).any(|i| x[i] != 0.0 && (got[i] == 0.0) != (cd.data()[i] == 0.0));
    if differs {
        return Err("dropout masks differ".into());
    }
    close("dropout", g, &gd, &cd, (dt, 1, 1))
}

fn matmuls(g: &Cuda, dt: DType, seed: u64) -> Check {
    let (m, k, n) = (37, 29, 23);
    let a = random(dt, m * k, 1.0, seed);
    let b = random(dt, k * n, 1.0, seed + 1);
    let (ga, ca) = both(g, &[m, k], &a, dt);
    let (gb, cb) = both(g, &[k, n], &b, dt);
    let (gbt, cbt) = both(g, &[n, k], &b, dt);
    let (gat, cat) = both(g, &[k, m], &a, dt);
    // (name, GPU operands, CPU operands, ops, output dtype): TN is a sum over the rows
    // (dW = dYᵀ·X), stored in f32.
    type Operands<'a> = (
        (&'a DeviceTensor, &'a DeviceTensor),
        (&'a CpuTensor, &'a CpuTensor),
    );
    let cases: [(&str, Operands<'_>, (Op, Op), DType); 3] = [
        ("NN", ((&ga, &gb), (&ca, &cb)), (Op::N, Op::N), dt),
        ("NT", ((&ga, &gbt), (&ca, &cbt)), (Op::N, Op::T), dt),
        ("TN", ((&gat, &gb), (&cat, &cb)), (Op::T, Op::N), DType::F32),
    ];
    for (name, ((x, y), (cx, cy)), (ox, oy), out) in cases {
        close(
            &format!("matmul {name}"),
            g,
            &g.matmul(x, ox, y, oy).map_err(e)?,
            &Cpu.matmul(cx, ox, cy, oy).map_err(e)?,
            (out, k, 0),
        )?;
    }
    // An f32 parameter operand on a 16-bit backend is read in the backend's dtype.
    let (gw, cw) = both(g, &[n, k], &b, DType::F32);
    close(
        "matmul with an f32 operand",
        g,
        &g.matmul(&ga, Op::N, &gw, Op::T).map_err(e)?,
        &Cpu.matmul(&ca, Op::N, &cw, Op::T).map_err(e)?,
        (dt, k, 0),
    )?;
    if g.matmul(&ga, Op::N, &ga, Op::N).is_ok() {
        return Err("matmul of mismatched inner sizes accepted".into());
    }
    Ok(())
}

fn layer_norm_and_embeddings(g: &Cuda, dt: DType, seed: u64) -> Check {
    let (rows, width) = (19, 96);
    let x = random(dt, rows * width, 3.0, seed);
    let dy = random(dt, rows * width, 1.0, seed + 1);
    let gamma = random(dt, width, 1.5, seed + 2);
    let (gx, cx) = both(g, &[rows, width], &x, dt);
    let (gdy, cdy) = both(g, &[rows, width], &dy, dt);
    let (gg, cg) = both(g, &[width], &gamma, DType::F32);
    let eps = 1e-12;
    let got = g.layer_norm_backward(&gx, &gg, eps, &gdy).map_err(e)?;
    let want = Cpu.layer_norm_backward(&cx, &cg, eps, &cdy).map_err(e)?;
    let t = cuattn::tolerance::layernorm::backward(dt, &dy, &x, width, Some(&gamma), eps);
    let check =
        |what: &str, got: &DeviceTensor, want: &CpuTensor, stored: DType, tol: Tolerance| {
            if got.dtype() != stored {
                return Err(format!("{what}: stored in {}", got.dtype()));
            }
            let r: Vec<f64> = want.data().iter().map(|&v| v as f64).collect();
            expect_close(what, &g.to_f32(got).map_err(e)?, &r, twice(tol))
        };
    check("layer_norm_backward dx", &got.dx, &want.dx, dt, t.dx)?;
    check(
        "layer_norm_backward dgamma",
        &got.dgamma,
        &want.dgamma,
        DType::F32,
        t.dgamma,
    )?;
    check(
        "layer_norm_backward dbeta",
        &got.dbeta,
        &want.dbeta,
        DType::F32,
        t.dbeta,
    )?;

    // The embedding scatter-add: repeated ids, a padding row that gets nothing.
    let ids: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 7 + seed as u32) % 6)
        .collect();
    let pad = Some(ids[0]);
    let gt = g.gather_rows_backward(&gdy, &ids, 9, pad).map_err(e)?;
    let ct = Cpu.gather_rows_backward(&cdy, &ids, 9, pad).map_err(e)?;
    close("gather_rows_backward", g, &gt, &ct, (DType::F32, rows, 0))?;
    if g.gather_rows_backward(&gdy, &ids, 3, None).is_ok() {
        return Err("an id outside the table accepted".into());
    }
    Ok(())
}

fn loss_and_optimizer(g: &Cuda, dt: DType, seed: u64) -> Check {
    let (rows, classes) = (9, 7);
    let z = random(dt, rows * classes, 4.0, seed);
    let (gz, cz) = both(g, &[rows, classes], &z, dt);
    let labels: Vec<i64> = (0..rows as i64)
        .map(|r| {
            if r == 4 {
                -100
            } else {
                (r * 3) % classes as i64
            }
        })
        .collect();
    for smoothing in [0.0, 0.1] {
        let opts = CrossEntropy {
            label_smoothing: smoothing,
            ..CrossEntropy::default()
        };
        let (gl, gg) = g.cross_entropy(&gz, &labels, &opts).map_err(e)?;
        let (cl, cg) = Cpu.cross_entropy(&cz, &labels, &opts).map_err(e)?;
        let tol = twice(tolerance(DType::F32, classes, 4.0, 0));
        expect_close("cross_entropy loss", &[gl], &[cl as f64], tol)?;
        close("cross_entropy gradient", g, &gg, &cg, (dt, classes, 0))?;
    }
    let (l, grad) = g
        .cross_entropy(&gz, &[-100; 9], &CrossEntropy::default())
        .map_err(e)?;
    if l != 0.0 || g.to_f32(&grad).map_err(e)?.iter().any(|&v| v != 0.0) {
        return Err("every row ignored: loss and gradient must be 0".into());
    }
    if g.cross_entropy(&gz, &[9; 9], &CrossEntropy::default())
        .is_ok()
    {
        return Err("a label outside the classes accepted".into());
    }

    // Two AdamW steps on f32 master weights with an f32 gradient.
    let n = 300;
    let p0 = random(DType::F32, n, 1.0, seed + 5);
    let gr = random(DType::F32, n, 1.0, seed + 6);
    let (mut gp, mut cp) = both(g, &[n], &p0, DType::F32);
    let (ggr, cgr) = both(g, &[n], &gr, DType::F32);
    let zeros = vec![0f32; n];
    let (mut gm, mut cm) = both(g, &[n], &zeros, DType::F32);
    let (mut gv, mut cv) = both(g, &[n], &zeros, DType::F32);
    for step in 1..=2 {
        let hp = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        g.adamw_step(&mut gp, &ggr, &mut gm, &mut gv, &hp)
            .map_err(e)?;
        Cpu.adamw_step(&mut cp, &cgr, &mut cm, &mut cv, &hp)
            .map_err(e)?;
    }
    close("adamw param", g, &gp, &cp, (DType::F32, 8, 0))?;
    close("adamw exp_avg_sq", g, &gv, &cv, (DType::F32, 4, 0))?;
    let hp0 = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
    };
    if g.adamw_step(&mut gp, &ggr, &mut gm, &mut gv, &hp0).is_ok() {
        return Err("AdamW step 0 accepted".into());
    }
    Ok(())
}

/// One attention call's shape and masks.
struct AttnCase {
    batch: usize,
    len_q: usize,
    len_k: usize,
    heads_q: usize,
    heads_kv: usize,
    dim: usize,
    dim_v: usize,
    key_lens: Option<Vec<usize>>,
    causal: Option<CausalAlign>,
    p: f32,
}

fn heads<T>(tensor: &T, col: usize, heads: usize, dim: usize) -> Heads<'_, T> {
    Heads {
        tensor,
        col,
        heads,
        dim,
    }
}

/// `[batch·len, heads·dim]` (heads side by side) → BHSD, as the tolerance modules read.
fn bhsd(v: &[f32], batch: usize, len: usize, heads: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for b in 0..batch {
        for h in 0..heads {
            for t in 0..len {
                for d in 0..dim {
                    out[((b * heads + h) * len + t) * dim + d] =
                        v[(b * len + t) * heads * dim + h * dim + d];
                }
            }
        }
    }
    out
}

fn attention_case(g: &Cuda, dt: DType, c: &AttnCase, seed: u64) -> Check {
    use cuattn::reference::attention::{Options, Shape};
    let (wq, wk, wv) = (c.heads_q * c.dim, c.heads_kv * c.dim, c.heads_kv * c.dim_v);
    // Q and K side by side in one tensor (a fused projection's output), V alone.
    let qk = random(dt, c.batch * c.len_q * (wq + wk), 1.0, seed);
    let v = random(dt, c.batch * c.len_k * wv, 1.0, seed + 1);
    let d_o = random(dt, c.batch * c.len_q * c.heads_q * c.dim_v, 1.0, seed + 2);
    assert_eq!(c.len_q, c.len_k, "Q and K share a tensor");
    let (gqk, cqk) = both(g, &[c.batch * c.len_q, wq + wk], &qk, dt);
    let (gv, cv) = both(g, &[c.batch * c.len_k, wv], &v, dt);
    let (gdo, cdo) = both(g, &[c.batch * c.len_q, c.heads_q * c.dim_v], &d_o, dt);
    let mask = AttentionMask {
        batch: c.batch,
        len_q: c.len_q,
        len_k: c.len_k,
        key_lens: c.key_lens.as_deref(),
        causal: c.causal,
        scale: None,
        window: None,
    };
    let site = (c.p > 0.0).then_some(DropoutSite {
        p: c.p,
        seed: seed ^ 0xd00d,
        offset: 3,
    });
    let (go, glse) = g
        .attention_with_lse(
            heads(&gqk, 0, c.heads_q, c.dim),
            heads(&gqk, wq, c.heads_kv, c.dim),
            heads(&gv, 0, c.heads_kv, c.dim_v),
            &mask,
            site,
        )
        .map_err(e)?;
    let (co, clse) = Cpu
        .attention_with_lse(
            heads(&cqk, 0, c.heads_q, c.dim),
            heads(&cqk, wq, c.heads_kv, c.dim),
            heads(&cv, 0, c.heads_kv, c.dim_v),
            &mask,
            site,
        )
        .map_err(e)?;
    // Bounds from the BHSD copies of the same inputs.
    let sel = |col: usize, w: usize| -> Vec<f32> {
        qk.chunks(wq + wk)
            .flat_map(|r| r[col..col + w].to_vec())
            .collect()
    };
    let (q, k) = (sel(0, wq), sel(wq, wk));
    let shape = Shape::new(
        c.batch, c.heads_q, c.heads_kv, c.len_q, c.len_k, c.dim, c.dim_v,
    );
    let opts = Options {
        scale: 1.0 / (c.dim as f64).sqrt(),
        causal: c.causal,
        key_lens: c.key_lens.clone(),
        window: None,
    };
    let (qb, kb, vb) = (
        bhsd(&q, c.batch, c.len_q, c.heads_q, c.dim),
        bhsd(&k, c.batch, c.len_k, c.heads_kv, c.dim),
        bhsd(&v, c.batch, c.len_k, c.heads_kv, c.dim_v),
    );
    let dob = bhsd(&d_o, c.batch, c.len_q, c.heads_q, c.dim_v);
    let widen = |t: Tolerance| {
        let mut t = twice(t);
        t.atol /= 1.0 - c.p as f64;
        t
    };
    let fwd = cuattn::tolerance::attention::bounds(&qb, &kb, &vb, &shape, opts.scale, dt);
    let bwd = cuattn::tolerance::attention_backward::bounds(
        &qb,
        &kb,
        &vb,
        &dob,
        &shape,
        &opts,
        &|_, _, _, _| true,
        dt,
    );
    let against = |what: &str, got: &DeviceTensor, want: &CpuTensor, tol: Tolerance| -> Check {
        if got.shape() != want.shape() {
            return Err(format!(
                "{what}: shape {:?} vs {:?}",
                got.shape(),
                want.shape()
            ));
        }
        let r: Vec<f64> = want.data().iter().map(|&x| x as f64).collect();
        expect_close(what, &g.to_f32(got).map_err(e)?, &r, widen(tol))
    };
    against("attention o", &go, &co, fwd.o)?;
    against("attention lse", &glse, &clse, fwd.lse)?;
    let gg = g
        .attention_backward(
            heads(&gqk, 0, c.heads_q, c.dim),
            heads(&gqk, wq, c.heads_kv, c.dim),
            heads(&gv, 0, c.heads_kv, c.dim_v),
            &go,
            &glse,
            &gdo,
            &mask,
            site,
        )
        .map_err(e)?;
    let cg = Cpu
        .attention_backward(
            heads(&cqk, 0, c.heads_q, c.dim),
            heads(&cqk, wq, c.heads_kv, c.dim),
            heads(&cv, 0, c.heads_kv, c.dim_v),
            &co,
            &clse,
            &cdo,
            &mask,
            site,
        )
        .map_err(e)?;
    against("attention dq", &gg.dq, &cg.dq, bwd.dq)?;
    against("attention dk", &gg.dk, &cg.dk, bwd.dk)?;
    against("attention dv", &gg.dv, &cg.dv, bwd.dv)
}

fn attention_cases() -> Vec<AttnCase> {
    let base = |p: f32| AttnCase {
        batch: 2,
        len_q: 21,
        len_k: 21,
        heads_q: 2,
        heads_kv: 2,
        dim: 16,
        dim_v: 16,
        key_lens: None,
        causal: None,
        p,
    };
    let mut out = Vec::new();
    for p in [0.0, 0.2] {
        out.push(base(p));
        out.push(AttnCase {
            key_lens: Some(vec![21, 9]),
            ..base(p)
        });
        out.push(AttnCase {
            causal: Some(CausalAlign::TopLeft),
            key_lens: Some(vec![0, 13]),
            ..base(p)
        });
        out.push(AttnCase {
            heads_q: 4,
            heads_kv: 2,
            dim_v: 8,
            causal: Some(CausalAlign::BottomRight),
            key_lens: Some(vec![17, 21]),
            ..base(p)
        });
    }
    out
}

#[test]
fn every_training_op_matches_the_cpu_backend() {
    let Some(gpu) = gpu_or_skip("every_training_op_matches_the_cpu_backend") else {
        return;
    };
    for dt in DType::ALL {
        let g = Cuda::new(gpu.clone(), dt).unwrap();
        let run = |what: &str, r: Check| r.unwrap_or_else(|m| panic!("{dt} {what}: {m}"));
        run("elementwise", elementwise_ops(&g, dt, 10));
        run("matmul", matmuls(&g, dt, 20));
        run("layernorm/embedding", layer_norm_and_embeddings(&g, dt, 30));
        run("loss/optimizer", loss_and_optimizer(&g, dt, 40));
        for (i, c) in attention_cases().iter().enumerate() {
            run(
                &format!(
                    "attention case {i} (p {}, {:?}, {:?})",
                    c.p, c.key_lens, c.causal
                ),
                attention_case(&g, dt, c, 50 + i as u64),
            );
        }
    }
}

fn cls_dir() -> std::path::PathBuf {
    fixture("tests/fixtures/tiny-bert-cls")
}

fn labels() -> Vec<i64> {
    json("tests/fixtures/tiny-bert-cls-train.json")["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

/// Max abs error, max |want| and the relative norm error.
fn errors(got: &[f32], want: &[f32]) -> (f64, f64, f64) {
    let (mut max_err, mut max_w, mut d2, mut w2) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &w) in got.iter().zip(want) {
        let (a, w) = (a as f64, w as f64);
        max_err = max_err.max(if a.is_finite() {
            (a - w).abs()
        } else {
            f64::INFINITY
        });
        max_w = max_w.max(w.abs());
        d2 += (a - w).powi(2);
        w2 += w * w;
    }
    (max_err, max_w, (d2 / w2.max(1e-300)).sqrt())
}

/// The tiny BERT classifier's step on the GPU in f32 against the CPU backend: the loss within
/// 1e-5 and every gradient within the bound tests/train_bert.rs holds the CPU to against
/// PyTorch (1e-4·max(1, max|g|) per element, 1e-4 in relative norm; the key biases' exact-zero
/// gradients by size only), with dropout off and on (the same Philox masks on both), with and
/// without recomputation.
#[test]
fn bert_classifier_step_matches_the_cpu_backend_in_f32() {
    let Some(gpu) = gpu_or_skip("bert_classifier_step_matches_the_cpu_backend_in_f32") else {
        return;
    };
    let g = Cuda::new(gpu, DType::F32).unwrap();
    let (batch, _) = tiny_bert_batch();
    let cpu_model =
        BertForSequenceClassification::from_folder(&Cpu, &cls_dir(), Head::FromCheckpoint).unwrap();
    let gpu_model =
        BertForSequenceClassification::from_folder(&g, &cls_dir(), Head::FromCheckpoint).unwrap();
    let labels = labels();
    for (seed, recompute) in [(None, false), (Some(7), false), (Some(7), true)] {
        let opts = StepOptions {
            dropout_seed: seed,
            step: 2,
            recompute,
            ..StepOptions::default()
        };
        let c = cpu_model
            .forward_backward(&Cpu, &batch, &labels, &opts)
            .unwrap();
        let o = gpu_model
            .forward_backward(&g, &batch, &labels, &opts)
            .unwrap();
        assert!(
            (o.loss - c.loss).abs() <= 1e-5,
            "{seed:?}: loss {} vs {}",
            o.loss,
            c.loss
        );
        assert_eq!(o.grads.names, c.grads.names);
        for ((name, gt), ct) in o
            .grads
            .names
            .iter()
            .zip(&o.grads.tensors)
            .zip(&c.grads.tensors)
        {
            assert_eq!(gt.dtype(), DType::F32, "{name}: gradients are f32");
            let (err, max_w, rel) = errors(&g.to_f32(gt).unwrap(), &Cpu.to_f32(ct).unwrap());
            let bound = 1e-4 * max_w.max(1.0);
            let key_bias = name.ends_with("attention.self.key.bias");
            assert!(
                err <= bound && (key_bias || rel <= 1e-4 || max_w == 0.0),
                "{seed:?} recompute {recompute} {name}: max abs err {err:.3e} (bound \
                 {bound:.1e}), rel norm err {rel:.3e}"
            );
        }
    }
}

/// The same GPU gradients against PyTorch's autograd on the fixture (dropout off), under the
/// bound the CPU backend meets (tests/train_bert.rs).
#[test]
fn bert_classifier_gradients_match_pytorch_in_f32() {
    let Some(gpu) = gpu_or_skip("bert_classifier_gradients_match_pytorch_in_f32") else {
        return;
    };
    let g = Cuda::new(gpu, DType::F32).unwrap();
    let (batch, _) = tiny_bert_batch();
    let m =
        BertForSequenceClassification::from_folder(&g, &cls_dir(), Head::FromCheckpoint).unwrap();
    let f = json("tests/fixtures/tiny-bert-cls-train.json");
    let out = m
        .forward_backward(&g, &batch, &labels(), &StepOptions::default())
        .unwrap();
    let loss = f["loss"].as_f64().unwrap();
    assert!(
        (out.loss as f64 - loss).abs() <= 1e-5,
        "loss {} vs {loss}",
        out.loss
    );
    let bytes = std::fs::read(fixture("tests/fixtures/tiny-bert-cls-grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, gt) in out.grads.names.iter().zip(&out.grads.tensors) {
        let view = st.tensor(&format!("grad.{name}")).unwrap();
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (err, max_w, rel) = errors(&g.to_f32(gt).unwrap(), &want);
        let bound = 1e-4 * max_w.max(1.0);
        if name.ends_with("attention.self.key.bias") {
            assert!(err <= bound && max_w <= 1e-5, "{name}: {err:.3e}");
            continue;
        }
        assert!(
            err <= bound && (rel <= 1e-4 || max_w == 0.0),
            "{name}: max abs err {err:.3e} (bound {bound:.1e}), rel norm err {rel:.3e}"
        );
    }
}

/// Gradients of one step, as host vectors.
fn step_grads(
    g: &Cuda,
    m: &BertForSequenceClassification<Cuda>,
    seed: Option<u64>,
) -> Vec<Vec<f32>> {
    let (batch, _) = tiny_bert_batch();
    let opts = StepOptions {
        dropout_seed: seed,
        step: 5,
        ..StepOptions::default()
    };
    let out = m.forward_backward(g, &batch, &labels(), &opts).unwrap();
    out.grads
        .tensors
        .iter()
        .map(|t| g.to_f32(t).unwrap())
        .collect()
}

#[test]
fn gradients_are_bitwise_identical_run_to_run() {
    let Some(gpu) = gpu_or_skip("gradients_are_bitwise_identical_run_to_run") else {
        return;
    };
    for dt in DType::ALL {
        let g = Cuda::new(gpu.clone(), dt).unwrap();
        let m = BertForSequenceClassification::from_folder(&g, &cls_dir(), Head::FromCheckpoint)
            .unwrap();
        // Dropout on: the unfused attention path; off: the fused deterministic backward.
        for seed in [None, Some(3)] {
            let a = step_grads(&g, &m, seed);
            let b = step_grads(&g, &m, seed);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{dt} dropout {seed:?}: gradients differ between two runs"
                );
            }
        }
    }
}

/// Six AdamW steps on the fixture batch (dropout off, lr 1e-3): the loss falls in every dtype
/// (f16 with the loss scaled by 2^10 and unscaled in the f32 gradients, as the fine-tuning
/// loop does), and the bf16/f16 first loss is the f32 one within the storage rounding's reach.
#[test]
fn a_few_adamw_steps_lower_the_loss_in_every_dtype() {
    let Some(gpu) = gpu_or_skip("a_few_adamw_steps_lower_the_loss_in_every_dtype") else {
        return;
    };
    let (batch, _) = tiny_bert_batch();
    let labels = labels();
    let mut first = Vec::new();
    for dt in DType::ALL {
        let g = Cuda::new(Arc::clone(&gpu), dt).unwrap();
        let mut m =
            BertForSequenceClassification::from_folder(&g, &cls_dir(), Head::FromCheckpoint)
                .unwrap();
        let mut opt = AdamW::new(
            &g,
            m.parameters(),
            AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let scale = if dt == DType::F16 { 1024.0 } else { 1.0 };
        let mut losses = Vec::new();
        for _ in 0..6 {
            let opts = StepOptions {
                loss_scale: Some(scale),
                ..StepOptions::default()
            };
            let mut out = m.forward_backward(&g, &batch, &labels, &opts).unwrap();
            out.grads.scale(&g, 1.0 / scale).unwrap();
            let norm = out.grads.clip_global_norm(&g, 1.0).unwrap();
            assert!(norm.is_finite(), "{dt}: gradient norm {norm}");
            opt.step(&g, m.parameters_mut(), &out.grads, 1e-3).unwrap();
            losses.push(out.loss);
        }
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[5] < losses[0],
            "{dt}: losses {losses:?}"
        );
        first.push(losses[0]);
    }
    // The first loss: 16-bit activations move it by a few storage roundings of the logits.
    for (dt, l) in DType::ALL.iter().zip(&first).skip(1) {
        let budget = 64.0 * dt.unit_roundoff() as f32 * first[0].abs().max(1.0);
        assert!(
            (l - first[0]).abs() <= budget,
            "{dt}: first loss {l} vs f32 {} (budget {budget})",
            first[0]
        );
    }
}
