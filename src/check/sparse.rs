//! Block-sparse attention ([`crate::ops::sparse_attention`]) against the f64 reference with the
//! layout's expanded element mask ([`reference::forward_masked`]), under the dense tolerance
//! rule. Outputs are poisoned with NaN before the launch; K/V rows past a sequence's key length,
//! and rows of keys that no query of any head keeps, are NaN and must not reach the output.

use super::attention::{err, expect_o_and_lse, poison_keys, upload_4d};
use super::{random_values, CheckResult};
use crate::dtype::DType;
use crate::gpu::{DeviceTensor, Gpu};
use crate::ops::attention::{Kernel, Options, Sequences};
use crate::ops::sparse_attention::{self as sparse, DeviceBlockLayout};
use crate::reference::attention::{self as reference, Shape};
use crate::sparse::BlockLayout;
use crate::tolerance::attention as tolerances;
use rand::SeedableRng;
use std::sync::Arc;

/// One block-sparse check.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub shape: Shape,
    pub layout: BlockLayout,
    /// Valid keys per sequence (key padding).
    pub key_lens: Option<Vec<i32>>,
    /// Lay Q, K, V and O out as BSHD in memory (read through strides).
    pub bshd: bool,
    /// `Auto` for the usual path (tensor cores for f16/bf16, every block size).
    pub kernel: Kernel,
    pub seed: u64,
}

impl Case {
    fn describe(&self) -> String {
        let (s, l) = (&self.shape, &self.layout);
        format!(
            "{} {:?} {s:?} block {} kept {}/{} key_lens {:?} bshd {} seed {}",
            self.dtype,
            self.kernel,
            l.block_size(),
            l.kept_blocks(),
            l.q_blocks() * l.k_blocks() * l.heads().stored(),
            self.key_lens,
            self.bshd,
            self.seed
        )
    }
}

/// One launch of a case: its host inputs (BHSD, K/V poisoned) and the O and LSE it wrote.
struct Ran {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: DeviceTensor,
    lse: DeviceTensor,
}

/// Uploads the case's inputs (drawn from its seed: every launch of a case sees the same),
/// NaN-poisoned outputs, and runs the sparse forward with the case's kernel.
fn launch(gpu: &Arc<Gpu>, c: &Case) -> CheckResult<Ran> {
    let s = c.shape;
    let l = &c.layout;
    let ctx = |what: &str| format!("sparse {what} for {}", c.describe());
    let mut rng = rand::rngs::SmallRng::seed_from_u64(c.seed);
    let q = random_values(&mut rng, c.dtype, s.q_len(), 0.0, 2.0);
    let mut k = random_values(&mut rng, c.dtype, s.k_len(), 0.0, 2.0);
    let mut v = random_values(&mut rng, c.dtype, s.v_len(), 0.0, 1.0);
    let unkept: Vec<bool> = (0..s.len_k)
        .map(|j| !(0..l.heads().stored()).any(|h| (0..s.len_q).any(|i| l.admits(h, i, j))))
        .collect();
    let key_len = |b: usize| {
        c.key_lens
            .as_ref()
            .map_or(s.len_k, |x| x[b].max(0) as usize)
    };
    poison_keys(&mut k, &mut v, &s, |b, j| unkept[j] || j >= key_len(b));
    let up = |dims, x: Option<&[f32]>, fill| upload_4d(gpu, c.dtype, dims, c.bshd, x, fill);
    let qd = up([s.batch, s.heads_q, s.len_q, s.dim_qk], Some(&q), 0.0)?;
    let kd = up([s.batch, s.heads_kv, s.len_k, s.dim_qk], Some(&k), 0.0)?;
    let vd = up([s.batch, s.heads_kv, s.len_k, s.dim_v], Some(&v), 0.0)?;
    let mut od = up([s.batch, s.heads_q, s.len_q, s.dim_v], None, f32::NAN)?;
    let mut lse = gpu
        .full(DType::F32, &[s.batch, s.heads_q, s.len_q], f32::NAN)
        .map_err(err)?;
    let dl = DeviceBlockLayout::upload(gpu, l).map_err(|e| ctx(&e.to_string()))?;
    let opts = Options {
        kernel: c.kernel,
        sequences: Sequences::Dense {
            key_lens: c.key_lens.as_deref(),
        },
        ..Options::default()
    };
    sparse::forward_into(
        gpu,
        &qd.view(),
        &kd.view(),
        &vd.view(),
        &mut od.view_mut(),
        Some(&mut lse.view_mut()),
        &dl,
        &opts,
    )
    .map_err(|e| ctx(&e.to_string()))?;
    Ok(Ran {
        q,
        k,
        v,
        o: od,
        lse,
    })
}

