//! The unfused baseline embedded: on the caller's stream, with its cuBLAS workspace and its
//! scores workspace both the caller's memory, `forward_into_workspace` is captured in a CUDA
//! graph that holds no allocation and replays on new Q, K, V; and memory of another context
//! (views, the cuBLAS workspace as an address or a view) is refused with `Error::Device`.

use crate::graphs::{assert_finite_and_equal, kernel_and_alloc_nodes, nan_poison};
use cuattn::check::gpu_or_skip;
use cuattn::gpu::{DeviceTensor, Gpu, TensorMut};
use cuattn::ops::attention::{self, CausalAlign};
use cuattn::ops::attention_unfused::{self as unfused, Unfused};
use cuattn::reference::attention as ref_attn;
use cuattn::tolerance::attention as tolerances;
use cuattn::tolerance::expect_close;
use cuattn::{DType, Error, HostTensor, Layout};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaContext;
use rand::{Rng, SeedableRng};

fn random(dtype: DType, shape: &[usize], seed: u64) -> HostTensor {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    HostTensor::from_f32(dtype, shape, &v).unwrap()
}

/// A `bytes`-long writable view at the first 256-byte boundary inside `buf` (which must have
/// 256 bytes to spare), in `gpu`'s context.
///
/// # Safety
/// The view must not outlive `buf`'s allocation, nor be used while anything else writes it.
unsafe fn aligned_bytes(gpu: &Gpu, buf: &DeviceTensor, bytes: usize) -> TensorMut<'static> {
    let ptr = buf
        .view()
        .device_ptr()
        .next_multiple_of(unfused::BLAS_WORKSPACE_ALIGN);
    // SAFETY: [ptr, ptr + bytes) lies inside `buf`; the lifetime is the caller's contract.
    unsafe {
        TensorMut::from_raw(
            gpu.context_id(),
            ptr,
            bytes,
            DType::F32,
            Layout::contiguous(&[bytes / 4]),
        )
    }
}

