//! A whole transformer layer on the caller's stream and buffers: a BERT encoder layer made only
//! of the CUDA backend's `_into` calls (linear layers, attention with device key lengths and
//! its LSE, the fused residual add + LayerNorm) is captured in one CUDA graph with no
//! allocation node and replayed on new inputs and key lengths, each replay bit-identical to
//! the runtime's ordinary forward (`runtime::layers`, the code `Bert::forward` runs per layer).
//! The unfused baseline on a caller workspace against its own-workspace path; the `_into`
//! calls' typed errors; the elementwise kernels on plain views; the embedding gather from
//! device ids in a graph.

use crate::graphs::{assert_finite_and_equal, kernel_and_alloc_nodes, nan_poison};
use cuattn::check::gpu_or_skip;
use cuattn::gpu::{DeviceTensor, Gpu, I32View};
use cuattn::ops::attention::{self, CausalAlign};
use cuattn::ops::attention_unfused::{self as unfused, Unfused};
use cuattn::ops::{elementwise, gemm};
use cuattn::runtime::checkpoint::HostParam;
use cuattn::runtime::cuda::{AttentionIntoOptions, Cuda};
use cuattn::runtime::layers::{FeedForward, LayerNorm, Linear, MultiHeadAttention};
use cuattn::runtime::{Activation, AttentionMask, Backend, Heads};
use cuattn::tolerance::{expect_close, Tolerance};
use cuattn::{DType, Error, HostTensor, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| scale * rng.gen_range(-1.0f32..1.0))
        .collect()
}

fn param(shape: &[usize], seed: u64, scale: f32) -> HostParam {
    HostParam {
        shape: shape.to_vec(),
        values: values(shape.iter().product(), seed, scale),
    }
}

/// A MiniLM-shaped layer, scaled down: hidden 64 in 4 heads of 16, feed-forward 128, GELU.
struct Sizes {
    batch: usize,
    len: usize,
    hidden: usize,
    heads: usize,
    ffn: usize,
    eps: f32,
}

/// One layer's parameters as the runtime holds them (the ordinary forward's) and, uploaded
/// again from the same values, as the `_into` calls read them.
struct Params {
    q: (HostParam, HostParam),
    k: (HostParam, HostParam),
    v: (HostParam, HostParam),
    o: (HostParam, HostParam),
    up: (HostParam, HostParam),
    down: (HostParam, HostParam),
    ln1: (HostParam, HostParam),
    ln2: (HostParam, HostParam),
}

impl Params {
    fn random(s: &Sizes, seed: u64) -> Params {
        let (h, f) = (s.hidden, s.ffn);
        let lin = |out: usize, inp: usize, i: u64| {
            let scale = 1.0 / (inp as f32).sqrt();
            (
                param(&[out, inp], seed + 2 * i, scale),
                param(&[out], seed + 2 * i + 1, 0.1),
            )
        };
        let norm = |i: u64| {
            let mut g = param(&[h], seed + 100 + 2 * i, 0.2);
            g.values.iter_mut().for_each(|x| *x += 1.0);
            (g, param(&[h], seed + 101 + 2 * i, 0.1))
        };
        Params {
            q: lin(h, h, 0),
            k: lin(h, h, 1),
            v: lin(h, h, 2),
            o: lin(h, h, 3),
            up: lin(f, h, 4),
            down: lin(h, f, 5),
            ln1: norm(0),
            ln2: norm(1),
        }
    }
}

/// The runtime's own layer objects (what `Bert::forward` runs per layer).
struct RuntimeLayer {
    attention: MultiHeadAttention<Cuda>,
    norm1: LayerNorm<Cuda>,
    ffn: FeedForward<Cuda>,
    norm2: LayerNorm<Cuda>,
}

impl RuntimeLayer {
    fn new(be: &Cuda, s: &Sizes, p: &Params) -> Result<RuntimeLayer> {
        Ok(RuntimeLayer {
            attention: MultiHeadAttention::self_attention(
                be,
                s.heads,
                (&p.q.0, Some(&p.q.1)),
                (&p.k.0, Some(&p.k.1)),
                (&p.v.0, Some(&p.v.1)),
                (&p.o.0, Some(&p.o.1)),
            )?,
            norm1: LayerNorm::new(be, &p.ln1.0, &p.ln1.1, s.eps)?,
            ffn: FeedForward {
                up: Linear::new(be, &p.up.0, Some(&p.up.1))?,
                down: Linear::new(be, &p.down.0, Some(&p.down.1))?,
                act: Activation::GeluErf,
            },
            norm2: LayerNorm::new(be, &p.ln2.0, &p.ln2.1, s.eps)?,
        })
    }

