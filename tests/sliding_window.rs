//! Sliding-window attention as a plain option of the dense path, on the CPU: the key band
//! (`cuattn::key_band`) against brute force, the reference's window against an explicit element
//! mask, the dense and decode twins against the reference with windows of every shape, the tiles
//! a windowed query block skips, and NaN in keys outside every window.

use cuattn::key_band::{KeyBand, Window};
use cuattn::reference::attention::{self as reference, CausalAlign, Options, Shape};
use cuattn::tolerance::{attention as tolerances, expect_close, Tolerance};
use cuattn::twin::attention::{self as twin, TileCounts, Tiling};
use cuattn::twin::decode;
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut SmallRng, dtype: DType, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(spread * rng.gen_range(-1.0f32..1.0)))
        .collect()
}

fn expect(what: &str, out: &[f32], want: &[f64], tol: Tolerance) {
    if let Err(e) = expect_close(what, out, want, tol) {
        panic!("{e}");
    }
}

const CAUSAL: [Option<CausalAlign>; 3] = [
    None,
    Some(CausalAlign::TopLeft),
    Some(CausalAlign::BottomRight),
];

/// Windows of every shape: empty-ish, one-sided, wide, and wider than any sequence here.
fn windows() -> Vec<Option<Window>> {
    let mut w = vec![None];
    for align in [CausalAlign::TopLeft, CausalAlign::BottomRight] {
        for (left, right) in [(0, 0), (3, 0), (0, 5), (9, 9), (100, 2), (usize::MAX, 1)] {
            w.push(Some(Window::new(left, right, align)));
        }
    }
    w
}

/// The mask written out from the definition, without `KeyBand`.
fn admitted(
    i: usize,
    j: usize,
    len_q: usize,
    key_len: usize,
    causal: Option<CausalAlign>,
    window: Option<Window>,
) -> bool {
    let off = |a| match a {
        CausalAlign::TopLeft => 0i128,
        CausalAlign::BottomRight => key_len as i128 - len_q as i128,
    };
    let (i, j) = (i as i128, j as i128);
    j < key_len as i128
        && causal.is_none_or(|a| j <= i + off(a))
        && window.is_none_or(|w| {
            j >= i + off(w.align) - w.left as i128 && j <= i + off(w.align) + w.right as i128
        })
}

