//! The embedding lookup's backward as a deterministic scatter-add: tokens are grouped by table
//! row on the host ([`crate::training::group_tokens`]); one block per (row, column tile) adds
//! its tokens' gradient rows in ascending token order. No atomics: bitwise repeatable.

use super::{by_dtype, kernel};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, TensorMut, TensorRef};
use crate::kernels::params::cuattn_embedding_bwd_params;
use crate::ops::launch;
use crate::ops::validate;
use crate::training::group_tokens;
use cudarc::driver::DevicePtr;

/// Options of [`embedding_backward_into`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmbeddingBackwardOptions {
    /// Add to `dtable` (gradient accumulation); otherwise `dtable` is zeroed first, so rows no
    /// token used end at 0.
    pub accumulate: bool,
}

const THREADS: usize = 256;

/// dtable[v] (+)= Σ_{t: ids[t] = v} dy[t]. `dy` is `[tokens, width]` (any leading dims, rows
/// evenly spaced, last dim contiguous; f32/f16/bf16), `ids` the host token ids (one per row of
/// dy, each below the table's rows), `dtable` a contiguous `[vocab, width]` of f32 or dy's
/// dtype. Word, position and token-type embeddings all use this.
pub fn embedding_backward_into(
    gpu: &Gpu,
    opts: &EmbeddingBackwardOptions,
    dy: &TensorRef,
    ids: &[u32],
    dtable: &mut TensorMut,
) -> Result<()> {
    gpu.check_contexts([("dy", dy.ctx), ("dtable", dtable.ctx)])?;
    let dyi = dy.info("dy");
    let rows = validate::rows(&dyi)?;
    let ti = dtable.info("dtable");
    if dtable.dtype != DType::F32 && dtable.dtype != dy.dtype {
        return Err(Error::DType {
            arg: "dtable",
            expected: DType::F32,
            got: dtable.dtype,
        });
    }
    let table = validate::rows(&ti)?;
    if table.cols != rows.cols || !dtable.layout.is_contiguous() {
        return Err(Error::shape(
            "dtable",
            format!("contiguous [vocab, {}] (dy's width)", rows.cols),
            dtable.shape(),
        ));
    }
    if ids.len() != rows.rows {
        return Err(Error::shape(
            "ids",
            format!("{} ids (one per row of dy)", rows.rows),
            &[ids.len()],
        ));
    }
    let groups = group_tokens(ids, table.rows)?;
    let col_tiles = rows.cols.div_ceil(THREADS);
    let threads = rows.cols.next_multiple_of(32).min(THREADS) as u32;
    if col_tiles > 65535 {
        return Err(Error::invalid(
            "dy",
            format!("width {} exceeds the grid", rows.cols),
        ));
    }
    let stream = gpu.stream();
    if !opts.accumulate {
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::driver("binding the context", e))?;
        // SAFETY: dtable is a contiguous view inside its memory (checked above); the memset
        // covers exactly its rows·width elements, on the Gpu's stream before the kernel.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                dtable.ptr,
                0,
                table.rows * table.cols * dtable.dtype.size_bytes(),
                stream.cu_stream(),
            )
        }
        .map_err(|e| Error::driver("zeroing dtable", e))?;
    }
    if groups.rows.is_empty() {
        return Ok(());
    }
    let upload = |v: &[i32]| {
        stream
            .clone_htod(v)
            .map_err(|e| Error::driver("copy token groups to the device", e))
    };
    let (positions, group_rows, starts) = (
        upload(&groups.positions)?,
        upload(&groups.rows)?,
        upload(&groups.starts)?,
    );
    let p = cuattn_embedding_bwd_params {
        dy: dy.ptr,
        positions: positions.device_ptr(stream).0,
        group_rows: group_rows.device_ptr(stream).0,
        group_start: starts.device_ptr(stream).0,
        dtable: dtable.ptr,
        groups: groups.rows.len() as i64,
        width: rows.cols as i64,
        dy_row_stride: rows.row_stride as i64,
    };
    let names = if dtable.dtype == dy.dtype && dy.dtype != DType::F32 {
        [
            "embedding_bwd_f32_same",
            "embedding_bwd_f16_same",
            "embedding_bwd_bf16_same",
        ]
    } else {
        [
            "embedding_bwd_f32_f32",
            "embedding_bwd_f16_f32",
            "embedding_bwd_bf16_f32",
        ]
    };
    let k = kernel(gpu, by_dtype(dy.dtype, names))?;
    // SAFETY: dy's rows (one per token, row stride checked) and dtable's vocab rows of width
    // elements lie inside their memory; the group arrays come from `group_tokens`, whose
    // positions index dy's rows and whose rows index dtable's (checked against vocab); each
    // (row, column) of dtable is owned by one thread; the uploads are freed in stream order.
    unsafe {
        launch(
            gpu,
            &k,
            &p,
            (groups.rows.len() as u32, col_tiles as u32),
            (threads, 1),
            0,
        )
    }
}