    /// `Bert::forward`'s loop body.
    fn forward(
        &self,
        be: &Cuda,
        s: &Sizes,
        x: &DeviceTensor,
        lens: &[usize],
    ) -> Result<DeviceTensor> {
        let a = self
            .attention
            .forward_self(be, x, s.batch, s.len, Some(lens), false, None)?;
        let h1 = self.norm1.forward(be, &a, Some(x))?;
        let f = self.ffn.forward(be, &h1)?;
        self.norm2.forward(be, &f, Some(&h1))
    }
}

/// The same layer as `_into` calls on tensors the caller allocated once.
struct IntoLayer {
    qkv_w: DeviceTensor,
    qkv_b: DeviceTensor,
    o: (DeviceTensor, DeviceTensor),
    up: (DeviceTensor, DeviceTensor),
    down: (DeviceTensor, DeviceTensor),
    ln1: (DeviceTensor, DeviceTensor),
    ln2: (DeviceTensor, DeviceTensor),
}

/// Every intermediate and output of the layer, the caller's.
struct Buffers {
    qkv: DeviceTensor,
    ctx: DeviceTensor,
    lse: DeviceTensor,
    attn_out: DeviceTensor,
    sum1: DeviceTensor,
    h1: DeviceTensor,
    up: DeviceTensor,
    down: DeviceTensor,
    sum2: DeviceTensor,
    out: DeviceTensor,
}

impl Buffers {
    fn new(gpu: &Arc<Gpu>, dt: DType, s: &Sizes) -> Buffers {
        let rows = s.batch * s.len;
        let z = |shape: &[usize]| gpu.zeros(dt, shape).unwrap();
        Buffers {
            qkv: z(&[rows, 3 * s.hidden]),
            ctx: z(&[rows, s.hidden]),
            lse: gpu.zeros(DType::F32, &[s.batch, s.heads, s.len]).unwrap(),
            attn_out: z(&[rows, s.hidden]),
            sum1: z(&[rows, s.hidden]),
            h1: z(&[rows, s.hidden]),
            up: z(&[rows, s.ffn]),
            down: z(&[rows, s.hidden]),
            sum2: z(&[rows, s.hidden]),
            out: z(&[rows, s.hidden]),
        }
    }

    fn poison_all(&mut self) {
        for t in [
            &mut self.qkv,
            &mut self.ctx,
            &mut self.lse,
            &mut self.attn_out,
            &mut self.sum1,
            &mut self.h1,
            &mut self.up,
            &mut self.down,
            &mut self.sum2,
            &mut self.out,
        ] {
            nan_poison(t);
        }
    }
}

impl IntoLayer {
    fn new(be: &Cuda, p: &Params) -> Result<IntoLayer> {
        let qkv = Linear::fused(
            be,
            &[
                (&p.q.0, Some(&p.q.1)),
                (&p.k.0, Some(&p.k.1)),
                (&p.v.0, Some(&p.v.1)),
            ],
        )?;
        let up = |(a, b): &(HostParam, HostParam)| -> Result<(DeviceTensor, DeviceTensor)> {
            Ok((
                be.upload(&a.shape, &a.values)?,
                be.upload(&b.shape, &b.values)?,
            ))
        };
        Ok(IntoLayer {
            qkv_w: qkv.weight,
            qkv_b: qkv.bias.expect("fused biases"),
            o: up(&p.o)?,
            up: up(&p.up)?,
            down: up(&p.down)?,
            ln1: up(&p.ln1)?,
            ln2: up(&p.ln2)?,
        })
    }

