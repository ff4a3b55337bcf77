//! Every entry of the CUDA backends (`impl Backend for Cuda` in src/runtime/cuda.rs and
//! `impl TrainBackend for Cuda` in src/runtime/cuda_train/mod.rs) that takes device tensors
//! checks, as its first statement, that each of them belongs to the backend's context
//! (`self.check_contexts([("name", tensor), ...])?`), naming every tensor argument.
//!
//! The GPU test `foreign_context::training_backend_ops_refuse_tensors_of_another_context`
//! proves the refusals on a device; this one runs everywhere, reading the source, so that an
//! entry added later without the check fails here too, before it can reach a GPU machine.

use std::path::Path;

/// Entries that take tensors but launch nothing on them: `to_f32` copies through the tensor's
/// own Gpu, `shape` and `tensor_dtype` read host metadata.
const EXEMPT: &[&str] = &["to_f32", "shape", "tensor_dtype"];

/// The text of the `impl <header> {` block of `src` (to its closing brace at column 0).
fn impl_block<'s>(src: &'s str, header: &str) -> &'s str {
    let start = src
        .find(&format!("{header} {{\n"))
        .unwrap_or_else(|| panic!("no `{header}`"));
    let len = src[start..]
        .find("\n}\n")
        .expect("the impl's closing brace");
    &src[start..start + len]
}

/// (name, parameter list, body) of each `fn` of an impl block (methods at 4 spaces).
fn methods(block: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for chunk in block.split("\n    fn ").skip(1) {
        let name: String = chunk
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let open = chunk.find('(').expect("a parameter list");
        let body_at = chunk.find("{\n").expect("a body");
        let params = chunk[open..body_at].to_string();
        let body = chunk[body_at + 2..].to_string();
        out.push((name, params, body));
    }
    out
}

/// The names of the parameters whose type holds a `DeviceTensor`.
fn tensor_params(params: &str) -> Vec<String> {
    let inner = params.trim_start_matches('(');
    let mut names = Vec::new();
    let mut depth = 0i32;
    let mut item = String::new();
    for c in inner.chars() {
        match c {
            '<' | '(' | '[' => depth += 1,
            '>' | ')' | ']' => depth -= 1,
            _ => {}
        }
        if (c == ',' && depth == 0) || depth < 0 {
            names.extend(tensor_param(&item));
            item.clear();
            if depth < 0 {
                break;
            }
        } else {
            item.push(c);
        }
    }
    names
}

fn tensor_param(item: &str) -> Option<String> {
    let (name, ty) = item.split_once(':')?;
    ty.contains("DeviceTensor")
        .then(|| name.trim().trim_start_matches("mut ").to_string())
}

/// The body's first statement (comment lines skipped), up to its `?;`.
fn first_statement(body: &str) -> String {
    let code: String = body
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    match code.find("?;") {
        Some(end) => code[..end].to_string(),
        None => code,
    }
}

/// (entries taking tensors, what is missing) in the impl block `header` of `src`.
fn check_source(file: &str, src: &str, header: &str) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut missing = Vec::new();
    for (name, params, body) in methods(impl_block(src, header)) {
        let tensors = tensor_params(&params);
        if tensors.is_empty() || EXEMPT.contains(&name.as_str()) {
            continue;
        }
        checked += 1;
        let first = first_statement(&body);
        if !first.trim_start().starts_with("self.check_contexts(") {
            missing.push(format!(
                "{file}: `{name}` does not begin with self.check_contexts(..)"
            ));
            continue;
        }
        for t in tensors {
            if !first.contains(&format!("(\"{t}\", ")) {
                missing.push(format!(
                    "{file}: `{name}`'s context check does not name `{t}`"
                ));
            }
        }
    }
    (checked, missing)
}

fn check_impl(file: &str, header: &str) -> (usize, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    check_source(file, &src, header)
}

#[test]
fn every_cuda_backend_entry_taking_tensors_checks_their_contexts_first() {
    let (inference, mut missing) = check_impl("src/runtime/cuda.rs", "impl Backend for Cuda");
    let (training, more) = check_impl(
        "src/runtime/cuda_train/mod.rs",
        "impl TrainBackend for Cuda",
    );
    missing.extend(more);
    // The entries present when this test was written: 6 and 26; new ones only add to them.
    assert!(
        inference >= 6 && training >= 26,
        "found {inference} and {training} entries taking tensors: did the parsing break?"
    );
    assert!(
        missing.is_empty(),
        "entries that may launch on another context's memory (add \
         `self.check_contexts([(\"arg\", tensor), ..])?;` as the first statement):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_source_reader_finds_a_missing_or_incomplete_check() {
    let src = "impl TrainBackend for Cuda {\n    \
        fn a(&self, x: &DeviceTensor, k: Heads<'_, DeviceTensor>, n: usize) -> Result<()> {\n        \
            // why\n        \
            self.check_contexts([(\"x\", x), (\"k\", k.tensor)])?;\n        \
            Ok(())\n    }\n\n    \
        fn b(&self, parts: &[&DeviceTensor]) -> Result<()> {\n        \
            self.ew(1)?;\n        Ok(())\n    }\n\n    \
        fn c(\n        &self,\n        acc: &mut DeviceTensor,\n        r: Option<&DeviceTensor>,\n    ) -> Result<()> {\n        \
            self.check_contexts([(\"acc\", &*acc)])?;\n        Ok(())\n    }\n\n    \
        fn tensor_dtype(&self, t: &DeviceTensor) -> DType {\n        t.dtype()\n    }\n\n    \
        fn zeros(&self, shape: &[usize]) -> Result<DeviceTensor> {\n        self.z(shape)\n    }\n}\n";
    let (checked, missing) = check_source("f.rs", src, "impl TrainBackend for Cuda");
    assert_eq!(checked, 3);
    assert_eq!(
        missing,
        [
            "f.rs: `b` does not begin with self.check_contexts(..)",
            "f.rs: `c`'s context check does not name `r`",
        ]
    );
}
