//! The one interface every model is written against. A [`Backend`] owns tensors of its own kind
//! (host f32 vectors, device buffers) and runs the handful of ops a transformer needs on them;
//! the layers in [`super::layers`] and the models ([`super::bert`]) call only these, so a model
//! is written once and runs on either backend.
//!
//! Tensors are row-major and contiguous. Activations are 2-D `[rows, width]` with rows =
//! batch·length (sequence-major: row `b·len + t` is token t of sequence b); weights keep their
//! checkpoint shapes.

pub use crate::attention_types::CausalAlign;
use crate::error::{Error, Result};
pub use crate::key_band::Window;

pub use crate::activation::Activation;

impl Activation {
    /// The activation of a Hugging Face `hidden_act` / `activation_function` name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            "linear" => Some(Activation::None),
            _ => None,
        }
    }

    /// The activation in f32 (the CPU backend's arithmetic; the CUDA kernel uses the same forms).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                const C: f32 = 0.797_884_6; // √(2/π)
                0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
        }
    }

    /// [`Activation::apply`] over a slice, with the dispatch outside the loop so that the
    /// loop vectorizes.
    pub fn apply_slice(self, xs: &mut [f32]) {
        match self {
            Activation::None => {}
            // Both GELUs in the CPU backend's vectorized copy for this CPU.
            Activation::GeluErf | Activation::GeluTanh => {
                super::cpu::vmath::activation(super::cpu::isa::Isa::current(), self, xs)
            }
            Activation::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            Activation::Tanh => xs.iter_mut().for_each(|x| *x = x.tanh()),
        }
    }
}

/// erf in f32, branch-free so that loops over it vectorize: three degree-9 polynomials in the
/// scaled variable t ∈ [-1, 1] of |x| ∈ [0, 1], [1, 2.2], [2.2, 4] (least-squares Chebyshev
/// fits to erf in f64 made for this crate, evaluated by Horner), and 1 beyond 4, where erf
/// rounds to 1 in f32. Max abs error 9.2e-8 measured over [0, 4] in f32 when fitted;
/// tests/runtime_layers.rs holds it to the f64 erf.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with(x, false)
}

/// [`erf`] with each Horner step one fused multiply-add (`mul_add`): the same fit, one
/// rounding per step instead of two. In code compiled with FMA (the CPU backend's AVX2 and
/// AVX-512 copies) that is one instruction per coefficient instead of two; elsewhere
/// `mul_add` is a library call, so scalar callers keep [`erf`].
#[inline(always)]
pub(crate) fn erf_fused(x: f32) -> f32 {
    erf_with(x, true)
}

/// The three pieces of [`erf`]'s fit: |x| from `ERF_BOUNDS[r]` (0 for the first) maps to
/// t = |x|·`ERF_T_SCALE[r]` − `ERF_T_SHIFT[r]` ∈ [-1, 1], where the piece's polynomial has
/// the coefficients `ERF_FIT[r]` (constant term first). The scalings are multiplications (t =
/// 2a − 1, (2a − 3.2)/1.2 and (2a − 6.2)/1.8): a division per lane costs more than the rest of
/// a polynomial; the difference is < 1 ulp of t. Shared with the CPU's GELU kernels, which
/// evaluate the same pieces lane by lane.
pub(crate) const ERF_BOUNDS: [f32; 3] = [0.0, 1.0, 2.2];
pub(crate) const ERF_T_SCALE: [f32; 3] = [2.0, 2.0 / 1.2, 2.0 / 1.8];
pub(crate) const ERF_T_SHIFT: [f32; 3] = [1.0, 3.2 / 1.2, 6.2 / 1.8];
/// erf rounds to 1 in f32 from here on.
pub(crate) const ERF_ONE_FROM: f32 = 4.0;
// The fit's values rounded to f32, printed with 10 digits.
#[allow(clippy::excessive_precision)]
pub(crate) const ERF_FIT: [[f32; 10]; 3] = [
    [
        5.204998851e-01,
        4.393912852e-01,
        -1.098476872e-01,
        -1.830801740e-02,
        1.144137233e-02,
        2.291105338e-04,
        -7.787714130e-04,
        4.162420009e-05,
        3.560730693e-05,
        -3.613595254e-06,
    ],
    [
        9.763484001e-01,
        5.233743042e-02,
        -5.024379492e-02,
        2.587574534e-02,
        -6.392185111e-03,
        -3.410727659e-04,
        7.258107071e-04,
        -1.674748200e-04,
        -1.923436139e-05,
        1.355346467e-05,
    ],
    [
        9.999883771e-01,
        6.807142927e-05,
        -1.903684315e-04,
        3.355061053e-04,
        -4.130818706e-04,
        3.800234117e-04,
        -2.740477794e-04,
        1.448757976e-04,
        -4.230003105e-05,
        2.941000275e-06,
    ],
];