    /// One encoder layer: `out = LN2(FFN(h1) + h1)`, `h1 = LN1(O(attention(QKV(x))) + x)`.
    fn forward_into(
        &self,
        be: &Cuda,
        s: &Sizes,
        x: &DeviceTensor,
        key_lens: I32View<'_>,
        b: &mut Buffers,
    ) -> Result<()> {
        let none = Activation::None;
        be.linear_into(x, &self.qkv_w, Some(&self.qkv_b), none, &mut b.qkv)?;
        let dim = s.hidden / s.heads;
        let heads = |col| Heads {
            tensor: &b.qkv,
            col,
            heads: s.heads,
            dim,
        };
        let mask = AttentionMask {
            batch: s.batch,
            len_q: s.len,
            len_k: s.len,
            key_lens: None,
            causal: None,
            window: None,
            scale: None,
        };
        let opts = AttentionIntoOptions {
            device_key_lens: Some(key_lens),
            lse: Some(&mut b.lse),
        };
        let (q, k, v) = (heads(0), heads(s.hidden), heads(2 * s.hidden));
        be.attention_into(q, k, v, &mask, &mut b.ctx, opts)?;
        be.linear_into(&b.ctx, &self.o.0, Some(&self.o.1), none, &mut b.attn_out)?;
        let (g1, b1) = &self.ln1;
        be.layer_norm_into(
            &b.attn_out,
            Some((x, &mut b.sum1)),
            g1,
            b1,
            s.eps,
            &mut b.h1,
        )?;
        let gelu = Activation::GeluErf;
        be.linear_into(&b.h1, &self.up.0, Some(&self.up.1), gelu, &mut b.up)?;
        be.linear_into(&b.up, &self.down.0, Some(&self.down.1), none, &mut b.down)?;
        let (g2, b2) = &self.ln2;
        let h1 = &b.h1;
        be.layer_norm_into(&b.down, Some((h1, &mut b.sum2)), g2, b2, s.eps, &mut b.out)
    }
}

/// A BERT encoder layer made of `_into` calls on a caller stream, with the cuBLAS workspace
/// the caller's and the key lengths on the device, captured once: the graph holds no
/// allocation node. Replayed twice on new inputs and new key lengths (padding in one round,
/// none in the other) with every output poisoned first, its hidden states equal the
/// runtime's ordinary forward (the `runtime::layers` objects `Bert::forward` runs, allocating,
/// with host key lengths) bit for bit, and so do the intermediate h1 and the sum of the fused
/// residual add; the LSE equals an uncaptured `attention_into` with host key lengths and is
/// finite.
#[test]
fn a_bert_layer_of_into_calls_replays_from_a_cuda_graph_equal_to_the_runtime_forward() {
    let Some(shared) = gpu_or_skip("bert_layer_graph_replay") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let dt = DType::F16;
    let mut be = Cuda::new(gpu.clone(), dt).expect("cuBLAS on the library path");
    let bytes = be.blas_workspace_bytes();
    let ws = gpu.zeros(DType::F32, &[(bytes + 256) / 4]).unwrap();
    let ptr = ws
        .view()
        .device_ptr()
        .next_multiple_of(gemm::WORKSPACE_ALIGN);
    // SAFETY: [ptr, ptr + bytes) lies inside `ws`, a live allocation of this context that
    // outlives `be` and every replay, touched by nothing else.
    unsafe { be.use_blas_workspace(ptr, bytes) }.unwrap();

    let s = Sizes {
        batch: 3,
        len: 40,
        hidden: 64,
        heads: 4,
        ffn: 128,
        eps: 1e-12,
    };
    // No decode-shaped call: the layer takes no scratch of the Gpu.
    let dims = (s.hidden / s.heads, s.hidden / s.heads);
    let scratch = be.attention_workspace_bytes((s.batch, s.len, s.len), (s.heads, s.heads), dims);
    assert_eq!(scratch.unwrap(), 0);
    let params = Params::random(&s, 7);
    let runtime = RuntimeLayer::new(&be, &s, &params).unwrap();
    let layer = IntoLayer::new(&be, &params).unwrap();
    let rows = s.batch * s.len;
    let mut x = be
        .upload(&[rows, s.hidden], &values(rows * s.hidden, 1, 1.0))
        .unwrap();
    let mut lens: CudaSlice<i32> = gpu.stream().clone_htod(&[s.len as i32; 3]).unwrap();
    let mut bufs = Buffers::new(&gpu, dt, &s);

    // Warm-up outside the capture: loads every kernel and cuBLAS's.
    layer
        .forward_into(&be, &s, &x, I32View::new(&gpu, &lens), &mut bufs)
        .unwrap();
    gpu.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = layer.forward_into(&be, &s, &x, I32View::new(&gpu, &lens), &mut bufs);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    captured.unwrap();
    let (kernels, allocs) = kernel_and_alloc_nodes(&graph);
    assert!(
        kernels >= 11,
        "{kernels} kernel nodes for 4 GEMMs, 4 bias kernels, attention and 2 LayerNorms"
    );
    assert_eq!(allocs, 0, "the captured layer allocates");

    for (round, host_lens) in [[40usize, 17, 1], [40, 40, 40]].into_iter().enumerate() {
        let seed = 1000 * (round as u64 + 1);
        let xv = values(rows * s.hidden, seed, 1.0);
        x.write(&HostTensor::from_f32(dt, &[rows, s.hidden], &xv).unwrap())
            .unwrap();
        let dev: Vec<i32> = host_lens.iter().map(|&l| l as i32).collect();
        gpu.stream().memcpy_htod(&dev, &mut lens).unwrap();
        bufs.poison_all();
        graph.launch().unwrap();
        let got = |t: &DeviceTensor| t.to_f32_vec().unwrap();
        let (out, h1, sum1, lse) = (
            got(&bufs.out),
            got(&bufs.h1),
            got(&bufs.sum1),
            got(&bufs.lse),
        );

        let want = runtime.forward(&be, &s, &x, &host_lens).unwrap();
        assert_finite_and_equal(
            &format!("round {round} out"),
            &out,
            &be.to_f32(&want).unwrap(),
        );
        // The first half of the layer on its own, and the fused add's sum.
        let a = runtime
            .attention
            .forward_self(&be, &x, s.batch, s.len, Some(&host_lens), false, None)
            .unwrap();
        let h1_want = runtime.norm1.forward(&be, &a, Some(&x)).unwrap();
        assert_finite_and_equal(
            &format!("round {round} h1"),
            &h1,
            &be.to_f32(&h1_want).unwrap(),
        );
        let sum_want = be.add(&a, &x).unwrap();
        assert_finite_and_equal(
            &format!("round {round} sum"),
            &sum1,
            &be.to_f32(&sum_want).unwrap(),
        );

        // The LSE with the key lengths given on the host instead, outside any graph.
        let dim = s.hidden / s.heads;
        let heads = |col| Heads {
            tensor: &bufs.qkv,
            col,
            heads: s.heads,
            dim,
        };
        let mask = AttentionMask {
            batch: s.batch,
            len_q: s.len,
            len_k: s.len,
            key_lens: Some(&host_lens),
            causal: None,
            window: None,
            scale: None,
        };
        let mut ctx2 = gpu.zeros(dt, &[rows, s.hidden]).unwrap();
        let mut lse2 = gpu.zeros(DType::F32, &[s.batch, s.heads, s.len]).unwrap();
        let opts = AttentionIntoOptions {
            device_key_lens: None,
            lse: Some(&mut lse2),
        };
        let (q, k, v) = (heads(0), heads(s.hidden), heads(2 * s.hidden));
        be.attention_into(q, k, v, &mask, &mut ctx2, opts).unwrap();
        assert_finite_and_equal(
            &format!("round {round} lse"),
            &lse,
            &lse2.to_f32_vec().unwrap(),
        );
        assert!(lse.iter().all(|l| l.is_finite()), "round {round}: LSE");
        assert_finite_and_equal(
            &format!("round {round} attention"),
            &got(&bufs.ctx),
            &ctx2.to_f32_vec().unwrap(),
        );
    }
    drop(graph);
    gpu.synchronize().unwrap();
    drop(be);
    drop(ws);
}

