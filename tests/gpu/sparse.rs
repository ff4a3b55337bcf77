//! Block-sparse attention (tensor cores for f16/bf16, the exact kernel for f32) against the f64 reference with the layout's
//! expanded element mask, on random layouts of every kind (tests/sparse_layouts), block sizes
//! 64 and 128, head dims 64/128/256 and odd ones, GQA, key padding, BHSD and BSHD. The check
//! (NaN-poisoned outputs, NaN in keys no query keeps and past the key length) is
//! `cuattn::check::sparse`.

use crate::sparse_layouts::{generate, self_attention_only, KINDS};
use cuattn::check::gpu_or_skip;
use cuattn::check::sparse::{self as check, Case};
use cuattn::reference::attention::Shape;
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[test]
fn sparse_kernel_matches_reference_on_random_layouts_of_every_kind() {
    let Some(gpu) = gpu_or_skip("sparse_kernel_matches_reference_on_random_layouts_of_every_kind")
    else {
        return;
    };
    let mut rng = SmallRng::seed_from_u64(0x5a55);
    let rounds = (crate::proptest_cases(64) as usize)
        .div_ceil(KINDS.len())
        .max(1);
    for round in 0..rounds {
        for &kind in &KINDS {
            let seed = rng.gen::<u64>();
            // f32 runs the exact kernel over the kept blocks; f16/bf16 the tensor-core entries.
            let dtype = [DType::F16, DType::BF16, DType::F32][rng.gen_range(0..3)];
            let (d, dv) = *[(64, 64), (128, 128), (72, 40), (256, 256), (96, 128)]
                .get(rng.gen_range(0..5))
                .unwrap();
            let bs = if d.max(dv) > 128 || rng.gen_bool(0.5) {
                64
            } else {
                128
            };
            let len_q = rng.gen_range(1..=350);
            let len_k = if self_attention_only(kind) {
                len_q
            } else {
                rng.gen_range(1..=350)
            };
            let (batch, hkv, group) = (
                rng.gen_range(1..=2),
                rng.gen_range(1..=2),
                rng.gen_range(1..=2),
            );
            let s = Shape::new(batch, hkv * group, hkv, len_q, len_k, d, dv);
            let causal = rng.gen_bool(0.5);
            let layout = generate(kind, causal, len_q, len_k, bs, s.heads_q, seed).layout;
            let key_lens = rng.gen_bool(0.4).then(|| {
                (0..batch)
                    .map(|_| rng.gen_range(0..=len_k as i32))
                    .collect()
            });
            let case = Case {
                dtype,
                shape: s,
                layout,
                bshd: key_lens.is_none() && rng.gen_bool(0.5),
                key_lens,
                seed,
            };
            if let Err(e) = check::forward(&gpu, &case) {
                panic!("round {round}, {kind:?} causal {causal}: {e}");
            }
        }
    }
}
