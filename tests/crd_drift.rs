//! `crds/` is the committed output of `herald crd`: this fails when they drift.
//! Regenerate with `cargo run -- crd > crds/eventsubscriptions.herald.dev.yaml`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

#[test]
fn committed_crd_matches_the_generated_one() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald")).arg("crd").output().expect("run herald crd");
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/eventsubscriptions.herald.dev.yaml"))
            .expect("crds/eventsubscriptions.herald.dev.yaml");
    assert!(generated == committed, "crds/ is stale: run `cargo run -- crd > crds/eventsubscriptions.herald.dev.yaml`");
}
