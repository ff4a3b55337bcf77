//! The `torch.optim.AdamW` fixture with gradients that are None in some steps
//! (`tests/fixtures/adamw-no-grad.json`, `scripts/make_fixtures.py --only adamw-no-grad`),
//! replayed through our `AdamW` on any training backend; shared by the CPU test
//! (`tests/train_adamw_no_grad.rs`) and the GPU test (`tests/gpu/main.rs`).

use crate::fixture_files::{floats, json};
use cuattn::runtime::train::{AdamW, AdamWConfig, Gradients, Param, TrainBackend};
use cuattn::DType;

/// What one replay gives, per step: every parameter's values and our per-parameter step counts.
pub struct Replay {
    pub params: Vec<Vec<Vec<f32>>>,
    pub param_steps: Vec<Vec<u64>>,
}

/// The fixture's parameters after each step and torch's `state["step"]` (0: no state yet).
pub struct Torch {
    pub params: Vec<Vec<Vec<f64>>>,
    pub steps: Vec<Vec<u64>>,
    pub lr: f64,
}

pub fn torch() -> Torch {
    let f = json("tests/fixtures/adamw-no-grad.json");
    let steps = f["steps"].as_array().unwrap();
    Torch {
        params: steps
            .iter()
            .map(|s| s["params"].as_array().unwrap().iter().map(floats).collect())
            .collect(),
        steps: steps
            .iter()
            .map(|s| {
                s["torch_steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect()
            })
            .collect(),
        lr: f["lr"].as_f64().unwrap(),
    }
}

/// Our AdamW over the fixture's steps on `be`. A None gradient is a zero tensor, listed in
/// `Gradients::no_grad` when `mark_missing` (torch's semantics); without it, the zero gradient
/// is an ordinary one (what our optimizer did before it knew of missing gradients).
pub fn replay<B: TrainBackend>(be: &B, mark_missing: bool) -> Replay {
    let f = json("tests/fixtures/adamw-no-grad.json");
    let shapes: Vec<Vec<usize>> = f["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let decay: Vec<bool> = f["decay"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_bool().unwrap())
        .collect();
    let f32s = |v: &serde_json::Value| floats(v).iter().map(|&x| x as f32).collect::<Vec<_>>();
    let starts = f["start"].as_array().unwrap();
    let mut params: Vec<Param<B::Tensor>> = (0..shapes.len())
        .map(|i| Param {
            name: format!("p{i}"),
            value: be
                .upload_as(&shapes[i], &f32s(&starts[i]), DType::F32)
                .unwrap(),
            decay: decay[i],
        })
        .collect();
    let num = |k: &str| f[k].as_f64().unwrap() as f32;
    let cfg = AdamWConfig {
        lr: num("lr"),
        beta1: num("beta1"),
        beta2: num("beta2"),
        eps: num("eps"),
        weight_decay: num("weight_decay"),
    };
    let mut opt = AdamW::new(be, &params, cfg).unwrap();
    let mut out = Replay {
        params: Vec::new(),
        param_steps: Vec::new(),
    };
    for step in f["steps"].as_array().unwrap() {
        let mut no_grad = Vec::new();
        let tensors = step["grads"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let n: usize = shapes[i].iter().product();
                let values = if g.is_null() {
                    no_grad.push(i);
                    vec![0.0; n]
                } else {
                    f32s(g)
                };
                be.upload_as(&shapes[i], &values, DType::F32).unwrap()
            })
            .collect();
        let grads = Gradients {
            names: params.iter().map(|p| p.name.clone()).collect(),
            tensors,
            no_grad: if mark_missing { no_grad } else { Vec::new() },
        };
        opt.step(be, &mut params, &grads, cfg.lr).unwrap();
        out.params.push(
            params
                .iter()
                .map(|p| be.to_f32(&p.value).unwrap())
                .collect(),
        );
        out.param_steps.push(opt.param_steps().to_vec());
    }
    out
}

/// The largest |ours − torch| over every element of every step, relative to the bound of one
/// element (`bound(torch value, step)`), with where it is.
pub fn worst(ours: &Replay, torch: &Torch, bound: impl Fn(f64, usize) -> f64) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for (s, (got, want)) in ours.params.iter().zip(&torch.params).enumerate() {
        for (p, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.len(), w.len());
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                let r = (g as f64 - w).abs() / bound(w, s + 1);
                // NaN never passes.
                let r = if r.is_nan() { f64::INFINITY } else { r };
                if r > worst.0 {
                    worst = (
                        r,
                        format!("step {} param {p}[{i}]: ours {g}, torch {w}", s + 1),
                    );
                }
            }
        }
    }
    worst
}