/// The `_into` calls refuse, by name and before any launch, outputs of the wrong shape or
/// dtype, an LSE of the wrong shape, key lengths given twice or of the wrong count, and a
/// residual sum of the wrong shape; a call with no keys writes zeros and an LSE of −inf into
/// poisoned outputs.
#[test]
fn into_calls_with_bad_outputs_are_typed_errors_and_no_keys_give_zeros() {
    let Some(gpu) = gpu_or_skip("into_calls_bad_outputs") else {
        return;
    };
    let dt = DType::BF16;
    let be = Cuda::new(gpu.clone(), dt).expect("cuBLAS on the library path");
    let (batch, len, heads, dim) = (2, 8, 2, 16);
    let width = heads * dim;
    let rows = batch * len;
    let t = |shape: &[usize], seed: u64| {
        be.upload(shape, &values(shape.iter().product(), seed, 1.0))
            .unwrap()
    };
    let a = t(&[rows, width], 1);
    let b = t(&[rows, width], 2);
    let mut wrong = gpu.zeros(dt, &[rows, width + 1]).unwrap();
    let r = be.add_into(&a, &b, &mut wrong);
    assert!(matches!(r, Err(Error::Shape { arg: "out", .. })), "{r:?}");
    let mut f32_out = gpu.zeros(DType::F32, &[rows, width]).unwrap();
    let r = be.add_into(&a, &b, &mut f32_out);
    assert!(matches!(r, Err(Error::DType { arg: "out", .. })), "{r:?}");
    let short = t(&[rows - 1, width], 3);
    let mut out = gpu.zeros(dt, &[rows, width]).unwrap();
    let r = be.add_into(&a, &short, &mut out);
    assert!(matches!(r, Err(Error::Shape { arg: "b", .. })), "{r:?}");

    let (g, beta) = (t(&[width], 4), t(&[width], 5));
    let mut sum_wrong = gpu.zeros(dt, &[rows - 1, width]).unwrap();
    let r = be.layer_norm_into(&a, Some((&b, &mut sum_wrong)), &g, &beta, 1e-5, &mut out);
    assert!(r.is_err(), "a residual sum of the wrong shape: {r:?}");
    let r = be.layer_norm_into(&a, None, &g, &beta, 1e-5, &mut f32_out);
    assert!(matches!(r, Err(Error::DType { arg: "y", .. })), "{r:?}");

    let qkv = t(&[rows, 3 * width], 6);
    let h = |col| Heads {
        tensor: &qkv,
        col,
        heads,
        dim,
    };
    let host_lens = [8usize, 3];
    let mask = AttentionMask {
        batch,
        len_q: len,
        len_k: len,
        key_lens: Some(&host_lens),
        causal: None,
        window: None,
        scale: None,
    };
    let r = be.attention_into(
        h(0),
        h(width),
        h(2 * width),
        &mask,
        &mut wrong,
        Default::default(),
    );
    assert!(matches!(r, Err(Error::Shape { arg: "out", .. })), "{r:?}");
    let mut bad_lse = gpu.zeros(DType::F32, &[batch, heads, len + 1]).unwrap();
    let opts = AttentionIntoOptions {
        device_key_lens: None,
        lse: Some(&mut bad_lse),
    };
    let r = be.attention_into(h(0), h(width), h(2 * width), &mask, &mut out, opts);
    assert!(matches!(r, Err(Error::Shape { arg: "lse", .. })), "{r:?}");
    let mut lse16 = gpu.zeros(dt, &[batch, heads, len]).unwrap();
    let opts = AttentionIntoOptions {
        device_key_lens: None,
        lse: Some(&mut lse16),
    };
    let r = be.attention_into(h(0), h(width), h(2 * width), &mask, &mut out, opts);
    assert!(matches!(r, Err(Error::DType { arg: "lse", .. })), "{r:?}");
    let dev: CudaSlice<i32> = gpu.stream().clone_htod(&[8i32, 3]).unwrap();
    let opts = AttentionIntoOptions {
        device_key_lens: Some(I32View::new(&gpu, &dev)),
        lse: None,
    };
    let r = be.attention_into(h(0), h(width), h(2 * width), &mask, &mut out, opts);
    assert!(
        matches!(
            r,
            Err(Error::InvalidArgument {
                arg: "key_lens",
                ..
            })
        ),
        "both host and device lengths: {r:?}"
    );
    let three: CudaSlice<i32> = gpu.stream().clone_htod(&[8i32, 3, 1]).unwrap();
    let no_host = AttentionMask {
        key_lens: None,
        ..mask
    };
    let opts = AttentionIntoOptions {
        device_key_lens: Some(I32View::new(&gpu, &three)),
        lse: None,
    };
    let r = be.attention_into(h(0), h(width), h(2 * width), &no_host, &mut out, opts);
    assert!(
        matches!(
            r,
            Err(Error::Shape {
                arg: "key_lens",
                ..
            })
        ),
        "{r:?}"
    );

    // No keys at all: zeros and −inf.
    let empty_k = gpu.zeros(dt, &[0, 3 * width]).unwrap();
    let hk = |col| Heads {
        tensor: &empty_k,
        col,
        heads,
        dim,
    };
    let no_keys = AttentionMask {
        len_k: 0,
        key_lens: None,
        ..mask
    };
    let mut lse = gpu.zeros(DType::F32, &[batch, heads, len]).unwrap();
    nan_poison(&mut out);
    nan_poison(&mut lse);
    let opts = AttentionIntoOptions {
        device_key_lens: None,
        lse: Some(&mut lse),
    };
    be.attention_into(h(0), hk(width), hk(2 * width), &no_keys, &mut out, opts)
        .unwrap();
    assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    assert!(lse
        .to_f32_vec()
        .unwrap()
        .iter()
        .all(|&l| l == f32::NEG_INFINITY));
}

