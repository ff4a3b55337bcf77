//! Warp-level twin of `kernels/attention_tc.cu`: the kernel's ldmatrix address expressions,
//! register orders, mma operand choices and C-fragment indexing, run on a CPU emulation of
//! `ldmatrix.x4[.trans]` and `mma.m16n8k16` built from the PTX fragment rules
//! (docs/kernels/attention-forward.md, fragments), checked against plain matrix products. A wrong
//! address, a swapped register or a misread accumulator shows here, on any machine, instead
//! of as a finite wrong answer on the GPU. CPU only.
//!
//! Keep the expressions marked `kernel:` identical to the CUDA source.

/// One lane's 32-bit register: two 16-bit values (lo, hi); kept as f32 here.
type Reg = (f32, f32);

/// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`: lane l supplies the address of row
/// (l % 8) of matrix (l / 8); `addr(l)` returns (row, col) of that row's first element in a
/// row-major tile with `pitch`. Returns regs[lane][j].
fn ldmatrix_x4(
    tile: &[f32],
    pitch: usize,
    addr: impl Fn(usize) -> (usize, usize),
    trans: bool,
) -> Vec<[Reg; 4]> {
    let at = |l: usize, k: usize| {
        let (r, c) = addr(l);
        tile[r * pitch + c + k]
    };
    (0..32)
        .map(|lane| {
            let (g, t) = (lane >> 2, lane & 3);
            let mut regs = [(0.0, 0.0); 4];
            for (j, reg) in regs.iter_mut().enumerate() {
                *reg = if trans {
                    // { Mj[2t][g], Mj[2t+1][g] }
                    (at(8 * j + 2 * t, g), at(8 * j + 2 * t + 1, g))
                } else {
                    // { Mj[g][2t], Mj[g][2t+1] }
                    (at(8 * j + g, 2 * t), at(8 * j + g, 2 * t + 1))
                };
            }
            regs
        })
        .collect()
}

/// `mma.m16n8k16.row.col`: d[lane] (c0..c3) += A·B with A from a[lane] (4 regs) and B from
/// (b0[lane], b1[lane]), per the PTX element formulas.
fn mma(d: &mut [[f32; 4]], a: &[[Reg; 4]], b0: &[Reg], b1: &[Reg]) {
    let mut am = [[0.0f32; 16]; 16];
    let mut bm = [[0.0f32; 8]; 16];
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        let av = [
            a[lane][0].0,
            a[lane][0].1,
            a[lane][1].0,
            a[lane][1].1,
            a[lane][2].0,
            a[lane][2].1,
            a[lane][3].0,
            a[lane][3].1,
        ];
        for (i, &v) in av.iter().enumerate() {
            let row = if matches!(i, 0 | 1 | 4 | 5) { g } else { g + 8 };
            let col = 2 * t + (i & 1) + if i >= 4 { 8 } else { 0 };
            am[row][col] = v;
        }
        let bv = [b0[lane].0, b0[lane].1, b1[lane].0, b1[lane].1];
        for (i, &v) in bv.iter().enumerate() {
            let row = 2 * t + (i & 1) + if i >= 2 { 8 } else { 0 };
            bm[row][g] = v;
        }
    }
    for (lane, dl) in d.iter_mut().enumerate() {
        let (g, t) = (lane >> 2, lane & 3);
        for (i, di) in dl.iter_mut().enumerate() {
            let row = if i < 2 { g } else { g + 8 };
            let col = 2 * t + (i & 1);
            *di += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f32>();
        }
    }
}

fn lane_regs(x: &[[Reg; 4]], j: usize) -> Vec<Reg> {
    x.iter().map(|r| r[j]).collect()
}

/// Deterministic small integers, so products and sums are exact in f32.
fn tile(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| (((i * 7 + seed * 13) % 11) as f32) - 5.0)
        .collect()
}

