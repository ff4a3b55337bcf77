//! Embedding in another runtime: ops on the caller's stream captured in a CUDA graph and
//! replayed with new data (inputs and device lengths rewritten in place) — attention, decode,
//! the linear layer's cuBLAS GEMMs and the inference backend's linear layers on the caller's
//! cuBLAS workspace —, memory of a foreign context refused with `Error::Device` (views, and
//! caller workspaces by the driver's pointer attributes), and two threads running ops on two
//! streams at once.
//! Each replay is compared with an ordinary call on the same data, which the other GPU tests
//! hold to the f64 reference, and with the reference itself.

use crate::graphs::{assert_finite_and_equal, kernel_and_alloc_nodes, nan_poison};
use cuattn::check::gpu_or_skip;
use cuattn::gpu::{ContextId, DeviceTensor, Gpu, I32View, TensorMut, TensorRef};
use cuattn::ops::gemm::{self, Gemm, WeightGradOptions};
use cuattn::ops::{attention, decode};
use cuattn::reference::attention as ref_attn;
use cuattn::runtime::conformance;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::{Activation, Backend};
use cuattn::tolerance::{expect_close, Tolerance};
use cuattn::{DType, Error, HostTensor, Layout};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn random(dtype: DType, shape: &[usize], seed: u64) -> HostTensor {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    HostTensor::from_f32(dtype, shape, &v).unwrap()
}

fn lens_buf(gpu: &Arc<Gpu>, v: &[i32]) -> CudaSlice<i32> {
    gpu.stream().clone_htod(v).unwrap()
}

fn set_lens(gpu: &Arc<Gpu>, buf: &mut CudaSlice<i32>, v: &[i32]) {
    gpu.stream().memcpy_htod(v, buf).unwrap();
}

/// Dense attention with device key lengths, captured once, replayed on two sets of inputs.
#[test]
fn attention_with_device_key_lengths_replays_from_a_cuda_graph_with_new_data() {
    let Some(shared) = gpu_or_skip("attention_graph_replay") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let (b, h, lq, lk, d) = (2, 4, 70, 90, 64);
    let dt = DType::F16;
    let mut q = gpu.upload(&random(dt, &[b, h, lq, d], 1)).unwrap();
    let mut k = gpu.upload(&random(dt, &[b, h, lk, d], 2)).unwrap();
    let mut v = gpu.upload(&random(dt, &[b, h, lk, d], 3)).unwrap();
    let mut o = gpu.full(dt, &[b, h, lq, d], 0.0).unwrap();
    let mut lse = gpu.full(DType::F32, &[b, h, lq], 0.0).unwrap();
    let mut key_lens = lens_buf(&gpu, &[90, 33]);
    let lens_view = I32View::new(&gpu, &key_lens);
    let opts = attention::Options {
        causal: Some(attention::CausalAlign::BottomRight),
        sequences: attention::Sequences::DenseDevice {
            key_lens: lens_view,
        },
        ..Default::default()
    };
    let run = |o: &mut DeviceTensor, lse: &mut DeviceTensor| {
        attention::forward_into(
            &gpu,
            &q.view(),
            &k.view(),
            &v.view(),
            &mut o.view_mut(),
            Some(&mut lse.view_mut()),
            &opts,
        )
    };
    // Warm-up: loads the module outside the capture.
    run(&mut o, &mut lse).unwrap();
    gpu.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = run(&mut o, &mut lse);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    captured.unwrap();

    for (round, lens) in [[90, 33], [17, 0]].iter().enumerate() {
        let seed = 10 * (round as u64 + 1);
        let (hq, hk, hv) = (
            random(dt, &[b, h, lq, d], seed),
            random(dt, &[b, h, lk, d], seed + 1),
            random(dt, &[b, h, lk, d], seed + 2),
        );
        q.write(&hq).unwrap();
        k.write(&hk).unwrap();
        v.write(&hv).unwrap();
        set_lens(&gpu, &mut key_lens, lens);
        nan_poison(&mut o);
        nan_poison(&mut lse);
        graph.launch().unwrap();
        let (go, gl) = (o.to_f32_vec().unwrap(), lse.to_f32_vec().unwrap());

        let mut o2 = gpu.full(dt, &[b, h, lq, d], f32::NAN).unwrap();
        let mut l2 = gpu.full(DType::F32, &[b, h, lq], f32::NAN).unwrap();
        let host_opts = attention::Options {
            causal: Some(attention::CausalAlign::BottomRight),
            sequences: attention::Sequences::Dense {
                key_lens: Some(lens),
            },
            ..Default::default()
        };
        attention::forward_into(
            &gpu,
            &q.view(),
            &k.view(),
            &v.view(),
            &mut o2.view_mut(),
            Some(&mut l2.view_mut()),
            &host_opts,
        )
        .unwrap();
        assert_finite_and_equal("o", &go, &o2.to_f32_vec().unwrap());
        let want_l = l2.to_f32_vec().unwrap();
        for (i, (g, w)) in gl.iter().zip(&want_l).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "lse[{i}]: {g} vs {w}");
        }

        // And against the f64 reference, loosely (the tolerance rule is the other tests' job):
        // the replay used this round's data, not the captured round's.
        let shape = ref_attn::Shape::new(b, h, h, lq, lk, d, d);
        let ropts = ref_attn::Options {
            causal: Some(ref_attn::CausalAlign::BottomRight),
            key_lens: Some(lens.iter().map(|&l| l as usize).collect()),
            ..ref_attn::Options::new(d)
        };
        let want = ref_attn::forward(
            &hq.to_f32_vec(),
            &hk.to_f32_vec(),
            &hv.to_f32_vec(),
            &shape,
            &ropts,
        )
        .unwrap();
        let worst = go
            .iter()
            .zip(&want.o)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 2e-2,
            "round {round}: max |replay − reference| = {worst}"
        );
    }
}