#[inline(always)]
fn erf_with(x: f32, fused: bool) -> f32 {
    let a = x.abs().min(ERF_ONE_FROM);
    let piece = |r: usize| {
        let t = a * ERF_T_SCALE[r] - ERF_T_SHIFT[r];
        (ERF_FIT[r].iter().rev()).fold(0.0f32, |acc, &k| match fused {
            true => acc.mul_add(t, k),
            false => acc * t + k,
        })
    };
    // All three evaluated, one kept: branch-free, so loops over it vectorize.
    let (y0, y1, y2) = (piece(0), piece(1), piece(2));
    let y = if a < ERF_BOUNDS[1] {
        y0
    } else if a < ERF_BOUNDS[2] {
        y1
    } else {
        y2
    };
    let y = if a >= ERF_ONE_FROM { 1.0 } else { y };
    // `min` above maps NaN to 4; keep NaN a NaN.
    if x.is_nan() {
        x
    } else {
        y.copysign(x)
    }
}

/// Where a group of attention heads lives inside a 2-D activation: columns
/// `col .. col + heads·dim` of `tensor` (`[batch·len, width]`), head h at `col + h·dim`. Lets
/// Q, K and V be read straight out of one fused projection's output.
#[derive(Debug)]
pub struct Heads<'a, T> {
    pub tensor: &'a T,
    pub col: usize,
    pub heads: usize,
    pub dim: usize,
}

// By hand: derived impls would require `T: Copy`, but only the reference is copied.
impl<T> Clone for Heads<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Heads<'_, T> {}

/// Sizes and masks of one attention call: `batch` sequences of `len_q` queries and `len_k`
/// keys. Query i of sequence b sees key j iff j < key_lens[b] (key padding), when causal,
/// j ≤ i + offset as [`crate::reference::attention::admissible_keys`] defines it, and, with a
/// window, j inside the window's band ([`crate::key_band::KeyBand`], the offset taken from
/// sequence b's own key length). A query row with no admissible key gives zeros.
#[derive(Clone, Copy, Debug)]
pub struct AttentionMask<'a> {
    pub batch: usize,
    pub len_q: usize,
    pub len_k: usize,
    /// Valid keys per sequence (padding after them); `None`: all `len_k`.
    pub key_lens: Option<&'a [usize]>,
    pub causal: Option<CausalAlign>,
    /// Sliding-window (local) attention; `None`: no window. GPT-Neo's local layers: the last
    /// `w` keys up to the query, `Window::new(w − 1, 0, align)`.
    pub window: Option<Window>,
    /// Multiplies Q·Kᵀ; `None` for 1/√dim.
    pub scale: Option<f32>,
}

/// How a model calls a linear layer, so a backend can store its weight for that
/// ([`Backend::upload_linear_weight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    /// Any number of rows, one-token decoding steps included: stored as uploaded.
    AnyRows,
    /// Whole sequences at a time (an encoder's layers); a handful of rows only rarely.
    ManyRows,
}

/// The ops a model needs. Every op checks its inputs' shapes and returns
/// [`crate::Error`] on a mismatch.
pub trait Backend {
    /// A tensor on this backend.
    type Tensor;

    /// The element type tensors are stored in (activations and weights).
    fn dtype(&self) -> crate::DType;

    /// Short description, e.g. `cpu (f32, 2 threads)` or `cuda:0 NVIDIA H100 (f16)`.
    fn describe(&self) -> String;

    /// A tensor of `shape` from row-major f32 values (rounded to the backend's dtype).
    fn upload(&self, shape: &[usize], values: &[f32]) -> Result<Self::Tensor>;

    /// [`Backend::upload`] of values the caller gives away: a host backend keeps them
    /// without copying (model loading uploads each parameter this way once).
    fn upload_owned(&self, shape: &[usize], values: Vec<f32>) -> Result<Self::Tensor> {
        self.upload(shape, &values)
    }

    /// A linear layer's weight `[out, in]` for [`Backend::linear`], given away like
    /// [`Backend::upload_owned`]. With [`WeightUse::ManyRows`] a backend may store it in a
    /// form that only `linear` reads, faster there (the CPU's panels); [`Backend::to_f32`]
    /// still gives the row-major values.
    fn upload_linear_weight(
        &self,
        shape: &[usize],
        values: Vec<f32>,
        usage: WeightUse,
    ) -> Result<Self::Tensor> {
        let _ = usage;
        self.upload_owned(shape, values)
    }

