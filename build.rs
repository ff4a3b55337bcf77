//! Builds the kernels (feature `cuda`):
//! 1. finds nvcc: `NVCC`, then `CUDA_HOME`/`CUDA_PATH`, then `PATH`, then the toolchain that
//!    `scripts/install-cuda-toolchain.sh` puts in `.toolchain/`;
//! 2. compiles every `kernels/*.cu` into one fatbin (SASS sm_80 + sm_90, PTX compute_80), all
//!    files in parallel, keeping ptxas' `-v` resource report;
//! 3. turns `kernels/cuattn_params.h` into Rust with bindgen (one definition of every
//!    launch-parameter struct);
//! 4. writes `kernels_generated.rs`, which embeds the fatbins and the report.
//!
//! Kernels recompile only when something under `kernels/` changes (cargo rescans the folder).
//! Even then only the files whose inputs changed are compiled: each fatbin and its ptxas report
//! are kept in a cache keyed by a hash of the `.cu` file, every header in `kernels/`, the nvcc
//! version and the flags (`CUATTN_KERNEL_CACHE`, default `<target dir>/kernel-cache`). The
//! check, debug and release profiles each run this script with their own `OUT_DIR`; the cache
//! lets them share one compilation (CI's clippy and release builds, a header-free `.cu` edit).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const PARAMS_HEADER: &str = "kernels/cuattn_params.h";

/// Targets every fatbin carries: Ampere and Hopper machine code, plus compute_80 PTX so newer
/// GPUs can JIT it. The toolchain is pinned to CUDA 13.0, the GPU machines' driver version:
/// PTX of a newer ISA would not load there.
const GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=compute_80",
];

