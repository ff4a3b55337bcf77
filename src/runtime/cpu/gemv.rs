//! Few-row linear layers (decoding): `y[m, o] = act(Σ_i x[m, i]·w[o, i] + bias[o])` for x
//! `[rows, k]` with rows ≤ [`MAX_ROWS`], w `[n, k]` (nn.Linear layout) in f32 or bf16.
//!
//! Why not the GEMM: with one row the `gemm` crate takes a single-threaded GEMV path whatever
//! parallelism it is given, so a decoding step streams its weights from one core (about half
//! of what two cores read from DRAM). Here every call is split over rayon's threads.
//!
//! - Work split: the n outputs (rows of w) are cut into contiguous blocks of a multiple of 12
//!   rows, about four blocks per thread (at least 32 K weights each, so the task overhead
//!   stays small); one rayon task per block.
//! - Inside a block: R weight rows at a time (fewer at the block's end), each meeting up to 4
//!   input rows at once: R×MB vector accumulators (MB ≤ 4) fed by R weight loads and one input
//!   load per step of 16 (AVX-512) or 8 (AVX2) elements along k, reduced horizontally at the
//!   end; k's remainder is a scalar loop. R is 4 with AVX-512's 32 vector registers (16
//!   accumulators + 4 weights + 1 input) and 3 with AVX2's 16 (12 + 3 + 1: a 4×4 tile would
//!   spill accumulators to the stack on every step, which measured no faster than the packed
//!   GEMM at 16 rows). With more than 4 input rows the next 4 re-read the same R weight rows
//!   (≤ 48 KB at k = 3072) from L1/L2, so each weight byte comes from DRAM once per call
//!   however many rows there are.
//! - Prefetch: with 2 or more input rows, or bf16 weights, every pass over a tile also
//!   prefetches the next tile's weight rows, one cache line per row per step. Without it the
//!   second pass over a tile (rows 5–8) ran from cache while DRAM idled, and even one pass of
//!   4 rows kept too few reads in flight: GPT-2-124M decoding at batch 8 took 1.8× batch 1's
//!   step time. bf16 at batch 1 gained 10–20%. With one row of f32 weights the hardware
//!   prefetcher alone was faster (BENCHMARKS.md).
//! - bf16 weights are widened to f32 in registers (a bf16 is the top 16 bits of an f32); the
//!   arithmetic is f32 either way. [`CpuBf16`](super::CpuBf16) stores them in [`tiles`]
//!   order, which a block reads front to back (`block_tiled`): tiles of 4 rows with AVX-512, 3
//!   with AVX2, up to 4 input rows per pass, a software prefetch 2 KiB ahead (or, when several
//!   passes share a tile, one tile ahead).
//! - Bytes: n·k·(4 or 2) of weights, rows·k·4 of input per block (cached), rows·n·4 out.
//!   FLOPs: 2·rows·n·k. At batch 1 that is 2 flop per weight: the call is memory-bound.
//! - Output: with one row the blocks write y directly; with more, each block writes its
//!   columns as `[col, row]` into a scratch buffer that is then transposed into y.
//! - Bias and activation are applied by each task to its own block while it is in cache.

use super::isa::Isa;
use crate::runtime::backend::Activation;
use rayon::prelude::*;

/// Inputs with at most this many rows take this path; more rows go to the packed GEMM,
/// which reuses each weight tile across rows from registers. Below this, the GEMM's
/// per-call packing of the weights (a strided gather) costs more than it saves: one linear
/// layer on two threads, 17 rows, took 4.2 ms at k = 3072 (n = 768) against 0.46 here, and at
/// 64 rows 0.86–4.9 ms against 0.28–1.35; from about 128 rows (k ≤ 768) the GEMM is faster.
pub const MAX_ROWS: usize = 64;

/// The weight matrix `[n, k]`: f32 or bf16 bit patterns row-major, or bf16 in [`tiles`]
/// order with tiles of the given height.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    Bf16Tiles(&'a [u16], usize),
}