/// The unfused baseline on a caller workspace of `workspace_bytes` (every head in one pass)
/// equals its own-workspace path bit for bit, O and LSE, on fresh random inputs with poisoned
/// outputs, both causal alignments; on a workspace of one head (a pass per head) it agrees
/// with it within the tolerance rule; a workspace under one head is refused by name.
#[test]
fn unfused_baseline_on_a_caller_workspace_matches_its_own_workspace_path() {
    let Some(gpu) = gpu_or_skip("unfused_caller_workspace") else {
        return;
    };
    let mut own = Unfused::new(&gpu).expect("cuBLAS on the library path");
    let (b, h, lq, lk, d) = (2, 3, 70, 90, 64);
    for (i, (dt, causal)) in [
        (DType::F16, None),
        (DType::BF16, Some(CausalAlign::TopLeft)),
        (DType::F32, Some(CausalAlign::BottomRight)),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 50 + 10 * i as u64;
        let host = |shape: &[usize], s: u64| {
            HostTensor::from_f32(dt, shape, &values(shape.iter().product(), s, 1.0)).unwrap()
        };
        let q = gpu.upload(&host(&[b, h, lq, d], seed)).unwrap();
        let k = gpu.upload(&host(&[b, h, lk, d], seed + 1)).unwrap();
        let v = gpu.upload(&host(&[b, h, lk, d], seed + 2)).unwrap();
        let opts = attention::Options {
            causal,
            ..Default::default()
        };
        let mut o1 = gpu.zeros(dt, &[b, h, lq, d]).unwrap();
        let mut l1 = gpu.zeros(DType::F32, &[b, h, lq]).unwrap();
        nan_poison(&mut o1);
        nan_poison(&mut l1);
        own.forward_into(
            &q.view(),
            &k.view(),
            &v.view(),
            &mut o1.view_mut(),
            Some(&mut l1.view_mut()),
            &opts,
        )
        .unwrap();
        let (o1, l1) = (o1.to_f32_vec().unwrap(), l1.to_f32_vec().unwrap());

        let all = unfused::workspace_bytes(dt, (b, h, lq, lk)).unwrap();
        let one_head = lq * lk * (4 + dt.size_bytes());
        assert_eq!(all, b * h * one_head);
        for (bytes, exact) in [(all, true), (one_head, false), (one_head - 4, false)] {
            let mut ws = gpu.zeros(DType::F32, &[bytes / 4]).unwrap();
            nan_poison(&mut ws);
            let mut o2 = gpu.zeros(dt, &[b, h, lq, d]).unwrap();
            let mut l2 = gpu.zeros(DType::F32, &[b, h, lq]).unwrap();
            nan_poison(&mut o2);
            nan_poison(&mut l2);
            let r = own.forward_into_workspace(
                &q.view(),
                &k.view(),
                &v.view(),
                &mut o2.view_mut(),
                Some(&mut l2.view_mut()),
                &mut ws.view_mut(),
                &opts,
            );
            if bytes < one_head {
                assert!(
                    matches!(
                        r,
                        Err(Error::InvalidArgument {
                            arg: "workspace",
                            ..
                        })
                    ),
                    "{r:?}"
                );
                continue;
            }
            r.unwrap();
            let (o2, l2) = (o2.to_f32_vec().unwrap(), l2.to_f32_vec().unwrap());
            if exact {
                assert_finite_and_equal(&format!("{dt} O"), &o2, &o1);
                assert_finite_and_equal(&format!("{dt} LSE"), &l2, &l1);
            } else {
                let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                expect_close(
                    &format!("{dt} O, one head per pass"),
                    &o2,
                    &want(&o1),
                    Tolerance::for_output(dt, lk, 1.0),
                )
                .unwrap();
                expect_close(
                    &format!("{dt} LSE, one head per pass"),
                    &l2,
                    &want(&l1),
                    Tolerance::for_output(DType::F32, d, 1.0),
                )
                .unwrap();
            }
        }
    }
}

