//! The CPU backend: f32 tensors in host memory. Many-row GEMMs through the `gemm` crate
//! (threaded over rayon's pool; its AVX-512 or AVX2 kernels chosen at run time); an
//! encoder's linear layers from weights stored once in `gemm`'s own order ([`panels`],
//! `Backend::upload_linear_weight`); other linear layers of at most [`gemv::MAX_ROWS`] rows
//! (decoding) through our own column-split kernel ([`gemv`]), which streams the weights from
//! every core; attention one (sequence, head) per
//! task with single-threaded GEMMs and a vectorized softmax; LayerNorm and the other row ops
//! vectorized ([`vmath`]) and parallel over rows. The vector kernels of this module pick
//! AVX-512, AVX2 or portable code at run time ([`isa`]). Independent batches can instead run
//! on lanes (`Backend::run_lanes`), a rayon pool of their own each, so every op of a batch
//! stays on its lane's threads.

mod bf16;
mod gemv;
pub mod isa;
mod panels;
mod recycle;
pub(super) mod vmath;

pub use bf16::CpuBf16;
pub use recycle::KeepOpBuffers;
pub(crate) use recycle::{copied, zeroed};

use super::backend::{
    check_attention, Activation, AttentionMask, Backend, HasShape, Heads, WeightUse,
};
use crate::error::{Error, Result};
use crate::key_band::KeyBand;
use isa::Isa;
use rayon::prelude::*;

/// A row-major tensor in host memory: f32, or bf16 for the weight matrices of [`CpuBf16`],
/// or a linear layer's weight in panels ([`Backend::upload_linear_weight`]).
#[derive(Debug, PartialEq)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
    /// The values as bf16 bit patterns instead of `data` (then empty): row-major, or in
    /// [`gemv::tiles`] order for a matrix whose shape it applies to.
    bf16: Option<Vec<u16>>,
    /// A `[out, in]` weight in [`panels`] order instead of `data` (then empty).
    panels: Option<Vec<f32>>,
}

