//! The two ways `load_tile` (kernels/attention_common.cuh) finds a thread's 16-byte copies give
//! the same copies in the same order. The default form divides each copy's flat index by the
//! chunks per row; `ROW_STEP` keeps one row base and one column per thread and steps the row by
//! a constant. The kernels pick the form per tile and architecture for the register allocation
//! only (kernels/attention_tc.cu, kernels/attention_bwd.cu), so the GPU tests of one form stand
//! for the other only if this holds. CPU only.
//!
//! Keep the expressions marked `header:` identical to the `vec` branch of `load_tile`.

/// One `cp_async16` call: the shared-memory element it writes, the global element it reads
/// (`None`: the fallback address), and whether it copies (false: zero-fill).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Copy16 {
    dst: usize,
    src: Option<usize>,
    ok: bool,
}

/// What one `load_tile` call asks of a tile: the rows it may copy, its valid columns and the
/// sparse keep mask (rows 0-63 in `keep_lo`, 64-127 in `keep_hi`).
#[derive(Clone, Copy)]
struct Call {
    row_stride: usize,
    row_lo: i32,
    row_hi: i32,
    cols_valid: i32,
    keep_mask: bool,
    keep_lo: u64,
    keep_hi: u64,
}

impl Call {
    /// header: `keep(r)`.
    fn keep(&self, r: i32) -> bool {
        if self.keep_mask {
            let word = if r < 64 { self.keep_lo } else { self.keep_hi };
            if (word >> (r & 63)) & 1 == 0 {
                return false;
            }
        }
        r >= self.row_lo && r < self.row_hi
    }

    fn copy(&self, pitch: i32, r: i32, c: i32, ok: bool) -> Copy16 {
        Copy16 {
            dst: (r * pitch + c) as usize,
            src: ok.then(|| r as usize * self.row_stride + c as usize),
            ok,
        }
    }
}

/// The default form's copies of thread `tid`, in issue order.
fn flat_index_copies(hd: i32, rows: i32, threads: i32, tid: i32, call: &Call) -> Vec<Copy16> {
    let (pitch, chunks) = (hd + 8, hd / 8);
    (0..rows * chunks / threads)
        .map(|i| {
            // header: idx = threadIdx.x + i * THREADS; r = idx / CHUNKS, c = (idx % CHUNKS) * 8
            let idx = tid + i * threads;
            let (r, c) = (idx / chunks, (idx % chunks) * 8);
            let ok = call.keep(r) && c < call.cols_valid;
            call.copy(pitch, r, c, ok)
        })
        .collect()
}

/// The `ROW_STEP` form's copies of thread `tid`, in issue order.
fn row_step_copies(hd: i32, rows: i32, threads: i32, tid: i32, call: &Call) -> Vec<Copy16> {
    let (pitch, chunks) = (hd + 8, hd / 8);
    // header: STEP = THREADS / CHUNKS; r0 = threadIdx.x / CHUNKS, c = (threadIdx.x % CHUNKS) * 8
    let step = threads / chunks;
    let (r0, c) = (tid / chunks, (tid % chunks) * 8);
    let col_ok = c < call.cols_valid;
    (0..rows / step)
        .map(|i| {
            let r = r0 + i * step;
            let ok = col_ok && call.keep(r);
            call.copy(pitch, r, c, ok)
        })
        .collect()
}

/// Both forms for every thread of one tile shape and call; also that the CTA's copies write
/// each (row, chunk) of the tile exactly once.
fn check_tile(hd: i32, rows: i32, threads: i32, call: &Call) {
    let (pitch, chunks) = (hd + 8, hd / 8);
    let mut written = vec![0u32; (rows * pitch) as usize];
    for tid in 0..threads {
        let flat = flat_index_copies(hd, rows, threads, tid, call);
        let stepped = row_step_copies(hd, rows, threads, tid, call);
        assert_eq!(
            flat, stepped,
            "hd {hd}, {rows} rows, {threads} threads: thread {tid}"
        );
        for cp in flat {
            written[cp.dst] += 1;
        }
    }
    for r in 0..rows {
        for k in 0..chunks {
            let at = (r * pitch + k * 8) as usize;
            assert_eq!(written[at], 1, "hd {hd}, {rows} rows: row {r}, chunk {k}");
        }
    }
    assert_eq!(
        written.iter().sum::<u32>(),
        (rows * chunks) as u32,
        "hd {hd}, {rows} rows: copies outside the chunk starts"
    );
}

/// Every tile shape the static_asserts of `load_tile` admit for 128 threads (the forward's and
/// backward's CTAs) and 256, covering the built tiles (cuattn_params.h: forward BM × BN 128×128 at
/// HD 64, 128×64 at 128, 64×32 at 256; sparse key tiles of 64 and 128; backward 64-row tiles).
fn shapes() -> Vec<(i32, i32, i32)> {
    let mut out = Vec::new();
    for hd in [64, 128, 256] {
        let chunks = hd / 8;
        for threads in [128, 256] {
            for rows in [16, 32, 64, 128] {
                // header: ROWS * CHUNKS % THREADS == 0 and (ROW_STEP) THREADS % CHUNKS == 0
                if rows * chunks % threads == 0 && threads % chunks == 0 {
                    out.push((hd, rows, threads));
                }
            }
        }
    }
    out
}

#[test]
fn both_load_forms_issue_the_same_copies_in_the_same_order_for_every_tile_shape() {
    let shapes = shapes();
    for &(hd, rows, threads) in &[
        (64, 128, 128),
        (128, 64, 128),
        (256, 32, 128),
        (256, 64, 128),
    ] {
        assert!(
            shapes.contains(&(hd, rows, threads)),
            "built tile {hd}/{rows} missing"
        );
    }
    let full = Call {
        row_stride: 3 * 256 + 5,
        row_lo: 0,
        row_hi: 128,
        cols_valid: 256,
        keep_mask: false,
        keep_lo: !0,
        keep_hi: !0,
    };
    for &(hd, rows, threads) in &shapes {
        check_tile(hd, rows, threads, &full);
    }
}

#[test]
fn both_load_forms_zero_fill_the_same_rows_and_columns() {
    // Row ranges cut inside the tile (tails, causal bands), head dims padded to the tile (cols
    // < HD), and sparse keep masks over both words; a small deterministic generator so every run
    // checks the same cases.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for &(hd, rows, threads) in &shapes() {
        for case in 0..24 {
            let lo = (next() % (rows as u64 + 1)) as i32;
            let hi = (next() % (rows as u64 + 2)) as i32 - 1;
            let cols = match case % 3 {
                0 => hd,
                1 => (next() % (hd as u64 + 1)) as i32,
                _ => hd - 8 * (1 + (next() % 3) as i32) + 3,
            };
            let call = Call {
                row_stride: hd as usize + (next() % 64) as usize,
                row_lo: lo,
                row_hi: hi.max(lo),
                cols_valid: cols,
                keep_mask: case % 2 == 1,
                keep_lo: next(),
                keep_hi: next(),
            };
            check_tile(hd, rows, threads, &call);
            // Something must be zero-filled and something copied in the cut cases, or the
            // comparison above proves less than it says.
            if call.keep_mask && call.row_hi - call.row_lo > 8 && cols >= 8 {
                let all: Vec<Copy16> = (0..threads)
                    .flat_map(|t| row_step_copies(hd, rows, threads, t, &call))
                    .collect();
                assert!(all.iter().any(|c| c.ok) && all.iter().any(|c| !c.ok));
            }
        }
    }
}
