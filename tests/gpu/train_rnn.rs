//! The recurrent models' fused kernels (`kernels/rnn_ops.cu`, through `impl TrainBackend for
//! Cuda`) against the CPU backend: the GRU step, the LSTM step and additive attention, forward
//! and backward, in every dtype, with inactive rows, padded, empty and full sequences and widths
//! across a warp; then the whole Bahdanau model's loss and every gradient on the device against
//! the CPU in f32, with GRU and with LSTM cells, and its gradients bitwise identical run to run. Bounds as in train_backend.rs: the
//! tolerance rule of the output dtype, doubled (both sides are within it of the exact result).

use cuattn::check::gpu_or_skip;
use cuattn::gpu::DeviceTensor;
use cuattn::runtime::conformance::{random, tolerance};
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::seq2seq::tasks::VOCAB;
use cuattn::runtime::seq2seq::{Bahdanau, BahdanauConfig, Cell, Seq2Seq, Seq2SeqBatch};
use cuattn::runtime::train::{CrossEntropy, TrainBackend};
use cuattn::runtime::{Backend, Cpu, CpuTensor};
use cuattn::tolerance::{expect_close, Tolerance};
use cuattn::DType;

type Check = Result<(), String>;

fn e(err: cuattn::Error) -> String {
    err.to_string()
}

fn twice(t: Tolerance) -> Tolerance {
    Tolerance {
        atol: 2.0 * t.atol,
        rtol: 2.0 * t.rtol,
        rel_norm_bound: 2.0 * t.rel_norm_bound,
        ..t
    }
}

fn both(g: &Cuda, shape: &[usize], v: &[f32], dtype: DType) -> (DeviceTensor, CpuTensor) {
    (
        g.upload_as(shape, v, dtype).unwrap(),
        Cpu.upload(shape, v).unwrap(),
    )
}

