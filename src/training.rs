//! Host-side plans of the training-op kernels (`kernels/training_ops.cu`): what the host
//! computes before a launch (the multi-tensor chunk table, the row chunks of the column sums,
//! the tokens grouped by embedding row). Plain CPU code, shared by the GPU wrappers
//! (`ops::training`) and the CPU twins (`twin::training`), so both walk the same plan.

use crate::error::{Error, Result};

/// Elements per block of a multi-tensor launch (`CUATTN_MT_CHUNK`).
pub const MT_CHUNK: usize = 65536;
/// Threads per block of a multi-tensor launch (`CUATTN_MT_THREADS`).
pub const MT_THREADS: usize = 512;
/// Column-sum tile: columns per block (`CUATTN_COLSUM_COLS`) and rows in flight
/// (`CUATTN_COLSUM_ROWS`).
pub const COLSUM_COLS: usize = 32;
pub const COLSUM_ROWS: usize = 8;

/// One block of a multi-tensor launch: elements `[index·MT_CHUNK, (index+1)·MT_CHUNK)` of
/// tensor `tensor` (clipped to its size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub tensor: i32,
    pub index: i32,
}

/// The chunk table of tensors with these element counts, tensor by tensor, in order. Empty
/// tensors have no chunk. Errors when an index does not fit the kernel's i32 fields.
pub fn mt_chunks(numels: &[usize]) -> Result<Vec<Chunk>> {
    let mut out = Vec::new();
    for (t, &n) in numels.iter().enumerate() {
        let tensor = i32::try_from(t).map_err(|_| {
            Error::invalid("tensors", format!("{} tensors exceed i32", numels.len()))
        })?;
        let chunks = n.div_ceil(MT_CHUNK);
        if chunks > i32::MAX as usize {
            return Err(Error::invalid(
                "tensors",
                format!("tensor {t} has {n} elements, more than 2^31 chunks"),
            ));
        }
        out.extend((0..chunks).map(|index| Chunk {
            tensor,
            index: index as i32,
        }));
    }
    if out.len() > i32::MAX as usize {
        return Err(Error::invalid("tensors", "more than 2^31 chunks in all"));
    }
    Ok(out)
}

/// How the column sums split `rows`: `chunks` row chunks of `rows_per_chunk` (a multiple of
/// [`COLSUM_ROWS`]) rows, aiming at about `target_blocks` blocks in all with `cols` columns.
pub fn colsum_split(rows: usize, cols: usize, target_blocks: usize) -> (usize, usize) {
    let col_tiles = cols.div_ceil(COLSUM_COLS).max(1);
    let max_chunks = rows.div_ceil(COLSUM_ROWS).max(1);
    let want = target_blocks.div_ceil(col_tiles).clamp(1, max_chunks);
    let rows_per_chunk = rows.div_ceil(want).next_multiple_of(COLSUM_ROWS);
    (rows.div_ceil(rows_per_chunk).max(1), rows_per_chunk)
}

/// Blocks per multiprocessor the column sums aim at (with [`colsum_split`]).
pub const COLSUM_BLOCKS_PER_SM: usize = 4;

/// Scratch bytes of the column sums (and the fused bias + GELU backward) over a `[rows, cols]`
/// input on a GPU with `multiprocessors` multiprocessors: one f32 partial per (row chunk,
/// column).
pub fn colsum_workspace_bytes(rows: usize, cols: usize, multiprocessors: usize) -> usize {
    let (chunks, _) = colsum_split(rows, cols, multiprocessors * COLSUM_BLOCKS_PER_SM);
    chunks * cols * 4
}

/// Scratch bytes of the gradient norm over tensors of `numels` elements: one f32 partial per
/// chunk of [`mt_chunks`].
pub fn grad_norm_workspace_bytes(numels: &[usize]) -> Result<usize> {
    Ok(mt_chunks(numels)?.len() * 4)
}

/// Token positions grouped by embedding row: group g adds the dy rows
/// `positions[starts[g]..starts[g+1]]` (ascending) into table row `rows[g]`. Rows are listed
/// in ascending order and each appears once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGroups {
    pub positions: Vec<i32>,
    pub rows: Vec<i32>,
    pub starts: Vec<i32>,
}

/// Groups `ids` (one table row per token) by row; every id must be below `vocab`.
pub fn group_tokens(ids: &[u32], vocab: usize) -> Result<TokenGroups> {
    if ids.len() > i32::MAX as usize || vocab > i32::MAX as usize {
        return Err(Error::invalid(
            "ids",
            format!("{} tokens or vocab {vocab} exceed i32", ids.len()),
        ));
    }
    if let Some((t, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::invalid(
            "ids",
            format!("token {t} has id {id}, past the table's {vocab} rows"),
        ));
    }
    // A stable sort by id keeps each group's positions ascending.
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&t| ids[t as usize]);
    let mut rows = Vec::new();
    let mut starts = Vec::new();
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize] as i32;
        if rows.last() != Some(&id) {
            rows.push(id);
            starts.push(k as i32);
        }
    }
    starts.push(order.len() as i32);
    Ok(TokenGroups {
        positions: order,
        rows,
        starts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_table_covers_every_element_once_and_skips_empty_tensors() {
        let numels = [1, MT_CHUNK, MT_CHUNK + 1, 0, 3 * MT_CHUNK - 5];
        let chunks = mt_chunks(&numels).unwrap();
        let mut covered = vec![0usize; numels.len()];
        for c in &chunks {
            let n = numels[c.tensor as usize];
            let begin = c.index as usize * MT_CHUNK;
            assert!(begin < n);
            covered[c.tensor as usize] += (begin + MT_CHUNK).min(n) - begin;
        }
        assert_eq!(covered, numels);
        assert_eq!(chunks.len(), 1 + 1 + 2 + 3);
    }

    #[test]
    fn colsum_split_covers_all_rows_in_multiples_of_eight() {
        for rows in [1, 7, 8, 9, 100, 4096, 100_003] {
            for cols in [1, 33, 768, 50_000] {
                let (chunks, rpc) = colsum_split(rows, cols, 528);
                assert_eq!(rpc % COLSUM_ROWS, 0);
                assert!(chunks * rpc >= rows && (chunks - 1) * rpc < rows);
            }
        }
    }

    #[test]
    fn workspace_queries_hold_one_f32_per_partial_the_plans_make() {
        for (rows, cols, sms) in [(1, 1, 1), (300, 96, 132), (4096, 768, 108), (9, 50_000, 2)] {
            let (chunks, _) = colsum_split(rows, cols, sms * COLSUM_BLOCKS_PER_SM);
            assert_eq!(colsum_workspace_bytes(rows, cols, sms), chunks * cols * 4);
        }
        let numels = [MT_CHUNK + 1, 0, 5];
        assert_eq!(grad_norm_workspace_bytes(&numels).unwrap(), 3 * 4);
        assert_eq!(grad_norm_workspace_bytes(&[]).unwrap(), 0);
    }

    #[test]
    fn token_groups_list_each_row_once_with_ascending_positions() {
        let g = group_tokens(&[3, 1, 3, 0, 1, 3], 4).unwrap();
        assert_eq!(g.rows, vec![0, 1, 3]);
        assert_eq!(g.starts, vec![0, 1, 3, 6]);
        assert_eq!(g.positions, vec![3, 1, 4, 0, 2, 5]);
        assert!(matches!(
            group_tokens(&[0, 4], 4),
            Err(Error::InvalidArgument { arg: "ids", .. })
        ));
    }
}
