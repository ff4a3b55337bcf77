//! The CPU references are public functions, so bad sizes are errors naming the argument, not
//! panics (they used to assert).

use cuattn::reference::attention::{self as attn, Options, Shape};
use cuattn::reference::layernorm;
use cuattn::{DType, Error};

#[test]
fn attention_reference_rejects_wrong_lengths_head_groups_and_key_length_counts() {
    let s = Shape::new(1, 2, 1, 3, 4, 8, 8);
    let (q, k, v) = (vec![0.5f32; 48], vec![0.5f32; 32], vec![0.5f32; 32]);
    assert!(attn::forward(&q, &k, &v, &s, &Options::new(8)).is_ok());
    let short = attn::forward(&q[..47], &k, &v, &s, &Options::new(8));
    assert!(
        matches!(short, Err(Error::Shape { arg: "q", .. })),
        "{short:?}"
    );
    let long_v = vec![0.5f32; 33];
    assert!(matches!(
        attn::forward(&q, &k, &long_v, &s, &Options::new(8)),
        Err(Error::Shape { arg: "v", .. })
    ));
    let groups = Shape::new(1, 3, 2, 3, 4, 8, 8);
    let r = attn::forward(
        &vec![0.0; 72],
        &vec![0.0; 64],
        &vec![0.0; 64],
        &groups,
        &Options::new(8),
    );
    assert!(
        matches!(
            r,
            Err(Error::InvalidArgument {
                arg: "heads_kv",
                ..
            })
        ),
        "{r:?}"
    );
    let no_kv = Shape::new(1, 2, 0, 3, 4, 8, 8);
    let r = attn::forward(&q, &[], &[], &no_kv, &Options::new(8));
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    let lens = Options {
        key_lens: Some(vec![4, 4]),
        ..Options::new(8)
    };
    assert!(matches!(
        attn::forward(&q, &k, &v, &s, &lens),
        Err(Error::Shape {
            arg: "key_lens",
            ..
        })
    ));
    let masked = attn::forward_masked(&q, &k, &v, &s, &lens, &|_, _, _, _| true);
    assert!(masked.is_err());
}

#[test]
fn varlen_reference_rejects_unequal_offset_lists_decreasing_offsets_and_wrong_lengths() {
    let o = Options::new(4);
    let (q, k, v) = (
        vec![0.1f32; 3 * 4],
        vec![0.1f32; 5 * 4],
        vec![0.1f32; 5 * 4],
    );
    assert!(attn::forward_varlen(&q, &k, &v, &[0, 1, 3], &[0, 2, 5], 1, 1, 4, 4, &o).is_ok());
    let r = attn::forward_varlen(&q, &k, &v, &[0, 1, 3], &[0, 5], 1, 1, 4, 4, &o);
    assert!(matches!(r, Err(Error::Shape { arg: "cu_k", .. })), "{r:?}");
    let r = attn::forward_varlen(&q, &k, &v, &[0, 2, 1, 3], &[0, 2, 2, 5], 1, 1, 4, 4, &o);
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "cu_q", .. })),
        "{r:?}"
    );
    let r = attn::forward_varlen(&q, &k, &v, &[1, 3], &[0, 5], 1, 1, 4, 4, &o);
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "cu_q", .. })),
        "{r:?}"
    );
    let r = attn::forward_varlen(&q, &k, &v, &[0, 4], &[0, 5], 1, 1, 4, 4, &o);
    assert!(matches!(r, Err(Error::Shape { arg: "q", .. })), "{r:?}");
}

#[test]
fn layernorm_reference_rejects_partial_rows_zero_hidden_and_mismatched_parameters() {
    let x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    assert!(layernorm::forward(&x, 3, None, None, 1e-5).is_ok());
    assert!(matches!(
        layernorm::forward(&x, 4, None, None, 1e-5),
        Err(Error::Shape { arg: "x", .. })
    ));
    assert!(matches!(
        layernorm::forward(&x, 0, None, None, 1e-5),
        Err(Error::Shape { arg: "x", .. })
    ));
    assert!(matches!(
        layernorm::forward(&x, 3, Some(&[1.0, 1.0]), None, 1e-5),
        Err(Error::Shape { arg: "gamma", .. })
    ));
    assert!(matches!(
        layernorm::forward(&x, 3, None, Some(&[0.0; 4]), 1e-5),
        Err(Error::Shape { arg: "beta", .. })
    ));
    assert!(matches!(
        layernorm::backward(&x[..5], &x, 3, None, 1e-5),
        Err(Error::Shape { arg: "dy", .. })
    ));
    assert!(matches!(
        layernorm::backward(&x, &x, 3, Some(&[1.0]), 1e-5),
        Err(Error::Shape { arg: "gamma", .. })
    ));
    assert!(matches!(
        layernorm::residual_add(&x, &x[..2], DType::F16),
        Err(Error::Shape {
            arg: "residual",
            ..
        })
    ));
}