/// The tile order of a bf16 weight `[n, k]`, for k a multiple of [`tiles::CHUNK`]: the rows in
/// tiles of h (the last one shorter when n is not a multiple of h), each tile's values chunk
/// by chunk along k and, within a chunk, row by row: `(o, i)` at
/// `t0·k + ((i / CHUNK)·ht + o − t0)·CHUNK + i % CHUNK` for the tile's first row `t0` and its
/// height `ht`. So a tile is still the slice `w[t0·k..(t0 + ht)·k]`.
///
/// Why: the few-row kernel reads a tile's rows side by side. Row-major, that is 3 or 4
/// streams 1.5 KiB long each at k = 768 (bf16), too short for the hardware prefetcher to get
/// ahead; in tile order it is one sequential stream per task. Measured on a 2-core Zen 3, a
/// 240 MiB bf16 stream over both cores (k = 768, tasks of 288 rows): 16.6–17.0 GB/s
/// row-major with the next-tile prefetch, 21.2–22.4 in tile order with a prefetch 2 KiB
/// ahead. f32 rows are twice as long and gained nothing measurable there (24–25 GB/s either
/// way), so f32 stays row-major.
///
/// The height is the kernel's weight rows per step on this CPU ([`tiles::height`]): 4 with
/// AVX-512, 3 with AVX2, whose 16 registers hold a 3×4 tile (12 accumulators, 3 weight
/// vectors, 1 input vector) for 4 input rows at a time but not a 4×3 one (it spilled).
pub mod tiles {
    use super::Isa;

    /// Values of one row per chunk: one AVX-512 vector, two AVX2 ones.
    pub const CHUNK: usize = 16;

    /// Rows per tile for kernels of `isa`.
    pub fn height(isa: Isa) -> usize {
        if isa.capped() == Isa::Avx2 {
            3
        } else {
            4
        }
    }

    /// Whether a bf16 matrix of `shape` is stored in tile order.
    pub fn applies(shape: &[usize]) -> bool {
        matches!(shape, [n, k] if *n > 0 && *k > 0 && k.is_multiple_of(CHUNK))
    }

    /// Row-major values of `[n, k]` in tile order with tiles of `h` rows, through `f` (e.g.
    /// f32 to bf16 bits), appended to `out`.
    pub fn append<S: Copy, T>(
        rows: &[S],
        (n, k): (usize, usize),
        h: usize,
        out: &mut Vec<T>,
        f: impl Fn(S) -> T,
    ) {
        assert!(
            rows.len() == n * k && k.is_multiple_of(CHUNK) && h > 0,
            "tiles::append: [{n}, {k}] in tiles of {h}"
        );
        for t0 in (0..n).step_by(h) {
            let ht = h.min(n - t0);
            for c in (0..k).step_by(CHUNK) {
                for o in t0..t0 + ht {
                    out.extend(rows[o * k + c..o * k + c + CHUNK].iter().map(|&v| f(v)));
                }
            }
        }
    }

    /// Row `o` of a tile-ordered `[n, k]` with tiles of `h` rows, through `f`, appended to
    /// `out`.
    pub fn row<S: Copy, T>(
        tiled: &[S],
        (n, k): (usize, usize),
        h: usize,
        o: usize,
        out: &mut Vec<T>,
        f: impl Fn(S) -> T,
    ) {
        let t0 = o - o % h;
        let ht = h.min(n - t0);
        for c in 0..k / CHUNK {
            let at = t0 * k + (c * ht + o - t0) * CHUNK;
            out.extend(tiled[at..at + CHUNK].iter().map(|&v| f(v)));
        }
    }
}

