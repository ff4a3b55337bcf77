//! Linear-layer weights stored for many-row GEMMs, and the GEMM that reads them.
//!
//! Layout: w `[out, in]` is cut into panels of [`PANEL`] output rows; panel p holds
//! `w[p·PANEL + j, i]` at `(p·in + i)·PANEL + j`, i.e. for each input feature the panel's 64
//! weights side by side (the last panel is zero-padded to the full width).
//!
//! Why: `gemm` vectorizes along the output features (64 of them per microkernel tile with
//! AVX-512, 16 with AVX2) and reads the weight operand in exactly this order. Given
//! nn.Linear's `[out, in]` rows it gathers every tile with scalar strided loads on every
//! call, which was 4.4% of a one-thread MiniLM embedding run, and more with two batches
//! gathering from memory at once. From a panel it reads contiguous rows (or copies them
//! whole), so the gather is done once, at load. Measured, one `gemm` call per linear layer
//! against one per panel, one thread, caches flushed before each call (GFLOP/s, MiniLM's
//! shapes): 550 rows 202–247 → 252–265, 1700 rows 236–271 → 253–276, 3000 rows about even;
//! whole embedding runs 5–6.5% faster (BENCHMARKS.md). With more than 48 input rows per
//! call `gemm` still copies the panel into its own strips (16 features wide with AVX2);
//! storing 16-wide panels and switching that copy off measured no faster: the copy's time is
//! the time to bring the weights into L1, which the microkernel would spend waiting instead.
//!
//! The GEMM: output rows in blocks and panels in groups, one task per (block, group), each a
//! single-threaded `gemm` call per panel then the bias/activation pass over its rows of the
//! group, while they are in cache. The sums are the ones the `[out, in]` call makes (the
//! same k order), so the values do not depend on the layout.
//!
//! Bytes: the weights (`out·in·4`) once per row block, `rows·in·4` of input per panel (from
//! cache), `rows·out·4` written. FLOPs: `2·rows·in·out`.

use super::isa::Isa;
use super::vmath;
use crate::runtime::backend::Activation;
use rayon::prelude::*;

/// Output rows per panel: `gemm`'s f32 tile height with AVX-512 (a multiple of AVX2's 16).
pub const PANEL: usize = 64;

/// Output rows of at least this many are stored in panels (a lone smaller panel would be
/// mostly padding).
pub const MIN_OUT: usize = PANEL;

/// Input rows per task at least, so a task's `gemm` calls amortize their setup.
const MIN_BLOCK_ROWS: usize = 64;

/// Values a panel store of `[out, in]` holds (padding included).
pub fn len(out: usize, inp: usize) -> usize {
    out.div_ceil(PANEL)
        .saturating_mul(PANEL)
        .saturating_mul(inp)
}

/// Copies `w` (`[out, in]`, row-major) into `dst` (empty) in panel order, zero-padding the last
/// panel. The rows of a panel are read in turn (contiguous), its columns written 64 apart.
pub fn pack(w: &[f32], out: usize, inp: usize, dst: &mut Vec<f32>) {
    assert_eq!(w.len(), out * inp, "panels::pack: weight length");
    dst.clear();
    dst.resize(len(out, inp), 0.0);
    dst.par_chunks_mut((PANEL * inp).max(1))
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..PANEL.min(out - p * PANEL) {
                let row = &w[(p * PANEL + j) * inp..][..inp];
                for (i, &v) in row.iter().enumerate() {
                    panel[i * PANEL + j] = v;
                }
            }
        });
}

/// The row-major `[out, in]` values of a panel store.
pub fn unpack(panels: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(panels.len(), len(out, inp), "panels::unpack: length");
    let mut w = vec![0.0; out * inp];
    for (o, row) in w.chunks_mut(inp.max(1)).take(out).enumerate() {
        let panel = &panels[(o / PANEL) * PANEL * inp..];
        for (i, v) in row.iter_mut().enumerate() {
            *v = panel[i * PANEL + o % PANEL];
        }
    }
    w
}

