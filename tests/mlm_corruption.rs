//! BERT's 80/10/10 masked-LM corruption (cuattn::data::mlm): statistics and invariants.

use cuattn::data::mlm::{corrupt, MlmOptions, IGNORE};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn targets_carry_the_original_and_everything_else_is_untouched(
        ids in prop::collection::vec(0u32..100, 0..80),
        special_bits in prop::collection::vec(any::<bool>(), 80),
        seed in any::<u64>(),
    ) {
        let special = &special_bits[..ids.len()];
        let o = MlmOptions::bert(99, 100, seed);
        let ex = corrupt(&ids, special, &o).unwrap();
        prop_assert_eq!(ex.input_ids.len(), ids.len());
        for i in 0..ids.len() {
            if ex.labels[i] == IGNORE {
                prop_assert_eq!(ex.input_ids[i], ids[i]);
            } else {
                prop_assert!(!special[i], "a special token was chosen");
                prop_assert_eq!(ex.labels[i], ids[i] as i64);
            }
        }
        prop_assert_eq!(corrupt(&ids, special, &o).unwrap(), ex);
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // three parallel arrays
fn fifteen_percent_chosen_and_split_80_10_10() {
    let n = 200_000;
    let ids: Vec<u32> = (0..n).map(|i| (i % 1000) as u32 + 1).collect();
    let special: Vec<bool> = (0..n).map(|i| i % 10 == 0).collect();
    let ex = corrupt(&ids, &special, &MlmOptions::bert(0, 30_000, 7)).unwrap();
    let eligible = special.iter().filter(|s| !**s).count() as f64;
    let (mut chosen, mut masked, mut kept, mut random) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..n {
        if ex.labels[i] == IGNORE {
            continue;
        }
        chosen += 1.0;
        match ex.input_ids[i] {
            0 => masked += 1.0,
            t if t == ids[i] => kept += 1.0,
            _ => random += 1.0,
        }
    }
    // Binomial standard errors are ≤ 0.2% here; 1% bounds fail only on a real bias. A random
    // replacement equal to the original (1 in 30000) counts as kept.
    assert!(
        (chosen / eligible - 0.15).abs() < 0.01,
        "{}",
        chosen / eligible
    );
    assert!((masked / chosen - 0.8).abs() < 0.01, "{}", masked / chosen);
    assert!((random / chosen - 0.1).abs() < 0.01, "{}", random / chosen);
    assert!((kept / chosen - 0.1).abs() < 0.01, "{}", kept / chosen);
}

#[test]
fn bad_options_are_errors() {
    let e = corrupt(&[1, 2], &[false], &MlmOptions::bert(0, 10, 0)).unwrap_err();
    assert!(e.to_string().contains("special"), "{e}");
    let e = corrupt(&[1], &[false], &MlmOptions::bert(10, 10, 0)).unwrap_err();
    assert!(e.to_string().contains("mask token"), "{e}");
    let o = MlmOptions {
        mask_share: 0.95,
        ..MlmOptions::bert(0, 10, 0)
    };
    assert!(corrupt(&[1], &[false], &o).is_err());
}