    /// The tensor's values, row-major, as f32.
    fn to_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];

    /// `y[r, o] = Σ_i x[r, i]·w[o, i] + bias[o]`, then `act`: x `[rows, in]`, w `[out, in]`
    /// (PyTorch `nn.Linear` layout), bias `[out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// `a @ bᵀ` per batch: a `[batch, m, k]`, b `[batch, n, k]` → `[batch, m, n]` (given as 2-D
    /// `[batch·m, k]` etc.). The unparameterised building blocks use it.
    fn batched_matmul_nt(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        batch: usize,
    ) -> Result<Self::Tensor>;

    /// Elementwise `a + b` (same shape).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// LayerNorm over the last dim of `x + residual` (or of `x`), with gamma/beta `[width]`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Rows `ids` of `table` `[n, width]` → `[ids.len(), width]` (embedding lookup). An id
    /// outside the table is an error.
    fn gather_rows(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;

    /// Scaled dot-product attention per head: softmax(Q·Kᵀ·scale + mask)·V. Q rows are
    /// `b·len_q + i`, K/V rows `b·len_k + j`; the output is `[batch·len_q, heads_q·dim_v]`
    /// (heads side by side). Query head h reads K/V head h / (heads_q / heads_kv).
    fn attention(
        &self,
        q: Heads<'_, Self::Tensor>,
        k: Heads<'_, Self::Tensor>,
        v: Heads<'_, Self::Tensor>,
        mask: &AttentionMask<'_>,
    ) -> Result<Self::Tensor>;

    /// Self-attention over packed sequences, with no padding rows: sequence b is rows
    /// `start_b .. start_b + lens[b]` of q, k and v (`start_b` the sum of the earlier lengths),
    /// its queries see only its own keys (narrowed by `window`, top-left aligned), and the
    /// output `[Σ lens, heads_q·dim_v]` has the same rows. `scale` as in [`AttentionMask`].
    /// `Ok(None)` when the backend has no packed path for this call: the caller pads the
    /// sequences and calls [`Backend::attention`] with their key lengths.
    fn attention_packed(
        &self,
        q: Heads<'_, Self::Tensor>,
        k: Heads<'_, Self::Tensor>,
        v: Heads<'_, Self::Tensor>,
        lens: &[usize],
        window: Option<Window>,
        scale: Option<f32>,
    ) -> Result<Option<Self::Tensor>> {
        let _ = (q, k, v, lens, window, scale);
        Ok(None)
    }

    /// How many independent forward passes this backend runs best at the same time (see
    /// [`Backend::run_lanes`]); 1, the default, means one after another.
    fn lanes(&self) -> usize {
        1
    }

    /// Runs `work` on `lanes` workers at once and returns when every one has returned. Each
    /// worker's ops run on that worker alone, so independent inputs (batches) go through in
    /// parallel instead of each op being split over the threads. The default runs `work`
    /// once, here.
    fn run_lanes(&self, lanes: usize, work: &(dyn Fn() + Sync)) {
        let _ = lanes;
        work();
    }
}

/// Checks an attention call's views against its mask; returns the row widths of q, k and v.
pub(crate) fn check_attention<T: HasShape>(
    q: &Heads<'_, T>,
    k: &Heads<'_, T>,
    v: &Heads<'_, T>,
    m: &AttentionMask<'_>,
) -> Result<(usize, usize, usize)> {
    let width = |arg: &'static str, h: &Heads<'_, T>, rows: usize| -> Result<usize> {
        let s = h.tensor.dims();
        if s.len() != 2 || s[0] != rows || h.col + h.heads * h.dim > s[1] || h.heads == 0 {
            return Err(Error::shape(
                arg,
                format!(
                    "[{rows}, ≥ {}] holding {} heads of dim {} at column {}",
                    h.col + h.heads * h.dim,
                    h.heads,
                    h.dim,
                    h.col
                ),
                s,
            ));
        }
        Ok(s[1])
    };
    let wq = width("q", q, m.batch * m.len_q)?;
    let wk = width("k", k, m.batch * m.len_k)?;
    let wv = width("v", v, m.batch * m.len_k)?;
    if k.dim != q.dim || v.heads != k.heads || !q.heads.is_multiple_of(k.heads) {
        return Err(Error::invalid(
            "k",
            format!(
                "q has {} heads of dim {}, k {} of dim {}, v {} heads: need equal q/k dims, \
                 equal k/v heads, and q heads a multiple of k heads",
                q.heads, q.dim, k.heads, k.dim, v.heads
            ),
        ));
    }
    if q.dim == 0 || v.dim == 0 {
        return Err(Error::invalid("q", "head dims must be ≥ 1"));
    }
    if let Some(lens) = m.key_lens {
        if lens.len() != m.batch {
            return Err(Error::shape(
                "key_lens",
                format!("[{}]", m.batch),
                &[lens.len()],
            ));
        }
        if let Some(&bad) = lens.iter().find(|&&l| l > m.len_k) {
            return Err(Error::invalid(
                "key_lens",
                format!("key length {bad} exceeds the {} keys", m.len_k),
            ));
        }
    }
    Ok((wq, wk, wv))
}

/// Shape access shared by the backends' tensors (for the common checks).
pub(crate) trait HasShape {
    fn dims(&self) -> &[usize];
}
