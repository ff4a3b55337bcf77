//! The C ABI from Rust, as a C caller sees it: codes and messages for bad input, NULLs and
//! panics never crossing the boundary, the CPU references against cuattn's own, and the GPU
//! entry points refusing host memory (or reporting no device) by code.

use cuattn_c::*;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: cuattn_last_error returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(cuattn_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn options() -> cuattn_attention_options {
    cuattn_attention_options {
        scale: 0.0,
        causal: CUATTN_MASK_NONE,
        window_left: -1,
        window_right: -1,
        window_align: CUATTN_MASK_TOP_LEFT,
        kernel: CUATTN_KERNEL_AUTO,
        key_lens: 0,
        cu_seqlens_q: 0,
        cu_seqlens_k: 0,
        batch: 0,
        max_len_q: 0,
        max_len_k: 0,
    }
}

#[test]
fn the_version_is_the_crate_version() {
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(cuattn_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_attention_reference_matches_cuattn_and_reports_bad_input_by_code() {
    let shape = cuattn_attention_shape {
        batch: 2,
        heads_q: 4,
        heads_kv: 2,
        len_q: 3,
        len_k: 5,
        dim_qk: 8,
        dim_v: 6,
    };
    let n = |a: i64| a as usize;
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        (0..n(2 * 4 * 3 * 8))
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
            .collect(),
        (0..n(2 * 2 * 5 * 8))
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 6.0)
            .collect(),
        (0..n(2 * 2 * 5 * 6))
            .map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0)
            .collect(),
    );
    let mut o = vec![f32::NAN; n(2 * 4 * 3 * 6)];
    let mut lse = vec![f32::NAN; n(2 * 4 * 3)];
    let lens = [5i32, 2];
    let mut opts = options();
    opts.causal = CUATTN_MASK_BOTTOM_RIGHT;
    let rc = cuattn_attention_reference(
        &shape,
        q.as_ptr(),
        k.as_ptr(),
        v.as_ptr(),
        lens.as_ptr(),
        &opts,
        o.as_mut_ptr(),
        lse.as_mut_ptr(),
    );
    assert_eq!(rc, CUATTN_OK, "{}", last_error());
    let rshape = cuattn::reference::attention::Shape::new(2, 4, 2, 3, 5, 8, 6);
    let ropts = cuattn::reference::attention::Options {
        causal: Some(cuattn::reference::attention::CausalAlign::BottomRight),
        key_lens: Some(vec![5, 2]),
        ..cuattn::reference::attention::Options::new(8)
    };
    let want = cuattn::reference::attention::forward(&q, &k, &v, &rshape, &ropts).unwrap();
    for (g, w) in o.iter().zip(&want.o) {
        assert_eq!(*g, *w as f32);
    }
    for (g, w) in lse.iter().zip(&want.lse) {
        assert_eq!(*g, *w as f32);
    }

    // Heads that do not group, a NULL input, a negative size: codes, messages, no panic.
    let bad = cuattn_attention_shape {
        heads_q: 3,
        ..shape
    }; // smaller arrays than given
    let rc = cuattn_attention_reference(
        &bad,
        q.as_ptr(),
        k.as_ptr(),
        v.as_ptr(),
        null(),
        &opts,
        o.as_mut_ptr(),
        null_mut(),
    );
    assert_ne!(rc, CUATTN_OK);
    assert!(last_error().contains("heads"), "{}", last_error());
    let rc = cuattn_attention_reference(
        &shape,
        null(),
        k.as_ptr(),
        v.as_ptr(),
        null(),
        &opts,
        o.as_mut_ptr(),
        null_mut(),
    );
    assert_eq!(rc, CUATTN_ERROR_INVALID_ARGUMENT);
    assert!(last_error().contains("`q`"), "{}", last_error());
    let negative = cuattn_attention_shape { len_q: -1, ..shape };
    let rc = cuattn_attention_reference(
        &negative,
        q.as_ptr(),
        k.as_ptr(),
        v.as_ptr(),
        null(),
        &opts,
        o.as_mut_ptr(),
        null_mut(),
    );
    assert_eq!(rc, CUATTN_ERROR_INVALID_ARGUMENT);
    // A success clears the message.
    let rc = cuattn_attention_reference(
        &shape,
        q.as_ptr(),
        k.as_ptr(),
        v.as_ptr(),
        null(),
        &opts,
        o.as_mut_ptr(),
        null_mut(),
    );
    assert_eq!(rc, CUATTN_OK);
    assert_eq!(last_error(), "");
}

