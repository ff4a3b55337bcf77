//! [`TrainBackend`] for the CPU backend, in f32: GEMMs through the same `gemm` crate call as
//! the forward, attention backward recomputing the probabilities from the saved log-sum-exp
//! (one (sequence, K/V head) per task, so a GQA group's dK/dV is summed in a fixed order),
//! dropout masks from the shared Philox stream ([`crate::rng`]) so the CUDA backend draws the
//! same ones.

use super::backend::{check_attention, Activation, AttentionMask, Heads};
use super::cpu::isa::Isa;
use super::cpu::{copied, sgemm, vmath, zeroed, Cpu, CpuTensor};
use super::train::backend::{
    check_cross_entropy, AdamWStep, AttentionGrads, CrossEntropy, DropoutSite, LayerNormGrads, Op,
    TrainBackend,
};
use crate::error::{Error, Result};
use crate::rng::Dropout;
use crate::DType;
use rayon::prelude::*;

fn same_shape(arg: &'static str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(
            arg,
            format!("{:?} (the other operand's shape)", a.shape()),
            b.shape(),
        ));
    }
    Ok(())
}

fn dims2(arg: &'static str, t: &CpuTensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(Error::shape(arg, "2 dims [rows, cols]", s)),
    }
}

fn zip_map(
    arg: &'static str,
    a: &CpuTensor,
    b: &CpuTensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<CpuTensor> {
    same_shape(arg, a, b)?;
    // Contiguous chunks per task with a plain inner loop (which the compiler can vectorize),
    // rather than one rayon item per element.
    const CHUNK: usize = 1 << 14;
    let mut data = zeroed(a.data().len());
    data.par_chunks_mut(CHUNK)
        .zip(a.data().par_chunks(CHUNK).zip(b.data().par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = f(x, y);
            }
        });
    CpuTensor::new(a.shape(), data)
}

/// d/dx of the activation in f32 (the forms of [`Activation::apply`]).
fn activation_derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::None => 1.0,
        Activation::GeluErf => vmath::gelu_erf_derivative(x),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // √(2/π)
            let inner = C * (x + 0.044715 * x * x * x);
            let t = inner.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Tanh => {
            let t = x.tanh();
            1.0 - t * t
        }
    }
}

fn dropout_of(site: &DropoutSite) -> Result<Dropout> {
    Dropout::new(site.p)
}

impl TrainBackend for Cpu {
    fn tensor_dtype(&self, _t: &CpuTensor) -> DType {
        DType::F32
    }

    fn upload_as(&self, shape: &[usize], values: &[f32], dtype: DType) -> Result<CpuTensor> {
        if dtype != DType::F32 {
            return Err(Error::invalid(
                "dtype",
                format!("the CPU backend stores f32 only, not {dtype}"),
            ));
        }
        CpuTensor::new(shape, copied(values))
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        CpuTensor::new(shape, zeroed(shape.iter().product()))
    }

    fn cast(&self, t: &CpuTensor, dtype: DType) -> Result<CpuTensor> {
        self.upload_as(t.shape(), t.data(), dtype)
    }

    fn accumulate(&self, acc: &mut CpuTensor, x: &CpuTensor) -> Result<()> {
        same_shape("x", acc, x)?;
        acc.data_mut()
            .par_iter_mut()
            .zip(x.data())
            .for_each(|(a, &b)| *a += b);
        Ok(())
    }