/// Runs the case and checks O and LSE.
pub fn forward(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let s = c.shape;
    let l = &c.layout;
    let ctx = |what: &str| format!("sparse {what} for {}", c.describe());
    let Ran { q, k, v, o, lse } = launch(gpu, c)?;
    let ropts = reference::Options {
        key_lens: c
            .key_lens
            .as_ref()
            .map(|x| x.iter().map(|&n| n.max(0) as usize).collect()),
        ..reference::Options::new(s.dim_qk)
    };
    let keep = |_b: usize, h: usize, i: usize, j: usize| l.admits(l.head_of(h), i, j);
    let want =
        reference::forward_masked(&q, &k, &v, &s, &ropts, &keep).map_err(|e| e.to_string())?;
    let tol = tolerances::bounds(&q, &k, &v, &s, ropts.scale, c.dtype);
    expect_o_and_lse(&ctx, (&o, &lse), &want, &tol)
}

/// `Kernel::Auto` runs the case (f16/bf16; its own kernel is ignored) on the tensor cores: its
/// O and LSE equal `Kernel::TensorCore`'s bit for bit, and the exact kernel's differ from them
/// somewhere (so the comparison can tell the two apart).
pub fn auto_picks_tensor_cores(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let bits = |kernel| -> CheckResult<Vec<u32>> {
        let r = launch(
            gpu,
            &Case {
                kernel,
                ..c.clone()
            },
        )?;
        let mut b: Vec<u32> =
            r.o.to_f32_vec()
                .map_err(err)?
                .iter()
                .map(|x| x.to_bits())
                .collect();
        b.extend(r.lse.to_f32_vec().map_err(err)?.iter().map(|x| x.to_bits()));
        Ok(b)
    };
    let (auto, tc) = (bits(Kernel::Auto)?, bits(Kernel::TensorCore)?);
    if let Some(i) = auto.iter().zip(&tc).position(|(a, t)| a != t) {
        return Err(format!(
            "Auto vs TensorCore differ at output {i}: {} vs {} for {}",
            f32::from_bits(auto[i]),
            f32::from_bits(tc[i]),
            c.describe()
        ));
    }
    if bits(Kernel::Exact)? == tc {
        return Err(format!(
            "the exact kernel gave the tensor cores' bits: cannot tell which ran for {}",
            c.describe()
        ));
    }
    Ok(())
}

/// The fixed list `cuattn check` runs: a causal BigBird layout (f16, blocks of 64), a sliding
/// window with key padding (bf16, blocks of 128), a bitmask layout from an element predicate
/// (f32, exact kernel), and two the tensor cores run re-blocked to 64: a strided layout in
/// blocks of 16 (f16, D 128 ≠ Dv 64, key padding) and a causal window in blocks of 128 at head
/// dim 256 (bf16, `Kernel::TensorCore`).
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
    let window = BlockLayout::sliding_window(260, 128, 40, 0, true)?;
    let predicate = BlockLayout::from_predicate(100, 130, 64, |i, j| (i + 2 * j) % 5 != 0)?;
    let strided16 = BlockLayout::strided(200, 16, 2, 3, true)?;
    let window128 = BlockLayout::sliding_window(300, 128, 100, 0, true)?;
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
                seed: 1,
            },
        ),
        (
            "bf16 window 40 causal 260 d128 padded".into(),
            Case {
                dtype: DType::BF16,
                shape: Shape::new(2, 2, 2, 260, 260, 128, 128),
                layout: window,
                key_lens: Some(vec![260, 101]),
                bshd: false,
                kernel: Kernel::Auto,
                seed: 2,
            },
        ),
        (
            "f32 predicate bitmask 100x130 d72".into(),
            Case {
                dtype: DType::F32,
                shape: Shape::new(1, 2, 1, 100, 130, 72, 72),
                layout: predicate,
                key_lens: None,
                bshd: true,
                kernel: Kernel::Auto,
                seed: 3,
            },
        ),
        (
            "f16 strided blocks of 16 causal 200 d128/64 padded".into(),
            Case {
                dtype: DType::F16,
                shape: Shape::new(2, 2, 1, 200, 200, 128, 64),
                layout: strided16,
                key_lens: Some(vec![200, 77]),
                bshd: false,
                kernel: Kernel::Auto,
                seed: 4,
            },
        ),
        (
            "bf16 window 100 causal blocks of 128 300 d256 tensor cores".into(),
            Case {
                dtype: DType::BF16,
                shape: Shape::new(1, 2, 2, 300, 300, 256, 256),
                layout: window128,
                key_lens: None,
                bshd: true,
                kernel: Kernel::TensorCore,
                seed: 5,
            },
        ),
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_standard_cases_build_and_fit_their_shapes() {
        let cases = super::standard_cases().unwrap();
        assert_eq!(cases.len(), 5);
        for (name, c) in cases {
            c.layout
                .check_call(&c.shape, c.layout.block_size())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(c.layout.kept_blocks() > 0, "{name}");
        }
    }
}