/// Decode with device cache lengths, a fixed split count and a reserved workspace, captured
/// and replayed with a new query, new cache rows and longer caches.
#[test]
fn decode_with_device_lengths_replays_from_a_cuda_graph_with_new_data() {
    let Some(shared) = gpu_or_skip("decode_graph_replay") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let (b, hq, hkv, cap, d) = (3, 8, 2, 300, 128);
    let dt = DType::BF16;
    let mut q = gpu.upload(&random(dt, &[b, hq, d], 1)).unwrap();
    let mut kc = gpu.upload(&random(dt, &[b, hkv, cap, d], 2)).unwrap();
    let mut vc = gpu.upload(&random(dt, &[b, hkv, cap, d], 3)).unwrap();
    let mut o = gpu.full(dt, &[b, hq, d], 0.0).unwrap();
    let mut lse = gpu.full(DType::F32, &[b, hq], 0.0).unwrap();
    let mut lens = lens_buf(&gpu, &[5, 300, 0]);
    let opts = decode::Options {
        splits: Some(4),
        ..Default::default()
    };
    gpu.reserve_workspace(decode::workspace_bytes(b, hq, d, 4))
        .unwrap();
    let lens_view = I32View::new(&gpu, &lens);
    let run = |o: &mut DeviceTensor, lse: &mut DeviceTensor| {
        decode::forward_into(
            &gpu,
            &q.view(),
            &kc.view(),
            &vc.view(),
            decode::CacheLens::View {
                lens: lens_view,
                max_len: cap,
            },
            &mut o.view_mut(),
            Some(&mut lse.view_mut()),
            &opts,
        )
    };
    run(&mut o, &mut lse).unwrap();
    gpu.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = run(&mut o, &mut lse);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    captured.unwrap();

    for (round, new_lens) in [[6, 299, 1], [300, 0, 150]].iter().enumerate() {
        let seed = 100 * (round as u64 + 1);
        q.write(&random(dt, &[b, hq, d], seed)).unwrap();
        kc.write(&random(dt, &[b, hkv, cap, d], seed + 1)).unwrap();
        vc.write(&random(dt, &[b, hkv, cap, d], seed + 2)).unwrap();
        set_lens(&gpu, &mut lens, new_lens);
        nan_poison(&mut o);
        nan_poison(&mut lse);
        graph.launch().unwrap();
        let (go, gl) = (o.to_f32_vec().unwrap(), lse.to_f32_vec().unwrap());
        let (o2, l2) =
            decode::forward(&q, &kc, &vc, decode::CacheLens::Host(new_lens), &opts).unwrap();
        assert_finite_and_equal("o", &go, &o2.to_f32_vec().unwrap());
        let want_l = l2.to_f32_vec().unwrap();
        for (i, (g, w)) in gl.iter().zip(&want_l).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "lse[{i}]: {g} vs {w}");
        }
    }
}