#[test]
fn the_layernorm_reference_matches_cuattn_and_checks_its_sizes() {
    let (rows, hidden) = (3usize, 10usize);
    let x: Vec<f32> = (0..rows * hidden).map(|i| (i as f32).sin()).collect();
    let gamma: Vec<f32> = (0..hidden).map(|i| 1.0 + i as f32 / 10.0).collect();
    let mut y = vec![f32::NAN; rows * hidden];
    let (mut mean, mut rstd) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
    let rc = cuattn_layernorm_reference(
        x.as_ptr(),
        rows,
        hidden,
        gamma.as_ptr(),
        null(),
        1e-5,
        y.as_mut_ptr(),
        mean.as_mut_ptr(),
        rstd.as_mut_ptr(),
    );
    assert_eq!(rc, CUATTN_OK, "{}", last_error());
    let want = cuattn::reference::layernorm::forward(&x, hidden, Some(&gamma), None, 1e-5).unwrap();
    for (g, w) in y.iter().zip(&want.y) {
        assert_eq!(*g, *w as f32);
    }
    for (g, w) in rstd.iter().zip(&want.rstd) {
        assert_eq!(*g, *w as f32);
    }
    let rc = cuattn_layernorm_reference(
        x.as_ptr(),
        rows,
        0,
        null(),
        null(),
        1e-5,
        y.as_mut_ptr(),
        null_mut(),
        null_mut(),
    );
    assert_eq!(rc, CUATTN_ERROR_SHAPE, "{}", last_error());
    let rc = cuattn_layernorm_reference(
        x.as_ptr(),
        usize::MAX,
        2,
        null(),
        null(),
        1e-5,
        y.as_mut_ptr(),
        null_mut(),
        null_mut(),
    );
    assert_eq!(rc, CUATTN_ERROR_INVALID_ARGUMENT, "{}", last_error());
}

#[test]
fn gpu_entry_points_report_no_device_or_refuse_host_memory_by_code() {
    let mut gpu = null_mut();
    let rc = cuattn_gpu_open(0, &mut gpu);
    if rc != CUATTN_OK {
        assert_eq!(rc, CUATTN_ERROR_NO_DEVICE, "{}", last_error());
        assert!(gpu.is_null());
        // Ops on a NULL handle are an argument error, not a crash.
        let rc = cuattn_attention_fwd(
            null(),
            null_mut(),
            null(),
            null(),
            null(),
            null(),
            null(),
            &options(),
        );
        assert_eq!(rc, CUATTN_ERROR_INVALID_ARGUMENT);
        assert!(last_error().contains("`gpu`"), "{}", last_error());
        println!("SKIPPED (no CUDA device): the GPU half of this test");
        return;
    }
    // Host memory passed as a device tensor is refused before any launch.
    let host = vec![0f32; 64];
    let t = cuattn_tensor {
        data: host.as_ptr() as u64,
        bytes: 256,
        dtype: CUATTN_DTYPE_F32,
        rank: 4,
        shape: [1, 1, 8, 8],
        strides: [0; 4],
    };
    let rc = cuattn_attention_fwd(gpu, null_mut(), &t, &t, &t, &t, null(), &options());
    assert_eq!(rc, CUATTN_ERROR_DEVICE, "{}", last_error());
    cuattn_gpu_close(gpu);
}
