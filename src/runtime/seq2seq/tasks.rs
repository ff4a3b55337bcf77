//! Generated digit tasks with a held-out test set.
//!
//! - `reverse`: 1–12 digits → the same digits reversed.
//! - `sort`: 1–12 digits → the digits in ascending order.
//! - `add`: two numbers of 1–5 digits (no leading zeros) as `a + b` → the digits of the sum.
//!
//! Held out by content, not by draw: a source whose FNV-1a hash is 0 mod 10 belongs to the
//! test split, every other one to the training split, so no test source is ever trained on
//! (while every length, even 1, keeps training examples). Sampling draws an example from the
//! task's distribution and redraws until it falls in the wanted split.

use super::{EOS, PAD};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The `+` of the addition task.
pub const PLUS: u32 = 3;
/// PAD, BOS, EOS, `+` and the ten digits.
pub const VOCAB: usize = 14;

/// Token of digit `d`.
pub fn digit(d: u32) -> u32 {
    4 + d
}

/// Text of a token sequence (digits, `+`; the specials as `<pad>`, `<s>`, `</s>`).
pub fn render(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(|&t| match t {
            PAD => "<pad>".to_string(),
            EOS => "</s>".to_string(),
            PLUS => "+".to_string(),
            t if (4..14).contains(&t) => (t - 4).to_string(),
            _ => "<s>".to_string(),
        })
        .collect::<Vec<_>>()
        .join("")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Reverse,
    Sort,
    Add,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Reverse => "reverse",
            Task::Sort => "sort",
            Task::Add => "add",
        }
    }

    /// The longest target (without EOS) the task produces.
    pub fn max_target_len(self) -> usize {
        match self {
            Task::Reverse | Task::Sort => MAX_LEN,
            Task::Add => MAX_ADD_DIGITS + 1,
        }
    }

    /// The target of a source.
    pub fn target(self, src: &[u32]) -> Vec<u32> {
        match self {
            Task::Reverse => src.iter().rev().copied().collect(),
            Task::Sort => {
                let mut t = src.to_vec();
                t.sort_unstable();
                t
            }
            Task::Add => {
                let value = |ds: &[u32]| ds.iter().fold(0u64, |a, &t| a * 10 + (t - 4) as u64);
                let split = src.iter().position(|&t| t == PLUS).unwrap_or(src.len());
                let sum = value(&src[..split]) + value(src.get(split + 1..).unwrap_or(&[]));
                number(sum)
            }
        }
    }
}

/// Longest source of `reverse` and `sort`.
pub const MAX_LEN: usize = 12;
/// Most digits of each addend.
pub const MAX_ADD_DIGITS: usize = 5;

fn number(mut n: u64) -> Vec<u32> {
    let mut ds = vec![digit((n % 10) as u32)];
    n /= 10;
    while n > 0 {
        ds.push(digit((n % 10) as u32));
        n /= 10;
    }
    ds.reverse();
    ds
}

/// FNV-1a over the tokens.
fn fnv1a(tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in tokens {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Whether a source belongs to the held-out test split.
pub fn is_test(src: &[u32]) -> bool {
    fnv1a(src).is_multiple_of(10)
}

/// One example: source and target tokens (no BOS/EOS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub src: Vec<u32>,
    pub tgt: Vec<u32>,
}

/// Draws examples of one task and split from a seeded generator.
pub struct Sampler {
    pub task: Task,
    test: bool,
    rng: SmallRng,
}

impl Sampler {
    /// Training examples (`test: false`) or held-out ones.
    pub fn new(task: Task, test: bool, seed: u64) -> Self {
        Sampler {
            task,
            test,
            rng: SmallRng::seed_from_u64(seed ^ if test { 0x7e57 } else { 0 }),
        }
    }

    fn draw(&mut self) -> Vec<u32> {
        let r = &mut self.rng;
        match self.task {
            Task::Reverse | Task::Sort => {
                let len = r.gen_range(1..=MAX_LEN);
                (0..len).map(|_| digit(r.gen_range(0..10))).collect()
            }
            Task::Add => {
                let operand = |r: &mut SmallRng| {
                    let n = r.gen_range(1..=MAX_ADD_DIGITS);
                    let lo = if n == 1 { 0 } else { 10u64.pow(n as u32 - 1) };
                    number(r.gen_range(lo..10u64.pow(n as u32)))
                };
                let mut s = operand(r);
                s.push(PLUS);
                s.extend(operand(r));
                s
            }
        }
    }

    /// The next example of the split.
    pub fn sample(&mut self) -> Example {
        loop {
            let src = self.draw();
            if is_test(&src) == self.test {
                let tgt = self.task.target(&src);
                return Example { src, tgt };
            }
        }
    }

    pub fn batch(&mut self, n: usize) -> Vec<Example> {
        (0..n).map(|_| self.sample()).collect()
    }
}
