//! Properties of BART's noising transforms (cuattn::data::noise) on random token sequences.

use cuattn::data::noise::{
    delete_tokens, infill, mask_tokens, permute_sentences, rotate, split_sentences, words,
    NoiseOptions,
};
use proptest::prelude::*;

const MASK: u32 = u32::MAX;

/// Tokens (never the mask id) with word starts (token 0 starts a word).
fn document() -> impl Strategy<Value = (Vec<u32>, Vec<bool>)> {
    (0usize..60).prop_flat_map(|n| {
        (
            prop::collection::vec(0u32..1000, n),
            prop::collection::vec(prop::bool::weighted(0.6), n),
        )
            .prop_map(|(t, mut w)| {
                if let Some(first) = w.first_mut() {
                    *first = true;
                }
                (t, w)
            })
    })
}

fn opts() -> impl Strategy<Value = NoiseOptions> {
    (0.0f64..=1.0, 0.0f64..6.0, any::<u64>()).prop_map(|(ratio, poisson_lambda, seed)| {
        NoiseOptions {
            ratio,
            poisson_lambda,
            seed,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn masking_keeps_length_masks_whole_words_and_at_least_the_ratio(
        (t, w) in document(), o in opts()
    ) {
        let out = mask_tokens(&t, &w, &MASK, &o).unwrap();
        prop_assert_eq!(out.len(), t.len());
        let mut masked = 0;
        for (s, e) in words(&w) {
            let m = out[s..e].iter().filter(|&&x| x == MASK).count();
            prop_assert!(m == 0 || m == e - s, "a word partly masked");
            if m == 0 {
                prop_assert_eq!(&out[s..e], &t[s..e]);
            }
            masked += m;
        }
        let target = (o.ratio * t.len() as f64).round() as usize;
        prop_assert!(masked >= target);
        prop_assert_eq!(mask_tokens(&t, &w, &MASK, &o).unwrap(), out, "same seed, same output");
    }

    #[test]
    fn deletion_keeps_the_survivors_in_order((t, _w) in document(), o in opts()) {
        let out = delete_tokens(&t, &o).unwrap();
        // `out` is a subsequence of `t`.
        let mut it = t.iter();
        for x in &out {
            prop_assert!(it.any(|y| y == x), "survivors out of order");
        }
        if o.ratio == 0.0 {
            prop_assert_eq!(&out, &t);
        }
        if o.ratio == 1.0 {
            prop_assert!(out.is_empty());
        }
        prop_assert_eq!(delete_tokens(&t, &o).unwrap(), out);
    }

    #[test]
    fn infilling_keeps_unmasked_tokens_in_order_with_one_mask_per_span(
        (t, w) in document(), o in opts()
    ) {
        let (out, spans) = infill(&t, &w, &MASK, &o).unwrap();
        prop_assert_eq!(out.iter().filter(|&&x| x == MASK).count(), spans.len());
        // Rebuild the input: every mask stands for its span's tokens.
        let mut rebuilt = Vec::new();
        let mut masks = spans.iter();
        for &x in &out {
            if x == MASK {
                let s = masks.next().unwrap();
                rebuilt.extend_from_slice(&t[s.start..s.start + s.len]);
            } else {
                rebuilt.push(x);
            }
        }
        prop_assert_eq!(&rebuilt, &t);
        // Spans are disjoint, sorted, start at word starts, end at word ends.
        let ws = words(&w);
        let mut last_end = 0;
        for s in &spans {
            prop_assert!(s.start >= last_end);
            prop_assert!(ws.iter().any(|&(a, _)| a == s.start));
            prop_assert!(s.len == 0 || ws.iter().any(|&(_, b)| b == s.start + s.len));
            last_end = s.start + s.len;
        }
        prop_assert_eq!(infill(&t, &w, &MASK, &o).unwrap().0, out);
    }

    #[test]
    fn permutation_is_a_permutation_of_the_sentences(
        sentences in prop::collection::vec(prop::collection::vec(0u32..50, 0..6), 0..8),
        o in opts()
    ) {
        let (out, order) = permute_sentences(&sentences, &o).unwrap();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..sentences.len()).collect::<Vec<_>>());
        for (i, &j) in order.iter().enumerate() {
            prop_assert_eq!(&out[i], &sentences[j]);
        }
        prop_assert_eq!(permute_sentences(&sentences, &o).unwrap().1, order);
    }

    #[test]
    fn rotation_is_a_rotation_starting_at_a_word((t, w) in document(), o in opts()) {
        let (out, k) = rotate(&t, &w, &o).unwrap();
        prop_assert_eq!(out.len(), t.len());
        if !t.is_empty() {
            prop_assert!(w[k], "rotation starts inside a word");
            let mut back = out[t.len() - k..].to_vec();
            back.extend_from_slice(&out[..t.len() - k]);
            prop_assert_eq!(&back, &t);
        }
        prop_assert_eq!(rotate(&t, &w, &o).unwrap().0, out);
    }
}

#[test]
fn different_seeds_give_different_noise() {
    let t: Vec<u32> = (0..200).collect();
    let w = vec![true; 200];
    let a = NoiseOptions::default();
    let b = NoiseOptions { seed: 1, ..a };
    assert_ne!(
        mask_tokens(&t, &w, &MASK, &a).unwrap(),
        mask_tokens(&t, &w, &MASK, &b).unwrap()
    );
    assert_ne!(
        infill(&t, &w, &MASK, &a).unwrap(),
        infill(&t, &w, &MASK, &b).unwrap()
    );
}

#[test]
fn infilling_masks_about_the_ratio_with_poisson_spans_of_mean_lambda() {
    // 2000 single-token words, 30%, λ = 3: spans cover ≥ 30% of the words before truncation,
    // and the mean span length is near 3 (zero-length spans included).
    let t: Vec<u32> = (0..2000).collect();
    let w = vec![true; 2000];
    let (_, spans) = infill(&t, &w, &MASK, &NoiseOptions::default()).unwrap();
    let covered: usize = spans.iter().map(|s| s.len).sum();
    let mean = covered as f64 / spans.len() as f64;
    assert!(
        (0.2..=0.32).contains(&(covered as f64 / 2000.0)),
        "{covered}"
    );
    assert!((2.0..=3.6).contains(&mean), "mean span {mean}");
    assert!(
        spans.iter().any(|s| s.len == 0),
        "no zero-length span among {}",
        spans.len()
    );
}

#[test]
fn sentences_split_after_terminal_punctuation() {
    assert_eq!(
        split_sentences("A man eats. A dog runs!  Why? 3.5 apples"),
        vec!["A man eats.", "A dog runs!", "Why?", "3.5 apples"]
    );
}

#[test]
fn bad_rates_and_shapes_are_errors() {
    let t = [1u32, 2, 3];
    let e = mask_tokens(&t, &[true, false], &MASK, &NoiseOptions::default()).unwrap_err();
    assert!(e.to_string().contains("word_starts"), "{e}");
    let o = NoiseOptions {
        ratio: 1.5,
        ..NoiseOptions::default()
    };
    assert!(delete_tokens(&t, &o)
        .unwrap_err()
        .to_string()
        .contains("ratio"));
    let o = NoiseOptions {
        poisson_lambda: f64::NAN,
        ..NoiseOptions::default()
    };
    assert!(infill(&t, &[true; 3], &MASK, &o).is_err());
}
