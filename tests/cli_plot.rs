//! `cuattn plot` and `cuattn bench --plot` from the command line, on the committed GPU reports
//! (docs/gpu-runs): the pictures are written and decode as PNGs of the size the layout gives,
//! and a wrong output name or a mismatched pair of reports is a clean error, checked before
//! any work (for `bench`, before looking for a GPU).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cuattn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cuattn"))
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cuattn-cli-plot-{}-{name}", std::process::id()))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Width and height from a PNG's header, after checking its signature and decoding it whole.
fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    // Not blank: more than one colour in the picture.
    let first = &buf[..3];
    assert!(
        buf[..info.buffer_size()]
            .chunks_exact(3)
            .any(|p| p != first),
        "{} is one colour",
        path.display()
    );
    (info.width, info.height)
}

/// Exit status 1, one `error:` line naming every needle, no panic, nothing written.
fn fails_with(o: Output, needles: &[&str], out: &Path) {
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.starts_with("error: ") && !e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "expected `{n}` in: {e}");
    }
    assert!(!out.exists(), "{} written on an error", out.display());
}

#[test]
fn plot_roofline_draws_every_committed_gpu_report() {
    let out = temp("roofline.png");
    let o = cuattn()
        .args(["plot", "roofline"])
        .arg(repo("docs/gpu-runs"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // One run per date-card-commit prefix of the committed JSON reports.
    let mut runs: Vec<String> = std::fs::read_dir(repo("docs/gpu-runs"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".json")?;
            let cut = [stem.find("-bench_"), stem.find("-torch_")]
                .into_iter()
                .flatten()
                .min()?;
            Some(stem[..cut].to_string())
        })
        .collect();
    runs.sort();
    runs.dedup();
    assert!(!runs.is_empty());
    assert!(
        stderr(&o).contains(&format!("({} runs,", runs.len())),
        "{}",
        stderr(&o)
    );
    let (w, h) = png_size(&out);
    assert_eq!(w, 1600);
    assert!(
        h > 500 * runs.len() as u32,
        "{h} px for {} runs",
        runs.len()
    );
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn plot_bench_draws_a_saved_run_beside_its_pytorch_baseline() {
    let out = temp("attention.png");
    let o = cuattn()
        .args(["plot", "bench"])
        .arg(repo(
            "docs/gpu-runs/2026-11-26-h200-b284275-bench_attention.json",
        ))
        .arg("--baseline")
        .arg(repo(
            "docs/gpu-runs/2026-11-26-h200-b284275-torch_attention.json",
        ))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Two columns of panels: f16/bf16 × head dim 64/128 × causal or not = 8 panels.
    let (w, h) = png_size(&out);
    assert_eq!(w, 1600);
    assert!(h >= 4 * 420, "{h}");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn wrong_picture_names_and_mismatched_reports_are_clean_errors() {
    let bench = repo("docs/gpu-runs/2026-11-26-h200-b284275-bench_attention.json");
    let jpg = temp("picture.jpg");
    fails_with(
        cuattn()
            .args(["plot", "bench"])
            .arg(&bench)
            .arg("--out")
            .arg(&jpg)
            .output()
            .unwrap(),
        &["--out", ".png"],
        &jpg,
    );
    let nowhere = temp("no-such-folder").join("x.png");
    fails_with(
        cuattn()
            .args(["plot", "roofline", "--out"])
            .arg(&nowhere)
            .output()
            .unwrap(),
        &["--out", "does not exist"],
        &nowhere,
    );
    let out = temp("mismatch.png");
    fails_with(
        cuattn()
            .args(["plot", "bench"])
            .arg(&bench)
            .arg("--baseline")
            .arg(repo(
                "docs/gpu-runs/2026-11-26-h200-b284275-torch_decode.json",
            ))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap(),
        &["torch_decode.json", "family `decode`"],
        &out,
    );
    // `bench --plot` checks the name before it looks for a GPU (or for the `cuda` feature).
    let txt = temp("bench.txt");
    fails_with(
        cuattn()
            .args(["bench", "layernorm", "--quick", "--plot"])
            .arg(&txt)
            .output()
            .unwrap(),
        &["--plot", ".png"],
        &txt,
    );
}