/// The linear layer's three GEMMs (forward, input gradient, accumulated weight gradient) on a
/// `Gemm` whose cuBLAS workspace is the caller's memory: captured once, the graph holds no
/// allocation; replayed on new inputs, each output equals an uncaptured call on the same data
/// bit for bit and is within the tolerance rule of the f64 products.
#[test]
fn linear_gemms_on_a_caller_cublas_workspace_replay_from_a_cuda_graph_with_new_data() {
    let Some(shared) = gpu_or_skip("gemm_graph_replay") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let mut gemm = Gemm::new(&gpu).expect("cuBLAS on the library path");
    // The caller's workspace, 256-byte aligned inside a slightly larger allocation.
    let bytes = gemm::workspace_bytes(&gpu);
    let ws = gpu.full(DType::F32, &[(bytes + 256) / 4], 0.0).unwrap();
    let base = ws.view().device_ptr();
    let ptr = base.next_multiple_of(gemm::WORKSPACE_ALIGN);
    // SAFETY: [ptr, ptr + bytes) lies inside `ws`, a live allocation of this context that
    // outlives `gemm` and every replay, touched by nothing else meanwhile.
    let misaligned = unsafe { gemm.use_workspace(ptr + 128, bytes) };
    assert!(
        matches!(
            misaligned,
            Err(Error::Alignment {
                arg: "workspace",
                ..
            })
        ),
        "{misaligned:?}"
    );
    // SAFETY: as above.
    let small = unsafe { gemm.use_workspace(ptr, gemm::MIN_WORKSPACE_BYTES - 256) };
    assert!(
        matches!(
            small,
            Err(Error::InvalidArgument {
                arg: "workspace",
                ..
            })
        ),
        "{small:?}"
    );
    assert_eq!(gemm.workspace(), None);
    // SAFETY: as above.
    unsafe { gemm.use_workspace(ptr, bytes) }.unwrap();
    assert_eq!(gemm.workspace(), Some(bytes));

    let (rows, d_in, d_out) = (96, 136, 72);
    let dt = DType::F16;
    let mut x = gpu.upload(&random(dt, &[rows, d_in], 1)).unwrap();
    let mut w = gpu.upload(&random(dt, &[d_out, d_in], 2)).unwrap();
    let mut dy = gpu.upload(&random(dt, &[rows, d_out], 3)).unwrap();
    let mut y = gpu.full(dt, &[rows, d_out], 0.0).unwrap();
    let mut dx = gpu.full(dt, &[rows, d_in], 0.0).unwrap();
    let mut dw = gpu.full(dt, &[d_out, d_in], 0.0).unwrap();
    let acc = WeightGradOptions { accumulate: true };
    type Inputs<'a> = (&'a DeviceTensor, &'a DeviceTensor, &'a DeviceTensor);
    let run = |(x, w, dy): Inputs<'_>,
               y: &mut DeviceTensor,
               dx: &mut DeviceTensor,
               dw: &mut DeviceTensor| {
        gemm.linear_forward(&x.view(), &w.view(), &mut y.view_mut())?;
        gemm.linear_input_grad(&dy.view(), &w.view(), &mut dx.view_mut())?;
        gemm.linear_weight_grad(&acc, &dy.view(), &x.view(), &mut dw.view_mut())
    };
    // Warm-up outside the capture (cuBLAS loads its kernels on first use).
    run((&x, &w, &dy), &mut y, &mut dx, &mut dw).unwrap();
    gpu.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = run((&x, &w, &dy), &mut y, &mut dx, &mut dw);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    captured.unwrap();
    let (kernels, allocs) = kernel_and_alloc_nodes(&graph);
    assert!(kernels >= 3, "{kernels} kernel nodes for three GEMMs");
    assert_eq!(allocs, 0, "the captured GEMMs allocate");

    for round in 0..2u64 {
        let seed = 10 * (round + 1);
        let (hx, hw, hdy, hdw) = (
            random(dt, &[rows, d_in], seed),
            random(dt, &[d_out, d_in], seed + 1),
            random(dt, &[rows, d_out], seed + 2),
            random(dt, &[d_out, d_in], seed + 3),
        );
        x.write(&hx).unwrap();
        w.write(&hw).unwrap();
        dy.write(&hdy).unwrap();
        dw.write(&hdw).unwrap();
        nan_poison(&mut y);
        nan_poison(&mut dx);
        graph.launch().unwrap();
        let got = [&y, &dx, &dw].map(|t| t.to_f32_vec().unwrap());

        let mut y2 = gpu.full(dt, &[rows, d_out], f32::NAN).unwrap();
        let mut dx2 = gpu.full(dt, &[rows, d_in], f32::NAN).unwrap();
        let mut dw2 = gpu.upload(&hdw).unwrap();
        run((&x, &w, &dy), &mut y2, &mut dx2, &mut dw2).unwrap();
        let plain = [&y2, &dx2, &dw2].map(|t| t.to_f32_vec().unwrap());
        for (name, (g, p)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&plain)) {
            assert_finite_and_equal(&format!("round {round} {name}"), g, p);
        }

        // The f64 products of the rounded inputs.
        let (vx, vw, vdy, vdw) = (
            hx.to_f32_vec(),
            hw.to_f32_vec(),
            hdy.to_f32_vec(),
            hdw.to_f32_vec(),
        );
        let dot = |n: usize, a: &dyn Fn(usize) -> f32, b: &dyn Fn(usize) -> f32| {
            (0..n).map(|i| a(i) as f64 * b(i) as f64).sum::<f64>()
        };
        let want_y: Vec<f64> = (0..rows * d_out)
            .map(|e| {
                let (r, o) = (e / d_out, e % d_out);
                dot(d_in, &|i| vx[r * d_in + i], &|i| vw[o * d_in + i])
            })
            .collect();
        let want_dx: Vec<f64> = (0..rows * d_in)
            .map(|e| {
                let (r, i) = (e / d_in, e % d_in);
                dot(d_out, &|o| vdy[r * d_out + o], &|o| vw[o * d_in + i])
            })
            .collect();
        let want_dw: Vec<f64> = (0..d_out * d_in)
            .map(|e| {
                let (o, i) = (e / d_in, e % d_in);
                vdw[e] as f64 + dot(rows, &|r| vdy[r * d_out + o], &|r| vx[r * d_in + i])
            })
            .collect();
        for (name, out, want, n) in [
            ("y", &got[0], &want_y, d_in),
            ("dx", &got[1], &want_dx, d_out),
            ("dw", &got[2], &want_dw, rows + 1),
        ] {
            expect_close(
                &format!("round {round} {name}"),
                out,
                want,
                Tolerance::for_output(dt, n, 1.0),
            )
            .unwrap();
        }
    }
    drop(graph);
    drop(gemm);
    drop(ws);
}