/// A stored weight element.
pub(crate) trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for u16 {
    /// bf16 bits to f32: exact (the bf16 value is the f32 with its low 16 bits zero).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// `y = act(x·wᵀ + bias)` (see the module docs), with the kernels of `isa` (capped at what
/// the CPU supports). The caller has checked the shapes: x `[rows, k]`, w `[n, k]`, bias
/// `[n]`, y `[rows, n]`.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    let isa = isa.capped();
    match w {
        Weights::F32(w) => run(isa, x, rows, k, w, n, bias, act, y, |w, b, out| {
            block(isa, x, rows, k, w, b, out)
        }),
        Weights::Bf16(w) => run(isa, x, rows, k, w, n, bias, act, y, |w, b, out| {
            block(isa, x, rows, k, w, b, out)
        }),
        Weights::Bf16Tiles(w, h) => run(isa, x, rows, k, w, n, bias, act, y, |w, b, out| {
            block_tiled(isa, x, rows, k, (w, h), b, out)
        }),
    }
}

/// Output columns per task: a multiple of 12 (whole tiles of 3 or 4 weight rows), about four
/// tasks per thread, each reading at least 32 K weights.
fn column_block(n: usize, k: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per_task = n.div_ceil(threads * 4);
    let min_cols = (1usize << 15) / k.max(1);
    per_task.max(min_cols).max(1).next_multiple_of(12)
}

/// Weight rows per tile for `isa`'s register file and the number of input rows (see the
/// module docs): AVX2 fits a 4×2 tile (8 accumulators) but not 4×3 or 4×4.
fn weight_rows(isa: Isa, rows: usize) -> usize {
    match isa {
        Isa::Avx512 => 4,
        _ if rows <= 2 => 4,
        _ => 3,
    }
}

/// The split over the threads (see the module docs); `block` computes one task's outputs
/// from its weight rows and bias (`block` or `block_tiled`).
#[allow(clippy::too_many_arguments)]
fn run<W: Sync>(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    block: impl Fn(&[W], Option<&[f32]>, &mut [f32]) + Sync,
) {
    assert!(
        x.len() == rows * k
            && w.len() == n * k
            && y.len() == rows * n
            && bias.is_none_or(|b| b.len() == n),
        "gemv::linear: shapes were not checked by the caller"
    );
    if rows == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        for row in y.chunks_mut(n) {
            if let Some(b) = bias {
                row.copy_from_slice(b);
            }
            act.apply_slice(row);
        }
        return;
    }
    let cols = column_block(n, k);
    let task = |c: usize, out: &mut [f32]| {
        let o0 = c * cols;
        let o1 = o0 + out.len() / rows;
        // A block starts on a tile boundary (`column_block` is a multiple of 12), so in tile
        // order its rows are the same slice as row-major.
        block(&w[o0 * k..o1 * k], bias.map(|b| &b[o0..o1]), out);
        super::vmath::activation(isa, act, out);
    };
    if rows == 1 {
        y.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(c, out)| task(c, out));
    } else {
        // Each task writes its block as `[row, col]`; the rows of y are then whole-block copies.
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(cols * rows)
            .enumerate()
            .for_each(|(c, out)| task(c, out));
        y.par_chunks_mut(n).enumerate().for_each(|(m, row)| {
            for (c, seg) in row.chunks_mut(cols).enumerate() {
                let w = seg.len();
                seg.copy_from_slice(&yt[c * cols * rows + m * w..][..w]);
            }
        });
    }
}