/// The runtime's elementwise kernels on plain views (`ops::elementwise`), as an embedder with
/// its own memory calls them: bias + each activation in place and the sum, on fresh random
/// f16 inputs with poisoned outputs, against the f64 arithmetic of the rounded inputs under the
/// tolerance rule (the sum's terms are two, the scale 2).
#[test]
fn elementwise_ops_on_caller_views_match_the_f64_arithmetic() {
    let Some(gpu) = gpu_or_skip("elementwise_views") else {
        return;
    };
    let dt = DType::F16;
    let (rows, cols) = (37, 96);
    let host = |shape: &[usize], seed: u64| {
        HostTensor::from_f32(dt, shape, &values(shape.iter().product(), seed, 1.0)).unwrap()
    };
    let (xh, bh) = (host(&[rows, cols], 11), host(&[cols], 12));
    let (xv, bv) = (xh.to_f32_vec(), bh.to_f32_vec());
    let bias = gpu.upload(&bh).unwrap();
    let tol = Tolerance::for_output(dt, 2, 2.0);
    let gelu_erf = |x: f64| 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
    let gelu_tanh = |x: f64| {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
    };
    let acts: [(Activation, &dyn Fn(f64) -> f64); 5] = [
        (Activation::None, &|x| x),
        (Activation::GeluErf, &gelu_erf),
        (Activation::GeluTanh, &gelu_tanh),
        (Activation::Relu, &|x: f64| x.max(0.0)),
        (Activation::Tanh, &|x: f64| x.tanh()),
    ];
    for (act, f) in acts {
        let mut y = gpu.upload(&xh).unwrap();
        elementwise::bias_act_into(&gpu, &mut y.view_mut(), Some(&bias.view()), act).unwrap();
        let want: Vec<f64> = (0..rows * cols)
            .map(|i| f(xv[i] as f64 + bv[i % cols] as f64))
            .collect();
        expect_close(&format!("{act:?}"), &y.to_f32_vec().unwrap(), &want, tol).unwrap();
    }
    let yh = host(&[rows, cols], 13);
    let (x, y) = (gpu.upload(&xh).unwrap(), gpu.upload(&yh).unwrap());
    let mut out = gpu.zeros(dt, &[rows, cols]).unwrap();
    nan_poison(&mut out);
    elementwise::add_into(&gpu, &x.view(), &y.view(), &mut out.view_mut()).unwrap();
    let yv = yh.to_f32_vec();
    let want: Vec<f64> = (0..rows * cols)
        .map(|i| xv[i] as f64 + yv[i] as f64)
        .collect();
    expect_close("add", &out.to_f32_vec().unwrap(), &want, tol).unwrap();
    let mut wrong = gpu.zeros(dt, &[rows, cols + 1]).unwrap();
    let r = elementwise::add_into(&gpu, &x.view(), &y.view(), &mut wrong.view_mut());
    assert!(matches!(r, Err(Error::Shape { arg: "out", .. })), "{r:?}");
}

