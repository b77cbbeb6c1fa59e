//! The fault and abuse suite (issue 7): process, control-plane, store and callback
//! faults, bad input and security abuse (one module each), against herald as a real process, the real
//! kube-apiserver and etcd, and real callback receivers on loopback. Every case, what it
//! expects and what it showed is in docs/RELIABILITY.md.
//!
//! Two sizes:
//! - the fast subset: every test here without `#[ignore]`. `cargo test` (tests/run.sh,
//!   CI) always runs it; nothing in it is skipped or gated.
//! - the full suite: `tests/faults/run-all.sh`, which installs schemathesis and runs
//!   `HERALD_FULL_FAULTS=1 tests/run.sh --test faults -- --include-ignored`. The
//!   variable scales the seeded cases (24 SIGKILL rounds instead of 3, ten times the
//!   fuzz cases); `--include-ignored` adds the long cases (etcd outage, the 10-minute
//!   soak, schemathesis), which are `#[ignore]`d so that CI lists them as ignored
//!   instead of silently passing them.
//!
//! `HERALD_FAULTS_SEED` replays a run (the seed is printed by every seeded case).
//! Tests that show a herald bug are marked `HERALD BUG` with the finding number of
//! docs/RELIABILITY.md; they fail until the bug is fixed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

#[path = "../common/mod.rs"]
mod common;
mod support;

mod bad_input;
mod callbacks;
mod control_plane;
mod full;
mod hardening;
mod jetstream;
mod process;
mod security;
mod store;

use common::callback::CallbackServer;
use common::*;
use herald::crd::{EventSubscription, Statistics};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