/// On a stream of the caller, with cuBLAS's workspace a view of caller memory and a scores
/// workspace of half the heads (two passes): one capture of `forward_into_workspace` holds no
/// allocation node and at least the six launches of two passes; replayed on two fresh sets of
/// Q, K, V (outputs poisoned with NaN), O and LSE equal an uncaptured call on the same data bit
/// for bit and are within the attention tolerance of the f64 reference, f16 and bf16, both
/// causal alignments.
#[test]
fn unfused_baseline_on_a_caller_cublas_workspace_replays_from_a_cuda_graph_with_new_data() {
    let Some(shared) = gpu_or_skip("unfused_graph_replay") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let mut un = Unfused::new(&gpu).expect("cuBLAS on the library path");
    assert_eq!(un.blas_workspace(), None);
    let blas_bytes = unfused::blas_workspace_bytes(&gpu);
    let blas_buf = gpu
        .full(DType::F32, &[(blas_bytes + 256) / 4], 0.0)
        .unwrap();
    // SAFETY: the view lies in `blas_buf`, which outlives `un` and every replay (dropped last);
    // only `un`'s GEMMs use it.
    let mut blas_view = unsafe { aligned_bytes(&gpu, &blas_buf, blas_bytes) };
    // SAFETY: as above.
    unsafe { un.use_blas_workspace_view(&mut blas_view) }.unwrap();
    assert_eq!(un.blas_workspace(), Some(blas_bytes));

    let (b, h, lq, lk, d) = (2, 3, 70, 90, 64);
    for (dt, causal) in [
        (DType::F16, Some(CausalAlign::BottomRight)),
        (DType::BF16, Some(CausalAlign::TopLeft)),
    ] {
        let one_head = lq * lk * (4 + dt.size_bytes());
        assert_eq!(
            unfused::workspace_bytes(dt, (b, h, lq, lk)).unwrap(),
            b * h * one_head
        );
        // Three heads a pass: two passes over the six.
        let mut scores = gpu.full(DType::F32, &[3 * one_head / 4], 0.0).unwrap();
        let mut q = gpu.upload(&random(dt, &[b, h, lq, d], 1)).unwrap();
        let mut k = gpu.upload(&random(dt, &[b, h, lk, d], 2)).unwrap();
        let mut v = gpu.upload(&random(dt, &[b, h, lk, d], 3)).unwrap();
        let mut o = gpu.full(dt, &[b, h, lq, d], 0.0).unwrap();
        let mut lse = gpu.full(DType::F32, &[b, h, lq], 0.0).unwrap();
        let opts = attention::Options {
            causal,
            ..Default::default()
        };
        let run = |q: &DeviceTensor,
                   k: &DeviceTensor,
                   v: &DeviceTensor,
                   o: &mut DeviceTensor,
                   lse: &mut DeviceTensor,
                   scores: &mut DeviceTensor| {
            un.forward_into_workspace(
                &q.view(),
                &k.view(),
                &v.view(),
                &mut o.view_mut(),
                Some(&mut lse.view_mut()),
                &mut scores.view_mut(),
                &opts,
            )
        };
        // Warm-up outside the capture: loads the softmax module and cuBLAS's kernels.
        run(&q, &k, &v, &mut o, &mut lse, &mut scores).unwrap();
        gpu.synchronize().unwrap();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = run(&q, &k, &v, &mut o, &mut lse, &mut scores);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        captured.unwrap();
        let (kernels, allocs) = kernel_and_alloc_nodes(&graph);
        assert!(kernels >= 6, "{dt}: {kernels} kernel nodes for two passes");
        assert_eq!(allocs, 0, "{dt}: the captured baseline allocates");

        for round in 0..2u64 {
            let seed = 100 * (round + 1);
            let (hq, hk, hv) = (
                random(dt, &[b, h, lq, d], seed),
                random(dt, &[b, h, lk, d], seed + 1),
                random(dt, &[b, h, lk, d], seed + 2),
            );
            q.write(&hq).unwrap();
            k.write(&hk).unwrap();
            v.write(&hv).unwrap();
            nan_poison(&mut o);
            nan_poison(&mut lse);
            nan_poison(&mut scores);
            graph.launch().unwrap();
            let (go, gl) = (o.to_f32_vec().unwrap(), lse.to_f32_vec().unwrap());

            let mut o2 = gpu.full(dt, &[b, h, lq, d], f32::NAN).unwrap();
            let mut l2 = gpu.full(DType::F32, &[b, h, lq], f32::NAN).unwrap();
            run(&q, &k, &v, &mut o2, &mut l2, &mut scores).unwrap();
            assert_finite_and_equal(
                &format!("{dt} round {round} O"),
                &go,
                &o2.to_f32_vec().unwrap(),
            );
            assert_finite_and_equal(
                &format!("{dt} round {round} LSE"),
                &gl,
                &l2.to_f32_vec().unwrap(),
            );

            // The replay computed this round's data, not the captured round's.
            let shape = ref_attn::Shape::new(b, h, h, lq, lk, d, d);
            let ropts = ref_attn::Options {
                causal,
                ..ref_attn::Options::new(d)
            };
            let (fq, fk, fv) = (hq.to_f32_vec(), hk.to_f32_vec(), hv.to_f32_vec());
            let want = ref_attn::forward(&fq, &fk, &fv, &shape, &ropts).unwrap();
            let tol = tolerances::bounds(&fq, &fk, &fv, &shape, ropts.scale, dt);
            expect_close(&format!("{dt} round {round} O"), &go, &want.o, tol.o).unwrap();
            expect_close(&format!("{dt} round {round} LSE"), &gl, &want.lse, tol.lse).unwrap();
        }
        drop(graph);
    }
    gpu.synchronize().unwrap();
    drop(un);
    drop(blas_buf);
}