/// Files whose kernels use Hopper-only instructions (wgmma, setmaxnreg): their SASS is built for
/// `sm_90a`, which runs on compute capability 9.0 only, beside an `sm_80` image in which the
/// same entry points are trapping stubs (so the module still loads on Ampere; the host never
/// launches them there). No PTX: `sm_90a` PTX could not be JIT-compiled for another GPU anyway.
const SM90A_SOURCES: &[&str] = &["attention_hopper"];
const GENCODE_SM90A: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "NVCC_CCBIN",
        "LIBCLANG_PATH",
        "CUATTN_KERNEL_CACHE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let nvcc = find_nvcc(&manifest_dir).unwrap_or_else(|searched| {
        fail(&format!(
            "nvcc (the CUDA compiler) was not found. Searched: {searched}.\n\
             Install the pinned CUDA 13.0 toolchain into this repo with\n\
             \n    bash scripts/install-cuda-toolchain.sh\n\n\
             or point NVCC or CUDA_HOME at an existing CUDA installation, or build the CPU parts \
             only with `cargo build --no-default-features`."
        ))
    });

    generate_params(&manifest_dir, &out_dir);

    let nvcc_version = nvcc_version(&nvcc);
    let sources = kernel_sources(&manifest_dir.join("kernels"));
    let cache = kernel_cache_dir(&out_dir);
    let headers = header_digest(&manifest_dir.join("kernels"));
    let results: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                s.spawn(|| {
                    let key = cache_key(src, headers, &nvcc_version);
                    compile_cached(&cache, &key, src, &out_dir, || {
                        compile_fatbin(&nvcc, &manifest_dir, src, &out_dir)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut generated = String::new();
    generated.push_str("pub const MODULES: &[super::ModuleImage] = &[\n");
    let mut ptxas_log = String::new();
    for (stem, log) in &results {
        generated.push_str(&format!(
            "    super::ModuleImage {{ name: {stem:?}, fatbin: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\")) }},\n"
        ));
        ptxas_log.push_str(log);
    }
    generated.push_str("];\n");
    generated.push_str(&format!(
        "pub const NVCC_VERSION: &str = {:?};\n",
        nvcc_version
    ));
    generated.push_str(&format!("pub const PTXAS_LOG: &str = {:?};\n", ptxas_log));
    fs::write(out_dir.join("kernels_generated.rs"), generated).unwrap();
}

fn fail(msg: &str) -> ! {
    // A panic message is what cargo shows of a failing build script; make it the whole story.
    eprintln!("\nerror: {msg}\n");
    panic!("{msg}");
}

fn find_nvcc(manifest_dir: &Path) -> Result<PathBuf, String> {
    let mut searched = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        return Ok(PathBuf::from(p));
    }
    searched.push("$NVCC".to_string());
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin/nvcc");
            if p.is_file() {
                return Ok(p);
            }
            searched.push(format!("${var}/bin/nvcc ({})", p.display()));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    searched.push("$PATH".to_string());
    let local = manifest_dir.join(".toolchain/cuda/nvidia/cu13/bin/nvcc");
    if local.is_file() {
        return Ok(local);
    }
    searched.push(local.display().to_string());
    Err(searched.join(", "))
}

fn nvcc_version(nvcc: &Path) -> String {
    match Command::new(nvcc).arg("--version").output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let release = text
                .lines()
                .find(|l| l.contains("release"))
                .unwrap_or("")
                .trim()
                .to_string();
            format!("{} ({})", release, nvcc.display())
        }
        Ok(o) => fail(&format!(
            "`{} --version` failed: {}",
            nvcc.display(),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run nvcc at {}: {e}", nvcc.display())),
    }
}

fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

/// `CUATTN_KERNEL_CACHE`, or `kernel-cache` in the target directory (OUT_DIR is
/// `<target>[/<triple>]/<profile>/build/<pkg>/out`).
fn kernel_cache_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("CUATTN_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let target = out_dir.ancestors().nth(4).unwrap_or(out_dir);
    target.join("kernel-cache")
}

/// FNV-1a, 64-bit: a stable content hash (std's hasher may change between Rust releases).
fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// One hash over every header in `kernels/` (names and contents, sorted): a `.cu` file's
/// output depends on the headers it includes, and hashing them all is simpler than tracking
/// includes (a header edit recompiles everything, as before).
fn header_digest(dir: &Path) -> u64 {
    let mut headers: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cuh" || x == "h"))
        .collect();
    headers.sort();
    headers.iter().fold(FNV_OFFSET, |h, p| {
        let name = p.file_name().unwrap().to_string_lossy();
        let text =
            fs::read(p).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", p.display())));
        fnv1a(fnv1a(h, name.as_bytes()), &text)
    })
}

/// `<stem>-<hash>`: the source, the headers, the compiler and every flag that shapes the output.
fn cache_key(src: &Path, headers: u64, nvcc_version: &str) -> String {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let text =
        fs::read(src).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", src.display())));
    let mut h = fnv1a(FNV_OFFSET, &text);
    h = fnv1a(h, &headers.to_le_bytes());
    // The release line, not the install path (two checkouts share a compiler version).
    h = fnv1a(h, nvcc_version.split(" (").next().unwrap_or("").as_bytes());
    h = fnv1a(
        h,
        format!("{GENCODE:?}{GENCODE_SM90A:?}{SM90A_SOURCES:?}").as_bytes(),
    );
    h = fnv1a(h, &fs::read("build.rs").unwrap_or_default());
    h = fnv1a(h, env::var("NVCC_CCBIN").unwrap_or_default().as_bytes());
    format!("{stem}-{h:016x}")
}

/// The fatbin and report from the cache when present; otherwise `compile` and store them (a
/// failed store only costs the next build a recompilation).
fn compile_cached(
    cache: &Path,
    key: &str,
    src: &Path,
    out_dir: &Path,
    compile: impl FnOnce() -> (String, String),
) -> (String, String) {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let (bin, log) = (
        cache.join(format!("{key}.fatbin")),
        cache.join(format!("{key}.ptxas")),
    );
    let out = out_dir.join(format!("{stem}.fatbin"));
    if let (Ok(()), Ok(report)) = (fs::copy(&bin, &out).map(|_| ()), fs::read_to_string(&log)) {
        return (stem, report);
    }
    let (stem, report) = compile();
    if fs::create_dir_all(cache).is_ok() {
        // Write under temporary names, then rename: a concurrent build never reads half a file.
        let tmp = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push(format!(".tmp{}", std::process::id()));
            PathBuf::from(name)
        };
        let ok = fs::copy(&out, tmp(&bin)).is_ok()
            && fs::write(tmp(&log), &report).is_ok()
            && fs::rename(tmp(&bin), &bin).is_ok();
        if ok {
            let _ = fs::rename(tmp(&log), &log);
        }
    }
    (stem, report)
}

/// Compiles one `.cu` into `OUT_DIR/<stem>.fatbin`; returns (stem, ptxas report).
fn compile_fatbin(
    nvcc: &Path,
    manifest_dir: &Path,
    src: &Path,
    out_dir: &Path,
) -> (String, String) {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let out = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    let gencode = if SM90A_SOURCES.contains(&stem.as_str()) {
        GENCODE_SM90A
    } else {
        GENCODE
    };
    cmd.arg("-fatbin")
        .args(gencode)
        .args([
            "-O3",
            "-std=c++17",
            "--threads",
            "0",
            "-lineinfo",
            "-Xptxas",
            "-v",
        ])
        .args(["-Wno-deprecated-gpu-targets", "--expt-relaxed-constexpr"])
        // Compressed fatbins (the driver inflates them at load): attention_tc is 1.7 MB instead of
        // 11.7, and every test binary embeds all modules.
        .arg("-Xfatbin=-compress-all")
        .arg("-I")
        .arg(manifest_dir.join("kernels"))
        .arg("-o")
        .arg(&out)
        .arg(src);
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        fail(&format!("nvcc failed on {}:\n{stderr}", src.display()));
    }
    (stem, stderr)
}

fn generate_params(manifest_dir: &Path, out_dir: &Path) {
    let header = manifest_dir.join(PARAMS_HEADER);
    let result = std::panic::catch_unwind(|| {
        bindgen::Builder::default()
            .header(header.to_string_lossy())
            .allowlist_type("cuattn_.*")
            .allowlist_var("CUATTN_.*")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(false)
            .generate()
    });
    match result {
        Ok(Ok(bindings)) => bindings
            .write_to_file(out_dir.join("params.rs"))
            .unwrap_or_else(|e| fail(&format!("cannot write params.rs: {e}"))),
        Ok(Err(e)) => fail(&format!("bindgen could not parse {}: {e}", header.display())),
        Err(_) => fail(
            "bindgen needs libclang, which was not found (it turns kernels/cuattn_params.h into \
             Rust). Install it with\n\n    apt-get install -y --no-install-recommends libclang1-14\n\n\
             (scripts/install-cuda-toolchain.sh does this), or set LIBCLANG_PATH to the folder \
             holding libclang.so.",
        ),
    }
}