/// `got` (stored in `want_dtype`) against the CPU's `want` for `n` summed terms and `stored`
/// chained roundings of the backend's dtype.
fn close(
    what: &str,
    g: &Cuda,
    got: &DeviceTensor,
    want: &CpuTensor,
    (want_dtype, n, stored): (DType, usize, usize),
) -> Check {
    if got.dtype() != want_dtype || got.shape() != want.shape() {
        return Err(format!(
            "{what}: {} {:?}, expected {want_dtype} {:?}",
            got.dtype(),
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
    let scale = r.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let tol = twice(tolerance(g.dtype(), n, scale, stored));
    expect_close(what, &g.to_f32(got).map_err(e)?, &r, tol)
}

fn gru(g: &Cuda, dt: DType, seed: u64) -> Check {
    let (batch, hidden) = (5, 45);
    let active = [true, false, true, true, false];
    let gi = random(dt, batch * 3 * hidden, 3.0, seed);
    let gh = random(dt, batch * 3 * hidden, 3.0, seed + 1);
    let h = random(dt, batch * hidden, 1.0, seed + 2);
    let dout = random(dt, batch * hidden, 1.0, seed + 3);
    let (ggi, cgi) = both(g, &[batch, 3 * hidden], &gi, dt);
    let (ggh, cgh) = both(g, &[batch, 3 * hidden], &gh, dt);
    let (gh_, ch) = both(g, &[batch, hidden], &h, dt);
    let (gdo, cdo) = both(g, &[batch, hidden], &dout, dt);
    let (out, cache) = g.gru_cell(&ggi, &ggh, &gh_, Some(&active)).map_err(e)?;
    let (cout, ccache) = Cpu.gru_cell(&cgi, &cgh, &ch, Some(&active)).map_err(e)?;
    close("gru h'", g, &out, &cout, (dt, 4, 1))?;
    close("gru cache", g, &cache, &ccache, (dt, 4, 1))?;
    let grads = g
        .gru_cell_backward(&cache, &gh_, &gdo, Some(&active))
        .map_err(e)?;
    let want = Cpu
        .gru_cell_backward(&ccache, &ch, &cdo, Some(&active))
        .map_err(e)?;
    close("gru dgi", g, &grads.dgi, &want.dgi, (dt, 6, 3))?;
    close("gru dgh", g, &grads.dgh, &want.dgh, (dt, 6, 3))?;
    close("gru dh", g, &grads.dh, &want.dh, (dt, 2, 2))
}

fn lstm(g: &Cuda, dt: DType, seed: u64) -> Check {
    let (batch, hidden) = (5, 45);
    let active = [true, false, true, true, false];
    let gi = random(dt, batch * 4 * hidden, 3.0, seed);
    let gh = random(dt, batch * 4 * hidden, 3.0, seed + 1);
    let h = random(dt, batch * hidden, 1.0, seed + 2);
    let c = random(dt, batch * hidden, 2.0, seed + 3);
    let dh_out = random(dt, batch * hidden, 1.0, seed + 4);
    let dc_out = random(dt, batch * hidden, 1.0, seed + 5);
    let (ggi, cgi) = both(g, &[batch, 4 * hidden], &gi, dt);
    let (ggh, cgh) = both(g, &[batch, 4 * hidden], &gh, dt);
    let (gh_, ch) = both(g, &[batch, hidden], &h, dt);
    let (gc, cc) = both(g, &[batch, hidden], &c, dt);
    let (gdh, cdh) = both(g, &[batch, hidden], &dh_out, dt);
    let (gdc, cdc) = both(g, &[batch, hidden], &dc_out, dt);
    let (h2, c2, cache) = g
        .lstm_cell(&ggi, &ggh, &gh_, &gc, Some(&active))
        .map_err(e)?;
    let (ch2, cc2, ccache) = Cpu
        .lstm_cell(&cgi, &cgh, &ch, &cc, Some(&active))
        .map_err(e)?;
    close("lstm h'", g, &h2, &ch2, (dt, 4, 1))?;
    close("lstm c'", g, &c2, &cc2, (dt, 4, 1))?;
    close("lstm cache", g, &cache, &ccache, (dt, 4, 1))?;
    let grads = g
        .lstm_cell_backward(&cache, &gc, &gdh, &gdc, Some(&active))
        .map_err(e)?;
    let want = Cpu
        .lstm_cell_backward(&ccache, &cc, &cdh, &cdc, Some(&active))
        .map_err(e)?;
    close("lstm dgates", g, &grads.dgates, &want.dgates, (dt, 6, 3))?;
    close("lstm dh", g, &grads.dh, &want.dh, (dt, 2, 2))?;
    close("lstm dc", g, &grads.dc, &want.dc, (dt, 6, 3))
}

fn additive(g: &Cuda, dt: DType, seed: u64) -> Check {
    // Widths on both sides of a warp; one full, one empty and two padded sequences.
    let (batch, len_k, a, d) = (4, 37, 33, 70);
    let lens = [37usize, 0, 5, 36];
    let q = random(dt, batch * a, 1.5, seed);
    let keys = random(dt, batch * len_k * a, 1.5, seed + 1);
    let v = random(dt, a, 1.0, seed + 2);
    let values = random(dt, batch * len_k * d, 1.0, seed + 3);
    let dctx = random(dt, batch * d, 1.0, seed + 4);
    let (gq, cq) = both(g, &[batch, a], &q, dt);
    let (gk, ck) = both(g, &[batch * len_k, a], &keys, dt);
    // v is a parameter: f32 on the device too, read converted.
    let (gv, cv) = both(g, &[a], &v, DType::F32);
    let (gx, cx) = both(g, &[batch * len_k, d], &values, dt);
    let (gd, cd) = both(g, &[batch, d], &dctx, dt);
    for key_lens in [Some(&lens[..]), None] {
        let (ctx, alpha) = g
            .additive_attention(&gq, &gk, &gv, &gx, key_lens)
            .map_err(e)?;
        let (cctx, calpha) = Cpu
            .additive_attention(&cq, &ck, &cv, &cx, key_lens)
            .map_err(e)?;
        close("ctx", g, &ctx, &cctx, (dt, len_k * a, 2))?;
        close("alpha", g, &alpha, &calpha, (dt, a, 2))?;
        // Both backwards from the device's α, so they differ only by their own arithmetic.
        let alpha_host = Cpu
            .upload(&[batch, len_k], &g.to_f32(&alpha).map_err(e)?)
            .unwrap();
        let grads = g
            .additive_attention_backward(&gq, &gk, &gv, &gx, &alpha, &gd, key_lens)
            .map_err(e)?;
        let want = Cpu
            .additive_attention_backward(&cq, &ck, &cv, &cx, &alpha_host, &cd, key_lens)
            .map_err(e)?;
        let n = len_k * (a + d);
        close("dq", g, &grads.dq, &want.dq, (dt, n, 3))?;
        close("dkeys", g, &grads.dkeys, &want.dkeys, (dt, n, 3))?;
        close("dvalues", g, &grads.dvalues, &want.dvalues, (dt, 2, 1))?;
        close("dv", g, &grads.dv, &want.dv, (DType::F32, batch * n, 3))?;
    }
    Ok(())
}

#[test]
fn gru_lstm_and_additive_attention_kernels_match_the_cpu_backend() {
    let Some(gpu) = gpu_or_skip("gru_lstm_and_additive_attention_kernels_match_the_cpu_backend")
    else {
        return;
    };
    for dt in DType::ALL {
        let g = Cuda::new(gpu.clone(), dt).unwrap();
        gru(&g, dt, 10).unwrap_or_else(|m| panic!("{dt} GRU: {m}"));
        lstm(&g, dt, 30).unwrap_or_else(|m| panic!("{dt} LSTM: {m}"));
        additive(&g, dt, 20).unwrap_or_else(|m| panic!("{dt} additive attention: {m}"));
    }
}

fn batch() -> Seq2SeqBatch {
    Seq2SeqBatch::from_pairs(&[
        (vec![5, 9, 7, 4, 11], vec![4, 7, 9]),
        (vec![8], vec![6, 5, 13, 3]),
        (vec![12, 3, 6], vec![10]),
    ])
    .unwrap()
}

const CONFIG: BahdanauConfig = BahdanauConfig {
    vocab: VOCAB,
    emb: 8,
    enc_hidden: 40,
    dec_hidden: 36,
    attn: 24,
    readout: 16,
    cell: Cell::Gru,
};

#[test]
fn bahdanau_loss_and_gradients_on_the_device_match_the_cpu_in_f32() {
    let Some(gpu) = gpu_or_skip("bahdanau_loss_and_gradients_on_the_device_match_the_cpu_in_f32")
    else {
        return;
    };
    model_on_the_device_matches_the_cpu(Cuda::new(gpu, DType::F32).unwrap(), CONFIG);
}

#[test]
fn bahdanau_with_lstm_cells_on_the_device_matches_the_cpu_in_f32() {
    let Some(gpu) = gpu_or_skip("bahdanau_with_lstm_cells_on_the_device_matches_the_cpu_in_f32")
    else {
        return;
    };
    let config = BahdanauConfig {
        cell: Cell::Lstm,
        ..CONFIG
    };
    model_on_the_device_matches_the_cpu(Cuda::new(gpu, DType::F32).unwrap(), config);
}

/// The model's loss and every gradient on the device against the CPU, and the device's
/// gradients bitwise the same on a second run.
fn model_on_the_device_matches_the_cpu(g: Cuda, config: BahdanauConfig) {
    let ce = CrossEntropy {
        label_smoothing: 0.1,
        ..CrossEntropy::default()
    };
    let on_gpu = Bahdanau::new(&g, config, 7).unwrap();
    let on_cpu = Bahdanau::new(&Cpu, config, 7).unwrap();
    let (loss_g, grads_g) = on_gpu.loss_and_grads(&g, &batch(), &ce).unwrap();
    let (loss_c, grads_c) = on_cpu.loss_and_grads(&Cpu, &batch(), &ce).unwrap();
    assert!(
        (loss_g - loss_c).abs() <= 1e-4 * loss_c.abs().max(1.0),
        "loss {loss_g} vs {loss_c}"
    );
    for (name, (a, b)) in grads_c
        .names
        .iter()
        .zip(grads_g.tensors.iter().zip(&grads_c.tensors))
    {
        let want: Vec<f64> = Cpu.to_f32(b).unwrap().iter().map(|&x| x as f64).collect();
        let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
        // A whole backward through time: a loose f32 bound relative to the largest entry.
        let tol = Tolerance {
            atol: 1e-4 * scale,
            rtol: 1e-3,
            rel_norm_bound: 1e-3,
            max_finite: f64::MAX,
        };
        expect_close(name, &g.to_f32(a).unwrap(), &want, tol).unwrap();
    }
    // Deterministic: the same gradients to the bit on a second run.
    let (_, again) = on_gpu.loss_and_grads(&g, &batch(), &ce).unwrap();
    for (name, (a, b)) in grads_g
        .names
        .iter()
        .zip(grads_g.tensors.iter().zip(&again.tensors))
    {
        let (a, b) = (g.to_f32(a).unwrap(), g.to_f32(b).unwrap());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: gradients differ between runs"
        );
    }
}