/// Memory of another context (a non-primary context on the same device) is refused by name
/// before any launch: Q and the scores workspace as views, cuBLAS's workspace as a view and as
/// a raw address; the refused workspaces leave cuBLAS on its own pool, and a good call runs
/// afterwards.
#[test]
fn unfused_baseline_refuses_memory_of_another_context() {
    let Some(gpu) = gpu_or_skip("unfused_foreign_context") else {
        return;
    };
    let foreign_ctx = CudaContext::new_non_primary(gpu.info().ordinal, 0).unwrap();
    let foreign = Gpu::from_context(foreign_ctx.clone(), foreign_ctx.default_stream()).unwrap();
    let mut un = Unfused::new(&gpu).expect("cuBLAS on the library path");
    let (dt, shape) = (DType::F16, [1, 2, 16, 64]);
    let q = gpu.upload(&random(dt, &shape, 1)).unwrap();
    let q_far = foreign.upload(&random(dt, &shape, 1)).unwrap();
    let k = gpu.upload(&random(dt, &shape, 2)).unwrap();
    let v = gpu.upload(&random(dt, &shape, 3)).unwrap();
    let mut o = gpu.full(dt, &shape, f32::NAN).unwrap();
    let need = unfused::workspace_bytes(dt, (1, 2, 16, 16)).unwrap();
    let mut scores = gpu.full(DType::F32, &[need / 4], 0.0).unwrap();
    let mut scores_far = foreign.full(DType::F32, &[need / 4], 0.0).unwrap();
    let opts = attention::Options::default();

    let r = un.forward_into(
        &q_far.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        None,
        &opts,
    );
    assert!(matches!(r, Err(Error::Device { arg: "q", .. })), "{r:?}");
    let r = un.forward_into_workspace(
        &q.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        None,
        &mut scores_far.view_mut(),
        &opts,
    );
    assert!(
        matches!(
            r,
            Err(Error::Device {
                arg: "workspace",
                ..
            })
        ),
        "{r:?}"
    );

    let bytes = unfused::MIN_BLAS_WORKSPACE_BYTES;
    let blas_far = foreign.full(DType::F32, &[(bytes + 256) / 4], 0.0).unwrap();
    // SAFETY: refused before use (what this test proves); `blas_far` outlives the view.
    let mut far_view = unsafe { aligned_bytes(&foreign, &blas_far, bytes) };
    // SAFETY: as above.
    let r = unsafe { un.use_blas_workspace_view(&mut far_view) };
    assert!(
        matches!(
            r,
            Err(Error::Device {
                arg: "workspace",
                ..
            })
        ),
        "{r:?}"
    );
    // The same memory as a raw address: `DeviceTensor`s are stream-ordered pool memory, which
    // the driver reports by device, so use a plain allocation of the foreign context.
    foreign_ctx.bind_to_thread().unwrap();
    // SAFETY: a plain allocation in the foreign context, freed below.
    let far_raw = unsafe { cudarc::driver::result::malloc_sync(bytes + 256) }.unwrap();
    gpu.context().bind_to_thread().unwrap();
    // SAFETY: refused before use.
    let r = unsafe {
        un.use_blas_workspace(
            far_raw.next_multiple_of(unfused::BLAS_WORKSPACE_ALIGN),
            bytes,
        )
    };
    assert!(
        matches!(
            r,
            Err(Error::Device {
                arg: "workspace",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(un.blas_workspace(), None);

    // The good call still runs, on a workspace cuBLAS allocates here.
    un.reserve_blas_workspace(bytes).unwrap();
    assert_eq!(un.blas_workspace(), Some(bytes));
    un.forward_into_workspace(
        &q.view(),
        &k.view(),
        &v.view(),
        &mut o.view_mut(),
        None,
        &mut scores.view_mut(),
        &opts,
    )
    .unwrap();
    assert!(o.to_f32_vec().unwrap().iter().all(|x| x.is_finite()));
    gpu.synchronize().unwrap();
    drop(un);
    // SAFETY: the allocation made above, never used.
    unsafe {
        foreign_ctx.bind_to_thread().unwrap();
        cudarc::driver::result::free_sync(far_raw).unwrap();
    }
    gpu.context().bind_to_thread().unwrap();
}