/// One task: the `out.len() / rows` outputs of the weight rows `w`, written `[row, col]`.
fn block<W: Elem + Kernels>(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[W],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let cols = out.len() / rows;
    let rw = weight_rows(isa, rows);
    let mut sums = [0f32; 16];
    let mut o = 0;
    let widened = std::mem::size_of::<W>() < std::mem::size_of::<f32>();
    let prefetch = rows > 1 || widened;
    while o < cols {
        let r = if cols - o >= rw { rw } else { 1 };
        let wr = &w[o * k..(o + r) * k];
        // With several input rows each weight load feeds several FMAs (with bf16 weights,
        // widening instructions too), and the loads alone no longer keep enough DRAM reads in
        // flight: every pass over this tile also prefetches the next one (when it is as
        // tall). Not for one row of f32 weights, where it was slower.
        let next = (prefetch && cols - (o + r) >= r).then(|| &w[(o + r) * k..(o + 2 * r) * k]);
        let mut m0 = 0;
        while m0 < rows {
            let mb = (rows - m0).min(4);
            tile(
                isa,
                r,
                mb,
                wr,
                next,
                &x[m0 * k..(m0 + mb) * k],
                k,
                &mut sums,
            );
            store(&sums, bias, cols, (o, r), (m0, mb), out);
            m0 += mb;
        }
        o += r;
    }
}

/// Calls the (R, MB) instance of kernel `$f` (row-major kernels take R of 1, 3 or 4; 2 only
/// occurs at the end of a tile-order matrix).
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($f:ident, $r:expr, $mb:expr, $($a:expr),*) => {
        match ($r, $mb) {
            (4, 1) => $f::<4, 1>($($a),*),
            (4, 2) => $f::<4, 2>($($a),*),
            (4, 3) => $f::<4, 3>($($a),*),
            (4, 4) => $f::<4, 4>($($a),*),
            (3, 1) => $f::<3, 1>($($a),*),
            (3, 2) => $f::<3, 2>($($a),*),
            (3, 3) => $f::<3, 3>($($a),*),
            (3, 4) => $f::<3, 4>($($a),*),
            (2, 1) => $f::<2, 1>($($a),*),
            (2, 2) => $f::<2, 2>($($a),*),
            (2, 3) => $f::<2, 3>($($a),*),
            (2, 4) => $f::<2, 4>($($a),*),
            (1, 1) => $f::<1, 1>($($a),*),
            (1, 2) => $f::<1, 2>($($a),*),
            (1, 3) => $f::<1, 3>($($a),*),
            (1, 4) => $f::<1, 4>($($a),*),
            _ => unreachable!("tiles are 1 to 4 weight rows by 1 to 4 input rows"),
        }
    };
}

/// A tile's sums plus bias into a block's output (`[row, col]`, rows of `cols`): weight rows
/// o..o+r, input rows m0..m0+mb.
fn store(
    sums: &[f32; 16],
    bias: Option<&[f32]>,
    cols: usize,
    (o, r): (usize, usize),
    (m0, mb): (usize, usize),
    out: &mut [f32],
) {
    for ri in 0..r {
        let b = bias.map_or(0.0, |b| b[o + ri]);
        for mi in 0..mb {
            out[(m0 + mi) * cols + o + ri] = sums[ri * 4 + mi] + b;
        }
    }
}

/// [`block`] for weights in [`tiles`] order (tiles of `h` rows, the last one of the matrix
/// maybe shorter), read front to back; each pass over a tile meets up to 4 input rows. The
/// first pass prefetches ahead within the block: [`TILE_PREFETCH`] bytes when it is the only
/// one, else the next tile, so DRAM works on it while the later passes read this one from
/// cache (with 2 KiB, 8 input rows ran 5–10% slower than the row-major kernel).
fn block_tiled(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    (w, h): (&[u16], usize),
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let cols = out.len() / rows;
    let mut sums = [0f32; 16];
    let mut o = 0;
    while o < cols {
        let ht = h.min(cols - o);
        let mut m0 = 0;
        while m0 < rows {
            let mb = (rows - m0).min(4);
            let ahead = match m0 {
                0 if rows > 4 => ht * k,
                0 => TILE_PREFETCH / 2,
                _ => 0,
            };
            let xs = &x[m0 * k..(m0 + mb) * k];
            tile_tiled(isa, ht, mb, &w[o * k..], ahead, xs, k, &mut sums);
            store(&sums, bias, cols, (o, ht), (m0, mb), out);
            m0 += mb;
        }
        o += ht;
    }
}