#[test]
fn kernel_fragment_code_computes_s_and_o_of_one_warp() {
    const HD: usize = 32; // two k-steps
    const BN: usize = 32; // two n-block pairs, two P·V k-steps
    const PITCH: usize = HD + 8; // kernel: PITCH = HD + 8
    const WARPS: usize = 4;
    let sq = tile(16 * WARPS, PITCH, 1);
    let sk = tile(BN, PITCH, 2);
    let sv = tile(BN, PITCH, 3);

    for warp in 0..WARPS {
        // S = Q·Kᵀ, exactly as the kernel forms it.
        let mut s = vec![[[0.0f32; 4]; 32]; BN / 8];
        for ks in 0..HD / 16 {
            // kernel: sQ + (warp * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4)
            let a = ldmatrix_x4(
                &sq,
                PITCH,
                |l| (warp * 16 + (l & 15), ks * 16 + 8 * (l >> 4)),
                false,
            );
            for nb2 in 0..BN / 16 {
                // kernel: sK + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4)
                let kb = ldmatrix_x4(
                    &sk,
                    PITCH,
                    |l| (nb2 * 16 + (l & 15), ks * 16 + 8 * (l >> 4)),
                    false,
                );
                // kernel: mma(s[2 nb2], a, kb[0], kb[2]); mma(s[2 nb2 + 1], a, kb[1], kb[3])
                mma(&mut s[2 * nb2], &a, &lane_regs(&kb, 0), &lane_regs(&kb, 2));
                mma(
                    &mut s[2 * nb2 + 1],
                    &a,
                    &lane_regs(&kb, 1),
                    &lane_regs(&kb, 3),
                );
            }
        }
        // Read S back the way the mask and softmax index it:
        // kernel: row = row_base + 8 * (e >> 1) (row_base = warp*16 + g), col = nb * 8 + 2t + (e & 1)
        for (nb, frags) in s.iter().enumerate() {
            for (lane, f) in frags.iter().enumerate() {
                let (g, t) = (lane >> 2, lane & 3);
                for (e, &got) in f.iter().enumerate() {
                    let (row, col) = (warp * 16 + g + 8 * (e >> 1), nb * 8 + 2 * t + (e & 1));
                    let want: f32 = (0..HD)
                        .map(|d| sq[row * PITCH + d] * sk[col * PITCH + d])
                        .sum();
                    assert_eq!(got, want, "S warp {warp} row {row} col {col}");
                }
            }
        }

        // O += P·V with P taken from the S accumulators (use S itself as P: any values do).
        let mut o = vec![[[0.0f32; 4]; 32]; HD / 8];
        for j in 0..BN / 16 {
            // kernel: pa = {pack(s[2j][0], s[2j][1]), pack(s[2j][2], s[2j][3]),
            //               pack(s[2j+1][0], s[2j+1][1]), pack(s[2j+1][2], s[2j+1][3])}
            let pa: Vec<[Reg; 4]> = (0..32)
                .map(|l| {
                    let (x, y) = (s[2 * j][l], s[2 * j + 1][l]);
                    [(x[0], x[1]), (x[2], x[3]), (y[0], y[1]), (y[2], y[3])]
                })
                .collect();
            for nd2 in 0..HD / 16 {
                // kernel: sV + (j * 16 + (lane & 15)) * PITCH + nd2 * 16 + 8 * (lane >> 4), .trans
                let vb = ldmatrix_x4(
                    &sv,
                    PITCH,
                    |l| (j * 16 + (l & 15), nd2 * 16 + 8 * (l >> 4)),
                    true,
                );
                // kernel: mma(o[2 nd2], pa, vb[0], vb[1]); mma(o[2 nd2 + 1], pa, vb[2], vb[3])
                mma(&mut o[2 * nd2], &pa, &lane_regs(&vb, 0), &lane_regs(&vb, 1));
                mma(
                    &mut o[2 * nd2 + 1],
                    &pa,
                    &lane_regs(&vb, 2),
                    &lane_regs(&vb, 3),
                );
            }
        }
        // kernel: output row = row_base + 8 r, col = nd * 8 + 2t + e, value o[nd][2r + e]
        let p_at = |row: usize, key: usize| -> f32 {
            (0..HD)
                .map(|d| sq[row * PITCH + d] * sk[key * PITCH + d])
                .sum()
        };
        for (nd, frags) in o.iter().enumerate() {
            for (lane, f) in frags.iter().enumerate() {
                let (g, t) = (lane >> 2, lane & 3);
                for r in 0..2 {
                    for e in 0..2 {
                        let (row, col) = (warp * 16 + g + 8 * r, nd * 8 + 2 * t + e);
                        let want: f32 = (0..BN)
                            .map(|key| p_at(row, key) * sv[key * PITCH + col])
                            .sum();
                        assert_eq!(f[2 * r + e], want, "O warp {warp} row {row} col {col}");
                    }
                }
            }
        }
    }
}

#[test]
fn emulated_fragments_match_the_notes_test_vectors() {
    // Notes §1.3: lane 31's A elements sit at (7,6)(7,7)(15,6)(15,7)(7,14)(7,15)(15,14)(15,15).
    // Load A = [row*16 + col] with the kernel's Q addressing and check lane 31's registers.
    let a_tile: Vec<f32> = (0..16 * 16).map(|i| i as f32).collect();
    let a = ldmatrix_x4(&a_tile, 16, |l| (l & 15, 8 * (l >> 4)), false);
    let v = |r: usize, c: usize| (r * 16 + c) as f32;
    assert_eq!(
        a[31],
        [
            (v(7, 6), v(7, 7)),
            (v(15, 6), v(15, 7)),
            (v(7, 14), v(7, 15)),
            (v(15, 14), v(15, 15))
        ]
    );
    assert_eq!(
        a[0],
        [
            (v(0, 0), v(0, 1)),
            (v(8, 0), v(8, 1)),
            (v(0, 8), v(0, 9)),
            (v(8, 8), v(8, 9))
        ]
    );
}