/// The runtime's CUDA inference backend on a caller cuBLAS workspace: its linear layers (GEMM,
/// then bias + GELU) and batched product, into caller outputs, captured once; the graph holds no
/// allocation; replayed on new weights and inputs, every output equals the backend's ordinary
/// (allocating, uncaptured) call on the same data bit for bit, the batched product is within
/// the tolerance rule of its f64 value, and the backend keeps passing the f64 conformance
/// checks of the CPU backend on that workspace.
#[test]
fn inference_backend_on_a_caller_cublas_workspace_replays_from_a_cuda_graph_with_new_data() {
    let Some(shared) = gpu_or_skip("backend_graph_replay") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let dt = DType::F16;
    let mut be = Cuda::new(gpu.clone(), dt).expect("cuBLAS on the library path");
    let bytes = be.blas_workspace_bytes();
    assert_eq!(bytes, gemm::workspace_bytes(&gpu));
    let ws = gpu.full(DType::F32, &[(bytes + 256) / 4], 0.0).unwrap();
    let ptr = ws
        .view()
        .device_ptr()
        .next_multiple_of(gemm::WORKSPACE_ALIGN);
    // SAFETY (each use_blas_workspace below): [ptr, ptr + bytes) lies inside `ws`, a live
    // allocation of this context that outlives `be` and every replay, touched by nothing else.
    let misaligned = unsafe { be.use_blas_workspace(ptr + 64, bytes) };
    assert!(
        matches!(
            misaligned,
            Err(Error::Alignment {
                arg: "workspace",
                ..
            })
        ),
        "{misaligned:?}"
    );
    // SAFETY: as above.
    let small = unsafe { be.use_blas_workspace(ptr, gemm::MIN_WORKSPACE_BYTES - 256) };
    assert!(
        matches!(
            small,
            Err(Error::InvalidArgument {
                arg: "workspace",
                ..
            })
        ),
        "{small:?}"
    );
    // SAFETY: refused before use.
    let null = unsafe { be.use_blas_workspace(0, bytes) };
    assert!(
        matches!(
            null,
            Err(Error::Device {
                arg: "workspace",
                ..
            })
        ),
        "{null:?}"
    );
    assert_eq!(be.blas_workspace(), None);
    // SAFETY: as above.
    unsafe { be.use_blas_workspace(ptr, bytes) }.unwrap();
    assert_eq!(be.blas_workspace(), Some(bytes));

    // A BERT feed-forward block's two linear layers and an attention-score-shaped product.
    let (rows, hidden, ffn) = (96, 128, 256);
    let (batch, m, n, k) = (2, 40, 56, 32);
    let upload = |shape: &[usize], seed: u64| gpu.upload(&random(dt, shape, seed)).unwrap();
    let mut x = upload(&[rows, hidden], 1);
    let mut w1 = upload(&[ffn, hidden], 2);
    let mut b1 = upload(&[ffn], 3);
    let mut w2 = upload(&[hidden, ffn], 4);
    let mut b2 = upload(&[hidden], 5);
    let mut a = upload(&[batch * m, k], 6);
    let mut b = upload(&[batch * n, k], 7);
    let mut h = gpu.full(dt, &[rows, ffn], 0.0).unwrap();
    let mut y = gpu.full(dt, &[rows, hidden], 0.0).unwrap();
    let mut c = gpu.full(dt, &[batch * m, n], 0.0).unwrap();
    let run = |h: &mut DeviceTensor, y: &mut DeviceTensor, c: &mut DeviceTensor| {
        be.linear_into(&x, &w1, Some(&b1), Activation::GeluErf, h)?;
        be.linear_into(h, &w2, Some(&b2), Activation::None, y)?;
        be.batched_matmul_nt_into(&a, &b, batch, c)
    };
    // Warm-up outside the capture: loads the bias kernel and cuBLAS's kernels.
    run(&mut h, &mut y, &mut c).unwrap();
    gpu.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = run(&mut h, &mut y, &mut c);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    captured.unwrap();
    let (kernels, allocs) = kernel_and_alloc_nodes(&graph);
    assert!(
        kernels >= 5,
        "{kernels} kernel nodes for three GEMMs and two bias kernels"
    );
    assert_eq!(allocs, 0, "the captured backend calls allocate");

    for round in 0..2u64 {
        let seed = 100 * (round + 1);
        let ha = random(dt, &[batch * m, k], seed + 5);
        let hb = random(dt, &[batch * n, k], seed + 6);
        for (t, host) in [
            (&mut x, random(dt, &[rows, hidden], seed)),
            (&mut w1, random(dt, &[ffn, hidden], seed + 1)),
            (&mut b1, random(dt, &[ffn], seed + 2)),
            (&mut w2, random(dt, &[hidden, ffn], seed + 3)),
            (&mut b2, random(dt, &[hidden], seed + 4)),
            (&mut a, ha.clone()),
            (&mut b, hb.clone()),
        ] {
            t.write(&host).unwrap();
        }
        nan_poison(&mut h);
        nan_poison(&mut y);
        nan_poison(&mut c);
        graph.launch().unwrap();
        let got = [&h, &y, &c].map(|t| t.to_f32_vec().unwrap());

        let h2 = be.linear(&x, &w1, Some(&b1), Activation::GeluErf).unwrap();
        let y2 = be.linear(&h2, &w2, Some(&b2), Activation::None).unwrap();
        let c2 = be.batched_matmul_nt(&a, &b, batch).unwrap();
        let plain = [&h2, &y2, &c2].map(|t| be.to_f32(t).unwrap());
        for (name, (g, p)) in ["h", "y", "c"].iter().zip(got.iter().zip(&plain)) {
            assert_finite_and_equal(&format!("round {round} {name}"), g, p);
        }
        let (va, vb) = (ha.to_f32_vec(), hb.to_f32_vec());
        let want_c: Vec<f64> = (0..batch * m * n)
            .map(|e| {
                let (bi, i, j) = (e / (m * n), (e / n) % m, e % n);
                (0..k)
                    .map(|t| va[(bi * m + i) * k + t] as f64 * vb[(bi * n + j) * k + t] as f64)
                    .sum()
            })
            .collect();
        expect_close(
            &format!("round {round} c"),
            &got[2],
            &want_c,
            Tolerance::for_output(dt, k, 1.0),
        )
        .unwrap();
    }
    drop(graph);
    // The ordinary entries on the caller's workspace, against the f64 references.
    for (i, act) in [Activation::GeluErf, Activation::None]
        .into_iter()
        .enumerate()
    {
        conformance::linear(&be, 70, 64, 130, act, i == 0, 300 + i as u64)
            .unwrap_or_else(|e| panic!("linear on the caller workspace: {e}"));
    }
    conformance::batched_matmul_nt(&be, 3, 17, 33, 64, 310)
        .unwrap_or_else(|e| panic!("batched product on the caller workspace: {e}"));
    gpu.synchronize().unwrap();
    drop(be);
    drop(ws);
}

