//! The CPU backend's ops and the runtime's building blocks against the f64 references, on
//! fresh random inputs (the checks are `cuattn::runtime::conformance`, shared with the GPU
//! tests), plus the references themselves against independent values.

use cuattn::reference::runtime as reference;
use cuattn::runtime::conformance as check;
use cuattn::runtime::{Activation, AttentionMask, Backend, Cpu, Heads};
use cuattn::Error;

#[test]
fn linear_every_activation_with_and_without_bias() {
    let acts = [
        Activation::None,
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::Relu,
        Activation::Tanh,
    ];
    for (i, act) in acts.into_iter().enumerate() {
        for (rows, inp, out) in [(1, 1, 1), (5, 17, 3), (70, 64, 130), (33, 384, 96)] {
            for bias in [false, true] {
                check::linear(&Cpu, rows, inp, out, act, bias, 100 + i as u64).unwrap();
            }
        }
    }
}

#[test]
fn batched_matmul_add_gather_layer_norm() {
    check::batched_matmul_nt(&Cpu, 3, 5, 7, 9, 1).unwrap();
    check::batched_matmul_nt(&Cpu, 1, 40, 33, 64, 2).unwrap();
    for (rows, width) in [(1, 1), (7, 32), (40, 384)] {
        check::elementwise(&Cpu, rows, width, 3).unwrap();
    }
}

#[test]
fn attention_padding_causal_grouped_fused() {
    for (i, c) in check::attention_cases().iter().enumerate() {
        check::attention(&Cpu, c, 10 + i as u64).unwrap();
    }
}

/// The packed path (no padding rows) on sequences of mixed lengths, an empty one included,
/// with grouped heads and with a sliding window, each sequence against the f64 reference. Run
/// in a two-thread pool so that the backend takes the packed path (it declines when there are
/// fewer than two sequences per thread), which the test requires.
#[test]
fn packed_attention_matches_the_reference_per_sequence() {
    use cuattn::runtime::backend::{CausalAlign, Window};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let lens = [5, 1, 17, 0, 9, 33];
        for (i, (heads, window)) in [
            ((4, 4, 16), None),
            ((6, 2, 8), None),
            ((4, 4, 16), Some(Window::new(3, 0, CausalAlign::TopLeft))),
            ((2, 1, 32), Some(Window::new(2, 2, CausalAlign::TopLeft))),
        ]
        .into_iter()
        .enumerate()
        {
            let took = check::attention_packed(&Cpu, &lens, heads, window, 40 + i as u64);
            assert!(took.unwrap(), "the CPU backend declined the packed path");
        }
        // Too few sequences per thread: declined, and the caller pads.
        assert!(!check::attention_packed(&Cpu, &[4, 6, 2], (2, 2, 8), None, 7).unwrap());
        // Lengths that do not add up to the rows are an error, not a panic.
        let t = Cpu.upload(&[10, 3 * 16], &[0.0; 10 * 48]).unwrap();
        let h = |col| Heads {
            tensor: &t,
            col,
            heads: 2,
            dim: 8,
        };
        assert!(Cpu
            .attention_packed(h(0), h(16), h(32), &[3, 3, 3, 3, 3], None, None)
            .is_err());
    });
}

#[test]
fn layers_against_composed_references() {
    check::multi_head_self_attention(&Cpu, false, 1).unwrap();
    check::multi_head_self_attention(&Cpu, true, 2).unwrap();
    check::multi_head_cross_attention(&Cpu, 3).unwrap();
    check::simple_attention(&Cpu, 4).unwrap();
    check::blocks(&Cpu, 5).unwrap();
}

#[test]
fn kv_cache_hook_reproduces_the_full_causal_forward() {
    check::kv_cache_hook(&Cpu, 6).unwrap();
}

#[test]
fn gelu_references_match_known_values() {
    // Values from Python's math.erf / math.tanh in f64.
    let erf = reference::activation(Activation::GeluErf, 1.0);
    let tanh = reference::activation(Activation::GeluTanh, 1.0);
    assert!((erf - 0.841_344_746_068_543).abs() < 1e-12, "{erf}");
    assert!((tanh - 0.841_191_990_608_277).abs() < 1e-12, "{tanh}");
    assert!(
        (reference::activation(Activation::GeluErf, -3.0) + 0.004_049_694_094_890_31).abs() < 1e-12
    );
    // The f32 forms stay within a few ulps of the f64 ones over the range that matters.
    for i in -800..=800 {
        let x = i as f32 / 100.0;
        for act in [Activation::GeluErf, Activation::GeluTanh] {
            let (got, want) = (act.apply(x) as f64, reference::activation(act, x as f64));
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{act:?}({x}) = {got} vs {want}"
            );
        }
    }
}

