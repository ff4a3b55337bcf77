//! The CPU twin of the LayerNorm kernels (`cuattn::twin::layernorm`) against the f64
//! reference, under the same tolerances as the GPU tests, over the launch shapes the planner
//! produces: every group width, packs per thread, rows per block, grid smaller and larger than
//! the row count, vector and scalar packs, and both ways of forming dγ/dβ. Runs without a GPU.

use cuattn::reference::layernorm as reference;
use cuattn::tolerance::{expect_close, layernorm as tolerances, Tolerance};
use cuattn::twin::layernorm::{self as twin, Launch, Partials};
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn values(rng: &mut SmallRng, dtype: DType, n: usize, center: f32, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(center + spread * rng.gen_range(-1.0f32..1.0)))
        .collect()
}

fn expect(what: &str, out: &[f32], want: &[f64], tol: Tolerance) {
    if let Err(e) = expect_close(what, out, want, tol) {
        panic!("{e}");
    }
}

/// The launches the planner can make for a row of `hidden` elements: scalar and (when the row
/// allows) 16-byte packs; groups of 32..=1024 threads; several grid sizes.
fn launches(dtype: DType, hidden: usize, rows: usize) -> Vec<Launch> {
    let pack = 16 / dtype.size_bytes();
    let mut vecs = vec![1];
    if hidden.is_multiple_of(pack) {
        vecs.push(pack);
    }
    let mut out = Vec::new();
    for vec in vecs {
        let units = hidden / vec;
        for target in [1usize, 2, 4] {
            for max_tpr in [512usize, 1024] {
                let tpr = units
                    .div_ceil(target)
                    .next_power_of_two()
                    .clamp(32, max_tpr);
                let rows_per_block = (256 / tpr).max(1);
                for grid in [1, 3, rows.div_ceil(rows_per_block)] {
                    out.push(Launch {
                        vec,
                        threads_per_row: tpr,
                        rows_per_block,
                        grid,
                    });
                }
            }
        }
    }
    out.dedup();
    out
}

#[test]
fn twin_forward_and_backward_match_the_reference_on_every_launch_shape() {
    let mut rng = SmallRng::seed_from_u64(0x7717);
    for dtype in DType::ALL {
        for (rows, hidden) in [
            (5, 1),
            (9, 7),
            (13, 51),
            (6, 768),
            (4, 1600),
            (3, 4097),
            (2, 8192),
        ] {
            let x = values(&mut rng, dtype, rows * hidden, 0.5, 2.0);
            let residual = values(&mut rng, dtype, rows * hidden, 0.0, 1.0);
            let dy = values(&mut rng, dtype, rows * hidden, 0.0, 1.0);
            let gamma = values(&mut rng, dtype, hidden, 1.0, 0.5);
            let beta = values(&mut rng, dtype, hidden, 0.0, 1.0);
            let eps = 1e-5;
            let s = reference::residual_add(&x, &residual, dtype).unwrap();
            let want = reference::forward(&s, hidden, Some(&gamma), Some(&beta), eps).unwrap();
            let ftol = tolerances::forward(dtype, &s, hidden, Some(&gamma), Some(&beta), &want);
            let bwant = reference::backward(&dy, &x, hidden, Some(&gamma), eps).unwrap();
            let btol = tolerances::backward(dtype, &dy, &x, hidden, Some(&gamma), eps);
            for l in launches(dtype, hidden, rows) {
                let what = format!("{dtype} {rows}x{hidden} {l:?}");
                let f = twin::forward(
                    &l,
                    dtype,
                    &x,
                    Some(&residual),
                    hidden,
                    Some(&gamma),
                    Some(&beta),
                    eps,
                );
                assert_eq!(
                    f.residual_out.as_deref(),
                    Some(&s[..]),
                    "{what}: residual_out"
                );
                expect(&format!("{what}: y"), &f.y, &want.y, ftol.y);
                expect(&format!("{what}: mean"), &f.mean, &want.mean, ftol.mean);
                expect(&format!("{what}: rstd"), &f.rstd, &want.rstd, ftol.rstd);

                let stats = twin::forward(&l, dtype, &x, None, hidden, Some(&gamma), None, eps);
                for partials in [
                    Partials::PerBlock,
                    Partials::Columns { rows_per_chunk: 1 },
                    Partials::Columns { rows_per_chunk: 3 },
                ] {
                    let what = format!("{what} {partials:?}");
                    let b = twin::backward(
                        &l,
                        partials,
                        dtype,
                        &dy,
                        &x,
                        hidden,
                        Some(&gamma),
                        &stats.mean,
                        &stats.rstd,
                    );
                    expect(&format!("{what}: dx"), &b.dx, &bwant.dx, btol.dx);
                    expect(
                        &format!("{what}: dgamma"),
                        &b.dgamma,
                        &bwant.dgamma,
                        btol.dgamma,
                    );
                    expect(
                        &format!("{what}: dbeta"),
                        &b.dbeta,
                        &bwant.dbeta,
                        btol.dbeta,
                    );
                }
            }
        }
    }
}

#[test]
fn twin_writes_every_output_element_exactly_from_its_owner() {
    // Every element of y and dx starts as NaN in the twin; a pack no thread owns would stay NaN.
    let dtype = DType::F16;
    let (rows, hidden) = (7, 200);
    let mut rng = SmallRng::seed_from_u64(3);
    let x = values(&mut rng, dtype, rows * hidden, 0.0, 1.0);
    let dy = values(&mut rng, dtype, rows * hidden, 0.0, 1.0);
    for l in launches(dtype, hidden, rows) {
        let f = twin::forward(&l, dtype, &x, None, hidden, None, None, 1e-5);
        assert!(
            f.y.iter()
                .chain(&f.mean)
                .chain(&f.rstd)
                .all(|v| v.is_finite()),
            "{l:?}"
        );
        let b = twin::backward(
            &l,
            Partials::PerBlock,
            dtype,
            &dy,
            &x,
            hidden,
            None,
            &f.mean,
            &f.rstd,
        );
        assert!(
            b.dx.iter()
                .chain(&b.dgamma)
                .chain(&b.dbeta)
                .all(|v| v.is_finite()),
            "{l:?}"
        );
    }
}

#[test]
fn twin_partials_are_independent_of_the_grid_up_to_rounding_and_bitwise_repeatable() {
    let dtype = DType::F32;
    let (rows, hidden) = (40, 96);
    let mut rng = SmallRng::seed_from_u64(11);
    let x = values(&mut rng, dtype, rows * hidden, 0.2, 1.0);
    let dy = values(&mut rng, dtype, rows * hidden, 0.0, 1.0);
    let l = |grid| Launch {
        vec: 4,
        threads_per_row: 32,
        rows_per_block: 8,
        grid,
    };
    let stats = twin::forward(&l(5), dtype, &x, None, hidden, None, None, 1e-5);
    let run = |grid| {
        twin::backward(
            &l(grid),
            Partials::PerBlock,
            dtype,
            &dy,
            &x,
            hidden,
            None,
            &stats.mean,
            &stats.rstd,
        )
    };
    let (a, b) = (run(5), run(5));
    assert!(a
        .dgamma
        .iter()
        .zip(&b.dgamma)
        .all(|(p, q)| p.to_bits() == q.to_bits()));
    let c = run(1);
    for (p, q) in a.dgamma.iter().zip(&c.dgamma) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
    }
}