/// Bytes a tile-order pass prefetches ahead of its reads (one line per 64 bytes read).
const TILE_PREFETCH: usize = 2048;

/// `sums[r·4 + m] = w_row_r · x_row_m` for the tile of `r` rows at the start of `w` (in
/// [`tiles`] order; `w` runs on to the end of the block, which bounds the prefetches;
/// `ahead` values ahead of each read, none when 0), and x exactly `mb` rows of k.
#[allow(clippy::too_many_arguments)]
fn tile_tiled(
    isa: Isa,
    r: usize,
    mb: usize,
    w: &[u16],
    ahead: usize,
    x: &[f32],
    k: usize,
    sums: &mut [f32; 16],
) {
    assert!(
        (1..=4).contains(&r)
            && (1..=4).contains(&mb)
            && w.len() >= r * k
            && x.len() == mb * k
            && k.is_multiple_of(tiles::CHUNK),
        "gemv tile (tile order): {r}×{mb} rows of {k}"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => {
            use x86::*;
            let (w, len, x) = (w.as_ptr(), w.len(), x.as_ptr());
            // SAFETY: the assert above keeps every read inside `w` (the kernels read its first
            // r·k values) and `x` (mb rows of k); the prefetched addresses stay below
            // `w.len()`; `isa` was capped at what this CPU supports (see `linear`), and the
            // kernel is the one compiled for it.
            unsafe {
                if isa == Isa::Avx512 {
                    by_shape!(avx512_bf16_tiles, r, mb, w, len, ahead, x, k, sums)
                } else {
                    by_shape!(avx2_bf16_tiles, r, mb, w, len, ahead, x, k, sums)
                }
            }
        }
        _ => {
            for ri in 0..r {
                for mi in 0..mb {
                    let mut s = 0f32;
                    for c in 0..k / tiles::CHUNK {
                        let wc = &w[(c * r + ri) * tiles::CHUNK..][..tiles::CHUNK];
                        let xc = &x[mi * k + c * tiles::CHUNK..][..tiles::CHUNK];
                        for (a, b) in wc.iter().zip(xc) {
                            s += a.to_f32() * b;
                        }
                    }
                    sums[ri * 4 + mi] = s;
                }
            }
        }
    }
}

/// `sums[r·4 + m] = w_row_r · x_row_m` for r < `r`, m < `mb`: w holds exactly r rows of k,
/// x exactly mb rows of k. `ahead` (r rows of k too) is prefetched into the cache meanwhile.
#[allow(clippy::too_many_arguments)]
fn tile<W: Elem + Kernels>(
    isa: Isa,
    r: usize,
    mb: usize,
    w: &[W],
    ahead: Option<&[W]>,
    x: &[f32],
    k: usize,
    sums: &mut [f32; 16],
) {
    assert!(
        (1..=4).contains(&r)
            && (1..=4).contains(&mb)
            && w.len() == r * k
            && x.len() == mb * k
            && ahead.is_none_or(|a| a.len() == r * k),
        "gemv tile: {r}×{mb} rows of {k}"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => {
            let ahead = ahead.map_or(std::ptr::null(), |a| a.as_ptr());
            // SAFETY: the assert above keeps every read inside `w` and `x` (the kernels read
            // rows 0..r of w and 0..mb of x, each k long) and every prefetch inside `ahead`;
            // `isa` was capped at what this CPU supports (see `linear`), so its instructions
            // exist here.
            unsafe { W::tile_x86(isa, r, mb, w.as_ptr(), ahead, x.as_ptr(), k, sums) }
        }
        _ => {
            for ri in 0..r {
                for mi in 0..mb {
                    let (wr, xr) = (&w[ri * k..(ri + 1) * k], &x[mi * k..(mi + 1) * k]);
                    sums[ri * 4 + mi] = wr.iter().zip(xr).map(|(a, b)| a.to_f32() * b).sum();
                }
            }
        }
    }
}

