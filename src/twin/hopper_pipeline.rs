//! A model of the Hopper attention kernel's synchronisation (`kernels/attention_hopper.cu`):
//! the producer's TMA loads into a ring of stages, the "full" and "empty" mbarriers, the two
//! consumer warpgroups' asynchronous wgmma groups, their turn-taking named barriers and the
//! V-padding barrier. Each agent runs the kernel's own sequence of synchronising steps; a
//! scheduler interleaves them, completes TMA transfers and wgmma groups at arbitrary moments,
//! and every step checks what the hardware would not:
//!
//! - a wgmma reads a stage only after the tile it expects has fully landed there (and, for the
//!   key-padding tile, after both consumers have zeroed its padding rows);
//! - no TMA writes a stage while a wgmma may still read it, or before both consumers released
//!   the tile that was there;
//! - an mbarrier wait by parity returns exactly at the phase the waiter means (parities alias
//!   once a barrier runs two phases ahead);
//! - the run ends with every agent done, for every tile count including 0 and 1 (no deadlock).
//!
//! [`Variant`] breaks the protocol in the ways one might by mistake, so the tests can show the
//! model catches each.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Stages in the K/V ring (the kernel's `CUATTN_ATTN_HOPPER_STAGES`).
pub const STAGES: usize = 2;
const TILE_BYTES: u64 = 4; // any positive amount; TMA completes it in one or two pieces

