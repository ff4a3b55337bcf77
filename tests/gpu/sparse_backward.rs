//! Block-sparse attention backward on the GPU (tensor cores for f16/bf16 with blocks of 64 in
//! both dQ modes, the exact kernels for f32 and any block size) against the f64 reference with
//! the layout's element mask, on random layouts of every kind (tests/sparse_layouts), GQA, key
//! padding, BHSD and BSHD; bitwise equality with the dense backward when every block is kept;
//! bitwise repeatability of the deterministic mode; and the typed errors. The checks
//! (NaN-poisoned outputs, NaN in keys no query keeps) are `cuattn::check::sparse_backward`.

use crate::sparse_layouts::{generate, self_attention_only, KINDS};
use cuattn::check::gpu_or_skip;
use cuattn::check::sparse_backward::{self as check, Case};
use cuattn::error::SparseLayoutError;
use cuattn::ops::attention::{self as attn, CausalAlign, Kernel};
use cuattn::ops::attention_backward::{self as bwd, Mode};
use cuattn::ops::sparse_attention::{self as sparse, DeviceBlockLayout};
use cuattn::reference::attention::Shape;
use cuattn::sparse::{BlockLayout, LayoutHeads};
use cuattn::{DType, Error};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[test]
fn sparse_backward_matches_reference_on_random_layouts_of_every_kind() {
    let Some(gpu) =
        gpu_or_skip("sparse_backward_matches_reference_on_random_layouts_of_every_kind")
    else {
        return;
    };
    let mut rng = SmallRng::seed_from_u64(0xb5a5);
    let rounds = (crate::proptest_cases(42) as usize)
        .div_ceil(KINDS.len())
        .max(1);
    for round in 0..rounds {
        for &kind in &KINDS {
            let seed = rng.gen::<u64>();
            let dtype = [DType::F16, DType::BF16, DType::F32][rng.gen_range(0..3)];
            let (d, dv) = *[(64, 64), (128, 128), (72, 40), (96, 128), (200, 64)]
                .get(rng.gen_range(0..5))
                .unwrap();
            let tc = dtype != DType::F32 && d.max(dv) <= bwd::TC_MAX_HEAD_DIM;
            // Tensor cores: blocks of 64; the exact path any block size.
            let bs = if tc {
                64
            } else {
                [16, 32, 64, 128][rng.gen_range(0..4)]
            };
            let (kernel, mode) = match (tc, rng.gen_range(0..2)) {
                (true, 0) => (Kernel::TensorCore, Mode::Deterministic),
                (true, _) => (Kernel::TensorCore, Mode::Fast),
                (false, _) => (Kernel::Exact, Mode::Deterministic),
            };
            let len_q = rng.gen_range(1..=300);
            let len_k = if self_attention_only(kind) {
                len_q
            } else {
                rng.gen_range(1..=300)
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
                kernel,
                mode,
                seed,
            };
            if let Err(e) = check::backward(&gpu, &case) {
                panic!("round {round}, {kind:?} causal {causal}: {e}");
            }
        }
    }
}

#[test]
fn sparse_backward_keeping_every_block_equals_the_dense_backward_bitwise() {
    let Some(gpu) =
        gpu_or_skip("sparse_backward_keeping_every_block_equals_the_dense_backward_bitwise")
    else {
        return;
    };
    let s = Shape::new(2, 4, 2, 150, 200, 128, 128);
    let (nq, nk) = (150usize.div_ceil(64), 200usize.div_ceil(64));
    let all = BlockLayout::from_block_mask(150, 200, 64, LayoutHeads::Shared, &vec![true; nq * nk])
        .unwrap();
    for (dtype, kernel) in [
        (DType::BF16, Kernel::TensorCore),
        (DType::F16, Kernel::TensorCore),
        (DType::BF16, Kernel::Exact),
    ] {
        let case = Case {
            dtype,
            shape: s,
            layout: all.clone(),
            key_lens: Some(vec![200, 77]),
            bshd: false,
            kernel,
            mode: Mode::Deterministic,
            seed: 21,
        };
        check::equals_dense_bitwise(&gpu, &case).unwrap();
    }
}

#[test]
fn sparse_backward_deterministic_mode_is_bitwise_repeatable() {
    let Some(gpu) = gpu_or_skip("sparse_backward_deterministic_mode_is_bitwise_repeatable") else {
        return;
    };
    let layout = BlockLayout::strided(500, 64, 2, 3, true).unwrap();
    let case = Case {
        dtype: DType::BF16,
        shape: Shape::new(1, 4, 1, 500, 500, 128, 128),
        layout,
        key_lens: None,
        bshd: false,
        kernel: Kernel::TensorCore,
        mode: Mode::Deterministic,
        seed: 22,
    };
    check::bitwise_repeatable(&gpu, &case, 30).unwrap();
}

#[test]
fn sparse_backward_refuses_what_it_cannot_run_with_typed_errors() {
    let Some(gpu) = gpu_or_skip("sparse_backward_refuses_what_it_cannot_run_with_typed_errors")
    else {
        return;
    };
    let (b, h, l, d) = (1, 2, 256, 64);
    let t = |seed| {
        gpu.random(DType::BF16, &[b, h, l, d], seed, 0.0, 1.0)
            .unwrap()
    };
    let (q, k, v, d_o) = (t(1), t(2), t(3), t(4));
    let lse = gpu.full(DType::F32, &[b, h, l], 0.0).unwrap();
    let opts = |forward| bwd::Options {
        forward,
        mode: Mode::Deterministic,
    };
    // Blocks of 128: the forward's tensor cores take them, the backward's do not (exact does).
    let wide = BlockLayout::sliding_window(l, 128, 64, 0, true).unwrap();
    let wide = DeviceBlockLayout::upload(&gpu, &wide).unwrap();
    let (o, _) = sparse::forward(&q, &k, &v, &wide, &attn::Options::default()).unwrap();
    assert!(matches!(
        sparse::backward(
            &q,
            &k,
            &v,
            &o,
            &lse,
            &d_o,
            &wide,
            &opts(attn::Options::default())
        ),
        Err(Error::SparseLayout(SparseLayoutError::BlockSize {
            got: 128,
            ..
        }))
    ));
    let exact = attn::Options {
        kernel: Kernel::Exact,
        ..attn::Options::default()
    };
    sparse::backward(&q, &k, &v, &o, &lse, &d_o, &wide, &opts(exact)).unwrap();
    // A layout for other lengths, and masks that belong in the layout.
    let short = BlockLayout::sliding_window(128, 64, 64, 0, true).unwrap();
    let short = DeviceBlockLayout::upload(&gpu, &short).unwrap();
    assert!(matches!(
        sparse::backward(
            &q,
            &k,
            &v,
            &o,
            &lse,
            &d_o,
            &short,
            &opts(attn::Options::default())
        ),
        Err(Error::SparseLayout(SparseLayoutError::ShapeMismatch {
            what: "len_q",
            ..
        }))
    ));
    let fits = BlockLayout::sliding_window(l, 64, 64, 0, true).unwrap();
    let fits = DeviceBlockLayout::upload(&gpu, &fits).unwrap();
    let causal = attn::Options {
        causal: Some(CausalAlign::TopLeft),
        ..attn::Options::default()
    };
    assert!(matches!(
        sparse::backward(&q, &k, &v, &o, &lse, &d_o, &fits, &opts(causal)),
        Err(Error::InvalidArgument { arg: "options", .. })
    ));
}
