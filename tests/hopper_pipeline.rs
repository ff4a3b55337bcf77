//! The Hopper attention kernel's barrier protocol (src/twin/hopper_pipeline.rs) under many
//! random schedules: it finishes without a violation for every tile count including 0 and 1,
//! with the V-padding tile anywhere, and each deliberate mistake in it is caught.

use cuattn::twin::hopper_pipeline::{run, Outcome, Variant};

const SCHEDULES: u64 = 300;

#[test]
fn protocol_finishes_for_every_tile_count_and_schedule() {
    for tiles in 0..=7 {
        let pads: Vec<Option<usize>> = std::iter::once(None).chain((0..tiles).map(Some)).collect();
        for pad in pads {
            for seed in 0..SCHEDULES {
                let out = run(tiles, pad, Variant::Kernel, seed);
                assert_eq!(
                    out,
                    Outcome::Finished,
                    "tiles {tiles}, pad {pad:?}, seed {seed}"
                );
            }
        }
    }
}

/// A mistake must show up (as a violation or a deadlock) under some schedule of some size.
fn caught(variant: Variant, pad_anywhere: bool) -> Option<Outcome> {
    for tiles in 1..=5 {
        for seed in 0..SCHEDULES {
            let pad = if pad_anywhere {
                Some(0)
            } else {
                Some(tiles - 1)
            };
            let out = run(tiles, pad, variant, seed);
            if out != Outcome::Finished {
                return Some(out);
            }
        }
    }
    None
}

#[test]
fn producer_waiting_on_the_wrong_first_parity_deadlocks() {
    assert!(matches!(
        caught(Variant::ProducerFirstLapParity, false),
        Some(Outcome::Deadlock(_))
    ));
}

#[test]
fn releasing_k_before_its_wgmma_retires_is_caught() {
    assert!(matches!(
        caught(Variant::ReleaseKBeforeWait, false),
        Some(Outcome::Violation(_))
    ));
}

#[test]
fn padding_barrier_inside_the_turn_can_deadlock() {
    assert!(matches!(
        caught(Variant::PadBarrierInsideTurn, true),
        Some(Outcome::Deadlock(_))
    ));
}

#[test]
fn overwriting_a_stage_without_waiting_for_empty_is_caught() {
    assert!(matches!(
        caught(Variant::NoEmptyWait, false),
        Some(Outcome::Violation(_))
    ));
}

#[test]
fn consumer_zero_not_going_first_deadlocks() {
    assert!(matches!(
        caught(Variant::NoFirstTurn, false),
        Some(Outcome::Deadlock(_))
    ));
}