/// The embedding gather with its ids on the device, captured in a graph (one kernel node, no
/// allocation) and replayed with new ids written into the same buffer: every row equals the
/// table's row bit for bit, in each dtype; an id outside the table (past the end, or negative)
/// gives a row of NaN. The output is filled with a finite sentinel before each replay, so an
/// unwritten row fails both checks.
#[test]
fn gathered_rows_from_device_ids_replay_from_a_graph_and_outside_ids_give_nan_rows() {
    let Some(shared) = gpu_or_skip("gather_rows_into") else {
        return;
    };
    let stream = shared.context().new_stream().unwrap();
    let gpu = shared.on_stream(stream.clone()).unwrap();
    let (rows, width) = (50usize, 24usize);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let th = HostTensor::from_f32(dt, &[rows, width], &values(rows * width, 21, 1.0)).unwrap();
        let tv = th.to_f32_vec();
        let table = gpu.upload(&th).unwrap();
        let first = [7i32, 0, 49, 3, 7, 12];
        let mut ids: CudaSlice<i32> = gpu.stream().clone_htod(&first).unwrap();
        let mut out = gpu.zeros(dt, &[first.len(), width]).unwrap();
        let gather = |out: &mut DeviceTensor, ids: &CudaSlice<i32>| {
            elementwise::gather_rows_into(
                &gpu,
                &table.view(),
                &I32View::new(&gpu, ids),
                &mut out.view_mut(),
            )
        };
        gather(&mut out, &ids).unwrap(); // loads the kernel outside the capture
        gpu.synchronize().unwrap();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = gather(&mut out, &ids);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        captured.unwrap();
        assert_eq!(
            kernel_and_alloc_nodes(&graph),
            (1, 0),
            "{dt:?}: one kernel, no alloc"
        );
        for id_set in [first, [49, 50, -1, 0, 2, 48]] {
            gpu.stream().memcpy_htod(&id_set, &mut ids).unwrap();
            let sentinel = vec![1234.0f32; id_set.len() * width];
            out.write(&HostTensor::from_f32(dt, out.shape(), &sentinel).unwrap())
                .unwrap();
            graph.launch().unwrap();
            let got = out.to_f32_vec().unwrap();
            for (r, &id) in id_set.iter().enumerate() {
                let row = &got[r * width..(r + 1) * width];
                if (0..rows as i32).contains(&id) {
                    let want = &tv[id as usize * width..(id as usize + 1) * width];
                    assert_finite_and_equal(&format!("{dt:?} row {r} (id {id})"), row, want);
                } else {
                    assert!(
                        row.iter().all(|x| x.is_nan()),
                        "{dt:?} row {r}: id {id} is outside the table but gave {row:?}"
                    );
                }
            }
        }
    }
}