/// A caller workspace that is not device memory this Gpu may use is refused by name, with the
/// same check, by the Gpu's scratch, `Gemm` and the inference backend: NULL, plain host
/// memory, page-locked host memory and memory `cuMemAlloc` gave a second (non-primary)
/// context on the same device. Memory of the Gpu's own context (`cuMemAlloc`) and of the
/// device's stream-ordered pool (what `DeviceTensor`s hold, which belongs to no context) is
/// taken.
#[test]
fn caller_workspaces_that_are_not_device_memory_of_the_gpu_are_a_device_error() {
    use cudarc::driver::result;
    let Some(shared) = gpu_or_skip("caller_workspace_pointer_checks") else {
        return;
    };
    let gpu = shared
        .on_stream(shared.context().new_stream().unwrap())
        .unwrap();
    let bytes = gemm::MIN_WORKSPACE_BYTES;
    let aligned = |p: u64| p.next_multiple_of(gemm::WORKSPACE_ALIGN);

    let foreign_ctx = CudaContext::new_non_primary(gpu.info().ordinal, 0).unwrap();
    foreign_ctx.bind_to_thread().unwrap();
    // SAFETY: a plain allocation in the foreign context, freed below.
    let foreign = unsafe { result::malloc_sync(bytes + 256) }.unwrap();
    gpu.context().bind_to_thread().unwrap();
    // SAFETY: plain allocations in the Gpu's context, freed below.
    let own = unsafe { result::malloc_sync(bytes + 256) }.unwrap();
    // SAFETY: page-locked host memory of the Gpu's context, freed below.
    let pinned = unsafe { result::malloc_host(bytes + 256, 0) }.unwrap();
    let host = vec![0u8; bytes + 256];
    let pool = gpu.full(DType::F32, &[(bytes + 256) / 4], 0.0).unwrap();

    let mut gemm = Gemm::new(&gpu).expect("cuBLAS on the library path");
    let mut be = Cuda::new(gpu.clone(), DType::F32).unwrap();
    let scratch = gpu.on_stream(gpu.context().new_stream().unwrap()).unwrap();
    for (what, ptr, reason) in [
        ("NULL", 0u64, Some("NULL")),
        ("plain host memory", aligned(host.as_ptr() as u64), None),
        ("page-locked host memory", aligned(pinned as u64), None),
        (
            "another context's memory",
            aligned(foreign),
            Some("allocated in CUDA context"),
        ),
    ] {
        // SAFETY: each call is refused before the memory is used (what this test proves).
        let results = unsafe {
            [
                ("Gemm", gemm.use_workspace(ptr, bytes)),
                ("Cuda", be.use_blas_workspace(ptr, bytes)),
                ("Gpu", scratch.use_workspace(ptr, bytes)),
            ]
        };
        for (who, r) in results {
            match r {
                Err(Error::Device {
                    arg: "workspace",
                    reason: got,
                }) => assert!(
                    reason.is_none_or(|want| got.contains(want)),
                    "{who}, {what}: {got}"
                ),
                other => panic!("{who}, {what}: expected Error::Device, got {other:?}"),
            }
        }
    }
    assert_eq!(gemm.workspace(), None);
    assert_eq!(be.blas_workspace(), None);
    for (what, ptr) in [
        ("cuMemAlloc memory of this context", aligned(own)),
        (
            "pool memory of this device",
            aligned(pool.view().device_ptr()),
        ),
    ] {
        // SAFETY: [ptr, ptr + bytes) is inside a live allocation that outlives `gemm`, `be`
        // and `scratch` (dropped below, before the frees), and nothing runs on it.
        unsafe {
            gemm.use_workspace(ptr, bytes)
                .unwrap_or_else(|e| panic!("Gemm, {what}: {e}"));
            be.use_blas_workspace(ptr, bytes)
                .unwrap_or_else(|e| panic!("Cuda, {what}: {e}"));
            scratch
                .use_workspace(ptr, bytes)
                .unwrap_or_else(|e| panic!("Gpu, {what}: {e}"));
        }
        assert_eq!(gemm.workspace(), Some(bytes));
        assert_eq!(be.blas_workspace(), Some(bytes));
    }
    gpu.synchronize().unwrap();
    drop((gemm, be, scratch));
    // SAFETY: the allocations made above, no longer used by anything.
    unsafe {
        result::free_host(pinned).unwrap();
        result::free_sync(own).unwrap();
        foreign_ctx.bind_to_thread().unwrap();
        result::free_sync(foreign).unwrap();
    }
    drop(pool);
}