#[test]
fn attention_reference_is_uniform_averaging_when_scores_tie() {
    // All-equal keys: every admissible value is weighted equally.
    let k = vec![1.0f32; 4 * 2];
    let v: Vec<f32> = (0..4 * 2).map(|i| i as f32).collect();
    let q = vec![0.5f32; 2];
    fn h(d: &[f32]) -> reference::HeadsRef<'_> {
        reference::HeadsRef {
            data: d,
            width: 2,
            col: 0,
            heads: 1,
            dim: 2,
        }
    }
    let out = |lens: usize| {
        reference::attention(
            h(&q),
            h(&k),
            h(&v),
            &reference::AttentionSizes {
                batch: 1,
                len_q: 1,
                len_k: 4,
                key_lens: Some(&[lens]),
                causal: None,
                window: None,
                scale: 1.0,
            },
        )
    };
    assert_eq!(out(4), vec![3.0, 4.0]);
    assert_eq!(out(2), vec![1.0, 2.0]);
    assert_eq!(out(0), vec![0.0, 0.0]);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let be = Cpu;
    let x = be.upload(&[2, 3], &[1.0; 6]).unwrap();
    let w = be.upload(&[4, 5], &[1.0; 20]).unwrap();
    assert!(matches!(
        be.linear(&x, &w, None, Activation::None),
        Err(Error::Shape { arg: "w", .. })
    ));
    assert!(be.upload(&[2, 2], &[1.0; 3]).is_err());
    assert!(matches!(
        be.gather_rows(&x, &[2]),
        Err(Error::InvalidArgument { arg: "ids", .. })
    ));
    let h = Heads {
        tensor: &x,
        col: 0,
        heads: 1,
        dim: 3,
    };
    let mask = AttentionMask {
        batch: 1,
        len_q: 2,
        len_k: 2,
        key_lens: Some(&[3]),
        causal: None,
        window: None,
        scale: None,
    };
    assert!(matches!(
        be.attention(h, h, h, &mask),
        Err(Error::InvalidArgument {
            arg: "key_lens",
            ..
        })
    ));
    let mask = AttentionMask {
        batch: 2,
        len_q: 2,
        len_k: 2,
        key_lens: None,
        causal: None,
        window: None,
        scale: None,
    };
    assert!(matches!(
        be.attention(h, h, h, &mask),
        Err(Error::Shape { arg: "q", .. })
    ));
}

#[test]
fn fast_erf_is_within_2e7_of_the_f64_erf() {
    let mut worst = 0f64;
    for i in -700_000..=700_000 {
        let x = i as f32 * 1e-5;
        let err = (cuattn::runtime::backend::erf(x) as f64 - libm::erf(x as f64)).abs();
        worst = worst.max(err);
    }
    assert!(worst <= 2e-7, "max abs error {worst:e}");
    assert_eq!(cuattn::runtime::backend::erf(0.0), 0.0);
    assert_eq!(cuattn::runtime::backend::erf(-9.0), -1.0);
    assert!(cuattn::runtime::backend::erf(f32::NAN).is_nan());
}

#[test]
fn conv1d_weights_load_transposed_and_hf_activation_names_map() {
    use cuattn::runtime::checkpoint::HostParam;
    use cuattn::runtime::layers::Linear;
    let be = Cpu;
    // A Conv1D stores [in, out]; loading it must give the same layer as nn.Linear's [out, in].
    let (inp, out) = (5usize, 3usize);
    let w_out_in = HostParam {
        shape: vec![out, inp],
        values: check::random(cuattn::DType::F32, out * inp, 1.0, 7),
    };
    let w_in_out = w_out_in.transposed().unwrap();
    assert_eq!(w_in_out.shape, vec![inp, out]);
    // Element (o = 2, i = 1) of [out, in] is element (i = 1, o = 2) of [in, out].
    assert_eq!(w_in_out.values[out + 2], w_out_in.values[2 * inp + 1]);
    let x = be
        .upload(
            &[2, inp],
            &check::random(cuattn::DType::F32, 2 * inp, 1.0, 8),
        )
        .unwrap();
    let a = Linear::new(&be, &w_out_in, None)
        .unwrap()
        .forward(&be, &x, Activation::None)
        .unwrap();
    let b = Linear::from_conv1d(&be, &w_in_out, None)
        .unwrap()
        .forward(&be, &x, Activation::None)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(
        Activation::from_hf_name("gelu_new"),
        Some(Activation::GeluTanh)
    );
    assert_eq!(Activation::from_hf_name("gelu"), Some(Activation::GeluErf));
    assert_eq!(Activation::from_hf_name("swish"), None);
}

/// Packing's row maps: padded rows copy their own sequence's rows (padding repeats the
/// sequence's first token), packed rows find their padded row, and a batch with no token is
/// refused.
#[test]
fn packing_maps_rows_between_packed_and_padded_layouts() {
    use cuattn::runtime::layers::Packing;
    let p = Packing::new(&[2, 3, 1]).unwrap();
    assert_eq!((p.rows(), p.len, p.is_dense()), (6, 3, false));
    // Gathering padded row r from packed rows 0..6 (value = packed row index):
    let padded: Vec<f32> = (0..6).map(|r| r as f32).collect();
    let t = Cpu.upload(&[6, 1], &padded).unwrap();
    let back = Cpu.to_f32(&p.gather_padded(&Cpu, &t).unwrap()).unwrap();
    assert_eq!(back, [0.0, 1.0, 0.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0]);
    let round = Cpu.upload(&[9, 1], &back).unwrap();
    let packed = Cpu.to_f32(&p.gather_packed(&Cpu, &round).unwrap()).unwrap();
    assert_eq!(packed, padded);
    assert!(Packing::new(&[3, 3]).unwrap().is_dense());
    assert!(Packing::new(&[0, 0]).is_err());
    assert!(Packing::new(&[]).is_err());
}
