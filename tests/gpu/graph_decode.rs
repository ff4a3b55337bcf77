//! Generation's one-token steps replayed from a CUDA graph (`runtime::graph_step`) against the
//! eager CUDA path (the same backend with the graph turned off), the CPU backend and Hugging
//! Face's greedy tokens on the tiny GPT-2 and GPT-Neo fixtures; a captured step driven directly
//! against the eager step, replay after replay, with only the pinned metadata changed between
//! some of them.

use crate::fixture_files::{fixture, uints};
use crate::graphs::kernel_and_alloc_nodes;
use cuattn::check::gpu_or_skip;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::generate::{
    generate, GenerateBackend, GenerateOptions, Sampling, StopReason, TokenModel,
};
use cuattn::runtime::gpt2::Gpt2;
use cuattn::runtime::gpt_neo::GptNeo;
use cuattn::runtime::graph_step::CudaGraphStep;
use cuattn::runtime::kv_cache::DecodeStep;
use cuattn::runtime::layers::KvCache;
use cuattn::runtime::Cpu;
use cuattn::DType;

/// Two f32 backends on `gpu`: one with the graph step on, one with it off.
fn graph_and_eager(gpu: std::sync::Arc<cuattn::gpu::Gpu>) -> (Cuda, Cuda) {
    // Set, not assumed: CUATTN_DECODE_GRAPH=0 in the environment turns the default off.
    let mut graph_be = Cuda::new(gpu.clone(), DType::F32).unwrap();
    graph_be.set_decode_graph(true);
    let mut eager_be = Cuda::new(gpu, DType::F32).unwrap();
    eager_be.set_decode_graph(false);
    (graph_be, eager_be)
}

fn cases() -> (Vec<Vec<u32>>, Vec<Vec<u32>>, usize) {
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tests/fixtures/tiny-gpt2-outputs.json")).unwrap(),
    )
    .unwrap();
    let cases = f["cases"].as_array().unwrap();
    let prompts = cases.iter().map(|c| uints(&c["ids"])).collect();
    let greedy = cases.iter().map(|c| uints(&c["greedy"])).collect();
    (
        prompts,
        greedy,
        f["max_new_tokens"].as_u64().unwrap() as usize,
    )
}

/// f32 greedy generation with the graph step gives Hugging Face's tokens (as the eager path
/// does: its smallest top-2 margin, 8.7e-3, is far above what f32 rounding moves), for each
/// prompt alone and for the four prompts of different lengths in one batch; so do the eager
/// CUDA path and the CPU backend. A batch with a prompt 6 positions short of the context
/// finishes that row early (its row leaves the batch and the step is made again for 3 rows):
/// the graph path's tokens equal the eager path's for every row, and Hugging Face's (as the
/// CPU's do) for the other three. Sampling (temperature, top-k, seed) gives the eager path's
/// tokens.
#[test]
fn graph_decoding_gives_the_eager_cpu_and_hugging_face_tokens_on_tiny_gpt2() {
    let Some(gpu) = gpu_or_skip("graph_decoding_tiny_gpt2") else {
        return;
    };
    let dir = fixture("tests/fixtures/tiny-gpt2");
    let (graph_be, eager_be) = graph_and_eager(gpu);
    let graph_model = Gpt2::from_folder(&graph_be, &dir).unwrap();
    let eager_model = Gpt2::from_folder(&eager_be, &dir).unwrap();
    let cpu_model = Gpt2::from_folder(&Cpu, &dir).unwrap();
    let (prompts, greedy, max_new) = cases();
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..GenerateOptions::default()
    };
    let run = |inputs: &[Vec<u32>], opts: &GenerateOptions| {
        let g = generate(&graph_be, &graph_model, inputs, opts, &mut |_, _| {}).unwrap();
        let e = generate(&eager_be, &eager_model, inputs, opts, &mut |_, _| {}).unwrap();
        let c = generate(&Cpu, &cpu_model, inputs, opts, &mut |_, _| {}).unwrap();
        (g, e, c)
    };
    for (p, want) in prompts.iter().zip(&greedy) {
        let (g, e, c) = run(std::slice::from_ref(p), &opts);
        assert_eq!(&g.generated[0], want, "graph, batch 1");
        assert_eq!(&e.generated[0], want, "eager, batch 1");
        assert_eq!(&c.generated[0], want, "cpu, batch 1");
    }
    let (g, e, c) = run(&prompts, &opts);
    assert_eq!(g.generated, greedy, "graph, batch {}", prompts.len());
    assert_eq!(e.generated, greedy);
    assert_eq!(c.generated, greedy);

    // One row reaches the 128-position context after 6 tokens.
    let mut batch = prompts.clone();
    batch[2] = prompts[2].iter().copied().cycle().take(122).collect();
    let to_the_end = GenerateOptions {
        stop_at_eos: false,
        ..opts
    };
    let (g, e, c) = run(&batch, &to_the_end);
    assert_eq!(g.stop[2], StopReason::ContextFull);
    assert_eq!(g.generated[2].len(), 6);
    assert_eq!(
        g.generated, e.generated,
        "graph vs eager with a row finishing"
    );
    // The other rows keep Hugging Face's tokens through the change of batch (the long
    // prompt's own tokens have no Hugging Face margins to lean on: compared with eager only).
    for r in [0, 1, 3] {
        assert_eq!(
            g.generated[r], greedy[r],
            "graph, row {r} beside a finishing row"
        );
        assert_eq!(
            c.generated[r], greedy[r],
            "cpu, row {r} beside a finishing row"
        );
    }
    assert_eq!(g.rows_per_step, e.rows_per_step);
    assert!(
        g.rows_per_step.contains(&3),
        "the finished row left the batch: {:?}",
        g.rows_per_step
    );

    let sampled = GenerateOptions {
        max_new_tokens: 16,
        sampling: Sampling {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: 7,
        },
        ..GenerateOptions::default()
    };
    let (g, e, _) = run(&prompts, &sampled);
    assert_eq!(g.generated, e.generated, "sampling: graph vs eager");
}

