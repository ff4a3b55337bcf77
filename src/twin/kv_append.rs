//! Twin of `rt_append_kv_*` (kernels/runtime_ops.cu): the KV-cache append of text generation.
//! The kernel runs a 1-D grid-stride loop over the step's `[batch, len_new, width]` block, one
//! element per thread and iteration; this runs the same loop, thread by thread, with the same
//! index decomposition and guards, on host slices.

/// The kernel's parameters (`cuattn_append_kv_params`), with slices for the pointers.
#[derive(Clone, Copy, Debug)]
pub struct AppendKv {
    /// Elements between consecutive source rows.
    pub src_row_stride: usize,
    pub batch: usize,
    /// Source rows per sequence.
    pub len_new: usize,
    /// Cache rows per sequence.
    pub capacity: usize,
    /// Elements per row.
    pub width: usize,
}

/// Runs the kernel's loop on `threads` threads (grid × block): `src_k`/`src_v` start at the
/// key/value block of row 0; `start_count` is `[start; count]`, `2·batch` entries; the caches
/// are `[batch·capacity, width]`.
pub fn append_kv<T: Copy>(
    p: &AppendKv,
    threads: usize,
    (src_k, src_v): (&[T], &[T]),
    start_count: &[i32],
    (dst_k, dst_v): (&mut [T], &mut [T]),
) {
    let (start, count) = start_count.split_at(p.batch);
    let n = p.batch * p.len_new * p.width;
    for thread in 0..threads {
        let mut i = thread;
        while i < n {
            let (c, row) = (i % p.width, i / p.width); // row = b·len_new + t
            let (b, t) = (row / p.len_new, row % p.len_new);
            let to = start[b] as i64 + t as i64;
            if (t as i64) < count[b] as i64 && to >= 0 && (to as usize) < p.capacity {
                let from = row * p.src_row_stride + c;
                let dst = (b * p.capacity + to as usize) * p.width + c;
                dst_k[dst] = src_k[from];
                dst_v[dst] = src_v[from];
            }
            i += threads;
        }
    }
}
