//! The keys a query row may see under the dense masks — key length, causal, sliding window —
//! as one diagonal band, by row and by tile.
//!
//! Every combination of these masks leaves query `i` a contiguous run of keys:
//!
//! ```text
//! keep j  ⇔  j < key_len  ∧  i + lo ≤ j  ∧  j ≤ i + hi
//! ```
//!
//! with `lo` from the window's left width and `hi` the smaller of the causal diagonal and the
//! window's right width (either bound absent when no mask sets it). The diagonal is offset by 0
//! for top-left alignment and by `key_len − len_q` for bottom-right (see
//! [`crate::reference::attention`]). Because both ends of the run only move right as `i` grows,
//! a tile of query rows sees the union of its first row's start and its last row's end, and a
//! key tile is free of masking iff the last row's start and the first row's end enclose it:
//! this is what the tiled kernels and their twins need to skip and to classify tiles.

use std::ops::Range;

use crate::attention_types::CausalAlign;

/// Sliding-window (local) attention: query `i` sees keys `i + off − left ..= i + off + right`,
/// `off` being the diagonal offset of `align` (0 top-left, `key_len − len_q` bottom-right).
/// Combined with a causal mask the right width is cut at the causal diagonal. Mistral-style
/// causal windows of `w` tokens including the query itself are `left = w − 1, right = 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Keys before the diagonal a query may see, in tokens.
    pub left: usize,
    /// Keys after the diagonal a query may see, in tokens.
    pub right: usize,
    pub align: CausalAlign,
}

impl Window {
    pub fn new(left: usize, right: usize, align: CausalAlign) -> Self {
        Window { left, right, align }
    }
}

/// The band of admissible keys of one sequence (one batch entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyBand {
    /// Valid keys: `0..key_len`.
    pub key_len: usize,
    /// Keep only `j ≥ i + lo`; `None`: no lower bound.
    pub lo: Option<i64>,
    /// Keep only `j ≤ i + hi`; `None`: no upper bound besides `key_len`.
    pub hi: Option<i64>,
}

/// Diagonal offset of an alignment: 0 top-left, `key_len − len_q` bottom-right.
pub fn diagonal_offset(align: CausalAlign, len_q: usize, key_len: usize) -> i64 {
    match align {
        CausalAlign::TopLeft => 0,
        CausalAlign::BottomRight => key_len as i64 - len_q as i64,
    }
}

/// A token width as i64, saturating (a width of `usize::MAX` means "unbounded").
fn width(w: usize) -> i64 {
    i64::try_from(w).unwrap_or(i64::MAX)
}

impl KeyBand {
    /// The band of a sequence with `len_q` queries and `key_len` valid keys.
    pub fn new(
        len_q: usize,
        key_len: usize,
        causal: Option<CausalAlign>,
        window: Option<Window>,
    ) -> Self {
        let causal_hi = causal.map(|a| diagonal_offset(a, len_q, key_len));
        let (lo, window_hi) = match window {
            None => (None, None),
            Some(w) => {
                let off = diagonal_offset(w.align, len_q, key_len);
                (
                    Some(off.saturating_sub(width(w.left))),
                    Some(off.saturating_add(width(w.right))),
                )
            }
        };
        let hi = match (causal_hi, window_hi) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        KeyBand { key_len, lo, hi }
    }

    /// Whether query `i` may see key `j`.
    pub fn admits(&self, i: usize, j: usize) -> bool {
        let (i, j) = (i as i64, j as i64);
        j < self.key_len as i64
            && self.lo.is_none_or(|lo| j >= i.saturating_add(lo))
            && self.hi.is_none_or(|hi| j <= i.saturating_add(hi))
    }

    /// The keys of query `i`: a (possibly empty) contiguous range.
    pub fn keys(&self, i: usize) -> Range<usize> {
        let i = i as i64;
        let n = self.key_len as i64;
        let start = self.lo.map_or(0, |lo| i.saturating_add(lo).clamp(0, n));
        let end = self
            .hi
            .map_or(n, |hi| i.saturating_add(hi).saturating_add(1).clamp(0, n));
        start as usize..(end.max(start)) as usize
    }

    /// The keys any of the query rows `rows` may see (their union, itself contiguous).
    /// Empty when every row is fully masked or `rows` is empty.
    pub fn keys_of_rows(&self, rows: Range<usize>) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        let (first, last) = (self.keys(rows.start), self.keys(rows.end - 1));
        // Rows in between may be empty where both ends are; the union runs from the first
        // non-empty row's start to the last non-empty row's end, and starts/ends only grow.
        let start = if first.is_empty() {
            // The first non-empty row starts no earlier than `last.start` allows; find it.
            match rows.clone().map(|i| self.keys(i)).find(|r| !r.is_empty()) {
                Some(r) => r.start,
                None => return 0..0,
            }
        } else {
            first.start
        };
        let end = if last.is_empty() {
            match rows.rev().map(|i| self.keys(i)).find(|r| !r.is_empty()) {
                Some(r) => r.end,
                None => return 0..0,
            }
        } else {
            last.end
        };
        start..end
    }

    /// Key tiles (of `block_k` keys) that query rows `rows` must compute: every tile holding
    /// a key some row may see. Tiles outside are skipped by the kernel.
    pub fn key_tiles(&self, rows: Range<usize>, block_k: usize) -> Range<usize> {
        let keys = self.keys_of_rows(rows);
        if keys.is_empty() {
            return 0..0;
        }
        keys.start / block_k..keys.end.div_ceil(block_k)
    }

    /// Whether every row of `rows` sees every key of tile `tile` (keys
    /// `tile·block_k .. (tile+1)·block_k`): such a tile runs without element masking.
    pub fn tile_is_full(&self, rows: Range<usize>, tile: usize, block_k: usize) -> bool {
        if rows.is_empty() {
            return true;
        }
        let (key0, key_end) = (tile * block_k, (tile + 1) * block_k);
        let (first, last) = (self.keys(rows.start), self.keys(rows.end - 1));
        // Starts grow with i, so the last row's start bounds them all; ends grow too, so the
        // first row's end bounds them all.
        last.start <= key0 && first.end >= key_end && !first.is_empty() && !last.is_empty()
    }

    /// The bounds as the kernel takes them: `(lo, hi)` in i32, absent bounds widened to
    /// `∓(len_q + len_k + 1)`, which admit every in-range key. Errors if they do not fit.
    pub fn bounds_i32(&self, len_q: usize, len_k: usize) -> crate::Result<(i32, i32)> {
        let far = (len_q + len_k + 1) as i64;
        let lo = self.lo.unwrap_or(-far).clamp(-far, far);
        let hi = self.hi.unwrap_or(far).clamp(-far, far);
        let fit = |x: i64| {
            i32::try_from(x).map_err(|_| {
                crate::Error::invalid(
                    "window",
                    format!("band bound {x} does not fit in i32 (len_q {len_q}, len_k {len_k})"),
                )
            })
        };
        Ok((fit(lo)?, fit(hi)?))
    }
}