/// The protocol as the kernel runs it, or with one deliberate mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Kernel,
    /// The producer waits on a fresh "empty" barrier with parity 0 instead of 1.
    ProducerFirstLapParity,
    /// Consumers release K before the wgmma group that reads it has retired.
    ReleaseKBeforeWait,
    /// Consumers meet at the V-padding barrier after taking their turn (can deadlock).
    PadBarrierInsideTurn,
    /// Consumer 0 does not arrive on its own turn barrier first.
    NoFirstTurn,
    /// A single-stage ring without waiting on "empty" (the producer overwrites early).
    NoEmptyWait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    K,
    V,
    Q,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bar {
    QFull,
    Full(Kind, usize),
    Empty(Kind, usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Named {
    Turn(usize),
    VPad,
}

/// One synchronising step of an agent.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// mbarrier arrive with expected transaction bytes, then the TMA load of `tile` into stage.
    ExpectAndLoad {
        bar: Bar,
        kind: Kind,
        stage: usize,
        tile: usize,
    },
    /// mbarrier try_wait.parity loop; `phase` is the completed-phase count the waiter means.
    Wait {
        bar: Bar,
        parity: u32,
        phase: u64,
    },
    Arrive(Bar),
    /// A wgmma reading stage `stage` expecting `tile`, opened in the current (uncommitted) group.
    Gemm {
        kind: Kind,
        stage: usize,
        tile: usize,
    },
    Commit,
    /// wgmma.wait_group n.
    WaitGroup(usize),
    /// Generic-proxy zeroing of V padding rows in `stage` (tile `tile`).
    ZeroPad {
        stage: usize,
        tile: usize,
    },
    BarSync(Named),
    BarArrive(Named),
}

#[derive(Clone, Debug, Default)]
struct MBarrier {
    init: u32,
    pending: u32,
    tx: i64,
    completed: u64,
}

impl MBarrier {
    fn new(init: u32) -> Self {
        MBarrier {
            init,
            pending: init,
            tx: 0,
            completed: 0,
        }
    }
    fn settle(&mut self) {
        if self.pending == 0 && self.tx == 0 {
            self.completed += 1;
            self.pending = self.init;
        }
    }
}

#[derive(Clone, Debug, Default)]
struct NamedBarrier {
    arrived: Vec<usize>,
    /// Generations each waiting agent is blocked on.
    generation: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct StageState {
    tile: Option<usize>,
    landed: bool,
    /// Consumers that released the tile now in the stage.
    released: u32,
    zeroed_by: u32,
}

struct Agent {
    steps: Vec<Step>,
    pc: usize,
    /// Open wgmma groups: each a list of (kind, stage) reads; the last is the uncommitted one.
    groups: Vec<Vec<(Kind, usize)>>,
    open: Vec<(Kind, usize)>,
    /// Generation of a named barrier this agent waits on.
    waiting: Option<(Named, u64)>,
}

struct Transfer {
    bar: Bar,
    kind: Kind,
    stage: usize,
    left: u64,
}

/// The outcome of one run.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Deadlock(String),
    Violation(String),
}

struct Model {
    variant: Variant,
    agents: Vec<Agent>, // 0 producer, 1 and 2 consumers 0 and 1
    mbar: Vec<(Bar, MBarrier)>,
    named: Vec<(Named, NamedBarrier)>,
    k: [StageState; STAGES],
    v: [StageState; STAGES],
    q_landed: bool,
    transfers: Vec<Transfer>,
    /// Retired wgmma groups per consumer, to release reads (groups retire in order).
    pad_tile: Option<usize>,
}

fn producer_steps(tiles: usize, variant: Variant) -> Vec<Step> {
    let mut s = Vec::new();
    if tiles == 0 {
        return s;
    }
    s.push(Step::ExpectAndLoad {
        bar: Bar::QFull,
        kind: Kind::Q,
        stage: 0,
        tile: 0,
    });
    for t in 0..tiles {
        let (st, lap) = (t % STAGES, (t / STAGES) as u64);
        let parity = match variant {
            Variant::ProducerFirstLapParity => (lap & 1) as u32,
            _ => ((lap & 1) ^ 1) as u32,
        };
        for kind in [Kind::K, Kind::V] {
            if variant != Variant::NoEmptyWait {
                // Released `lap` times before this load: the empty barrier has completed `lap`
                // phases (on the first lap, the "preceding" phase of a fresh barrier).
                s.push(Step::Wait {
                    bar: Bar::Empty(kind, st),
                    parity,
                    phase: lap,
                });
            }
            s.push(Step::ExpectAndLoad {
                bar: Bar::Full(kind, st),
                kind,
                stage: st,
                tile: t,
            });
        }
    }
    s
}

fn consumer_steps(c: usize, tiles: usize, pad_tile: Option<usize>, variant: Variant) -> Vec<Step> {
    let mut s = Vec::new();
    if tiles == 0 {
        return s;
    }
    let (mine, other) = (Named::Turn(c), Named::Turn(c ^ 1));
    let full_wait = |kind: Kind, t: usize| Step::Wait {
        bar: Bar::Full(kind, t % STAGES),
        parity: ((t / STAGES) & 1) as u32,
        phase: (t / STAGES) as u64 + 1,
    };
    let wait_v = |s: &mut Vec<Step>, t: usize| {
        s.push(full_wait(Kind::V, t));
        if pad_tile == Some(t) {
            s.push(Step::ZeroPad {
                stage: t % STAGES,
                tile: t,
            });
            s.push(Step::BarSync(Named::VPad));
        }
    };
    if c == 0 && variant != Variant::NoFirstTurn {
        s.push(Step::BarArrive(mine));
    }
    s.push(Step::Wait {
        bar: Bar::QFull,
        parity: 0,
        phase: 1,
    });
    s.push(full_wait(Kind::K, 0));
    s.push(Step::BarSync(mine));
    s.push(Step::Gemm {
        kind: Kind::K,
        stage: 0,
        tile: 0,
    });
    s.push(Step::Commit);
    s.push(Step::BarArrive(other));
    s.push(Step::WaitGroup(0));
    s.push(Step::Arrive(Bar::Empty(Kind::K, 0)));
    for t in 1..tiles {
        let (st, pst) = (t % STAGES, (t - 1) % STAGES);
        s.push(full_wait(Kind::K, t));
        if variant != Variant::PadBarrierInsideTurn {
            wait_v(&mut s, t - 1);
        }
        s.push(Step::BarSync(mine));
        if variant == Variant::PadBarrierInsideTurn {
            wait_v(&mut s, t - 1);
        }
        s.push(Step::Gemm {
            kind: Kind::K,
            stage: st,
            tile: t,
        });
        s.push(Step::Commit);
        s.push(Step::Gemm {
            kind: Kind::V,
            stage: pst,
            tile: t - 1,
        });
        s.push(Step::Commit);
        s.push(Step::BarArrive(other));
        if variant == Variant::ReleaseKBeforeWait {
            s.push(Step::Arrive(Bar::Empty(Kind::K, st)));
            s.push(Step::WaitGroup(1));
        } else {
            s.push(Step::WaitGroup(1));
            s.push(Step::Arrive(Bar::Empty(Kind::K, st)));
        }
        s.push(Step::WaitGroup(0));
        s.push(Step::Arrive(Bar::Empty(Kind::V, pst)));
    }
    let last = tiles - 1;
    wait_v(&mut s, last);
    s.push(Step::Gemm {
        kind: Kind::V,
        stage: last % STAGES,
        tile: last,
    });
    s.push(Step::Commit);
    s.push(Step::WaitGroup(0));
    s.push(Step::Arrive(Bar::Empty(Kind::V, last % STAGES)));
    s
}

impl Model {
    fn new(tiles: usize, pad_tile: Option<usize>, variant: Variant) -> Self {
        let agent = |steps| Agent {
            steps,
            pc: 0,
            groups: Vec::new(),
            open: Vec::new(),
            waiting: None,
        };
        let mut mbar = vec![(Bar::QFull, MBarrier::new(1))];
        for st in 0..STAGES {
            for kind in [Kind::K, Kind::V] {
                mbar.push((Bar::Full(kind, st), MBarrier::new(1)));
                mbar.push((Bar::Empty(kind, st), MBarrier::new(2)));
            }
        }
        Model {
            variant,
            agents: vec![
                agent(producer_steps(tiles, variant)),
                agent(consumer_steps(0, tiles, pad_tile, variant)),
                agent(consumer_steps(1, tiles, pad_tile, variant)),
            ],
            mbar,
            named: vec![
                (Named::Turn(0), NamedBarrier::default()),
                (Named::Turn(1), NamedBarrier::default()),
                (Named::VPad, NamedBarrier::default()),
            ],
            k: [StageState::default(); STAGES],
            v: [StageState::default(); STAGES],
            q_landed: false,
            transfers: Vec::new(),
            pad_tile,
        }
    }

    fn mbar(&mut self, b: Bar) -> &mut MBarrier {
        &mut self.mbar.iter_mut().find(|(x, _)| *x == b).unwrap().1
    }

    fn named(&mut self, n: Named) -> &mut NamedBarrier {
        &mut self.named.iter_mut().find(|(x, _)| *x == n).unwrap().1
    }

    fn stage(&mut self, kind: Kind, st: usize) -> &mut StageState {
        match kind {
            Kind::K => &mut self.k[st],
            _ => &mut self.v[st],
        }
    }

    /// Whether any consumer's open or in-flight wgmma reads (kind, stage).
    fn being_read(&self, kind: Kind, st: usize) -> bool {
        self.agents[1..].iter().any(|a| {
            a.open.contains(&(kind, st)) || a.groups.iter().any(|g| g.contains(&(kind, st)))
        })
    }

    /// Tries agent `i`'s next step: Ok(true) if it ran, Ok(false) if blocked.
    fn step(&mut self, i: usize) -> Result<bool, String> {
        let Some(&step) = self.agents[i].steps.get(self.agents[i].pc) else {
            return Ok(false);
        };
        let who = ["producer", "consumer 0", "consumer 1"][i];
        match step {
            Step::ExpectAndLoad {
                bar,
                kind,
                stage,
                tile,
            } => {
                if kind != Kind::Q {
                    if self.being_read(kind, stage) {
                        return Err(format!(
                            "{who}: TMA into {kind:?} stage {stage} (tile {tile}) while a wgmma reads it"
                        ));
                    }
                    let s = *self.stage(kind, stage);
                    if s.tile.is_some() && s.released < 2 {
                        return Err(format!(
                            "{who}: TMA of tile {tile} overwrites {kind:?} stage {stage} before both consumers released tile {:?}",
                            s.tile
                        ));
                    }
                    *self.stage(kind, stage) = StageState {
                        tile: Some(tile),
                        ..Default::default()
                    };
                }
                let m = self.mbar(bar);
                m.tx += TILE_BYTES as i64;
                m.pending -= 1;
                self.transfers.push(Transfer {
                    bar,
                    kind,
                    stage,
                    left: TILE_BYTES,
                });
            }
            Step::Wait { bar, parity, phase } => {
                let m = self.mbar(bar);
                if (m.completed & 1) as u32 == parity {
                    return Ok(false); // the phase with this parity is the current, incomplete one
                }
                if m.completed != phase {
                    return Err(format!(
                        "{who}: wait on {bar:?} with parity {parity} returned at {} completed phases, meant {phase}",
                        m.completed
                    ));
                }
            }
            Step::Arrive(bar) => {
                if let Bar::Empty(kind, st) = bar {
                    let reading = self.agents[i].open.contains(&(kind, st))
                        || self.agents[i]
                            .groups
                            .iter()
                            .any(|g| g.contains(&(kind, st)));
                    if reading {
                        return Err(format!(
                            "{who}: releases {kind:?} stage {st} while its own wgmma may still read it"
                        ));
                    }
                    self.stage(kind, st).released += 1;
                }
                let m = self.mbar(bar);
                if m.pending == 0 {
                    return Err(format!("{who}: arrival on {bar:?} beyond its count"));
                }
                m.pending -= 1;
                m.settle();
            }
            Step::Gemm { kind, stage, tile } => {
                let s = *self.stage(kind, stage);
                if !self.q_landed {
                    return Err(format!("{who}: wgmma before Q landed"));
                }
                if s.tile != Some(tile) || !s.landed {
                    return Err(format!(
                        "{who}: wgmma reads {kind:?} stage {stage} expecting tile {tile}, holds {:?} (landed: {})",
                        s.tile, s.landed
                    ));
                }
                if kind == Kind::V && self.pad_tile == Some(tile) && s.zeroed_by != 0b11 {
                    return Err(format!(
                        "{who}: P·V on padding tile {tile} before both consumers zeroed it"
                    ));
                }
                self.agents[i].open.push((kind, stage));
            }
            Step::Commit => {
                let g = std::mem::take(&mut self.agents[i].open);
                self.agents[i].groups.push(g);
            }
            Step::WaitGroup(n) => {
                if self.agents[i].groups.len() > n {
                    return Ok(false); // groups retire on their own (scheduler events)
                }
            }
            Step::ZeroPad { stage, tile } => {
                let s = *self.stage(Kind::V, stage);
                if s.tile != Some(tile) || !s.landed {
                    return Err(format!(
                        "{who}: zeroes V stage {stage} before tile {tile} landed"
                    ));
                }
                if self.being_read(Kind::V, stage) {
                    return Err(format!(
                        "{who}: zeroes V stage {stage} while a wgmma reads it"
                    ));
                }
                self.v[stage].zeroed_by |= 1 << (i - 1);
            }
            Step::BarSync(n) | Step::BarArrive(n) => {
                let wait = matches!(step, Step::BarSync(_));
                if let Some((wn, generation)) = self.agents[i].waiting {
                    // Already arrived: blocked until that generation completes.
                    if self.named(wn).generation == generation {
                        return Ok(false);
                    }
                    self.agents[i].waiting = None;
                } else {
                    // Counts warpgroups, not which: consumer 0's first turn is completed by
                    // its own arrive and sync, on purpose.
                    let nb = self.named(n);
                    nb.arrived.push(i);
                    let generation = nb.generation;
                    if nb.arrived.len() == 2 {
                        nb.arrived.clear();
                        nb.generation += 1;
                    } else if wait {
                        self.agents[i].waiting = Some((n, generation));
                        return Ok(true); // arrived; the next attempt checks for release
                    }
                }
            }
        }
        self.agents[i].pc += 1;
        Ok(true)
    }

    fn done(&self) -> bool {
        self.agents.iter().all(|a| a.pc == a.steps.len())
    }
}

/// Runs the protocol for a block with `tiles` key tiles (`pad_tile`: the tile whose V rows past
/// the key length are zeroed, if any) under a random schedule drawn from `seed`.
pub fn run(tiles: usize, pad_tile: Option<usize>, variant: Variant, seed: u64) -> Outcome {
    let mut m = Model::new(tiles, pad_tile, variant);
    let mut rng = SmallRng::seed_from_u64(seed);
    let limit = 200 + 200 * tiles;
    for _ in 0..limit * 10 {
        if m.done() && m.transfers.is_empty() {
            return Outcome::Finished;
        }
        // Candidate events: each agent's next step, each transfer's completion (in pieces),
        // each consumer's oldest wgmma group retiring.
        let mut events: Vec<usize> = (0..3).collect();
        events.extend(3..3 + m.transfers.len());
        let g0 = 3 + m.transfers.len();
        events.extend(g0..g0 + 2);
        let mut progressed = false;
        // Try events in a random order until one makes progress.
        for _ in 0..events.len() {
            let e = events.swap_remove(rng.gen_range(0..events.len()));
            if e < 3 {
                match m.step(e) {
                    Err(v) => return Outcome::Violation(v),
                    Ok(true) => {
                        progressed = true;
                        break;
                    }
                    Ok(false) => {}
                }
            } else if e < g0 {
                let t = &mut m.transfers[e - 3];
                let piece = if t.left > 1 && rng.gen_bool(0.5) {
                    1
                } else {
                    t.left
                };
                t.left -= piece;
                let (bar, kind, stage, left) = (t.bar, t.kind, t.stage, t.left);
                if left == 0 {
                    m.transfers.remove(e - 3);
                    match kind {
                        Kind::Q => m.q_landed = true,
                        _ => m.stage(kind, stage).landed = true,
                    }
                }
                let mb = m.mbar(bar);
                mb.tx -= piece as i64;
                mb.settle();
                progressed = true;
                break;
            } else {
                let a = &mut m.agents[1 + (e - g0)];
                if !a.groups.is_empty() {
                    a.groups.remove(0);
                    progressed = true;
                    break;
                }
            }
        }
        if !progressed {
            let at: Vec<String> = m
                .agents
                .iter()
                .map(|a| format!("{:?}", a.steps.get(a.pc)))
                .collect();
            return if m.done() {
                Outcome::Finished
            } else {
                Outcome::Deadlock(format!("blocked at {at:?} ({:?})", m.variant))
            };
        }
    }
    Outcome::Deadlock("step limit".into())
}
