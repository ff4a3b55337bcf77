//! Block-sparse attention forward (tensor cores for f16/bf16, the exact kernel for f32) against
//! the f64 reference with the layout's expanded element mask, on random layouts of every kind
//! (tests/sparse_layouts), every block size (16, 32 and 128 above head dim 128 run re-blocked to
//! the entries' 64-blocks), head dims 64/128/256, odd ones and D ≠ Dv, GQA, key padding, BHSD
//! and BSHD, under `Kernel::Auto` and `Kernel::TensorCore`; Auto running on the tensor cores;
//! the typed errors. The checks (NaN-poisoned outputs, NaN in keys no query keeps and past the
//! key length) are `cuattn::check::sparse`.

use crate::sparse_layouts::{generate, self_attention_only, KINDS};
use cuattn::check::gpu_or_skip;
use cuattn::check::sparse::{self as check, Case};
use cuattn::ops::attention::{CausalAlign, Kernel, Options};
use cuattn::ops::sparse_attention::{self as sparse, DeviceBlockLayout};
use cuattn::reference::attention::Shape;
use cuattn::sparse::BlockLayout;
use cuattn::{DType, Error};
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
            let bs = [16, 32, 64, 128][rng.gen_range(0..4)];
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
                kernel: Kernel::Auto,
                seed,
            };
            if let Err(e) = check::forward(&gpu, &case) {
                panic!("round {round}, {kind:?} causal {causal}: {e}");
            }
        }
    }
}

/// A causal mix of a banded diagonal, scattered bitmask blocks and a key tail, in blocks of `bs`.
fn mixed_layout(len_q: usize, len_k: usize, bs: usize) -> BlockLayout {
    BlockLayout::from_predicate(len_q, len_k, bs, |i, j| {
        j <= i && (i - j < 40 || (i * 7 + j * 3) % 11 < 4)
    })
    .unwrap()
}

#[test]
fn sparse_forward_runs_every_block_size_and_head_dim_on_tensor_cores() {
    let Some(gpu) =
        gpu_or_skip("sparse_forward_runs_every_block_size_and_head_dim_on_tensor_cores")
    else {
        return;
    };
    let mut seed = 0x5f;
    for bs in [16, 32, 64, 128] {
        for (d, dv) in [(64, 64), (128, 128), (256, 256), (128, 64), (72, 200)] {
            for (dtype, kernel) in [
                (DType::BF16, Kernel::Auto),
                (DType::F16, Kernel::TensorCore),
            ] {
                seed += 1;
                let (len_q, len_k) = (190, 170);
                let case = Case {
                    dtype,
                    shape: Shape::new(2, 2, 1, len_q, len_k, d, dv),
                    layout: mixed_layout(len_q, len_k, bs),
                    key_lens: Some(vec![len_k as i32, 121]),
                    bshd: bs == 32,
                    kernel,
                    seed,
                };
                if let Err(e) = check::forward(&gpu, &case) {
                    panic!("blocks of {bs}, d {d}/{dv} {kernel:?}: {e}");
                }
            }
        }
    }
}

#[test]
fn sparse_forward_auto_picks_tensor_cores_for_every_block_size_and_head_dim() {
    let Some(gpu) =
        gpu_or_skip("sparse_forward_auto_picks_tensor_cores_for_every_block_size_and_head_dim")
    else {
        return;
    };
    for (bs, d, dv) in [
        (16, 64, 64),
        (32, 128, 128),
        (128, 256, 256),
        (128, 64, 64),
        (16, 200, 96),
    ] {
        let case = Case {
            dtype: DType::BF16,
            shape: Shape::new(1, 2, 1, 160, 160, d, dv),
            layout: BlockLayout::sliding_window(160, bs, 50, 0, true).unwrap(),
            key_lens: None,
            bshd: false,
            kernel: Kernel::Auto,
            seed: 40 + bs as u64,
        };
        if let Err(e) = check::auto_picks_tensor_cores(&gpu, &case) {
            panic!("blocks of {bs}, d {d}/{dv}: {e}");
        }
    }
}

#[test]
fn sparse_forward_refuses_what_it_cannot_run_with_typed_errors() {
    let Some(gpu) = gpu_or_skip("sparse_forward_refuses_what_it_cannot_run_with_typed_errors")
    else {
        return;
    };
    let shape = [1, 2, 256, 64];
    let t = |dtype, seed| gpu.random(dtype, &shape, seed, 0.0, 1.0).unwrap();
    // Every block size runs at every head dim: blocks of 16 and 128 at head dim 256 too.
    for (bs, d) in [(16, 64), (128, 256), (32, 256)] {
        let s = [1, 2, 256, d];
        let x = |seed| gpu.random(DType::F16, &s, seed, 0.0, 1.0).unwrap();
        let layout = BlockLayout::sliding_window(256, bs, 64, 0, true).unwrap();
        let layout = DeviceBlockLayout::upload(&gpu, &layout).unwrap();
        for kernel in [Kernel::Auto, Kernel::TensorCore, Kernel::Exact] {
            let opts = Options {
                kernel,
                ..Options::default()
            };
            sparse::forward(&x(1), &x(2), &x(3), &layout, &opts)
                .unwrap_or_else(|e| panic!("blocks of {bs}, d {d}, {kernel:?}: {e}"));
        }
    }
    let fits = BlockLayout::sliding_window(256, 16, 64, 0, true).unwrap();
    let fits = DeviceBlockLayout::upload(&gpu, &fits).unwrap();
    // f32 has no tensor-core path.
    let (q, k, v) = (t(DType::F32, 1), t(DType::F32, 2), t(DType::F32, 3));
    let tc = Options {
        kernel: Kernel::TensorCore,
        ..Options::default()
    };
    assert!(matches!(
        sparse::forward(&q, &k, &v, &fits, &tc),
        Err(Error::DType { arg: "q", .. })
    ));
    // Masks belong in the layout.
    let (q, k, v) = (t(DType::BF16, 1), t(DType::BF16, 2), t(DType::BF16, 3));
    let causal = Options {
        causal: Some(CausalAlign::TopLeft),
        ..Options::default()
    };
    assert!(matches!(
        sparse::forward(&q, &k, &v, &fits, &causal),
        Err(Error::InvalidArgument { arg: "options", .. })
    ));
}
