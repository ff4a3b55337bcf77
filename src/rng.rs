//! Counter-based random numbers shared by the CPU and the GPU: Philox4x32-10 (Salmon et al.,
//! "Parallel random numbers: as easy as 1, 2, 3", SC 2011) and the dropout mask built on it.
//!
//! A counter-based generator has no state to carry between calls: the random word for element
//! `i` is a pure function of (seed, offset, i). The dropout kernel (`kernels/training_ops.cu`,
//! with the device Philox in `kernels/philox.cuh`) and this file compute the same function, so
//! the CPU backend, the GPU forward and the GPU backward all see bit-identical masks, and the
//! backward regenerates the mask instead of reading a stored one.
//!
//! Stream layout (the contract both sides implement):
//! - key = (seed low 32 bits, seed high 32 bits);
//! - counter = (block low, block high, offset low, offset high) with block = i / 4;
//! - element `i` takes word `i % 4` of Philox4x32-10(counter, key).
//!
//! So each (seed, offset) pair is its own stream of 2^66 words: a trainer keeps one seed and
//! gives every dropout site of every step a distinct offset (e.g. `step · sites + site`).
//! Element indices are logical row-major indices of the tensor, not memory offsets.
//!
//! Dropout with probability `p` keeps element `i` when `word(i) ≥ round(p · 2^32)` (an exact
//! integer comparison, no float rounding to disagree on), and scales kept elements by
//! `1 / (1 − p)` computed once in f32 ([`Dropout::scale`]).

use crate::error::{Error, Result};

