//! Reading a model folder without trusting it: every file is read with a size bound (a
//! `config.json` that is a link to `/dev/zero`, or a gigabyte of spaces, is an error after a
//! few megabytes, not a process killed for memory), only regular files are read, and every
//! path a file of the folder names (`modules.json`'s module paths) must stay inside it.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Largest JSON configuration read (`config.json`, `modules.json`, pooling configs). Real
/// ones are a few kilobytes.
pub const CONFIG_LIMIT: u64 = 4 << 20;

/// Largest tokenizer file read (`tokenizer.json`, `vocab.json`, `merges.txt`). Hugging Face's
/// largest tokenizers are a few tens of megabytes.
pub const TOKENIZER_LIMIT: u64 = 256 << 20;

/// Checks that `path` is a regular file (after links) of at most `limit` bytes.
pub fn check_file(path: &Path, limit: u64) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    if meta.len() > limit {
        return Err(too_big(path, limit));
    }
    Ok(())
}

fn too_big(path: &Path, limit: u64) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!(
            "larger than the {} MiB this file may have",
            limit >> 20
        )),
    }
}

/// The bytes of `path`, a regular file of at most `limit` bytes. The read itself is bounded
/// too (a file that grows while it is read cannot push past the limit).
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    check_file(path, limit)?;
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(path, limit));
    }
    Ok(bytes)
}

/// `dir/name` for a relative path `name` that a file of model folder `dir` names: an absolute
/// path, a drive prefix or any `..` component (which could leave the folder) is an error.
pub fn inside(dir: &Path, name: &str, named_by: &Path) -> Result<PathBuf> {
    let rel = Path::new(name);
    let escapes = rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes {
        return Err(Error::Config {
            file: named_by.display().to_string(),
            reason: format!(
                "path `{name}` leaves the model folder (only relative paths without `..` are \
                 allowed)"
            ),
        });
    }
    Ok(dir.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_folder_are_refused() {
        let dir = Path::new("/models/m");
        let by = Path::new("/models/m/modules.json");
        for bad in ["../x", "/etc", "a/../../b", "a/.."] {
            assert!(inside(dir, bad, by).is_err(), "{bad}");
        }
        assert_eq!(
            inside(dir, "1_Pooling", by).unwrap(),
            PathBuf::from("/models/m/1_Pooling")
        );
        assert_eq!(inside(dir, "", by).unwrap(), PathBuf::from("/models/m/"));
    }

    #[test]
    fn reads_stop_at_the_limit_and_refuse_devices() {
        let file = std::env::temp_dir().join(format!("cuattn-folder-{}", std::process::id()));
        std::fs::write(&file, vec![b' '; 100]).unwrap();
        assert_eq!(read_bounded(&file, 100).unwrap().len(), 100);
        let err = read_bounded(&file, 99).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        std::fs::remove_file(&file).unwrap();
        if Path::new("/dev/zero").exists() {
            let err = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }
}