    fn scale(&self, x: &mut CpuTensor, s: f32) -> Result<()> {
        x.data_mut().par_iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn matmul(&self, a: &CpuTensor, op_a: Op, b: &CpuTensor, op_b: Op) -> Result<CpuTensor> {
        let (ar, ac) = dims2("a", a)?;
        let (br, bc) = dims2("b", b)?;
        // Logical sizes and (row, column) strides of op(a) [m, k] and op(b) [k, n].
        let (m, k, sa) = match op_a {
            Op::N => (ar, ac, (ac, 1)),
            Op::T => (ac, ar, (1, ac)),
        };
        let (kb, n, sb) = match op_b {
            Op::N => (br, bc, (bc, 1)),
            Op::T => (bc, br, (1, bc)),
        };
        if kb != k {
            return Err(Error::shape(
                "b",
                format!("op(b) with {k} rows (op(a) is [{m}, {k}])"),
                b.shape(),
            ));
        }
        let mut c = zeroed(m * n);
        if k == 0 {
            return CpuTensor::new(&[m, n], c);
        }
        sgemm(m, k, n, a.data(), sa, b.data(), sb, &mut c, n, true);
        CpuTensor::new(&[m, n], c)
    }

    fn sum_rows(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (rows, cols) = dims2("x", x)?;
        let sums = column_sums(rows, cols, |r, c| x.data()[r * cols + c] as f64);
        CpuTensor::new(&[cols], sums)
    }

    fn sum_squares(&self, x: &CpuTensor) -> Result<f64> {
        // Fixed-size blocks, each summed in SUM_LANES independent f64 lanes, the block sums
        // added in order: the same result on any thread count, and no serial chain of
        // dependent adds through millions of parameters.
        const BLOCK: usize = 1 << 16;
        let blocks: Vec<f64> = x
            .data()
            .par_chunks(BLOCK)
            .map(|c| {
                let mut acc = [0f64; SUM_LANES];
                let lanes = c.chunks_exact(SUM_LANES);
                let rest: f64 = lanes
                    .remainder()
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum();
                for l in lanes {
                    for (a, &v) in acc.iter_mut().zip(l) {
                        *a += (v as f64) * (v as f64);
                    }
                }
                acc.iter().sum::<f64>() + rest
            })
            .collect();
        Ok(blocks.iter().sum())
    }

    fn mul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        zip_map("b", a, b, |x, y| x * y)
    }

    fn activate(&self, x: &CpuTensor, act: Activation) -> Result<CpuTensor> {
        let mut y = x.clone();
        let isa = Isa::current();
        y.data_mut()
            .par_chunks_mut(4096)
            .for_each(|c| vmath::activation(isa, act, c));
        Ok(y)
    }