/// A caller-supplied workspace that is too small is an error, not an allocation.
#[test]
fn a_caller_workspace_too_small_for_the_call_is_an_error() {
    let Some(shared) = gpu_or_skip("caller_workspace_too_small") else {
        return;
    };
    let gpu = shared
        .on_stream(shared.context().new_stream().unwrap())
        .unwrap();
    let (b, hq, d, cap) = (2, 4, 64, 64);
    let dt = DType::F32;
    let q = gpu.upload(&random(dt, &[b, hq, d], 1)).unwrap();
    let kc = gpu.upload(&random(dt, &[b, hq, cap, d], 2)).unwrap();
    let vc = gpu.upload(&random(dt, &[b, hq, cap, d], 3)).unwrap();
    let need = decode::workspace_bytes(b, hq, d, 2);
    let scratch = gpu.full(DType::F32, &[need / 4 - 1], 0.0).unwrap();
    let ptr = scratch.view().device_ptr();
    // SAFETY: `scratch` outlives every use of `gpu` below and nothing else touches it.
    unsafe { gpu.use_workspace(ptr, need - 4) }.unwrap();
    let mut o = gpu.full(dt, &[b, hq, d], 0.0).unwrap();
    let err = decode::forward_into(
        &gpu,
        &q.view(),
        &kc.view(),
        &vc.view(),
        decode::CacheLens::Host(&[64, 10]),
        &mut o.view_mut(),
        None,
        &decode::Options {
            splits: Some(2),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "workspace",
                ..
            }
        ),
        "{err}"
    );
    // One split needs no scratch and runs.
    decode::forward_into(
        &gpu,
        &q.view(),
        &kc.view(),
        &vc.view(),
        decode::CacheLens::Host(&[64, 10]),
        &mut o.view_mut(),
        None,
        &decode::Options {
            splits: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    gpu.synchronize().unwrap();
    drop(scratch);
}

/// Memory of another context (a non-primary context on the same device) is refused by name.
#[test]
fn views_of_another_context_are_a_device_error() {
    let Some(gpu) = gpu_or_skip("foreign_context") else {
        return;
    };
    let foreign_ctx = CudaContext::new_non_primary(gpu.info().ordinal, 0).unwrap();
    let foreign = Gpu::from_context(foreign_ctx.clone(), foreign_ctx.default_stream()).unwrap();
    assert_ne!(foreign.context_id(), gpu.context_id());
    let dt = DType::F16;
    let shape = [1, 2, 16, 64];
    let q_foreign = foreign.upload(&random(dt, &shape, 1)).unwrap();
    let k = gpu.upload(&random(dt, &shape, 2)).unwrap();
    let v = gpu.upload(&random(dt, &shape, 3)).unwrap();
    let mut o = gpu.full(dt, &shape, 0.0).unwrap();
    let err = attention::forward_into(
        &gpu,
        &q_foreign.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        None,
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Device { arg: "q", .. }), "{err}");

    // A raw view that names the foreign context, and foreign device lengths.
    let ptr = q_foreign.view().device_ptr();
    // SAFETY: a live allocation of `foreign_ctx` of this size; the op refuses it unread.
    let raw = unsafe {
        TensorRef::from_raw(
            ContextId::of(&foreign_ctx),
            ptr,
            shape.iter().product::<usize>() * 2,
            dt,
            Layout::contiguous(&shape),
        )
    };
    let err = attention::forward_into(
        &gpu,
        &k.view(),
        &raw,
        &v.view(),
        &mut o.view_mut(),
        None,
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Device { arg: "k", .. }), "{err}");
    let foreign_lens = foreign.stream().clone_htod(&[16i32]).unwrap();
    let err = attention::forward_into(
        &gpu,
        &k.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        None,
        &attention::Options {
            sequences: attention::Sequences::DenseDevice {
                key_lens: I32View::new(&foreign, &foreign_lens),
            },
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Device {
                arg: "key_lens",
                ..
            }
        ),
        "{err}"
    );
    // An output in the foreign context.
    let mut o_foreign = foreign.full(dt, &shape, 0.0).unwrap();
    let err = attention::forward_into(
        &gpu,
        &k.view(),
        &k.view(),
        &v.view(),
        &mut o_foreign.view_mut(),
        None,
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Device { arg: "o", .. }), "{err}");
    // A stream of the foreign context cannot make a handle of this one.
    assert!(matches!(
        gpu.on_stream(foreign_ctx.default_stream()),
        Err(Error::Device { arg: "stream", .. })
    ));
    let foreign_stream = foreign_ctx.new_stream().unwrap();
    // SAFETY: a live stream; the handle refuses it for belonging to another context.
    let r = unsafe { gpu.on_raw_stream(foreign_stream.cu_stream()) };
    assert!(matches!(r, Err(Error::Device { arg: "stream", .. })));
    // The good call still runs on this context afterwards, on a raw stream of it.
    let own_stream = gpu.context().new_stream().unwrap();
    // SAFETY: a live stream of this context, alive until the end of the test.
    let raw = unsafe { gpu.on_raw_stream(own_stream.cu_stream()) }.unwrap();
    let mut o_ok: TensorMut = o.view_mut();
    attention::forward_into(
        &raw,
        &k.view(),
        &k.view(),
        &v.view(),
        &mut o_ok,
        None,
        &Default::default(),
    )
    .unwrap();
    raw.synchronize().unwrap();
}