/// Philox4x32 round multipliers.
pub const PHILOX_M0: u32 = 0xD251_1F53;
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Philox4x32 key schedule increments (the golden ratio and √3 − 1, as 32-bit fractions).
pub const PHILOX_W0: u32 = 0x9E37_79B9;
pub const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: 4 random 32-bit words for one (counter, key).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = (PHILOX_M0 as u64) * (c[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four words of the Philox block holding elements `4·block .. 4·block + 3` of the stream
/// (seed, offset).
pub fn philox_block(seed: u64, offset: u64, block: u64) -> [u32; 4] {
    philox4x32_10(
        [
            block as u32,
            (block >> 32) as u32,
            offset as u32,
            (offset >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The random word of element `index` in the stream (seed, offset).
pub fn random_word(seed: u64, offset: u64, index: u64) -> u32 {
    philox_block(seed, offset, index / 4)[(index % 4) as usize]
}

/// A dropout probability turned into what the kernels use: an integer keep threshold and the
/// f32 scale of kept elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    p: f32,
    threshold: u64,
    scale: f32,
}

impl Dropout {
    /// Dropout with drop probability `p` in [0, 1]. `p = 1` drops everything (scale 0).
    pub fn new(p: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "p",
                format!("dropout probability must be in [0, 1], got {p}"),
            ));
        }
        let threshold = (p as f64 * 4_294_967_296.0).round() as u64;
        let scale = if p < 1.0 {
            (1.0 / (1.0 - p as f64)) as f32
        } else {
            0.0
        };
        Ok(Dropout {
            p,
            threshold,
            scale,
        })
    }

    pub fn p(&self) -> f32 {
        self.p
    }
    /// Elements whose word is below this are dropped (0 ..= 2^32).
    pub fn threshold(&self) -> u64 {
        self.threshold
    }
    /// 1/(1−p) in f32 (0 when p = 1): the factor on every kept element.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether element `index` of stream (seed, offset) is kept.
    pub fn keeps(&self, seed: u64, offset: u64, index: u64) -> bool {
        random_word(seed, offset, index) as u64 >= self.threshold
    }

    /// `out[i] = keep(i) ? x[i] · scale : 0` in f32, for the elements with logical indices
    /// `first_index ..`: the CPU twin of the dropout kernel, bit for bit on f32 tensors (for
    /// f16/bf16 the kernel rounds the same f32 product once to the storage type). Serves the
    /// forward (x → y) and the backward (dy → dx) alike: both use the same mask.
    pub fn apply(&self, seed: u64, offset: u64, first_index: u64, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len(), "dropout: x and out lengths differ");
        let mut block_words = [0u32; 4];
        let mut cached_block = u64::MAX;
        for (k, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let index = first_index + k as u64;
            if index / 4 != cached_block {
                cached_block = index / 4;
                block_words = philox_block(seed, offset, cached_block);
            }
            let keep = block_words[(index % 4) as usize] as u64 >= self.threshold;
            *o = if keep { v * self.scale } else { 0.0 };
        }
    }

    /// In-place form of [`Dropout::apply`].
    pub fn apply_in_place(&self, seed: u64, offset: u64, first_index: u64, x: &mut [f32]) {
        let mut block_words = [0u32; 4];
        let mut cached_block = u64::MAX;
        for (k, v) in x.iter_mut().enumerate() {
            let index = first_index + k as u64;
            if index / 4 != cached_block {
                cached_block = index / 4;
                block_words = philox_block(seed, offset, cached_block);
            }
            let keep = block_words[(index % 4) as usize] as u64 >= self.threshold;
            *v = if keep { *v * self.scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    #[test]
    fn philox4x32_10_matches_the_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn stream_words_follow_the_documented_counter_layout() {
        let (seed, offset) = (0x0123_4567_89ab_cdefu64, 0xfedc_ba98_7654_3210u64);
        let block = philox4x32_10([5, 0, 0x7654_3210, 0xfedc_ba98], [0x89ab_cdef, 0x0123_4567]);
        for w in 0..4 {
            assert_eq!(random_word(seed, offset, 20 + w), block[w as usize]);
        }
        // Offsets and seeds give different streams.
        assert_ne!(
            random_word(seed, offset, 0),
            random_word(seed, offset + 1, 0)
        );
        assert_ne!(
            random_word(seed, offset, 0),
            random_word(seed + 1, offset, 0)
        );
    }

    #[test]
    fn dropout_rejects_probabilities_outside_0_1() {
        for p in [-0.1f32, 1.5, f32::NAN] {
            assert!(matches!(
                Dropout::new(p),
                Err(Error::InvalidArgument { arg: "p", .. })
            ));
        }
    }

    #[test]
    fn dropout_keeps_about_1_minus_p_and_rescales_by_its_inverse() {
        let n = 200_000usize;
        for p in [0.1f32, 0.5, 0.9] {
            let d = Dropout::new(p).unwrap();
            let x = vec![1.0f32; n];
            let mut y = vec![f32::NAN; n];
            d.apply(7, 3, 0, &x, &mut y);
            let kept = y.iter().filter(|&&v| v != 0.0).count();
            // Binomial: 6 standard deviations.
            let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
            assert!((kept as f64 - n as f64 * (1.0 - p as f64)).abs() < 6.0 * sd);
            for &v in &y {
                assert!(v == 0.0 || v == (1.0 / (1.0 - p as f64)) as f32, "{v}");
            }
            // The rescale keeps the expectation: the mean of y is 1 within sampling error.
            let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((mean - 1.0).abs() < 6.0 * sd / n as f64 / (1.0 - p as f64));
        }
    }

    #[test]
    fn dropout_edges_keep_all_at_p0_and_drop_all_at_p1() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32 - 500.0).collect();
        let mut y = vec![f32::NAN; x.len()];
        Dropout::new(0.0).unwrap().apply(1, 2, 0, &x, &mut y);
        assert_eq!(x, y);
        Dropout::new(1.0).unwrap().apply(1, 2, 0, &x, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn dropout_mask_is_a_function_of_the_element_index_only() {
        // Applying to a slice starting at `first_index` equals the same elements of the whole.
        let d = Dropout::new(0.3).unwrap();
        let x: Vec<f32> = (0..103).map(|i| (i as f32).sin()).collect();
        let mut whole = vec![0.0; x.len()];
        d.apply(11, 12, 0, &x, &mut whole);
        let mut part = vec![0.0; 50];
        d.apply(11, 12, 37, &x[37..87], &mut part);
        assert_eq!(&whole[37..87], &part[..]);
        let mut inplace = x.clone();
        d.apply_in_place(11, 12, 0, &mut inplace);
        assert_eq!(whole, inplace);
    }
}