impl CpuTensor {
    /// A tensor of `shape` over `data` (its length must be the product of `shape`).
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::shape(
                "data",
                format!("{n} values for shape {shape:?}"),
                &[data.len()],
            ));
        }
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data,
            bf16: None,
            panels: None,
        })
    }

    /// A bf16 tensor of `shape` over bf16 bit patterns (row-major).
    pub fn from_bf16(shape: &[usize], bits: Vec<u16>) -> Result<Self> {
        match shape {
            &[rows, k]
                if gemv::tiles::applies(shape) && rows.checked_mul(k) == Some(bits.len()) =>
            {
                let mut t = Vec::with_capacity(bits.len());
                gemv::tiles::append(&bits, (rows, k), tile_height(), &mut t, |b| b);
                CpuTensor::from_bf16_stored(shape, t)
            }
            _ => CpuTensor::from_bf16_stored(shape, bits),
        }
    }

    /// A bf16 tensor over bits already in its stored order (see the `bf16` field).
    pub(crate) fn from_bf16_stored(shape: &[usize], bits: Vec<u16>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if bits.len() != n {
            return Err(Error::shape(
                "bits",
                format!("{n} values for shape {shape:?}"),
                &[bits.len()],
            ));
        }
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: Vec::new(),
            bf16: Some(bits),
            panels: None,
        })
    }

    /// Whether the bf16 values are in [`gemv::tiles`] order (a matrix it applies to).
    fn bf16_tiled(&self) -> bool {
        self.bf16.is_some() && gemv::tiles::applies(&self.shape)
    }

    /// Row-major bf16 bits as f32.
    fn widened(bits: &[u16]) -> Vec<f32> {
        bits.iter().map(|&b| gemv::Elem::to_f32(b)).collect()
    }

    /// The stored bf16 bits as row-major f32 values.
    fn bf16_values(&self, bits: &[u16]) -> Vec<f32> {
        match self.shape.as_slice() {
            &[n, k] if self.bf16_tiled() => {
                let mut out = Vec::with_capacity(n * k);
                for o in 0..n {
                    gemv::tiles::row(bits, (n, k), tile_height(), o, &mut out, gemv::Elem::to_f32);
                }
                out
            }
            _ => Self::widened(bits),
        }
    }

    /// A `[out, in]` weight stored in panels for many-row GEMMs (see [`panels`]); kept
    /// row-major when it has fewer than [`panels::MIN_OUT`] rows (or is not `[out, in]`).
    fn linear_weight(shape: &[usize], w: Vec<f32>) -> Result<Self> {
        let &[out, inp] = shape else {
            return CpuTensor::new(shape, w);
        };
        if out < panels::MIN_OUT || w.len() != out.saturating_mul(inp) {
            // Too few rows to pay, or a length `new` reports.
            return CpuTensor::new(shape, w);
        }
        let n = panels::len(out, inp);
        let mut p = crate::runtime::host_memory::huge_page_buffer(n)
            .map_err(|e| Error::invalid("weight", format!("cannot allocate {n} values: {e}")))?;
        panels::pack(&w, out, inp, &mut p);
        // The row-major values are freed here, not kept for op outputs.
        drop(w);
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: Vec::new(),
            bf16: None,
            panels: Some(p),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The f32 values; empty for a bf16 tensor (see [`CpuTensor::is_bf16`]) and for a weight
    /// stored in panels ([`Backend::upload_linear_weight`]).
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// The values as f32 (converted from bf16 when stored so).
    pub fn into_data(mut self) -> Vec<f32> {
        if self.panels.is_some() {
            return self.values_f32().into_owned();
        }
        match &self.bf16 {
            Some(bits) => self.bf16_values(bits),
            None => std::mem::take(&mut self.data),
        }
    }
    pub(crate) fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    /// Whether the values are stored as bf16 ([`CpuBf16`]'s weight matrices).
    pub fn is_bf16(&self) -> bool {
        self.bf16.is_some()
    }
    fn rows_cols(&self, arg: &'static str) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            [r, c] => Ok((*r, *c)),
            s => Err(Error::shape(arg, "2 dims [rows, width]", s)),
        }
    }
    /// The values as f32 for an op's input: borrowed when stored as f32 (every activation),
    /// widened when stored as bf16 (a weight, or a tensor uploaded to [`CpuBf16`]).
    fn f32s(&self) -> std::borrow::Cow<'_, [f32]> {
        self.values_f32()
    }
    /// The values as f32, converted only when stored as bf16 (small parameters, or a whole
    /// weight for a many-row GEMM) or in panels (read back, not an op's path).
    fn values_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        if let (Some(p), [out, inp]) = (&self.panels, self.shape.as_slice()) {
            return std::borrow::Cow::Owned(panels::unpack(p, *out, *inp));
        }
        match &self.bf16 {
            Some(bits) => std::borrow::Cow::Owned(self.bf16_values(bits)),
            None => std::borrow::Cow::Borrowed(&self.data),
        }
    }
    fn weights(&self) -> gemv::Weights<'_> {
        match &self.bf16 {
            Some(bits) if self.bf16_tiled() => gemv::Weights::Bf16Tiles(bits, tile_height()),
            Some(bits) => gemv::Weights::Bf16(bits),
            None => gemv::Weights::F32(&self.data),
        }
    }
}

impl Clone for CpuTensor {
    fn clone(&self) -> Self {
        CpuTensor {
            shape: self.shape.clone(),
            data: copied(&self.data),
            bf16: self.bf16.clone(),
            panels: self.panels.clone(),
        }
    }
}

/// A large buffer goes back to [`recycle`]'s pool for the next op's output.
impl Drop for CpuTensor {
    fn drop(&mut self) {
        recycle::give_back(std::mem::take(&mut self.data));
    }
}

/// The tile height of the bf16 matrices stored in this process (see [`gemv::tiles`]): fixed,
/// as [`Isa::current`] is.
pub(crate) fn tile_height() -> usize {
    gemv::tiles::height(Isa::current())
}

/// Runs on the host in f32, with rayon's global thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Rows per parallel GEMM block: enough blocks for every thread, none so thin that packing
/// the shared operand dominates.
fn rows_per_block(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads()).max(32)
}

/// Rows per piece of a many-row GEMM, on CPUs where pieces pay (see [`row_piece`]).
const ROW_PIECE: usize = 384;

