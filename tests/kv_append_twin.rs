//! The KV-cache append twin (`cuattn::twin::kv_append`, the loop of `rt_append_kv_*`) against
//! the definition: for each sequence b and t < count[b], source row b·len_new + t (a block at a
//! column offset inside wider rows) lands in cache row b·capacity + start[b] + t; every other
//! cache element keeps its poison. Random shapes, starts, counts and thread counts. CPU only.

use cuattn::twin::kv_append::{append_kv, AppendKv};
use proptest::prelude::*;

fn case() -> impl Strategy<Value = (AppendKv, usize, usize, Vec<i32>, usize)> {
    (1usize..5, 1usize..7, 1usize..20, 0usize..5, 1usize..700).prop_flat_map(
        |(batch, len_new, width, extra_cols, threads)| {
            let capacity_range = len_new..len_new + 9;
            (
                capacity_range,
                Just((batch, len_new, width, extra_cols, threads)),
            )
                .prop_flat_map(
                    move |(capacity, (batch, len_new, width, extra_cols, threads))| {
                        // start + count ≤ capacity, count ≤ len_new (what the host checks).
                        let one = (0..=capacity).prop_flat_map(move |start| {
                            (Just(start), 0..=len_new.min(capacity - start))
                        });
                        (
                            proptest::collection::vec(one, batch),
                            0..=extra_cols,
                            Just((batch, len_new, width, extra_cols, threads, capacity)),
                        )
                            .prop_map(
                                |(
                                    sc,
                                    col,
                                    (batch, len_new, width, extra_cols, threads, capacity),
                                )| {
                                    let mut start_count: Vec<i32> =
                                        sc.iter().map(|&(s, _)| s as i32).collect();
                                    start_count.extend(sc.iter().map(|&(_, c)| c as i32));
                                    let p = AppendKv {
                                        src_row_stride: width + extra_cols,
                                        batch,
                                        len_new,
                                        capacity,
                                        width,
                                    };
                                    (p, col, threads, start_count, extra_cols)
                                },
                            )
                    },
                )
        },
    )
}

proptest! {
    #[test]
    fn twin_appends_exactly_the_valid_rows((p, col, threads, start_count, _) in case()) {
        let rows = p.batch * p.len_new;
        // Distinct values: element (r, j) of K is r·1000 + j, of V its negative − 1.
        let src_k: Vec<f32> = (0..rows * p.src_row_stride)
            .map(|i| ((i / p.src_row_stride) * 1000 + i % p.src_row_stride) as f32)
            .collect();
        let src_v: Vec<f32> = src_k.iter().map(|x| -x - 1.0).collect();
        let cache = p.batch * p.capacity * p.width;
        let (mut k, mut v) = (vec![f32::NAN; cache], vec![f32::NAN; cache]);
        append_kv(&p, threads, (&src_k[col..], &src_v[col..]), &start_count, (&mut k, &mut v));
        let (start, count) = start_count.split_at(p.batch);
        for b in 0..p.batch {
            for pos in 0..p.capacity {
                let t = pos as i64 - start[b] as i64;
                for c in 0..p.width {
                    let at = (b * p.capacity + pos) * p.width + c;
                    if t >= 0 && t < count[b] as i64 {
                        let from = (b * p.len_new + t as usize) * p.src_row_stride + col + c;
                        prop_assert_eq!(k[at], src_k[from]);
                        prop_assert_eq!(v[at], src_v[from]);
                    } else {
                        prop_assert!(k[at].is_nan() && v[at].is_nan(), "wrote row {} of sequence {}", pos, b);
                    }
                }
            }
        }
    }
}