/// The vector kernels of one weight type.
pub(crate) trait Kernels: Sized {
    /// # Safety
    /// `w` points to `r` rows of `k` elements, `x` to `mb` rows of `k`; `r` is 1, 3 or 4,
    /// `mb` 1 to 4; `ahead` is null or points to `r` rows of `k` to prefetch; the CPU supports
    /// `isa`, which is Avx2 or Avx512.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_x86(
        isa: Isa,
        r: usize,
        mb: usize,
        w: *const Self,
        ahead: *const Self,
        x: *const f32,
        k: usize,
        sums: &mut [f32; 16],
    );
}

#[cfg(target_arch = "x86_64")]
macro_rules! impl_kernels {
    ($W:ty, $avx512:ident, $avx2:ident) => {
        impl Kernels for $W {
            unsafe fn tile_x86(
                isa: Isa,
                r: usize,
                mb: usize,
                w: *const Self,
                ahead: *const Self,
                x: *const f32,
                k: usize,
                sums: &mut [f32; 16],
            ) {
                use x86::*;
                if isa == Isa::Avx512 {
                    by_shape!($avx512, r, mb, w, ahead, x, k, sums)
                } else {
                    by_shape!($avx2, r, mb, w, ahead, x, k, sums)
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl_kernels!(f32, avx512_f32, avx2_f32);
#[cfg(target_arch = "x86_64")]
impl_kernels!(u16, avx512_bf16, avx2_bf16);

#[cfg(not(target_arch = "x86_64"))]
impl Kernels for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl Kernels for u16 {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Elem;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    /// 16 bf16 weights as f32: zero-extend to 32 bits and shift into the high half.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_bf16(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// 8 bf16 weights as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// One step of a kernel: R weight vectors (the r-th at `$w`) each times MB input vectors
    /// (the m-th at `$x`), into `acc[r][m]`; `$between` runs after the weight loads.
    macro_rules! fma_step {
        ($acc:ident, $zero:ident, $loadw:ident, $loadx:ident, $fma:ident,
         |$r:ident| $w:expr, |$m:ident| $x:expr, $between:block) => {{
            let mut wv = [$zero(); R];
            for $r in 0..R {
                wv[$r] = $loadw($w);
            }
            $between
            for $m in 0..MB {
                let xv = $loadx($x);
                for r in 0..R {
                    $acc[r][$m] = $fma(wv[r], xv, $acc[r][$m]);
                }
            }
        }};
    }

    /// Defines one kernel: R weight rows · MB input rows, `$lanes` elements per step.
    macro_rules! kernel {
        ($name:ident, $feat:literal, $W:ty, $lanes:literal, $zero:ident, $loadw:ident,
         $loadx:ident, $fma:ident, $hsum:ident) => {
            /// # Safety
            /// See [`super::Kernels::tile_x86`].
            #[target_feature(enable = $feat)]
            #[allow(clippy::needless_range_loop)]
            pub(super) unsafe fn $name<const R: usize, const MB: usize>(
                w: *const $W,
                ahead: *const $W,
                x: *const f32,
                k: usize,
                sums: &mut [f32; 16],
            ) {
                let mut acc = [[$zero(); MB]; R];
                let body = k - k % $lanes;
                let mut i = 0;
                while i < body {
                    fma_step!(
                        acc,
                        $zero,
                        $loadw,
                        $loadx,
                        $fma,
                        |r| w.add(r * k + i),
                        |m| x.add(m * k + i),
                        {
                            if !ahead.is_null() {
                                for r in 0..R {
                                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(r * k + i).cast());
                                }
                            }
                        }
                    );
                    i += $lanes;
                }
                for r in 0..R {
                    for m in 0..MB {
                        let mut s = $hsum(acc[r][m]);
                        for j in body..k {
                            s += (*w.add(r * k + j)).to_f32() * *x.add(m * k + j);
                        }
                        sums[r * 4 + m] = s;
                    }
                }
            }
        };
    }

    /// Defines one tile-order kernel (see [`super::tiles`]): R weight rows · MB input rows,
    /// `$lanes` elements per vector, so CHUNK / `$lanes` vectors per row and chunk.
    ///
    /// # Safety (of the kernels)
    /// `w` points to `len` elements, the first `R·k` of them a tile of R rows in tile order
    /// (k a multiple of its chunk); `x` to MB rows of `k`; the CPU supports the kernel's
    /// features. `ahead` values past each read are prefetched where they lie inside `len`.
    macro_rules! tiled_kernel {
        ($name:ident, $feat:literal, $W:ty, $lanes:literal, $zero:ident, $loadw:ident,
         $loadx:ident, $fma:ident, $hsum:ident) => {
            /// # Safety
            /// See [`tiled_kernel`].
            #[target_feature(enable = $feat)]
            #[allow(clippy::needless_range_loop)]
            pub(super) unsafe fn $name<const R: usize, const MB: usize>(
                w: *const $W,
                len: usize,
                ahead: usize,
                x: *const f32,
                k: usize,
                sums: &mut [f32; 16],
            ) {
                const CHUNK: usize = super::tiles::CHUNK;
                let step = R * CHUNK; // values per chunk of the tile
                let bytes = if ahead > 0 {
                    step * std::mem::size_of::<$W>()
                } else {
                    0
                };
                let mut acc = [[$zero(); MB]; R];
                let mut at = 0; // offset of this chunk in `w`
                for c in 0..k / CHUNK {
                    // One prefetch per 64 bytes of the tile's chunk, `ahead` on, inside `w`.
                    let mut b = 0;
                    while b < bytes {
                        let p = at + ahead + b / std::mem::size_of::<$W>();
                        if p < len {
                            _mm_prefetch::<_MM_HINT_T0>(w.add(p).cast());
                        }
                        b += 64;
                    }
                    for h in 0..CHUNK / $lanes {
                        fma_step!(
                            acc,
                            $zero,
                            $loadw,
                            $loadx,
                            $fma,
                            |r| w.add(at + r * CHUNK + h * $lanes),
                            |m| x.add(m * k + c * CHUNK + h * $lanes),
                            {}
                        );
                    }
                    at += step;
                }
                for r in 0..R {
                    for m in 0..MB {
                        sums[r * 4 + m] = $hsum(acc[r][m]);
                    }
                }
            }
        };
    }

    tiled_kernel!(
        avx512_bf16_tiles,
        "avx512f",
        u16,
        16,
        _mm512_setzero_ps,
        load16_bf16,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    tiled_kernel!(
        avx2_bf16_tiles,
        "avx2,fma",
        u16,
        8,
        _mm256_setzero_ps,
        load8_bf16,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum8
    );

    kernel!(
        avx512_f32,
        "avx512f",
        f32,
        16,
        _mm512_setzero_ps,
        load16_f32,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    kernel!(
        avx512_bf16,
        "avx512f",
        u16,
        16,
        _mm512_setzero_ps,
        load16_bf16,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    kernel!(
        avx2_f32,
        "avx2,fma",
        f32,
        8,
        _mm256_setzero_ps,
        load8_f32,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum8
    );
    kernel!(
        avx2_bf16,
        "avx2,fma",
        u16,
        8,
        _mm256_setzero_ps,
        load8_bf16,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum8
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every supported ISA (so the AVX2 and portable paths are covered on an AVX-512 machine
    /// too), f32 and bf16 weights, rows 1..=64, k with and without a vector remainder, n not a
    /// multiple of 4, with bias and GELU: against an f64 sum of the same (bf16-rounded)
    /// weights, within f32 accumulation error. Outputs start as NaN so an unwritten one fails.
    #[test]
    fn every_isa_matches_an_f64_reference_for_f32_and_bf16_weights() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for isa in Isa::all_supported() {
            for &(rows, k, n) in &[
                (1, 768, 70),
                (3, 37, 9),
                (8, 200, 133),
                (5, 16, 4),
                (2, 1, 3),
                (16, 40, 31),
                (13, 24, 7),
                (37, 50, 29),
                (64, 33, 20),
                (1, 64, 70),
                (2, 32, 13),
                (5, 48, 25),
                (9, 96, 40),
                (64, 32, 29),
            ] {
                let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let wb: Vec<u16> = wf
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                let bias: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                // bf16 in tile order too, in tiles of 3 and of 4 rows, where k allows.
                let tiled = |h: usize| {
                    let mut t = Vec::new();
                    tiles::append(&wb, (n, k), h, &mut t, |b| b);
                    t
                };
                let (t3, t4) = if k.is_multiple_of(tiles::CHUNK) {
                    (tiled(3), tiled(4))
                } else {
                    (Vec::new(), Vec::new())
                };
                let mut all = vec![(Weights::F32(&wf), "f32"), (Weights::Bf16(&wb), "bf16")];
                if k.is_multiple_of(tiles::CHUNK) {
                    all.push((Weights::Bf16Tiles(&t3, 3), "bf16 tiles of 3"));
                    all.push((Weights::Bf16Tiles(&t4, 4), "bf16 tiles of 4"));
                }
                for (weights, name) in all {
                    // The reference reads the row-major values.
                    let wv = |i: usize| match weights {
                        Weights::F32(w) => w[i] as f64,
                        Weights::Bf16(_) | Weights::Bf16Tiles(..) => wb[i].to_f32() as f64,
                    };
                    let mut y = vec![f32::NAN; rows * n];
                    linear(
                        isa,
                        &x,
                        rows,
                        k,
                        weights,
                        n,
                        Some(&bias),
                        Activation::GeluTanh,
                        &mut y,
                    );
                    for m in 0..rows {
                        for o in 0..n {
                            let mut s = bias[o] as f64;
                            let mut mag = bias[o].abs() as f64;
                            for i in 0..k {
                                s += x[m * k + i] as f64 * wv(o * k + i);
                                mag += (x[m * k + i] as f64 * wv(o * k + i)).abs();
                            }
                            let pre = s as f32;
                            let want = Activation::GeluTanh.apply(pre) as f64;
                            // f32 accumulation over k terms (plus the activation's own ulps).
                            let tol = (k as f64 + 4.0) * f32::EPSILON as f64 * mag + 1e-6;
                            let got = y[m * n + o] as f64;
                            assert!(
                                (got - want).abs() <= tol,
                                "{isa:?} {name} rows {rows} k {k} n {n} [{m},{o}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Tile order holds every value once and gives each row back, for tile heights that do
    /// and do not divide n.
    #[test]
    fn tile_order_round_trips_every_row() {
        for (n, k) in [(1, 16), (7, 32), (12, 48), (13, 16)] {
            let w: Vec<u32> = (0..(n * k) as u32).collect();
            for h in 1..=4 {
                let mut t = Vec::new();
                tiles::append(&w, (n, k), h, &mut t, |v| v);
                let mut sorted = t.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, w, "[{n}, {k}] h {h}: a permutation");
                for o in 0..n {
                    let mut row = Vec::new();
                    tiles::row(&t, (n, k), h, o, &mut row, |v| v);
                    assert_eq!(row, w[o * k..(o + 1) * k], "[{n}, {k}] h {h} row {o}");
                }
                // A tile of rows is the row-major slice of those rows.
                for t0 in (0..n).step_by(h) {
                    let ht = h.min(n - t0);
                    let mut part = t[t0 * k..(t0 + ht) * k].to_vec();
                    part.sort_unstable();
                    assert_eq!(part, w[t0 * k..(t0 + ht) * k], "[{n}, {k}] h {h} tile {t0}");
                }
            }
        }
    }
}
