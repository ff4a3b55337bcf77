//! Block-sparse attention backward ([`crate::ops::sparse_attention::backward_into`]) against the
//! f64 reference with the layout's element mask ([`ref_bwd::backward_masked`]), under
//! [`crate::tolerance::attention_backward`]. O and LSE come from the GPU's sparse forward (as in
//! training); dQ, dK, dV are poisoned with NaN before each launch; K/V rows past a sequence's
//! key length, and rows of keys no query of any head keeps, are NaN and must not reach a
//! gradient. Also: bitwise repeatability, and bitwise equality with the dense backward when the
//! layout keeps every block.

use super::attention::{err, poison_keys, upload_4d};
use super::{expect_close, random_values, CheckResult};
use crate::dtype::DType;
use crate::gpu::{DeviceTensor, Gpu};
use crate::ops::attention::{self as attn, Kernel, Sequences};
use crate::ops::attention_backward::{self as bwd, Mode};
use crate::ops::sparse_attention::{self as sparse, DeviceBlockLayout};
use crate::reference::attention::{self as reference, Shape};
use crate::reference::attention_backward as ref_bwd;
use crate::sparse::BlockLayout;
use crate::tolerance::attention_backward as tolerances;
use rand::SeedableRng;
use std::sync::Arc;

/// One block-sparse backward check.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub shape: Shape,
    pub layout: BlockLayout,
    /// Valid keys per sequence (key padding).
    pub key_lens: Option<Vec<i32>>,
    /// Lay Q, K, V, dO out as BSHD in memory (read through strides).
    pub bshd: bool,
    pub kernel: Kernel,
    pub mode: Mode,
    pub seed: u64,
}

impl Case {
    fn ref_opts(&self) -> reference::Options {
        reference::Options {
            key_lens: self
                .key_lens
                .as_ref()
                .map(|x| x.iter().map(|&n| n.max(0) as usize).collect()),
            ..reference::Options::new(self.shape.dim_qk)
        }
    }

    fn describe(&self) -> String {
        let l = &self.layout;
        format!(
            "{} {:?} block {} kept {}/{} key_lens {:?} bshd {} {:?} {:?} seed {}",
            self.dtype,
            self.shape,
            l.block_size(),
            l.kept_blocks(),
            l.q_blocks() * l.k_blocks() * l.heads().stored(),
            self.key_lens,
            self.bshd,
            self.kernel,
            self.mode,
            self.seed
        )
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    qd: DeviceTensor,
    kd: DeviceTensor,
    vd: DeviceTensor,
    dod: DeviceTensor,
    layout: DeviceBlockLayout,
}

impl Inputs {
    fn new(gpu: &Arc<Gpu>, c: &Case) -> CheckResult<Inputs> {
        let s = c.shape;
        let l = &c.layout;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(c.seed);
        let q = random_values(&mut rng, c.dtype, s.q_len(), 0.0, 2.0);
        let mut k = random_values(&mut rng, c.dtype, s.k_len(), 0.0, 2.0);
        let mut v = random_values(&mut rng, c.dtype, s.v_len(), 0.0, 1.0);
        let d_o = random_values(&mut rng, c.dtype, s.o_len(), 0.0, 1.0);
        let unkept: Vec<bool> = (0..s.len_k)
            .map(|j| !(0..l.heads().stored()).any(|h| (0..s.len_q).any(|i| l.admits(h, i, j))))
            .collect();
        let key_len = |b: usize| {
            c.key_lens
                .as_ref()
                .map_or(s.len_k, |x| x[b].max(0) as usize)
        };
        poison_keys(&mut k, &mut v, &s, |b, j| unkept[j] || j >= key_len(b));
        let up = |dims, x: &[f32]| upload_4d(gpu, c.dtype, dims, c.bshd, Some(x), 0.0);
        Ok(Inputs {
            qd: up([s.batch, s.heads_q, s.len_q, s.dim_qk], &q)?,
            kd: up([s.batch, s.heads_kv, s.len_k, s.dim_qk], &k)?,
            vd: up([s.batch, s.heads_kv, s.len_k, s.dim_v], &v)?,
            dod: up([s.batch, s.heads_q, s.len_q, s.dim_v], &d_o)?,
            layout: DeviceBlockLayout::upload(gpu, l).map_err(err)?,
            q,
            k,
            v,
            d_o,
        })
    }

    fn opts<'s>(&'s self, c: &'s Case) -> attn::Options<'s> {
        attn::Options {
            kernel: c.kernel,
            sequences: Sequences::Dense {
                key_lens: c.key_lens.as_deref(),
            },
            ..attn::Options::default()
        }
    }

