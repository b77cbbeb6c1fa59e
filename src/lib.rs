//! herald: BlueKing CMDB event subscriptions as Kubernetes resources. The design, and a
//! table of where each concern lives, is docs/design.md.
//!
//! Modules, one concern each:
//! - `crd`: the EventSubscription and CmdbSource resources (types, schema, apply bodies).
//! - `effective`: the normalised, defaulted view of a spec and its field validation.
//! - `conditions`: status-condition merging and the clock both status writers use.
//! - `controller`: reconcile, id allocation, validation beyond the schema, Ready.
//! - `delivery`: publish matching, per-subscription workers, confirm, retries, dead
//!   letters, and the status projector for statistics.
//! - `outbound`: every request to a user-given destination: the callback guard, the HTTP
//!   client, capped body reads, and the ping/telnet probes.
//! - `source`: CmdbSource: bk-cmdb's resource watch read, converted to v3.5 events and
//!   committed exactly once with its cursor; the supervisor and the status it writes.
//! - `store`: the event store trait and its engines, SQLite and NATS JetStream.
//! - `event`: bk-cmdb event instances, their names and the callback body.
//! - `compat`: bk-cmdb's REST conventions: envelopes, error codes, input parsing, search,
//!   subscription records, time formats. Pure functions.
//! - `api`: the HTTP server (direct and ESB paths, publish, dead letters, auth).
//! - `import`: `herald import`, subscriptions of an older bk-cmdb brought over with their ids.
//! - `leader`: the Lease that makes one herald the controller (and, on SQLite, the only active one).
//! - `shards`: delivery shards, one Lease each, so that with a shared store each
//!   subscription is delivered by exactly one replica.
//! - `tenancy`: which namespaces may receive which supplier account's events.
//! - `config`, `telemetry` (logs and metrics), `app` (wiring and supervision of `herald run`).

pub mod api;
pub mod app;
pub mod compat;
pub mod conditions;
pub mod config;
pub mod console;
pub mod controller;
pub mod crd;
pub mod delivery;
pub mod effective;
pub mod event;
pub mod import;
pub mod leader;
pub mod outbound;
pub mod shards;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tenancy;

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