/// How this CPU's many-row GEMMs are run: in pieces of [`ROW_PIECE`] rows, or (`None`) as one
/// call over all rows. Measured on MiniLM's shapes (k, n of 384–1536), one thread and two:
/// - 2-core Zen 3, 512 KiB of L2 per core: pieces of 384 rows ran about 10% faster than
///   1700–3400 rows at once, whether `gemm` split those over the threads itself or not;
/// - 2-core Zen 5, 1 MiB of L2 per core: one call ran 6–8% faster than pieces of 384 with
///   `gemm`'s AVX-512 kernels and 2.5–3.5% with its AVX2 ones (mixed-length embedding, the
///   whole run); pieces of 768 and 1536 rows fell in between.
///
/// So pieces are cut where the L2 is below 1 MiB, or not known.
fn row_piece() -> Option<usize> {
    match isa::l2_cache_bytes() {
        Some(bytes) if bytes >= 1 << 20 => None,
        _ => Some(ROW_PIECE),
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` for strided row-major views (strides in elements), on
/// rayon's threads when `parallel` (one big GEMM) or on the calling thread (many small ones
/// already spread over the threads).
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    rsc: usize,
    parallel: bool,
) {
    sgemm_into(
        m,
        k,
        n,
        a,
        (rsa, csa),
        b,
        (rsb, csb),
        c,
        rsc,
        parallel,
        Epilogue::NONE,
        row_piece(),
    )
}

/// What a GEMM's output gets besides the product: c = act(a·b + bias), the bias per column.
/// The bias alone is written into each piece of rows just before its GEMM adds the product
/// to it; with an activation, bias and activation are one pass over the piece right after
/// its GEMM. Either way the piece is still in cache, where a pass over the whole output
/// would stream it from memory once more. Without pieces (see [`row_piece`]) the same is done
/// once over the whole output.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    act: Activation,
}

impl Epilogue<'_> {
    /// c = a·b.
    const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        act: Activation::None,
    };
}

/// [`sgemm`] with an [`Epilogue`], in pieces of `piece` rows when there are at least two
/// such pieces (see [`row_piece`]), else as one call.
#[allow(clippy::too_many_arguments)]
fn sgemm_into(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    rsc: usize,
    parallel: bool,
    epilogue: Epilogue<'_>,
    piece: Option<usize>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if let Some(bias) = epilogue.bias {
        assert_eq!(bias.len(), n, "sgemm: bias length");
    }
    // Bounds the kernel will touch, checked here so the unsafe call reads and writes only
    // inside the slices.
    let last = |r: usize, rs: usize, cc: usize, cs: usize| (r - 1) * rs + (cc - 1) * cs;
    assert!(
        k == 0 || last(m, rsa, k, csa) < a.len(),
        "sgemm: a out of bounds"
    );
    assert!(
        k == 0 || last(k, rsb, n, csb) < b.len(),
        "sgemm: b out of bounds"
    );
    assert!(last(m, rsc, n, 1) < c.len(), "sgemm: c out of bounds");
    if let Some(piece) = piece.filter(|&p| p > 0 && m >= 2 * p && k > 0) {
        // Many rows: pieces of about `piece` rows, each one single-threaded GEMM, spread
        // over the threads when `parallel` (a whole number of pieces per thread).
        let threads = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let pieces = threads * m.div_ceil(threads * piece);
        let rows = m.div_ceil(pieces);
        let c = &mut c[..last(m, rsc, n, 1) + 1];
        let one = |i: usize, cp: &mut [f32]| {
            let r0 = i * rows;
            let a = &a[r0 * rsa..];
            let mp = rows.min(m - r0);
            sgemm_into(
                mp,
                k,
                n,
                a,
                (rsa, csa),
                b,
                (rsb, csb),
                cp,
                rsc,
                false,
                epilogue,
                None,
            )
        };
        if parallel {
            c.par_chunks_mut(rows * rsc)
                .enumerate()
                .for_each(|(i, cp)| one(i, cp));
        } else {
            c.chunks_mut(rows * rsc)
                .enumerate()
                .for_each(|(i, cp)| one(i, cp));
        }
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    fn rows_of(c: &mut [f32], (m, n, rsc): (usize, usize, usize)) -> Vec<&mut [f32]> {
        let rows = c.chunks_mut(rsc).map(|row| &mut row[..n]);
        rows.take(m).collect()
    }
    let Epilogue { bias, act } = epilogue;
    // A bias alone is written first and accumulated onto; with an activation the pass after
    // the GEMM adds it.
    let accumulate = act == Activation::None && bias.is_some();
    if let (true, Some(bias)) = (accumulate, bias) {
        (rows_of(c, (m, n, rsc)).into_iter()).for_each(|row| row.copy_from_slice(bias));
    }
    // SAFETY: the asserts above keep every element the GEMM addresses inside `a`, `b` and
    // `c`; `c` is borrowed mutably, so nothing else aliases it. With `accumulate` (read_dst)
    // c = 1·c + 1·a·b, else c = 1·a·b (c only written).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            rsc as isize,
            accumulate,
            a.as_ptr(),
            csa as isize,
            rsa as isize,
            b.as_ptr(),
            csb as isize,
            rsb as isize,
            // alpha (multiplies the old c), beta (the product)
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
    if act != Activation::None {
        let isa = Isa::current();
        let rows = rows_of(c, (m, n, rsc));
        let apply = |row: &mut [f32]| vmath::bias_activation(isa, act, bias, row);
        if parallel {
            rows.into_par_iter().for_each(apply);
        } else {
            rows.into_iter().for_each(apply);
        }
    }
}

impl Backend for Cpu {
    type Tensor = CpuTensor;

    fn dtype(&self) -> crate::DType {
        crate::DType::F32
    }

    fn describe(&self) -> String {
        format!(
            "cpu (f32, {} threads, {})",
            rayon::current_num_threads(),
            Isa::current().name()
        )
    }

    fn upload(&self, shape: &[usize], values: &[f32]) -> Result<CpuTensor> {
        CpuTensor::new(shape, copied(values))
    }

    fn upload_owned(&self, shape: &[usize], values: Vec<f32>) -> Result<CpuTensor> {
        CpuTensor::new(shape, values)
    }

    fn upload_linear_weight(
        &self,
        shape: &[usize],
        values: Vec<f32>,
        usage: WeightUse,
    ) -> Result<CpuTensor> {
        match usage {
            WeightUse::ManyRows => CpuTensor::linear_weight(shape, values),
            WeightUse::AnyRows => CpuTensor::new(shape, values),
        }
    }

    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.values_f32().into_owned())
    }

    fn shape<'t>(&self, t: &'t CpuTensor) -> &'t [usize] {
        &t.shape
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        let (rows, inp) = x.rows_cols("x")?;
        let (out, w_in) = w.rows_cols("w")?;
        if w_in != inp {
            return Err(Error::shape("w", format!("[out, {inp}]"), &w.shape));
        }
        if let Some(b) = bias {
            if b.shape != [out] {
                return Err(Error::shape("bias", format!("[{out}]"), &b.shape));
            }
        }
        let xd = x.f32s();
        let bias = bias.map(|b| b.values_f32());
        if out == 0 {
            return CpuTensor::new(&[rows, out], Vec::new());
        }
        if let Some(p) = &w.panels {
            // An encoder's weight (any row count): one GEMM per panel, see `panels`.
            let mut y = recycle::scratch(rows * out);
            let bias = bias.as_deref();
            panels::linear(&xd, rows, inp, p, out, bias, act, &mut y, row_piece());
            return CpuTensor::new(&[rows, out], y);
        }
        if rows <= gemv::MAX_ROWS {
            let mut y = vec![0f32; rows * out];
            // Decoding: a weight stream, split over the threads by output columns.
            gemv::linear(
                Isa::current(),
                &xd,
                rows,
                inp,
                w.weights(),
                out,
                bias.as_deref(),
                act,
                &mut y,
            );
            return CpuTensor::new(&[rows, out], y);
        }
        // Where pieces pay (`row_piece`), pieces of rows over the threads, each one GEMM with
        // the bias and activation applied while the piece is in cache (see `Epilogue`);
        // every output value is written, so the buffer needs no clearing.
        // wᵀ[i, o] = w[o, i]: row stride 1, column stride `inp`. A bf16 weight is widened
        // once per call here (a prefill, not the per-token path).
        let mut y = recycle::scratch(rows * out);
        let wd = w.values_f32();
        sgemm_into(
            rows,
            inp,
            out,
            &xd,
            (inp, 1),
            &wd,
            (1, inp),
            &mut y,
            out,
            true,
            Epilogue {
                bias: bias.as_deref(),
                act,
            },
            row_piece(),
        );
        CpuTensor::new(&[rows, out], y)
    }

    fn batched_matmul_nt(&self, a: &CpuTensor, b: &CpuTensor, batch: usize) -> Result<CpuTensor> {
        let (ar, k) = a.rows_cols("a")?;
        let (br, bk) = b.rows_cols("b")?;
        if batch == 0 || ar % batch != 0 || br % batch != 0 || bk != k {
            return Err(Error::shape(
                "b",
                format!("[{batch}·n, {k}] with a [{batch}·m, {k}]"),
                &b.shape,
            ));
        }
        let (m, n) = (ar / batch, br / batch);
        let (ad, bd) = (a.f32s(), b.f32s());
        // Every value is written by a GEMM (zeros when k = 0).
        let mut c = recycle::scratch(ar * n);
        c.par_chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, cb)| {
                let ab = &ad[i * m * k..(i + 1) * m * k];
                let bb = &bd[i * n * k..(i + 1) * n * k];
                sgemm(m, k, n, ab, (k, 1), bb, (1, k), cb, n, false);
            });
        CpuTensor::new(&[ar, n], c)
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        if a.shape != b.shape {
            return Err(Error::shape(
                "b",
                format!("{:?} (a's shape)", a.shape),
                &b.shape,
            ));
        }
        let (ad, bd) = (a.f32s(), b.f32s());
        let mut out = recycle::scratch(ad.len());
        let width = a.shape.last().copied().unwrap_or(1).max(1);
        let block = rows_per_block(out.len() / width) * width;
        let isa = Isa::current();
        out.par_chunks_mut(block)
            .zip(ad.par_chunks(block).zip(bd.par_chunks(block)))
            .for_each(|(o, (x, y))| vmath::add(isa, x, y, o));
        CpuTensor::new(&a.shape, out)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let width = *x
            .shape
            .last()
            .ok_or_else(|| Error::shape("x", "≥ 1 dim", &x.shape))?;
        if width == 0 {
            return Err(Error::Empty {
                arg: "x",
                shape: x.shape.clone(),
            });
        }
        for (arg, p) in [("gamma", gamma), ("beta", beta)] {
            if p.shape != [width] {
                return Err(Error::shape(arg, format!("[{width}]"), &p.shape));
            }
        }
        if let Some(r) = residual {
            if r.shape != x.shape {
                return Err(Error::shape(
                    "residual",
                    format!("{:?} (x's shape)", x.shape),
                    &r.shape,
                ));
            }
        }
        let xd = x.f32s();
        let rd = residual.map(|r| r.f32s());
        let rd = rd.as_deref();
        let (gd, bd) = (gamma.values_f32(), beta.values_f32());
        let mut y = recycle::scratch(xd.len());
        let isa = Isa::current();
        let block = rows_per_block(y.len() / width) * width;
        y.par_chunks_mut(block).enumerate().for_each(|(i, yb)| {
            let at = i * block;
            for (j, row) in yb.chunks_mut(width).enumerate() {
                let s = at + j * width;
                let rr = rd.map(|r| &r[s..s + width]);
                vmath::layer_norm_row(isa, &xd[s..s + width], rr, &gd, &bd, eps, row);
            }
        });
        CpuTensor::new(&x.shape, y)
    }

    fn gather_rows(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        let (n, width) = table.rows_cols("table")?;
        let mut out = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            let id = id as usize;
            if id >= n {
                return Err(Error::invalid(
                    "ids",
                    format!("id {id} is outside the table's {n} rows"),
                ));
            }
            match &table.bf16 {
                Some(bits) if table.bf16_tiled() => {
                    let h = tile_height();
                    gemv::tiles::row(bits, (n, width), h, id, &mut out, gemv::Elem::to_f32)
                }
                Some(bits) => out.extend(
                    bits[id * width..(id + 1) * width]
                        .iter()
                        .map(|&b| gemv::Elem::to_f32(b)),
                ),
                None => out.extend_from_slice(&table.data[id * width..(id + 1) * width]),
            }
        }
        CpuTensor::new(&[ids.len(), width], out)
    }

    fn attention(
        &self,
        q: Heads<'_, CpuTensor>,
        k: Heads<'_, CpuTensor>,
        v: Heads<'_, CpuTensor>,
        mask: &AttentionMask<'_>,
    ) -> Result<CpuTensor> {
        let (wq, wk, wv) = check_attention(&q, &k, &v, mask)?;
        let (qd, kd, vd) = (q.tensor.f32s(), k.tensor.f32s(), v.tensor.f32s());
        let m = *mask;
        let (dim, dim_v) = (q.dim, v.dim);
        let scale = m.scale.unwrap_or(1.0 / (dim as f32).sqrt());
        let group = q.heads / k.heads;
        let width_o = q.heads * dim_v;
        let isa = Isa::current();
        // One [len_q, dim_v] block per (sequence, head), scattered into place afterwards.
        let blocks: Vec<Vec<f32>> = (0..m.batch * q.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / q.heads, bh % q.heads);
                let hk = h / group;
                let key_len = m.key_lens.map_or(m.len_k, |l| l[b]);
                let band = KeyBand::new(m.len_q, key_len, m.causal, m.window);
                let mut o = vec![0f32; m.len_q * dim_v];
                head_attention(
                    isa,
                    &band,
                    (m.len_q, dim, dim_v, scale),
                    (&qd[b * m.len_q * wq + q.col + h * dim..], wq),
                    (&kd[b * m.len_k * wk + k.col + hk * dim..], wk),
                    (&vd[b * m.len_k * wv + v.col + hk * dim_v..], wv),
                    &mut Vec::new(),
                    (&mut o, dim_v),
                );
                o
            })
            .collect();
        let mut out = zeroed(m.batch * m.len_q * width_o);
        for (bh, o) in blocks.iter().enumerate() {
            let (b, h) = (bh / q.heads, bh % q.heads);
            for i in 0..m.len_q {
                let dst = (b * m.len_q + i) * width_o + h * dim_v;
                out[dst..dst + dim_v].copy_from_slice(&o[i * dim_v..(i + 1) * dim_v]);
            }
        }
        CpuTensor::new(&[m.batch * m.len_q, width_o], out)
    }

    /// Each task is one sequence: its heads one after another, each writing its columns of
    /// the sequence's output rows directly (no padded copies of Q, K, V or the output, no
    /// padding queries). With fewer than two sequences per thread that leaves threads idle,
    /// so such calls take the padded path, whose tasks are (sequence, head) pairs.
    fn attention_packed(
        &self,
        q: Heads<'_, CpuTensor>,
        k: Heads<'_, CpuTensor>,
        v: Heads<'_, CpuTensor>,
        lens: &[usize],
        window: Option<super::backend::Window>,
        scale: Option<f32>,
    ) -> Result<Option<CpuTensor>> {
        let total = lens.iter().try_fold(0usize, |t, &n| t.checked_add(n));
        let total = total.ok_or_else(|| Error::invalid("lens", "the lengths overflow"))?;
        // The views' shapes, heads and dims, checked as one sequence of every row.
        let whole = AttentionMask {
            batch: 1,
            len_q: total,
            len_k: total,
            key_lens: None,
            causal: None,
            window,
            scale,
        };
        let (wq, wk, wv) = check_attention(&q, &k, &v, &whole)?;
        if lens.len() < 2 * rayon::current_num_threads() {
            return Ok(None);
        }
        let (qd, kd, vd) = (q.tensor.f32s(), k.tensor.f32s(), v.tensor.f32s());
        let (dim, dim_v) = (q.dim, v.dim);
        let scale = scale.unwrap_or(1.0 / (dim as f32).sqrt());
        let group = q.heads / k.heads;
        let width_o = q.heads * dim_v;
        let isa = Isa::current();
        // Every row of every sequence is written by its heads' second GEMM.
        let mut out = recycle::scratch(total * width_o);
        // (first row, rows, output rows) per sequence.
        let mut seqs = Vec::with_capacity(lens.len());
        let (mut rest, mut start) = (out.as_mut_slice(), 0);
        for &n in lens {
            let (o, tail) = rest.split_at_mut(n * width_o);
            seqs.push((start, n, o));
            (rest, start) = (tail, start + n);
        }
        seqs.into_par_iter().for_each(|(start, n, o)| {
            if n == 0 {
                return;
            }
            let band = KeyBand::new(n, n, None, window);
            let mut scores = Vec::new();
            for h in 0..q.heads {
                let hk = h / group;
                head_attention(
                    isa,
                    &band,
                    (n, dim, dim_v, scale),
                    (&qd[start * wq + q.col + h * dim..], wq),
                    (&kd[start * wk + k.col + hk * dim..], wk),
                    (&vd[start * wv + v.col + hk * dim_v..], wv),
                    &mut scores,
                    (&mut o[h * dim_v..], width_o),
                );
            }
        });
        CpuTensor::new(&[total, width_o], out).map(Some)
    }

    /// One lane per thread of the calling pool.
    fn lanes(&self) -> usize {
        rayon::current_num_threads()
    }

    /// Each lane is a rayon pool of its own, the calling pool's threads shared out among
    /// them (one each when there are as many lanes as threads), so an op inside a lane is
    /// split over that lane's threads only, or, with one, takes its single-thread path. A
    /// lane whose pool or thread cannot be started is not run; if none can, `work` runs
    /// once on the calling thread.
    fn run_lanes(&self, lanes: usize, work: &(dyn Fn() + Sync)) {
        let threads = rayon::current_num_threads().max(lanes);
        let pools: Vec<rayon::ThreadPool> = (0..lanes)
            .filter_map(|i| {
                let share = threads / lanes + usize::from(i < threads % lanes);
                // 8 MiB of stack, as the CLI's pool and the main thread have; each lane
                // keeps its freed buffers in a pool of its own.
                let pool = rayon::ThreadPoolBuilder::new().num_threads(share);
                let pool = pool.start_handler(move |_| recycle::set_lane(i + 1));
                pool.stack_size(8 << 20).build().ok()
            })
            .collect();
        let started = std::thread::scope(|s| {
            let mut started = 0;
            for pool in &pools {
                let lane = std::thread::Builder::new().stack_size(64 << 10);
                started += usize::from(lane.spawn_scoped(s, || pool.install(work)).is_ok());
            }
            started
        });
        if started == 0 {
            work();
        }
    }
}

/// One head of one sequence: `o = softmax(scale·Q·Kᵀ)·V` for its `len_q` queries over the
/// keys `band` lets each see (rows no key may see give 0). `q`, `k`, `v` start at the head's first element of the
/// sequence's first row, with the given row strides; `o` likewise with its row stride.
/// Only the keys some query sees (the band's union) are multiplied: with a window, a long
/// cache costs its window only. `scores` is scratch, grown as needed.
#[allow(clippy::too_many_arguments)]
fn head_attention(
    isa: Isa,
    band: &KeyBand,
    (len_q, dim, dim_v, scale): (usize, usize, usize, f32),
    (q, rsq): (&[f32], usize),
    (k, rsk): (&[f32], usize),
    (v, rsv): (&[f32], usize),
    scores: &mut Vec<f32>,
    (o, rso): (&mut [f32], usize),
) {
    let seen = band.keys_of_rows(0..len_q);
    let n = seen.len();
    scores.clear();
    scores.resize(len_q * n, 0.0);
    let (k, v) = (&k[seen.start * rsk..], &v[seen.start * rsv..]);
    if len_q == 1 {
        // A decoding step: one query's ~4·n·dim flops as two row loops; the two GEMM calls
        // below cost more to set up than that (a decoding step makes one pair per head and
        // layer).
        vmath::dots(isa, &q[..dim], k, rsk, scores);
        softmax_range(isa, scores, 0..n, scale);
        vmath::weighted_rows(isa, scores, v, rsv, &mut o[..dim_v]);
        return;
    }
    sgemm(
        len_q,
        dim,
        n,
        q,
        (rsq, 1),
        k,
        (1, rsk),
        scores,
        n.max(1),
        false,
    );
    for (i, row) in scores.chunks_mut(n.max(1)).enumerate().take(len_q) {
        let keys = band.keys(i);
        // Every row's keys lie inside `seen` (their union); empty rows stay 0.
        let keys = if keys.is_empty() {
            0..0
        } else {
            keys.start - seen.start..keys.end - seen.start
        };
        softmax_range(isa, row, keys, scale);
    }
    sgemm(len_q, n, dim_v, scores, (n, 1), v, (rsv, 1), o, rso, false);
}

/// In place: the scores in `keys` become softmax(scale·s), the rest 0 (all 0 if `keys` is
/// empty).
fn softmax_range(isa: Isa, row: &mut [f32], keys: std::ops::Range<usize>, scale: f32) {
    let end = keys.end.min(row.len());
    let start = keys.start.min(end);
    let (rest, after) = row.split_at_mut(end);
    after.fill(0.0);
    let (before, keep) = rest.split_at_mut(start);
    before.fill(0.0);
    if keep.is_empty() {
        return;
    }
    let max = vmath::max(isa, keep) * scale;
    let sum = vmath::exp_sum(isa, keep, scale, max);
    vmath::scale(isa, keep, 1.0 / sum);
}

impl HasShape for CpuTensor {
    fn dims(&self) -> &[usize] {
        &self.shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GEMMs against an f64 product: row-pieced (m ≥ 2·ROW_PIECE) and one call (fewer rows,
    /// or pieces turned off as on CPUs with a large L2), row-major and transposed `a`, `c`
    /// rows wider than n, each epilogue (none, bias, bias + GELU, activation alone), on one
    /// thread and split over a pool of three (pieces not a multiple of the threads' count of
    /// rows). `c` starts as NaN, so a value the GEMM or its epilogue leaves unwritten shows;
    /// its padding columns must stay untouched.
    #[test]
    fn gemms_and_their_epilogues_match_an_f64_product() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        for &(m, k, n) in &[
            (2 * ROW_PIECE + 5, 19usize, 7usize),
            (3 * ROW_PIECE - 1, 8, 12),
            (45, 33, 10),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 16.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / 4.0 - 1.0).collect();
            let epilogues = [
                (None, Activation::None),
                (Some(&bias[..]), Activation::None),
                (Some(&bias[..]), Activation::GeluErf),
                (Some(&bias[..]), Activation::GeluTanh),
                (None, Activation::Relu),
            ];
            for transposed in [false, true] {
                // a as [m, k] row-major, or the same matrix stored [k, m] (strides 1, m).
                let (ad, strides) = if transposed {
                    let mut t = vec![0f32; m * k];
                    for i in 0..m {
                        for l in 0..k {
                            t[l * m + i] = a[i * k + l];
                        }
                    }
                    (t, (1, m))
                } else {
                    (a.clone(), (k, 1))
                };
                for (parallel, piece) in [false, true]
                    .into_iter()
                    .flat_map(|p| [(p, Some(ROW_PIECE)), (p, None)])
                {
                    for (bias, act) in epilogues {
                        let rsc = n + 3;
                        let mut c: Vec<f32> = (0..m * rsc)
                            .map(|i| {
                                if i % rsc < n {
                                    f32::NAN
                                } else {
                                    (i % 5) as f32
                                }
                            })
                            .collect();
                        let before = c.clone();
                        pool.install(|| {
                            sgemm_into(
                                m,
                                k,
                                n,
                                &ad,
                                strides,
                                &b,
                                (n, 1),
                                &mut c,
                                rsc,
                                parallel,
                                Epilogue { bias, act },
                                piece,
                            )
                        });
                        for i in 0..m {
                            for j in 0..rsc {
                                let got = c[i * rsc + j];
                                if j >= n {
                                    assert_eq!(got, before[i * rsc + j], "padding [{i},{j}]");
                                    continue;
                                }
                                let mut sum = bias.map_or(0.0, |b| b[j] as f64);
                                let mut mag = sum.abs();
                                for l in 0..k {
                                    let p = a[i * k + l] as f64 * b[l * n + j] as f64;
                                    sum += p;
                                    mag += p.abs();
                                }
                                // The f32 sum's error bound, carried through the activation
                                // (slope ≤ 1.13), plus the activation's own few ulps.
                                let want = act.apply(sum as f32) as f64;
                                let bound = (k as f64 + 2.0) * 1.2e-7 * mag * 1.13
                                    + 4.0 * 1.2e-7 * want.abs().max(sum.abs())
                                    + 1e-30;
                                assert!(
                                    (got as f64 - want).abs() <= bound,
                                    "m {m} transposed {transposed} parallel {parallel} \
                                     piece {piece:?} {act:?} bias {} [{i},{j}]: {got} vs {want}",
                                    bias.is_some()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A weight uploaded for many rows reads back as uploaded and gives `linear` the values
    /// the row-major weight gives (the few-row kernel for 5 rows, the GEMM for 300), within
    /// f32 rounding; too few rows stay row-major; a wrong length is an error.
    #[test]
    fn panel_weights_read_back_and_match_row_major_weights() {
        let (out, inp) = (130, 40);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let b: Vec<f32> = (0..out).map(|i| (i as f32 - 60.0) / 32.0).collect();
        let be = Cpu;
        let packed = be
            .upload_linear_weight(&[out, inp], w.clone(), WeightUse::ManyRows)
            .unwrap();
        assert!(packed.panels.is_some() && packed.data().is_empty());
        assert_eq!(be.to_f32(&packed).unwrap(), w);
        assert_eq!(packed.clone().into_data(), w);
        let plain = be.upload(&[out, inp], &w).unwrap();
        let bias = be.upload(&[out], &b).unwrap();
        for rows in [5, 300] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 16.0)
                .collect();
            let x = be.upload(&[rows, inp], &x).unwrap();
            for act in [Activation::None, Activation::GeluErf] {
                let want = be
                    .to_f32(&be.linear(&x, &plain, Some(&bias), act).unwrap())
                    .unwrap();
                let got = be
                    .to_f32(&be.linear(&x, &packed, Some(&bias), act).unwrap())
                    .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{rows} rows {act:?}: {g} vs {w}"
                    );
                }
            }
        }
        let few = be
            .upload_linear_weight(&[63, inp], vec![1.0; 63 * inp], WeightUse::ManyRows)
            .unwrap();
        assert!(few.panels.is_none());
        assert!(be
            .upload_linear_weight(&[out, inp], vec![1.0; 7], WeightUse::ManyRows)
            .is_err());
    }
}
