//! `crds/` is the committed output of `herald crd`: this fails when they drift.
//! Regenerate with `for f in eventsubscriptions cmdbsources; do cargo run -- crd $f.herald.dev.yaml > crds/$f.herald.dev.yaml; done`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

#[test]
fn committed_crds_match_the_generated_ones() {
    for file in ["eventsubscriptions.herald.dev.yaml", "cmdbsources.herald.dev.yaml"] {
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_herald")).args(["crd", file]).output().expect("herald crd");
        assert!(out.status.success(), "herald crd {file}");
        let generated = String::from_utf8(out.stdout).expect("utf-8");
        let committed = std::fs::read_to_string(format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR"))).expect(file);
        assert!(generated == committed, "crds/{file} is stale: run `cargo run -- crd {file} > crds/{file}`");
    }
}