/// Two threads, each with its own stream handle, run attention and decode (which uses the
/// handle's scratch) in a loop at the same time; every result equals the same call made alone.
#[test]
fn two_threads_on_two_streams_get_the_results_of_serial_calls() {
    let Some(shared) = gpu_or_skip("two_threads_two_streams") else {
        return;
    };
    let (b, hq, hkv, cap, d) = (2, 8, 2, 512, 64);
    let dt = DType::F16;
    let work = |gpu: &Arc<Gpu>, seed: u64| -> (Vec<f32>, Vec<f32>) {
        let q = gpu.upload(&random(dt, &[b, hq, d], seed)).unwrap();
        let kc = gpu
            .upload(&random(dt, &[b, hkv, cap, d], seed + 1))
            .unwrap();
        let vc = gpu
            .upload(&random(dt, &[b, hkv, cap, d], seed + 2))
            .unwrap();
        let (mut last_d, mut last_a) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let (o, _) = decode::forward(
                &q,
                &kc,
                &vc,
                decode::CacheLens::Host(&[512, 200]),
                &decode::Options {
                    splits: Some(8),
                    ..Default::default()
                },
            )
            .unwrap();
            let qa = kc
                .view_at(0, Layout::contiguous(&[b, hkv, cap, d]))
                .unwrap();
            let mut oa = gpu.full(dt, &[b, hkv, cap, d], f32::NAN).unwrap();
            attention::forward_into(
                gpu,
                &qa,
                &kc.view(),
                &vc.view(),
                &mut oa.view_mut(),
                None,
                &Default::default(),
            )
            .unwrap();
            last_d = o.to_f32_vec().unwrap();
            last_a = oa.to_f32_vec().unwrap();
        }
        (last_d, last_a)
    };
    let serial: Vec<_> = [1u64, 50].iter().map(|&seed| work(&shared, seed)).collect();
    let handles: Vec<Arc<Gpu>> = (0..2)
        .map(|_| {
            shared
                .on_stream(shared.context().new_stream().unwrap())
                .unwrap()
        })
        .collect();
    let parallel: Vec<_> = std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .iter()
            .zip([1u64, 50])
            .map(|(g, seed)| s.spawn(move || work(g, seed)))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (i, (p, s)) in parallel.iter().zip(&serial).enumerate() {
        assert_finite_and_equal(&format!("thread {i} decode"), &p.0, &s.0);
        assert_finite_and_equal(&format!("thread {i} attention"), &p.1, &s.1);
    }
}
