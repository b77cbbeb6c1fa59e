//! herald: BlueKing CMDB event subscriptions as Kubernetes resources.
//!
//! One module per concern: `crd` (resource types and schema), `effective` (the normalised
//! view of a subscription and its validation), `controller` (reconcile, ids, conditions),
//! `config`, `telemetry`, `api` (HTTP server), `app` (wiring for `herald run`).

pub mod api;
pub mod app;
pub mod compat;
pub mod config;
pub mod controller;
pub mod crd;
pub mod delivery;
pub mod effective;
pub mod event;
pub mod leader;
pub mod store;
pub mod telemetry;

pub use controller::Error;

/// Field manager of every write herald makes to the API server.
pub const FIELD_MANAGER: &str = "herald";

/// A Kubernetes error for logs and answers: the API status code and reason, without the
/// server's full message (which can echo the request).
pub fn kube_error_summary(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
        other => other.to_string(),
    }
}