#[test]
fn key_band_rows_and_tiles_agree_with_brute_force() {
    let bn = 8;
    for len_q in [1, 7, 8, 19, 40] {
        for key_len in [0, 1, 8, 13, 40] {
            for causal in CAUSAL {
                for window in windows() {
                    let band = KeyBand::new(len_q, key_len, causal, window);
                    let ok = |i, j| admitted(i, j, len_q, key_len, causal, window);
                    for i in 0..len_q {
                        let keys = band.keys(i);
                        for j in 0..key_len + 3 {
                            assert_eq!(band.admits(i, j), ok(i, j));
                            assert_eq!(keys.contains(&j), ok(i, j), "row {i} key {j}");
                        }
                    }
                    // Every block of rows: computed tiles are exactly those holding an admitted
                    // key, full tiles exactly those admitting all of theirs.
                    for row0 in (0..len_q).step_by(8) {
                        let rows = row0..len_q.min(row0 + 8);
                        let tiles = band.key_tiles(rows.clone(), bn);
                        let union = band.keys_of_rows(rows.clone());
                        for t in 0..key_len.div_ceil(bn) + 1 {
                            let any = rows
                                .clone()
                                .any(|i| (t * bn..(t + 1) * bn).any(|j| ok(i, j)));
                            let all = rows
                                .clone()
                                .all(|i| (t * bn..(t + 1) * bn).all(|j| ok(i, j)));
                            let at = format!(
                                "{len_q}×{key_len} {causal:?} {window:?} rows {rows:?} tile {t}"
                            );
                            assert_eq!(tiles.contains(&t), any, "{at}");
                            assert_eq!(band.tile_is_full(rows.clone(), t, bn), all, "{at}");
                        }
                        for j in 0..key_len {
                            assert_eq!(union.contains(&j), rows.clone().any(|i| ok(i, j)));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_references_window_equals_the_explicit_element_mask() {
    let mut rng = SmallRng::seed_from_u64(0x51d);
    for (lq, lk) in [(13, 13), (5, 21), (21, 5)] {
        let s = Shape::new(2, 2, 1, lq, lk, 6, 4);
        let q = rand_vec(&mut rng, DType::F32, s.q_len(), 2.0);
        let k = rand_vec(&mut rng, DType::F32, s.k_len(), 2.0);
        let v = rand_vec(&mut rng, DType::F32, s.v_len(), 1.0);
        let key_lens = [lk, lk / 2];
        for causal in CAUSAL {
            for window in windows() {
                let opts = Options {
                    causal,
                    window,
                    key_lens: Some(key_lens.to_vec()),
                    ..Options::new(6)
                };
                let got = reference::forward(&q, &k, &v, &s, &opts).unwrap();
                let plain = Options::new(6);
                let want = reference::forward_masked(&q, &k, &v, &s, &plain, &|b, _, i, j| {
                    admitted(i, j, lq, key_lens[b], causal, window)
                })
                .unwrap();
                // The same keys summed in the same order: identical results.
                assert_eq!(got.o, want.o, "{lq}×{lk} {causal:?} {window:?}");
                assert_eq!(got.lse, want.lse, "{lq}×{lk} {causal:?} {window:?}");
            }
        }
    }
}

#[test]
fn dense_twin_with_a_window_matches_the_reference_on_the_edge_case_matrix() {
    let mut rng = SmallRng::seed_from_u64(0xb4d);
    let tiling = Tiling {
        block_q: 16,
        block_k: 8,
    };
    let bn = tiling.block_k;
    let lens = [1, 2, bn - 1, bn, bn + 1, 3 * bn + 5];
    for (n, &lq) in lens.iter().enumerate() {
        for &lk in &lens {
            for causal in CAUSAL {
                for window in windows() {
                    let dtype = DType::ALL[(n + lk) % 3];
                    let (d, dv) = if (lq + lk) % 2 == 0 { (8, 8) } else { (9, 5) };
                    let s = Shape::new(2, 4, 2, lq, lk, d, dv);
                    let q = rand_vec(&mut rng, dtype, s.q_len(), 2.0);
                    let k = rand_vec(&mut rng, dtype, s.k_len(), 2.0);
                    let v = rand_vec(&mut rng, dtype, s.v_len(), 1.0);
                    let opts = Options {
                        causal,
                        window,
                        key_lens: Some(vec![lk, lk / 2]),
                        ..Options::new(d)
                    };
                    let want = reference::forward(&q, &k, &v, &s, &opts).unwrap();
                    let (got, _) = twin::forward(&q, &k, &v, &s, &opts, tiling, dtype);
                    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, dtype);
                    let what = format!("{dtype} Lq={lq} Lk={lk} {causal:?} {window:?}");
                    expect(&format!("{what}: O"), &got.o, &want.o, tol.o);
                    expect(&format!("{what}: LSE"), &got.lse, &want.lse, tol.lse);
                    // Decode through splits honours the window too.
                    if lq <= 2 {
                        let (o, lse) = decode::forward(&q, &k, &v, &s, &opts, 3, bn);
                        expect(&format!("{what}: decode O"), &o, &want.o, tol.o);
                        expect(&format!("{what}: decode LSE"), &lse, &want.lse, tol.lse);
                    }
                }
            }
        }
    }
}

#[test]
fn tiles_outside_the_window_are_skipped() {
    // Lq = Lk = 64 in 16×16 tiles, causal with 31 keys of look-back: query block m (rows
    // 16m..16m+15, keys i−31..=i) computes tiles m−2 (masked), m−1 (full) and m (diagonal):
    // blocks 0..4 compute 1 + 2 + 3 + 3 = 9 tiles, 3 of them full, and skip 16 − 9 = 7.
    let s = Shape::new(1, 1, 1, 64, 64, 4, 4);
    let mut rng = SmallRng::seed_from_u64(12);
    let (q, k, v) = (
        rand_vec(&mut rng, DType::F32, 256, 1.0),
        rand_vec(&mut rng, DType::F32, 256, 1.0),
        rand_vec(&mut rng, DType::F32, 256, 1.0),
    );
    let tiling = Tiling {
        block_q: 16,
        block_k: 16,
    };
    let opts = Options {
        causal: Some(CausalAlign::TopLeft),
        window: Some(Window::new(31, 0, CausalAlign::TopLeft)),
        ..Options::new(4)
    };
    let (got, counts) = twin::forward(&q, &k, &v, &s, &opts, tiling, DType::F32);
    assert_eq!(
        counts,
        TileCounts {
            full: 3,
            masked: 6,
            skipped: 7
        }
    );
    let want = reference::forward(&q, &k, &v, &s, &opts).unwrap();
    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::F32);
    expect("O", &got.o, &want.o, tol.o);
    // A two-sided window without the causal mask: block m computes tiles m−1, m, m+1 where
    // they exist (3·4 − 2 = 10), skipping 6; with 16 keys each side none is full but m.
    let opts = Options {
        window: Some(Window::new(16, 16, CausalAlign::TopLeft)),
        ..Options::new(4)
    };
    let (_, counts) = twin::forward(&q, &k, &v, &s, &opts, tiling, DType::F32);
    assert_eq!(
        counts,
        TileCounts {
            full: 4,
            masked: 6,
            skipped: 6
        }
    );
}

#[test]
fn nan_in_keys_outside_every_window_never_reaches_the_output() {
    // Bottom-right, Lq = 8 < Lk = 40, 3 keys of look-back: queries see keys 29..=39 only, so
    // keys 0..29 — including the first five of tile 3 (keys 24..32) — are never read.
    let s = Shape::new(1, 2, 1, 8, 40, 8, 8);
    let mut rng = SmallRng::seed_from_u64(13);
    let q = rand_vec(&mut rng, DType::F16, s.q_len(), 1.0);
    let mut k = rand_vec(&mut rng, DType::F16, s.k_len(), 1.0);
    let mut v = rand_vec(&mut rng, DType::F16, s.v_len(), 1.0);
    let opts = Options {
        causal: Some(CausalAlign::BottomRight),
        window: Some(Window::new(3, 0, CausalAlign::BottomRight)),
        ..Options::new(8)
    };
    let clean = reference::forward(&q, &k, &v, &s, &opts).unwrap();
    let tol = tolerances::bounds(&q, &k, &v, &s, opts.scale, DType::F16);
    k[..29 * 8].iter_mut().for_each(|x| *x = f32::NAN);
    v[..29 * 8].iter_mut().for_each(|x| *x = f32::NAN);
    let tiling = Tiling {
        block_q: 8,
        block_k: 8,
    };
    let (got, counts) = twin::forward(&q, &k, &v, &s, &opts, tiling, DType::F16);
    expect("O", &got.o, &clean.o, tol.o);
    expect("LSE", &got.lse, &clean.lse, tol.lse);
    assert_eq!(
        counts.skipped,
        2 * 3,
        "tiles 0..3 hold no visible key, for each head"
    );
    let (o, lse) = decode::forward(&q, &k, &v, &s, &opts, 4, 8);
    expect("decode O", &o, &clean.o, tol.o);
    expect("decode LSE", &lse, &clean.lse, tol.lse);
}

#[test]
fn band_bounds_for_the_kernel_fit_i32_and_admit_the_same_keys() {
    let band = KeyBand::new(
        100,
        300,
        None,
        Some(Window::new(usize::MAX, 7, CausalAlign::BottomRight)),
    );
    let (lo, hi) = band.bounds_i32(100, 300).unwrap();
    assert_eq!((lo, hi), (-401, 207));
    for i in 0..100i32 {
        for j in 0..300i32 {
            let kernel = j >= i + lo && j <= i + hi;
            assert_eq!(kernel, band.admits(i as usize, j as usize));
        }
    }
    let causal = KeyBand::new(5, 9, Some(CausalAlign::BottomRight), None);
    assert_eq!(causal.bounds_i32(5, 9).unwrap(), (-15, 4));
}