    fn activation_backward(
        &self,
        x: &CpuTensor,
        dy: &CpuTensor,
        act: Activation,
    ) -> Result<CpuTensor> {
        if act != Activation::GeluErf {
            return zip_map("dy", x, dy, |x, g| g * activation_derivative(act, x));
        }
        // GELU (BERT's): the vector copy of the same derivative.
        same_shape("dy", x, dy)?;
        const CHUNK: usize = 1 << 14;
        let isa = Isa::current();
        let mut data = zeroed(x.data().len());
        data.par_chunks_mut(CHUNK)
            .zip(x.data().par_chunks(CHUNK).zip(dy.data().par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| vmath::gelu_erf_backward(isa, x, g, o));
        CpuTensor::new(x.shape(), data)
    }

    fn sigmoid(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let data = x.data().iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
        CpuTensor::new(x.shape(), data)
    }

    fn sigmoid_backward(&self, y: &CpuTensor, dy: &CpuTensor) -> Result<CpuTensor> {
        zip_map("dy", y, dy, |y, g| g * y * (1.0 - y))
    }

    fn tanh_backward(&self, y: &CpuTensor, dy: &CpuTensor) -> Result<CpuTensor> {
        zip_map("dy", y, dy, |y, g| g * (1.0 - y * y))
    }

    fn slice_cols(&self, x: &CpuTensor, start: usize, width: usize) -> Result<CpuTensor> {
        let (rows, cols) = dims2("x", x)?;
        if start.checked_add(width).is_none_or(|end| end > cols) {
            return Err(Error::invalid(
                "start",
                format!("columns {start}..+{width} of a tensor with {cols} columns"),
            ));
        }
        let mut out = Vec::with_capacity(rows * width);
        for r in 0..rows {
            out.extend_from_slice(&x.data()[r * cols + start..r * cols + start + width]);
        }
        CpuTensor::new(&[rows, width], out)
    }

    fn concat_cols(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        let Some(first) = parts.first() else {
            return Err(Error::invalid("parts", "nothing to concatenate"));
        };
        let (rows, _) = dims2("parts", first)?;
        let mut widths = Vec::with_capacity(parts.len());
        for p in parts {
            let (r, c) = dims2("parts", p)?;
            if r != rows {
                return Err(Error::shape("parts", format!("[{rows}, _]"), p.shape()));
            }
            widths.push(c);
        }
        let total: usize = widths.iter().sum();
        let mut out = Vec::with_capacity(rows * total);
        for r in 0..rows {
            for (p, &w) in parts.iter().zip(&widths) {
                out.extend_from_slice(&p.data()[r * w..(r + 1) * w]);
            }
        }
        CpuTensor::new(&[rows, total], out)
    }

    fn layer_norm_backward(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        eps: f32,
        dy: &CpuTensor,
    ) -> Result<LayerNormGrads<CpuTensor>> {
        let (rows, width) = dims2("x", x)?;
        same_shape("dy", x, dy)?;
        if gamma.shape() != [width] {
            return Err(Error::shape("gamma", format!("[{width}]"), gamma.shape()));
        }
        if width == 0 {
            return Err(Error::Empty {
                arg: "x",
                shape: x.shape().to_vec(),
            });
        }
        let g = gamma.data();
        // Per row: x̂ = (x − mean)·rstd, dx̂ = dy·γ,
        // dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)); row statistics in f64 as the forward.
        let mut dx = zeroed(rows * width);
        let mut xhat = vec![0f32; rows * width];
        dx.par_chunks_mut(width)
            .zip(xhat.par_chunks_mut(width))
            .enumerate()
            .for_each(|(r, (dxr, xh))| {
                let xr = &x.data()[r * width..(r + 1) * width];
                let dyr = &dy.data()[r * width..(r + 1) * width];
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
                let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                let (mut m1, mut m2) = (0f64, 0f64);
                for c in 0..width {
                    let h = (xr[c] as f64 - mean) * rstd;
                    xh[c] = h as f32;
                    let d = dyr[c] as f64 * g[c] as f64;
                    m1 += d;
                    m2 += d * h;
                }
                let (m1, m2) = (m1 / width as f64, m2 / width as f64);
                for c in 0..width {
                    let d = dyr[c] as f64 * g[c] as f64;
                    dxr[c] = (rstd * (d - m1 - xh[c] as f64 * m2)) as f32;
                }
            });
        let dgamma = column_sums(rows, width, |r, c| {
            dy.data()[r * width + c] as f64 * xhat[r * width + c] as f64
        });
        Ok(LayerNormGrads {
            dx: CpuTensor::new(x.shape(), dx)?,
            dgamma: CpuTensor::new(&[width], dgamma)?,
            dbeta: self.sum_rows(dy)?,
        })
    }

    fn gather_rows_backward(
        &self,
        dy: &CpuTensor,
        ids: &[u32],
        rows: usize,
        padding_idx: Option<u32>,
    ) -> Result<CpuTensor> {
        let (n, width) = dims2("dy", dy)?;
        if n != ids.len() {
            return Err(Error::shape(
                "dy",
                format!("[{}, width] (one row per id)", ids.len()),
                dy.shape(),
            ));
        }
        // As the CUDA backend: a padding row the table does not have is a caller's mistake.
        if let Some(p) = padding_idx.filter(|&p| p as usize >= rows) {
            return Err(Error::invalid(
                "padding_idx",
                format!("row {p} is outside the table's {rows} rows"),
            ));
        }
        let mut out = zeroed(rows * width);
        // In id order: the same sums in the same order every run.
        for (i, &id) in ids.iter().enumerate() {
            if Some(id) == padding_idx {
                continue;
            }
            let id = id as usize;
            if id >= rows {
                return Err(Error::invalid(
                    "ids",
                    format!("id {id} is outside the table's {rows} rows"),
                ));
            }
            let src = &dy.data()[i * width..(i + 1) * width];
            for (o, &g) in out[id * width..(id + 1) * width].iter_mut().zip(src) {
                *o += g;
            }
        }
        CpuTensor::new(&[rows, width], out)
    }

    fn attention_with_lse(
        &self,
        q: Heads<'_, CpuTensor>,
        k: Heads<'_, CpuTensor>,
        v: Heads<'_, CpuTensor>,
        mask: &AttentionMask<'_>,
        dropout: Option<DropoutSite>,
    ) -> Result<(CpuTensor, CpuTensor)> {
        let g = AttnGeometry::new(&q, &k, &v, mask, dropout)?;
        let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..g.batch * g.heads_q)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / g.heads_q, bh % g.heads_q);
                let p = g.probabilities(&q, &k, b, h, None);
                let mut o = vec![0f32; g.len_q * g.dim_v];
                if g.key_len(b) > 0 {
                    let pd = g.dropped(&p.probs, b, h);
                    sgemm(
                        g.len_q,
                        g.key_len(b),
                        g.dim_v,
                        &pd,
                        (g.key_len(b), 1),
                        g.head(&v, b, h / g.group, g.len_k),
                        (g.wv, 1),
                        &mut o,
                        g.dim_v,
                        false,
                    );
                }
                (o, p.lse)
            })
            .collect();
        let width_o = g.heads_q * g.dim_v;
        let mut out = zeroed(g.batch * g.len_q * width_o);
        let mut lse = vec![0f32; g.batch * g.heads_q * g.len_q];
        for (bh, (o, l)) in blocks.iter().enumerate() {
            let (b, h) = (bh / g.heads_q, bh % g.heads_q);
            scatter_head(&mut out, o, b, h, g.len_q, width_o, g.dim_v);
            lse[bh * g.len_q..(bh + 1) * g.len_q].copy_from_slice(l);
        }
        Ok((
            CpuTensor::new(&[g.batch * g.len_q, width_o], out)?,
            CpuTensor::new(&[g.batch, g.heads_q, g.len_q], lse)?,
        ))
    }

    fn attention_backward(
        &self,
        q: Heads<'_, CpuTensor>,
        k: Heads<'_, CpuTensor>,
        v: Heads<'_, CpuTensor>,
        o: &CpuTensor,
        lse: &CpuTensor,
        dout: &CpuTensor,
        mask: &AttentionMask<'_>,
        dropout: Option<DropoutSite>,
    ) -> Result<AttentionGrads<CpuTensor>> {
        let g = AttnGeometry::new(&q, &k, &v, mask, dropout)?;
        let o_shape = [g.batch * g.len_q, g.heads_q * g.dim_v];
        if o.shape() != o_shape {
            return Err(Error::shape("o", format!("{o_shape:?}"), o.shape()));
        }
        if dout.shape() != o_shape {
            return Err(Error::shape("dout", format!("{o_shape:?}"), dout.shape()));
        }
        if lse.shape() != [g.batch, g.heads_q, g.len_q] {
            return Err(Error::shape(
                "lse",
                format!("[{}, {}, {}]", g.batch, g.heads_q, g.len_q),
                lse.shape(),
            ));
        }
        let width_o = g.heads_q * g.dim_v;
        // One task per (sequence, K/V head): its query heads run in order and their dK, dV
        // add up in the task's own buffers.
        let blocks: Vec<GroupGrads> = (0..g.batch * g.heads_kv)
            .into_par_iter()
            .map(|bk| {
                let (b, hk) = (bk / g.heads_kv, bk % g.heads_kv);
                let kl = g.key_len(b);
                let mut dk = vec![0f32; kl * g.dim];
                let mut dv = vec![0f32; kl * g.dim_v];
                let mut dqs = Vec::with_capacity(g.group);
                for h in hk * g.group..(hk + 1) * g.group {
                    let mut dq = vec![0f32; g.len_q * g.dim];
                    if kl == 0 {
                        dqs.push(dq);
                        continue;
                    }
                    let l = &lse.data()[(b * g.heads_q + h) * g.len_q..][..g.len_q];
                    let p = g.probabilities(&q, &k, b, h, Some(l));
                    let pd = g.dropped(&p.probs, b, h);
                    let dob = &dout.data()[b * g.len_q * width_o + h * g.dim_v..];
                    let ob = &o.data()[b * g.len_q * width_o + h * g.dim_v..];
                    let vb = g.head(&v, b, hk, g.len_k);
                    // dV += P̃ᵀ·dO
                    sgemm_acc(
                        kl,
                        g.len_q,
                        g.dim_v,
                        &pd,
                        (1, kl),
                        dob,
                        (width_o, 1),
                        &mut dv,
                    );
                    // dP̃ = dO·Vᵀ, then through the dropout mask: dP = dP̃∘M/(1−p).
                    let mut dp = vec![0f32; g.len_q * kl];
                    sgemm(
                        g.len_q,
                        g.dim_v,
                        kl,
                        dob,
                        (width_o, 1),
                        vb,
                        (1, g.wv),
                        &mut dp,
                        kl,
                        false,
                    );
                    let dp = g.dropped(&dp, b, h);
                    // dS = P∘(dP − D), D_i = Σ_d dO_id·O_id (= Σ_j P_ij·dP_ij).
                    let mut ds = dp;
                    for i in 0..g.len_q {
                        let d: f32 = (0..g.dim_v)
                            .map(|c| dob[i * width_o + c] * ob[i * width_o + c])
                            .sum();
                        for j in 0..kl {
                            let at = i * kl + j;
                            ds[at] = p.probs[at] * (ds[at] - d) * g.scale;
                        }
                    }
                    // dQ = dS·K, dK += dSᵀ·Q (the scale is already in dS).
                    let kb = g.head(&k, b, hk, g.len_k);
                    sgemm(
                        g.len_q,
                        kl,
                        g.dim,
                        &ds,
                        (kl, 1),
                        kb,
                        (g.wk, 1),
                        &mut dq,
                        g.dim,
                        false,
                    );
                    let qb = g.head(&q, b, h, g.len_q);
                    sgemm_acc(kl, g.len_q, g.dim, &ds, (1, kl), qb, (g.wq, 1), &mut dk);
                    dqs.push(dq);
                }
                (dqs, dk, dv)
            })
            .collect();
        let (wdq, wdk, wdv) = (g.heads_q * g.dim, g.heads_kv * g.dim, g.heads_kv * g.dim_v);
        let mut dq = zeroed(g.batch * g.len_q * wdq);
        let mut dk = zeroed(g.batch * g.len_k * wdk);
        let mut dv = zeroed(g.batch * g.len_k * wdv);
        for (bk, (dqs, dkb, dvb)) in blocks.iter().enumerate() {
            let (b, hk) = (bk / g.heads_kv, bk % g.heads_kv);
            for (i, dqh) in dqs.iter().enumerate() {
                scatter_head(&mut dq, dqh, b, hk * g.group + i, g.len_q, wdq, g.dim);
            }
            // Keys past the sequence's length keep zero gradients.
            let kl = g.key_len(b);
            for j in 0..kl {
                let dst = (b * g.len_k + j) * wdk + hk * g.dim;
                dk[dst..dst + g.dim].copy_from_slice(&dkb[j * g.dim..(j + 1) * g.dim]);
                let dst = (b * g.len_k + j) * wdv + hk * g.dim_v;
                dv[dst..dst + g.dim_v].copy_from_slice(&dvb[j * g.dim_v..(j + 1) * g.dim_v]);
            }
        }
        Ok(AttentionGrads {
            dq: CpuTensor::new(&[g.batch * g.len_q, wdq], dq)?,
            dk: CpuTensor::new(&[g.batch * g.len_k, wdk], dk)?,
            dv: CpuTensor::new(&[g.batch * g.len_k, wdv], dv)?,
        })
    }

    fn dropout(&self, x: &CpuTensor, site: DropoutSite) -> Result<CpuTensor> {
        let d = dropout_of(&site)?;
        let mut y = x.clone();
        // Chunks at multiples of 4 elements: each Philox block is drawn once.
        const CHUNK: usize = 1 << 14;
        y.data_mut()
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, ys)| d.apply_in_place(site.seed, site.offset, (c * CHUNK) as u64, ys));
        Ok(y)
    }

    fn cross_entropy(
        &self,
        logits: &CpuTensor,
        labels: &[i64],
        opts: &CrossEntropy,
    ) -> Result<(f32, CpuTensor)> {
        let (rows, classes) = dims2("logits", logits)?;
        check_cross_entropy(rows, classes, labels, opts)?;
        let eps = opts.label_smoothing;
        let valid = labels.iter().filter(|&&l| l != opts.ignore_index).count();
        let mut grad = zeroed(rows * classes);
        let mut loss = 0f64;
        if valid > 0 {
            let inv = 1.0 / valid as f64;
            for (r, &label) in labels.iter().enumerate() {
                if label == opts.ignore_index {
                    continue;
                }
                let z = &logits.data()[r * classes..(r + 1) * classes];
                let max = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
                let lse = max + sum.ln();
                let mean_z = z.iter().map(|&v| v as f64).sum::<f64>() / classes as f64;
                let e = eps as f64;
                loss += (1.0 - e) * (lse - z[label as usize] as f64) + e * (lse - mean_z);
                for (c, gv) in grad[r * classes..(r + 1) * classes].iter_mut().enumerate() {
                    let target =
                        e / classes as f64 + if c == label as usize { 1.0 - e } else { 0.0 };
                    *gv = (((z[c] as f64 - lse).exp() - target) * inv) as f32;
                }
            }
            loss *= inv;
        }
        Ok((loss as f32, CpuTensor::new(&[rows, classes], grad)?))
    }

    fn adamw_step(
        &self,
        param: &mut CpuTensor,
        grad: &CpuTensor,
        m: &mut CpuTensor,
        v: &mut CpuTensor,
        hp: &AdamWStep,
    ) -> Result<()> {
        same_shape("grad", param, grad)?;
        same_shape("m", param, m)?;
        same_shape("v", param, v)?;
        if hp.step == 0 {
            return Err(Error::invalid("step", "AdamW steps count from 1"));
        }
        // PyTorch's single-tensor AdamW in f32, with the bias corrections in f64.
        let t = hp.step as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt();
        let step_size = (hp.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2_sqrt as f32;
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let (b1, b2) = (hp.beta1, hp.beta2);
        param
            .data_mut()
            .par_iter_mut()
            .zip(grad.data().par_iter())
            .zip(m.data_mut().par_iter_mut())
            .zip(v.data_mut().par_iter_mut())
            .for_each(|(((p, &g), m), v)| {
                *p *= decay;
                *m += (g - *m) * (1.0 - b1);
                *v = *v * b2 + (1.0 - b2) * g * g;
                let denom = v.sqrt() / bc2_sqrt + hp.eps;
                *p -= step_size * *m / denom;
            });
        Ok(())
    }
}