/// A raw output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes its own (row block × panel group) rectangle of the output and
// nothing else; the rectangles do not overlap (see `linear`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y[r, o] = act(Σ_i x[r, i]·w[o, i] + bias[o])` for x `[rows, inp]` and w in panels
/// ([`pack`]), y `[rows, out]` (every value written). On rayon's threads when there are
/// several; `row_piece` caps a task's rows (CPUs with a small L2, see the backend's
/// `row_piece`).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    rows: usize,
    inp: usize,
    panels: &[f32],
    out: usize,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    row_piece: Option<usize>,
) {
    assert_eq!(x.len(), rows * inp, "panels::linear: x length");
    assert_eq!(panels.len(), len(out, inp), "panels::linear: weight length");
    assert_eq!(y.len(), rows * out, "panels::linear: y length");
    if let Some(b) = bias {
        assert_eq!(b.len(), out, "panels::linear: bias length");
    }
    if rows == 0 || out == 0 {
        return;
    }
    let n_panels = out.div_ceil(PANEL);
    let threads = rayon::current_num_threads().max(1);
    // Row blocks: one per thread where the rows allow, and no more rows per task than a
    // small L2 keeps; then panel groups for the threads still idle.
    let mut blocks = rows.div_ceil(MIN_BLOCK_ROWS).clamp(1, threads);
    if let Some(piece) = row_piece.filter(|&p| p > 0) {
        blocks = blocks.max(rows.div_ceil(piece));
    }
    let block_rows = rows.div_ceil(blocks);
    let blocks = rows.div_ceil(block_rows);
    let groups = threads.div_ceil(blocks).clamp(1, n_panels);
    let group_panels = n_panels.div_ceil(groups);
    let groups = n_panels.div_ceil(group_panels);
    let isa = Isa::current();
    let y_out = Out(y.as_mut_ptr());
    let task = |t: usize| {
        let (b, g) = (t / groups, t % groups);
        let r0 = b * block_rows;
        let nr = block_rows.min(rows - r0);
        let p_end = ((g + 1) * group_panels).min(n_panels);
        let y = y_out;
        for p in g * group_panels..p_end {
            let c0 = p * PANEL;
            let nc = PANEL.min(out - c0);
            // SAFETY: the asserts above bound every access. The panel is `nc` × `inp`
            // (row stride 1, column stride PANEL) inside `panels`; the input rows
            // r0..r0+nr are `inp` values each inside `x`; the output rectangle (rows
            // r0..r0+nr, columns c0..c0+nc, row stride `out`) lies inside `y` and in this
            // task's rectangle only, so no two tasks write the same value. The GEMM is
            // written in gemm's column-major terms: dst[c, r] = Σ_i panel[c, i]·x[r, i].
            unsafe {
                gemm::gemm(
                    nc,
                    nr,
                    inp,
                    y.0.add(r0 * out + c0),
                    out as isize,
                    1,
                    false,
                    panels.as_ptr().add(p * PANEL * inp),
                    PANEL as isize,
                    1,
                    x.as_ptr().add(r0 * inp),
                    inp as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        }
        if bias.is_none() && act == Activation::None {
            return;
        }
        let (c0, c1) = (g * group_panels * PANEL, (p_end * PANEL).min(out));
        let bias = bias.map(|b| &b[c0..c1]);
        for r in r0..r0 + nr {
            // SAFETY: row r's columns c0..c1 are inside `y` and inside this task's
            // rectangle (see above); the GEMM calls that wrote them have returned.
            let row = unsafe { std::slice::from_raw_parts_mut(y.0.add(r * out + c0), c1 - c0) };
            vmath::bias_activation(isa, act, bias, row);
        }
    };
    let tasks = blocks * groups;
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Against an f64 sum, within f32 accumulation error, for row counts from 0 to a few
    /// blocks, widths with a partial last panel, k = 0 and odd k, every epilogue, on 1 and 3
    /// threads and with row pieces (so blocks, panel groups and their edges all occur).
    /// Outputs start as NaN so an unwritten one fails.
    #[test]
    fn matches_an_f64_reference_over_blocks_groups_and_edges() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(29);
        let cases = [
            (0, 8, 64),
            (1, 33, 64),
            (5, 7, 65),
            (64, 40, 130),
            (65, 1, 200),
            (150, 24, 128),
            (200, 0, 70),
        ];
        let acts = [
            (None, Activation::None),
            (Some(()), Activation::None),
            (Some(()), Activation::GeluErf),
            (None, Activation::Relu),
        ];
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for &(rows, k, n) in &cases {
                let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut p = Vec::new();
                pack(&w, n, k, &mut p);
                for piece in [None, Some(16)] {
                    for (with_bias, act) in acts {
                        let bias = with_bias.map(|_| &b[..]);
                        let mut y = vec![f32::NAN; rows * n];
                        pool.install(|| linear(&x, rows, k, &p, n, bias, act, &mut y, piece));
                        for r in 0..rows {
                            for o in 0..n {
                                let b0 = bias.map_or(0.0, |b| b[o] as f64);
                                let (mut s, mut mag) = (b0, b0.abs());
                                for i in 0..k {
                                    let t = x[r * k + i] as f64 * w[o * k + i] as f64;
                                    s += t;
                                    mag += t.abs();
                                }
                                let want = act.apply(s as f32) as f64;
                                let tol = (k as f64 + 4.0) * f32::EPSILON as f64 * mag + 1e-6;
                                let got = y[r * n + o] as f64;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{threads} threads, rows {rows} k {k} n {n} {piece:?} \
                                     {act:?} [{r},{o}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pack_and_unpack_round_trip_with_a_padded_last_panel() {
        for (out, inp) in [(64, 3), (65, 5), (130, 1), (200, 7), (64, 0)] {
            let w: Vec<f32> = (0..out * inp).map(|v| v as f32 + 0.5).collect();
            let mut p = vec![-1.0; 3];
            pack(&w, out, inp, &mut p);
            assert_eq!(p.len(), len(out, inp));
            for o in 0..out {
                for i in 0..inp {
                    assert_eq!(p[(o / PANEL * inp + i) * PANEL + o % PANEL], w[o * inp + i]);
                }
            }
            // The padding is zeros.
            let real = out * inp;
            assert_eq!(p.iter().filter(|&&v| v == 0.0).count(), p.len() - real);
            assert_eq!(unpack(&p, out, inp), w);
        }
    }
}
