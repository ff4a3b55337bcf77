//! The KV-cache generation path against full recomputation on any backend and any
//! decoder-only model, shared by the CPU and GPU GPT-2 and GPT-Neo tests.

use cuattn::runtime::generate::{
    generate, GenerateBackend, GenerateOptions, StopReason, TokenModel,
};
use cuattn::runtime::layers::KvCache;

/// Drives a backend's KV cache the way `generate` does — a ragged prefill of two prompts
/// (5 and 2 tokens), then `steps − 1` one-token steps, the second sequence finishing (appending
/// nothing) after `finish_after` of them — and compares each step's logits with a full forward
/// pass over the same tokens. The cache is exactly as long as the first sequence gets, so its
/// last step fills it. The tokens fed are not the argmax (off the greedy path, spread
/// over the vocabulary). Returns the largest absolute logit difference (∞ for NaN).
pub fn cache_vs_recompute<B: GenerateBackend, M: TokenModel<B, Memory = ()>>(
    be: &B,
    m: &M,
    steps: usize,
    finish_after: usize,
) -> f32 {
    let (n_layer, width) = m.cache_layout();
    let vocab = m.vocab_size();
    // GPT-2 ids, folded into smaller vocabularies.
    let prompts = [vec![464u32, 2068, 7586, 21831, 18045], vec![15496u32, 11]]
        .map(|p| p.iter().map(|&t| t % vocab as u32).collect::<Vec<u32>>());
    let (batch, longest) = (2, 5);
    let capacity = longest + steps - 1;
    let mut cache = be
        .kv_cache(n_layer, batch, capacity, width)
        .unwrap()
        .expect("this backend has a KV cache");
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut worst = 0f32;
    for step in 0..steps {
        let live = [true, step <= finish_after];
        let (ids, positions, len, valid): (Vec<u32>, Vec<u32>, usize, Vec<usize>) = if step == 0 {
            let mut ids = vec![0; batch * longest];
            for (b, p) in prompts.iter().enumerate() {
                ids[b * longest..b * longest + p.len()].copy_from_slice(p);
            }
            let pos = (0..batch * longest).map(|r| (r % longest) as u32).collect();
            (ids, pos, longest, prompts.iter().map(Vec::len).collect())
        } else {
            (
                seqs.iter().map(|s| *s.last().unwrap()).collect(),
                seqs.iter().map(|s| (s.len() - 1) as u32).collect(),
                1,
                live.iter().map(|&l| usize::from(l)).collect(),
            )
        };
        cache.begin_step(&valid).unwrap();
        let mut layers = cache.layers();
        let mut refs: Vec<&mut dyn KvCache<B>> = layers
            .iter_mut()
            .map(|l| &mut **l as &mut dyn KvCache<B>)
            .collect();
        let rows: Vec<u32> = (0..batch)
            .map(|b| (b * len + if step == 0 { prompts[b].len() - 1 } else { 0 }) as u32)
            .collect();
        let cached = m
            .decode(
                be,
                &(),
                &ids,
                &positions,
                batch,
                len,
                &rows,
                Some(&mut refs),
            )
            .unwrap();
        drop(refs);
        drop(layers);
        for b in 0..batch {
            if !live[b] {
                continue;
            }
            let n = seqs[b].len();
            let all: Vec<u32> = (0..n as u32).collect();
            let last = m
                .decode(be, &(), &seqs[b], &all, 1, n, &[n as u32 - 1], None)
                .unwrap();
            let got = &cached[b * vocab..(b + 1) * vocab];
            for (x, y) in got.iter().zip(last) {
                let d = (x - y).abs();
                worst = worst.max(if d.is_nan() { f32::INFINITY } else { d });
            }
            let next = (step as u32 * 7919 + b as u32 * 104_729) % vocab as u32;
            seqs[b].push(next);
        }
    }
    let expect = [5 + steps - 1, 2 + finish_after.min(steps - 1)];
    assert_eq!(cache.lens(), &expect, "cached lengths");
    worst
}

/// A prompt that fills the model's context, batched before `prompt`. It stops at once with its cache full (later steps append nothing at start = capacity) while `prompt`
/// generates `max_new` greedy tokens, which are returned (to be compared with what `prompt`
/// gets alone or with Hugging Face's greedy continuation).
pub fn beside_a_full_context<B: GenerateBackend, M: TokenModel<B>>(
    be: &B,
    m: &M,
    prompt: &[u32],
    max_new: usize,
) -> Vec<u32> {
    let n = m.max_positions();
    let vocab = m.vocab_size() as u32;
    let full: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7919 + 13) % 50_000 % vocab)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..GenerateOptions::default()
    };
    let out = generate(be, m, &[full, prompt.to_vec()], &opts, &mut |_, _| {}).unwrap();
    assert_eq!(out.stop[0], StopReason::ContextFull);
    assert!(out.generated[0].is_empty());
    out.generated[1].clone()
}