/// GPT-Neo's local layers (window 4) in the graph step attend over the whole cache with the
/// window as their band; greedy tokens equal the eager path's and the CPU's, alone and batched.
#[test]
fn graph_decoding_gives_the_eager_tokens_on_tiny_gpt_neo_local_layers() {
    let Some(gpu) = gpu_or_skip("graph_decoding_tiny_gpt_neo") else {
        return;
    };
    let dir = fixture("tests/fixtures/tiny-gpt-neo");
    let (graph_be, eager_be) = graph_and_eager(gpu);
    let graph_model = GptNeo::from_folder(&graph_be, &dir).unwrap();
    let eager_model = GptNeo::from_folder(&eager_be, &dir).unwrap();
    let cpu_model = GptNeo::from_folder(&Cpu, &dir).unwrap();
    let vocab = graph_model.vocab_size() as u32;
    let prompts: Vec<Vec<u32>> = [vec![464u32, 2068, 7586, 21831, 18045], vec![15496u32, 11]]
        .map(|p| p.iter().map(|&t| t % vocab).collect())
        .to_vec();
    let opts = GenerateOptions {
        max_new_tokens: 20,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    for inputs in [&prompts[..1], &prompts[1..], &prompts[..]] {
        let g = generate(&graph_be, &graph_model, inputs, &opts, &mut |_, _| {}).unwrap();
        let e = generate(&eager_be, &eager_model, inputs, &opts, &mut |_, _| {}).unwrap();
        let c = generate(&Cpu, &cpu_model, inputs, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(g.generated, e.generated, "{} prompts", inputs.len());
        assert_eq!(g.generated, c.generated, "{} prompts", inputs.len());
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// A captured step driven directly beside the eager step, each on its own device cache after
/// the same ragged prefill (prompts of 5 and 2 tokens), in f32 and f16. Every step's logits
/// are finite and within the bound of the eager step's (they differ only in how the decode
/// kernel splits the keys: planned for the cache's capacity in the graph, for the longest
/// sequence eagerly); the second row stops appending half-way. The first step runs eagerly
/// and captures; every later one replays the graph (counted), whose nodes include no
/// allocation. Then three replays that append nothing, with only the pinned ids changed
/// (A, B, A): A's logits come back bit for bit, B's differ from them, and each equals the
/// eager step on the same ids within the bound: the graph reads the metadata written after
/// its capture.
#[test]
fn a_captured_step_replays_new_pinned_metadata_and_matches_the_eager_step() {
    let Some(gpu) = gpu_or_skip("captured_step_replays_new_metadata") else {
        return;
    };
    let dir = fixture("tests/fixtures/tiny-gpt2");
    // f16: the bound of runtime_gpt2's F16_CACHE_BOUND (two paths each within the f16
    // per-logit budget of the exact logits).
    for (dtype, bound) in [(DType::F32, 1e-4f32), (DType::F16, 0.08)] {
        let mut be = Cuda::new(gpu.clone(), dtype).unwrap();
        be.set_decode_graph(true);
        let model = Gpt2::from_folder(&be, &dir).unwrap();
        let (layers, width) = model.cache_layout();
        let vocab = model.vocab_size();
        let prompts = [vec![464u32, 2068, 7586, 21831, 18045], vec![15496u32, 11]];
        let (batch, longest, steps) = (2usize, 5usize, 12usize);
        let capacity = longest + steps + 3;
        let mut eager = be
            .kv_cache(layers, batch, capacity, width)
            .unwrap()
            .unwrap();
        let mut graph = be
            .kv_cache(layers, batch, capacity, width)
            .unwrap()
            .unwrap();
        // The prefill, eagerly, into both caches.
        let mut ids = vec![0u32; batch * longest];
        for (b, p) in prompts.iter().enumerate() {
            ids[b * longest..b * longest + p.len()].copy_from_slice(p);
        }
        let pos: Vec<u32> = (0..batch * longest).map(|r| (r % longest) as u32).collect();
        let rows: Vec<u32> = (0..batch)
            .map(|b| (b * longest + prompts[b].len() - 1) as u32)
            .collect();
        for cache in [&mut eager, &mut graph] {
            cache.begin_step(&[5, 2]).unwrap();
            let mut ls = cache.layers();
            let mut refs: Vec<&mut dyn KvCache<Cuda>> = ls
                .iter_mut()
                .map(|l| &mut **l as &mut dyn KvCache<Cuda>)
                .collect();
            model
                .decode(&be, &(), &ids, &pos, batch, longest, &rows, Some(&mut refs))
                .unwrap();
        }
        let mut step = CudaGraphStep::new(&be, model.decoder(), batch, capacity)
            .unwrap()
            .expect("GPT-2 takes the graph step");
        let eager_step = |cache: &mut Box<dyn cuattn::runtime::generate::StepKvCache<Cuda>>,
                          ids: &[u32],
                          pos: &[u32],
                          valid: &[usize]| {
            cache.begin_step(valid).unwrap();
            let mut ls = cache.layers();
            let mut refs: Vec<&mut dyn KvCache<Cuda>> = ls
                .iter_mut()
                .map(|l| &mut **l as &mut dyn KvCache<Cuda>)
                .collect();
            model
                .decode(&be, &(), ids, pos, batch, 1, &[0, 1], Some(&mut refs))
                .unwrap()
        };
        let mut lens = [5usize, 2];
        let mut previous: Option<Vec<f32>> = None;
        for s in 0..steps {
            let valid = [1usize, usize::from(s < steps / 2)];
            // Tokens off the greedy path, spread over the vocabulary.
            let ids: Vec<u32> = (0..batch)
                .map(|b| ((s * 7919 + b * 104_729 + 13) % vocab) as u32)
                .collect();
            let pos: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
            let want = eager_step(&mut eager, &ids, &pos, &valid);
            graph.begin_step_lengths_only(&valid).unwrap();
            let got = step.run(graph.step_view().unwrap(), &ids, &pos).unwrap();
            assert!(got.iter().all(|x| x.is_finite()), "{dtype} step {s}");
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= bound,
                "{dtype} step {s}: graph vs eager {d:e} > {bound:e}"
            );
            if let Some(prev) = &previous {
                assert!(
                    max_abs_diff(&got, prev) > 0.0,
                    "{dtype} step {s}: stale logits"
                );
            }
            previous = Some(got);
            for (l, v) in lens.iter_mut().zip(valid) {
                *l += v;
            }
        }
        assert_eq!(
            step.counts(),
            (steps, steps - 1),
            "{dtype}: one capture, then replays"
        );
        let (kernels, allocs) = kernel_and_alloc_nodes(step.graph().expect("captured"));
        // 2 gathers; per layer 2 LayerNorms, 4 GEMMs, 4 bias kernels, the append, the
        // attention; the final LayerNorm and the LM head.
        assert!(kernels >= 2 + 2 * 12 + 2, "{dtype}: {kernels} kernel nodes");
        assert_eq!(allocs, 0, "{dtype}: the captured step allocates");

        // Nothing appended: only the ids change between replays.
        let valid = [0usize, 0];
        let pos: Vec<u32> = lens.iter().map(|&l| (l - 1) as u32).collect();
        let (a, b) = (vec![17u32, 4242], vec![30_000u32, 9]);
        let mut got = Vec::new();
        for ids in [&a, &b, &a] {
            let want = eager_step(&mut eager, ids, &pos, &valid);
            graph.begin_step_lengths_only(&valid).unwrap();
            let g = step.run(graph.step_view().unwrap(), ids, &pos).unwrap();
            let d = max_abs_diff(&g, &want);
            assert!(d <= bound, "{dtype} ids {ids:?}: graph vs eager {d:e}");
            got.push(g);
        }
        assert_eq!(
            step.counts(),
            (steps + 3, steps + 2),
            "{dtype}: replays only"
        );
        assert!(
            got[0]
                .iter()
                .zip(&got[2])
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{dtype}: the same metadata replayed gives other logits"
        );
        assert!(
            max_abs_diff(&got[0], &got[1]) > 1e-3,
            "{dtype}: new ids in the pinned metadata changed nothing"
        );
    }
}
