//! Reads the Hopper attention kernels' machine code (cuobjdump on the fatbin build.rs embedded)
//! and checks that it is what the source means: warpgroup MMAs (HGMMA) of the intended shapes,
//! TMA loads (UTMALDG), register reallocation (USETMAXREG), no spills (LDL/STL), no waits or
//! fences that ptxas had to insert on its own (which silently serialise the pipeline), and
//! trapping stubs in the sm_80 image. No GPU needed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

/// cuobjdump from `$CUOBJDUMP`, PATH, or the toolchain scripts/install-cuda-toolchain.sh installs.
fn cuobjdump() -> PathBuf {
    if let Some(p) = std::env::var_os("CUOBJDUMP") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".toolchain/cuda/sass-tools/nvidia/cu13/bin/cuobjdump");
    if local.is_file() {
        return local;
    }
    PathBuf::from("cuobjdump")
}

/// SASS text per (arch, function) of the `attention_hopper` module.
fn sass() -> HashMap<(String, String), String> {
    let module = cuattn::kernels::modules()
        .iter()
        .find(|m| m.name == "attention_hopper")
        .expect("build.rs compiles kernels/attention_hopper.cu");
    let path = std::env::temp_dir().join(format!("cuattn-hopper-{}.fatbin", std::process::id()));
    std::fs::write(&path, module.fatbin).unwrap();
    let tool = cuobjdump();
    let tool_dir = tool.parent().map(|d| d.to_path_buf()).unwrap_or_default();
    // cuobjdump runs nvdisasm, which sits beside it.
    let path_var = std::env::join_paths(std::iter::once(tool_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let out = Command::new(&tool)
        .arg("--dump-sass")
        .arg(&path)
        .env("PATH", path_var)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install it with scripts/install-cuda-toolchain.sh or set CUOBJDUMP",
                tool.display()
            )
        });
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "cuobjdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut map = HashMap::new();
    let (mut arch, mut func, mut body) = (String::new(), String::new(), String::new());
    for line in text.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("arch = ") {
            arch = a.to_string();
        } else if let Some(f) = t.strip_prefix("Function : ") {
            if !func.is_empty() {
                map.insert(
                    (arch.clone(), std::mem::take(&mut func)),
                    std::mem::take(&mut body),
                );
            }
            func = f.to_string();
        } else if !func.is_empty() {
            body.push_str(line);
            body.push('\n');
        }
        if t.starts_with("Fatbin") && !func.is_empty() {
            map.insert(
                (arch.clone(), std::mem::take(&mut func)),
                std::mem::take(&mut body),
            );
        }
    }
    if !func.is_empty() {
        map.insert((arch, func), body);
    }
    map
}

fn count(body: &str, op: &str) -> usize {
    body.lines().filter(|l| l.contains(op)).count()
}

const ENTRIES: [(&str, usize, usize, usize); 4] = [
    // (name, head dim, HGMMA 64x128x16 count, HGMMA 64x64x16 count)
    ("attention_hopper_hd64_bf16", 64, 8, 16),
    ("attention_hopper_hd64_f16", 64, 8, 16),
    ("attention_hopper_hd128_bf16", 128, 32, 0),
    ("attention_hopper_hd128_f16", 128, 32, 0),
];

#[test]
fn hopper_kernels_use_wgmma_tma_and_setmaxnreg_without_spills_or_inserted_waits() {
    let sass = sass();
    for (name, hd, n128, n64) in ENTRIES {
        let body = sass
            .get(&("sm_90a".to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("{name} has no sm_90a image; found {:?}", sass.keys()));
        // S = Q·Kᵀ: hd/16 k-steps of m64n128, issued in the first tile and in the loop.
        // O += P·V: 128/16 k-steps of m64n{hd}, in the loop and after it.
        assert_eq!(
            count(body, "HGMMA.64x128x16"),
            n128,
            "{name}: m64n128 wgmmas"
        );
        assert_eq!(count(body, "HGMMA.64x64x16"), n64, "{name}: m64n64 wgmmas");
        // One box load per 64 columns of Q, K and V, unrolled by ptxas: present, 4-D.
        assert!(
            count(body, "UTMALDG.4D") >= 3 * hd / 64,
            "{name}: TMA loads"
        );
        assert_eq!(
            count(body, "USETMAXREG.DEALLOC"),
            1,
            "{name}: producer gives registers away"
        );
        assert_eq!(
            count(body, "USETMAXREG.TRY_ALLOC"),
            1,
            "{name}: consumers take them"
        );
        assert_eq!(count(body, "LDL"), 0, "{name}: local loads (spills)");
        assert_eq!(count(body, "STL"), 0, "{name}: local stores (spills)");
        // Exactly the three wgmma fences and four waits the source has: more would be ptxas
        // inserting them because an accumulator was touched inside an async window.
        assert_eq!(count(body, "WARPGROUP.ARRIVE"), 3, "{name}: wgmma fences");
        assert_eq!(count(body, "WARPGROUP.DEPBAR"), 4, "{name}: wgmma waits");
        assert!(count(body, "SYNCS.PHASECHK") > 0, "{name}: mbarrier waits");
        let trap = sass
            .get(&("sm_80".to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("{name} has no sm_80 stub"));
        assert!(
            trap.contains("BPT.TRAP"),
            "{name}: the sm_80 image must be a trap stub"
        );
        assert_eq!(count(trap, "HGMMA"), 0);
    }
    // ptxas says when it injects warpgroup waits/arrives (C7517/C7519) or ignores setmaxnreg.
    let log = cuattn::kernels::ptxas_log();
    for warning in ["C7517", "C7519", "C7508", "C7510"] {
        assert!(!log.contains(warning), "ptxas warned {warning}:\n{log}");
    }
    let res = cuattn::kernels::resources();
    for (name, ..) in ENTRIES {
        let r = res
            .iter()
            .find(|r| r.kernel == name && r.arch == "sm_90a")
            .unwrap_or_else(|| panic!("no ptxas report for {name} on sm_90a"));
        assert_eq!((r.spill_store_bytes, r.spill_load_bytes), (0, 0), "{name}");
        assert!(
            r.registers <= 168,
            "{name}: {} registers at 384 threads",
            r.registers
        );
    }
}