/// Independent f64 partial sums in [`TrainBackend::sum_squares`].
const SUM_LANES: usize = 8;

/// `out[c] = Σ_r term(r, c)` in f64, rounded once to f32, rows added in order for every
/// column (deterministic). Walks the matrix row by row over blocks of columns (one block per
/// task), so memory is read in order instead of one strided column at a time.
fn column_sums(rows: usize, cols: usize, term: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f32> {
    const COLS: usize = 64;
    let mut out = vec![0f32; cols];
    out.par_chunks_mut(COLS).enumerate().for_each(|(i, o)| {
        let c0 = i * COLS;
        let mut acc = [0f64; COLS];
        for r in 0..rows {
            for (j, a) in acc.iter_mut().enumerate().take(o.len()) {
                *a += term(r, c0 + j);
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = a as f32;
        }
    });
    out
}

/// One (sequence, K/V head) task's gradients: dQ of each query head of the group, dK, dV.
type GroupGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// `c[m, n] += a·b` (strided views, single-threaded: called inside parallel tasks).
#[allow(clippy::too_many_arguments)]
fn sgemm_acc(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: &mut [f32],
) {
    let mut t = vec![0f32; m * n];
    sgemm(m, k, n, a, sa, b, sb, &mut t, n, false);
    c.iter_mut().zip(&t).for_each(|(x, y)| *x += y);
}

/// Copies a per-head `[len, dim]` block into columns `h·dim ..` of rows `b·len ..`.
fn scatter_head(
    out: &mut [f32],
    block: &[f32],
    b: usize,
    h: usize,
    len: usize,
    width: usize,
    dim: usize,
) {
    for i in 0..len {
        let dst = (b * len + i) * width + h * dim;
        out[dst..dst + dim].copy_from_slice(&block[i * dim..(i + 1) * dim]);
    }
}

/// The sizes of one attention call, checked once, shared by the forward and the backward.
struct AttnGeometry<'m> {
    batch: usize,
    len_q: usize,
    len_k: usize,
    key_lens: Option<&'m [usize]>,
    causal: Option<super::backend::CausalAlign>,
    window: Option<crate::key_band::Window>,
    heads_q: usize,
    heads_kv: usize,
    group: usize,
    dim: usize,
    dim_v: usize,
    wq: usize,
    wk: usize,
    wv: usize,
    scale: f32,
    dropout: Option<(Dropout, DropoutSite)>,
}

/// One head's probabilities `[len_q, key_len]` (zero past each query's admissible keys) and
/// each query's log-sum-exp of scaled scores.
struct HeadProbs {
    probs: Vec<f32>,
    lse: Vec<f32>,
}

impl<'m> AttnGeometry<'m> {
    fn new(
        q: &Heads<'_, CpuTensor>,
        k: &Heads<'_, CpuTensor>,
        v: &Heads<'_, CpuTensor>,
        mask: &AttentionMask<'m>,
        dropout: Option<DropoutSite>,
    ) -> Result<Self> {
        let (wq, wk, wv) = check_attention(q, k, v, mask)?;
        let dropout = match dropout {
            Some(site) => Some((dropout_of(&site)?, site)),
            None => None,
        };
        Ok(AttnGeometry {
            batch: mask.batch,
            len_q: mask.len_q,
            len_k: mask.len_k,
            key_lens: mask.key_lens,
            causal: mask.causal,
            window: mask.window,
            heads_q: q.heads,
            heads_kv: k.heads,
            group: q.heads / k.heads,
            dim: q.dim,
            dim_v: v.dim,
            wq,
            wk,
            wv,
            scale: mask.scale.unwrap_or(1.0 / (q.dim as f32).sqrt()),
            dropout,
        })
    }

    fn key_len(&self, b: usize) -> usize {
        self.key_lens.map_or(self.len_k, |l| l[b])
    }

    /// Rows `b·len ..` of a head view, from its first column.
    fn head<'t>(&self, x: &Heads<'t, CpuTensor>, b: usize, h: usize, len: usize) -> &'t [f32] {
        let w = x.tensor.shape()[1];
        &x.tensor.data()[b * len * w + x.col + h * x.dim..]
    }

    /// P for query head `h` of sequence `b`; with `lse` given (the backward) P = exp(s − lse)
    /// from the forward's statistics, else computed here.
    fn probabilities(
        &self,
        q: &Heads<'_, CpuTensor>,
        k: &Heads<'_, CpuTensor>,
        b: usize,
        h: usize,
        lse: Option<&[f32]>,
    ) -> HeadProbs {
        let kl = self.key_len(b);
        let mut s = vec![0f32; self.len_q * kl];
        let mut lse_out = vec![f32::NEG_INFINITY; self.len_q];
        if kl == 0 {
            return HeadProbs {
                probs: s,
                lse: lse_out,
            };
        }
        sgemm(
            self.len_q,
            self.dim,
            kl,
            self.head(q, b, h, self.len_q),
            (self.wq, 1),
            self.head(k, b, h / self.group, self.len_k),
            (1, self.wk),
            &mut s,
            kl,
            false,
        );
        // Key padding, causal and window masks leave each query one contiguous run of keys.
        let band = crate::key_band::KeyBand::new(self.len_q, kl, self.causal, self.window);
        for (i, row) in s.chunks_mut(kl).enumerate() {
            let keys = band.keys(i);
            let (before, rest) = row.split_at_mut(keys.start);
            before.fill(0.0);
            let (keep, masked) = rest.split_at_mut(keys.len());
            masked.fill(0.0);
            if keep.is_empty() {
                continue;
            }
            let l = match lse {
                Some(l) => l[i],
                None => {
                    let max = keep.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * self.scale;
                    let sum: f32 = keep.iter().map(|&x| (x * self.scale - max).exp()).sum();
                    max + sum.ln()
                }
            };
            lse_out[i] = l;
            for x in keep.iter_mut() {
                *x = (*x * self.scale - l).exp();
            }
        }
        HeadProbs {
            probs: s,
            lse: lse_out,
        }
    }

    /// `x∘M/(1−p)` for a `[len_q, key_len]` block of head `h` of sequence `b` (a copy of `x`
    /// without dropout). The mask's element index is that of the full `[batch, heads_q,
    /// len_q, len_k]` probability tensor.
    fn dropped(&self, x: &[f32], b: usize, h: usize) -> Vec<f32> {
        let mut out = x.to_vec();
        if let Some((d, site)) = &self.dropout {
            let kl = self.key_len(b);
            for i in 0..self.len_q {
                let first = (((b * self.heads_q + h) * self.len_q + i) * self.len_k) as u64;
                d.apply_in_place(
                    site.seed,
                    site.offset,
                    first,
                    &mut out[i * kl..(i + 1) * kl],
                );
            }
        }
        out
    }
}