    /// The sparse forward (O, LSE), then the sparse backward, or with `dense` the dense
    /// backward on the same O and LSE; dQ, dK, dV read back (f32, BHSD).
    fn grads(&self, gpu: &Arc<Gpu>, c: &Case, dense: bool) -> CheckResult<[Vec<f32>; 3]> {
        let opts = self.opts(c);
        let fwd_opts = attn::Options {
            kernel: forward_kernel(c),
            ..opts
        };
        let (o, lse) = sparse::forward(&self.qd, &self.kd, &self.vd, &self.layout, &fwd_opts)
            .map_err(|e| format!("forward: {e} for {}", c.describe()))?;
        let poisoned = |t: &DeviceTensor| gpu.full(t.dtype(), t.shape(), f32::NAN).map_err(err);
        let (mut dq, mut dk, mut dv) = (
            poisoned(&self.qd)?,
            poisoned(&self.kd)?,
            poisoned(&self.vd)?,
        );
        let bopts = bwd::Options {
            forward: opts,
            mode: c.mode,
        };
        let (q, k, v, d_o) = (
            self.qd.view(),
            self.kd.view(),
            self.vd.view(),
            self.dod.view(),
        );
        let (ov, lv) = (o.view(), lse.view());
        let (mut dqv, mut dkv, mut dvv) = (dq.view_mut(), dk.view_mut(), dv.view_mut());
        let r = if dense {
            bwd::backward_into(
                gpu, &q, &k, &v, &ov, &lv, &d_o, &mut dqv, &mut dkv, &mut dvv, &bopts,
            )
        } else {
            sparse::backward_into(
                gpu,
                &q,
                &k,
                &v,
                &ov,
                &lv,
                &d_o,
                &mut dqv,
                &mut dkv,
                &mut dvv,
                &self.layout,
                &bopts,
            )
        };
        r.map_err(|e| format!("backward: {e} for {}", c.describe()))?;
        Ok([
            dq.to_f32_vec().map_err(err)?,
            dk.to_f32_vec().map_err(err)?,
            dv.to_f32_vec().map_err(err)?,
        ])
    }
}

/// The forward's kernel for the case: the case's own, unless the forward's tensor cores do not
/// take the layout's block size (they take 64, and 128 up to head dim 128), where the exact
/// forward gives O and LSE (the backward under test still runs with the case's kernel).
fn forward_kernel(c: &Case) -> Kernel {
    let bs = c.layout.block_size();
    let tc_takes = bs == 64 || (bs == 128 && c.shape.dim_qk.max(c.shape.dim_v) <= 128);
    if tc_takes || c.kernel == Kernel::Exact {
        c.kernel
    } else {
        Kernel::Exact
    }
}

/// Runs the case and checks dQ, dK, dV against the reference under the layout's mask.
pub fn backward(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let x = Inputs::new(gpu, c)?;
    let got = x.grads(gpu, c, false)?;
    let s = c.shape;
    let ro = c.ref_opts();
    let l = &c.layout;
    let keep = |_b: usize, h: usize, i: usize, j: usize| l.admits(l.head_of(h), i, j);
    let want = ref_bwd::backward_masked(&x.q, &x.k, &x.v, &x.d_o, &s, &ro, &keep);
    let tol = tolerances::bounds(&x.q, &x.k, &x.v, &x.d_o, &s, &ro, &keep, c.dtype);
    let ctx = |what: &str| format!("sparse {what} for {}", c.describe());
    expect_close(&ctx("dQ"), &got[0], &want.dq, tol.dq)?;
    expect_close(&ctx("dK"), &got[1], &want.dk, tol.dk)?;
    expect_close(&ctx("dV"), &got[2], &want.dv, tol.dv)
}

fn first_difference(a: &[Vec<f32>; 3], b: &[Vec<f32>; 3]) -> Option<String> {
    for (name, (a, b)) in ["dQ", "dK", "dV"].iter().zip(a.iter().zip(b)) {
        if let Some(i) = a
            .iter()
            .zip(b)
            .position(|(x, y)| x.to_bits() != y.to_bits())
        {
            return Some(format!("{name}[{i}]: {} vs {}", a[i], b[i]));
        }
    }
    None
}

/// `runs` sparse backward calls on the same inputs give bit-identical dQ, dK, dV.
pub fn bitwise_repeatable(gpu: &Arc<Gpu>, c: &Case, runs: usize) -> CheckResult {
    let x = Inputs::new(gpu, c)?;
    let first = x.grads(gpu, c, false)?;
    for run in 1..runs {
        if let Some(d) = first_difference(&first, &x.grads(gpu, c, false)?) {
            return Err(format!("run {run}: {d} for {}", c.describe()));
        }
    }
    Ok(())
}

/// `Kernel::Auto` runs the case (f16/bf16; its own kernel and mode are ignored: deterministic
/// mode) on the tensor cores: its gradients equal `Kernel::TensorCore`'s bit for bit, and the
/// exact kernels' differ from them somewhere (so the comparison can tell the two apart).
pub fn auto_picks_tensor_cores(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let with = |kernel| Case {
        kernel,
        mode: Mode::Deterministic,
        ..c.clone()
    };
    let x = Inputs::new(gpu, c)?;
    let auto = x.grads(gpu, &with(Kernel::Auto), false)?;
    let tc = x.grads(gpu, &with(Kernel::TensorCore), false)?;
    if let Some(d) = first_difference(&auto, &tc) {
        return Err(format!("Auto vs TensorCore: {d} for {}", c.describe()));
    }
    let exact = x.grads(gpu, &with(Kernel::Exact), false)?;
    if first_difference(&exact, &tc).is_none() {
        return Err(format!(
            "the exact kernels gave the tensor cores' bits: cannot tell which ran for {}",
            c.describe()
        ));
    }
    Ok(())
}

/// The case's layout must keep every block: the sparse backward then gives the dense
/// backward's gradients bit for bit (same tiles, same order; deterministic mode).
pub fn equals_dense_bitwise(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    if c.layout.density() != 1.0 {
        return Err(format!(
            "the layout must keep every block: {}",
            c.describe()
        ));
    }
    let x = Inputs::new(gpu, c)?;
    let sparse = x.grads(gpu, c, false)?;
    let dense = x.grads(gpu, c, true)?;
    match first_difference(&sparse, &dense) {
        Some(d) => Err(format!("sparse vs dense: {d} for {}", c.describe())),
        None => Ok(()),
    }
}

/// The fixed list `cuattn check` runs: a causal BigBird layout per head (f16, tensor cores,
/// deterministic), a sliding window with key padding (bf16, fast mode), a bitmask layout
/// from an element predicate in blocks of 32 (f32, exact kernels), and one in blocks of 16 at
/// head dim 200 (bf16, tensor cores: re-blocked to 64, HD 256 column split).
pub fn standard_cases() -> crate::Result<Vec<(String, Case)>> {
    use crate::sparse::{BigBird, LayoutHeads};
    let bigbird = BlockLayout::bigbird(
        300,
        64,
        LayoutHeads::PerHead(4),
        BigBird {
            global_blocks: 1,
            window_radius: 1,
            random_blocks: 1,
            seed: 5,
        },
        true,
    )?;
    let window = BlockLayout::sliding_window(260, 64, 40, 0, true)?;
    let predicate = BlockLayout::from_predicate(100, 130, 32, |i, j| (i + 2 * j) % 5 != 0)?;
    let fine =
        BlockLayout::from_predicate(150, 150, 16, |i, j| j <= i && (i / 16 + j / 16) % 3 != 1)?;
    Ok(vec![
        (
            "f16 bigbird causal 300 d64 gqa".into(),
            Case {
                dtype: DType::F16,
                shape: Shape::new(2, 4, 2, 300, 300, 64, 64),
                layout: bigbird,
                key_lens: None,
                bshd: false,
                kernel: Kernel::Auto,
                mode: Mode::Deterministic,
                seed: 1,
            },
        ),
        (
            "bf16 window 40 causal 260 d128 padded [fast]".into(),
            Case {
                dtype: DType::BF16,
                shape: Shape::new(2, 2, 2, 260, 260, 128, 128),
                layout: window,
                key_lens: Some(vec![260, 101]),
                bshd: false,
                kernel: Kernel::Auto,
                mode: Mode::Fast,
                seed: 2,
            },
        ),
        (
            "f32 predicate bitmask 100x130 blocks of 32 d72".into(),
            Case {
                dtype: DType::F32,
                shape: Shape::new(1, 2, 1, 100, 130, 72, 72),
                layout: predicate,
                key_lens: None,
                bshd: true,
                kernel: Kernel::Auto,
                mode: Mode::Deterministic,
                seed: 3,
            },
        ),
        (
            "bf16 causal predicate blocks of 16 150 d200 [tensor cores, fast]".into(),
            Case {
                dtype: DType::BF16,
                shape: Shape::new(1, 4, 2, 150, 150, 200, 200),
                layout: fine,
                key_lens: None,
                bshd: false,
                kernel: Kernel::TensorCore,
                mode: Mode::Fast,
                seed: 4,
            },
        ),
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_standard_cases_build_and_fit_their_shapes() {
        let cases = super::standard_cases().unwrap();
        assert_eq!(cases.len(), 4);
        for (name, c) in cases {
            c.layout
                .check_call(&c.shape, c.layout.block_size())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(c.layout.kept_blocks() > 0, "{name}");
        }
    }
}
