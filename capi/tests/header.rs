//! include/cuattn.h is what cbindgen makes of capi/src/lib.rs today: a change to the C ABI
//! that forgot `make header` fails here (CUATTN_BLESS=1 rewrites the file instead).

use std::path::Path;

#[test]
fn the_committed_header_is_what_cbindgen_generates() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen parses capi/src/lib.rs")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("../include/cuattn.h");
    if std::env::var_os("CUATTN_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/cuattn.h is out of date: run `make header` (CUATTN_BLESS=1 cargo test -p cuattn-capi --test header) and commit it"
    );
}