/// One query per sequence (a decoding step) through `attention_into` with device key lengths
/// and the LSE runs the split-KV decode kernel on a Gpu whose scratch is exactly
/// `attention_workspace_bytes` of the caller's memory (so the query is enough: a call needing
/// more would be refused): poisoned outputs are written, within the tolerance rule of the
/// ordinary call with host lengths, and the LSE of the f64 log-sum-exp of the scaled scores.
#[test]
fn decode_shaped_attention_into_runs_on_exactly_its_queried_workspace() {
    let Some(shared) = gpu_or_skip("decode_shaped_attention_into") else {
        return;
    };
    let gpu = shared
        .on_stream(shared.context().new_stream().unwrap())
        .unwrap();
    let dt = DType::F16;
    let be = Cuda::new(gpu.clone(), dt).expect("cuBLAS on the library path");
    let (batch, len_k, heads_q, heads_kv, dim) = (3, 300, 4, 2, 64);
    let bytes = be
        .attention_workspace_bytes((batch, 1, len_k), (heads_q, heads_kv), (dim, dim))
        .unwrap();
    let ws = gpu.zeros(DType::F32, &[bytes.div_ceil(4).max(4)]).unwrap();
    // SAFETY: `ws` is a live allocation of this context of at least `bytes` bytes, 256-byte
    // aligned by the allocator, used by nothing else, and outlives every call below.
    unsafe { gpu.use_workspace(ws.view().device_ptr(), bytes) }.unwrap();

    let (wq, wkv) = (heads_q * dim, heads_kv * dim);
    let qv = values(batch * wq, 21, 1.0);
    let kvv = values(batch * len_k * 2 * wkv, 22, 1.0);
    let q = be.upload(&[batch, wq], &qv).unwrap();
    let kv = be.upload(&[batch * len_k, 2 * wkv], &kvv).unwrap();
    let host_lens = [300usize, 77, 1];
    let dev: CudaSlice<i32> = gpu.stream().clone_htod(&[300i32, 77, 1]).unwrap();
    let hq = Heads {
        tensor: &q,
        col: 0,
        heads: heads_q,
        dim,
    };
    let hk = |col| Heads {
        tensor: &kv,
        col,
        heads: heads_kv,
        dim,
    };
    let mask = AttentionMask {
        batch,
        len_q: 1,
        len_k,
        key_lens: None,
        causal: Some(CausalAlign::BottomRight),
        window: None,
        scale: None,
    };
    let mut out = gpu.zeros(dt, &[batch, wq]).unwrap();
    let mut lse = gpu.zeros(DType::F32, &[batch, heads_q, 1]).unwrap();
    nan_poison(&mut out);
    nan_poison(&mut lse);
    let opts = AttentionIntoOptions {
        device_key_lens: Some(I32View::new(&gpu, &dev)),
        lse: Some(&mut lse),
    };
    be.attention_into(hq, hk(0), hk(wkv), &mask, &mut out, opts)
        .unwrap();
    let host_mask = AttentionMask {
        key_lens: Some(&host_lens),
        ..mask
    };
    let plain = be.attention(hq, hk(0), hk(wkv), &host_mask).unwrap();
    let want: Vec<f64> = (be.to_f32(&plain).unwrap().iter())
        .map(|&x| x as f64)
        .collect();
    let got = out.to_f32_vec().unwrap();
    expect_close(
        "decode out",
        &got,
        &want,
        Tolerance::for_output(dt, len_k, 1.0),
    )
    .unwrap();

    // The f64 LSE of the rounded inputs: head h reads K/V head h / (heads_q / heads_kv).
    let (qr, kvr) = (q.to_f32_vec().unwrap(), kv.to_f32_vec().unwrap());
    let scale = 1.0 / (dim as f64).sqrt();
    let mut want_lse = Vec::new();
    let mut max_score = 0f64;
    for (b, &len) in host_lens.iter().enumerate() {
        for h in 0..heads_q {
            let g = h / (heads_q / heads_kv);
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    let krow = &kvr[(b * len_k + j) * 2 * wkv + g * dim..][..dim];
                    let qrow = &qr[b * wq + h * dim..][..dim];
                    scale
                        * (qrow.iter().zip(krow))
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            max_score = max_score.max(m.abs());
            want_lse.push(m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln());
        }
    }
    let got_lse = lse.to_f32_vec().unwrap();
    let tol = Tolerance::for_output(DType::F32, dim * len_k, max_score.max(1.0));
    expect_close("decode LSE", &got_lse, &want_lse, tol).unwrap();
    gpu.synchronize().unwrap();
    drop(ws);
}
