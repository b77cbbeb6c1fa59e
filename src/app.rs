//! `herald run`: leadership, store, controller, delivery and HTTP server in one process,
//! stopped together by one cancellation token. Every long-running part is a supervised
//! task: one that ends before shutdown, or panics, takes readiness down and ends the
//! process with an error, so Kubernetes restarts it instead of leaving it half alive.

use crate::api::auth::{Authenticator, EsbApps, EsbCredentialsError};
use crate::api::{self, AppState, Services};
use crate::conditions::WriteBudget;
use crate::config::{Config, StoreEngine};
use crate::controller;
use crate::delivery::{Delivery, DeliveryParts, ShardedDelivery, index::SubscriptionIndex};
use crate::leader::{LeaderError, Leadership};
use crate::outbound::{ClientError, Outbound};
use crate::shards::Shards;
use crate::source::SourceContext;
use crate::store::EventStore;
use crate::store::jetstream::JetStreamStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Limits, StoreError};
use crate::telemetry::Metrics;
use k8s_openapi::api::coordination::v1::Lease;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    HttpClient(#[from] ClientError),
    #[error(transparent)]
    EsbCredentials(#[from] EsbCredentialsError),
    #[error("the {task} stopped before shutdown")]
    TaskEnded { task: &'static str },
    #[error("the {task} panicked: {source}")]
    TaskPanicked { task: &'static str, source: JoinError },
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let config = Arc::new(config);
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new(config.metrics.per_subscription));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen { addr: config.listen, source })?;
    tracing::info!(addr = %config.listen, namespace = %config.namespace, "herald starting");

    // Health answers from the start; readiness waits for leadership, store and caches.
    let state = AppState::new(config.clone(), metrics.clone());
    // Body limits per route, timeouts and the connection bound: `api::limits`.
    let router = crate::console::with_console(state.clone(), api::router(state.clone()));
    let mut tasks = Supervisor::new(shutdown.clone());
    let limits = api::ServerLimits::from_config(&config.api);
    let server = api::serve(listener, router, config.api.tls.clone(), limits, shutdown.clone());
    tasks.spawn("HTTP server", async move { server.await.map_err(RunError::Serve) });
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::Listen { addr, source })?;
        let server = api::serve(listener, api::metrics_router(state.clone()), None, limits, shutdown.clone());
        tasks.spawn("metrics server", async move { server.await.map_err(RunError::Serve) });
    }

    let result = lead_and_serve(&config, client, &state, metrics, &mut tasks).await;
    state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    let drained = tasks.drain().await;
    result.and(drained)
}

/// Waits for leadership, then starts the store, controller and delivery and serves until
/// shutdown or until a task fails (the lease renewal is one of them: losing the lease
/// ends herald).
async fn lead_and_serve(
    config: &Arc<Config>,
    client: kube::Client,
    state: &Arc<AppState>,
    metrics: Arc<Metrics>,
    tasks: &mut Supervisor,
) -> Result<(), RunError> {
    let shutdown = tasks.shutdown.clone();
    // With the embedded store one herald is active: the Lease comes first. With a shared
    // store every replica serves; the Lease only makes one of them the controller and the
    // sources' reader, and delivery is spread in shards.
    let shared = config.store.engine == StoreEngine::Jetstream;
    let leases = kube::Api::<Lease>::namespaced(client.clone(), &config.namespace);
    let lease_duration = Duration::from_secs(config.leader_election.lease_duration_seconds.max(3));
    let leadership = config.leader_election.enabled.then(|| {
        Leadership::new(
            leases.clone(),
            config.leader_election.lease_name.clone(),
            config.instance.clone(),
            lease_duration,
        )
    });
    let leadership = match leadership {
        Some(leadership) if !shared => {
            if !leadership.acquire(&shutdown).await? {
                return Ok(());
            }
            let renewing = shutdown.clone();
            tasks.spawn("lease renewal", async move { Ok(leadership.keep(&renewing).await?) });
            None
        }
        other => other,
    };
    let limits = Limits { quota_bytes: config.store.quota_bytes, backlog_cap: config.store.backlog_cap };
    let store: Arc<dyn EventStore> = match config.store.engine {
        StoreEngine::Sqlite => Arc::new(SqliteStore::open(&config.store.path, limits)?),
        StoreEngine::Jetstream => {
            let settings = config.store.jetstream.settings()?;
            let urls = crate::store::jetstream::redacted_urls(&settings.urls);
            tracing::info!(%urls, stream = %settings.stream, "opening the JetStream store");
            Arc::new(JetStreamStore::open(&settings, limits).await?)
        }
    };
    let shards = shared.then(|| {
        Arc::new(Shards::new(
            leases,
            &config.leader_election.lease_name,
            config.instance.clone(),
            config.leader_election.shards,
            lease_duration,
        ))
    });
    let outbound = Outbound::new(&config.callback_guard)?;
    let esb = EsbApps::load(&client, &config.api, &config.namespace).await?;

    let status_budget = Arc::new(WriteBudget::new(config.delivery.status_writes_per_second));
    let (index, changes) = SubscriptionIndex::new();
    // Only a follower waiting for the Lease starts without writing.
    let leading = leadership.is_none();
    let (ctx, controller) = controller::build(client.clone(), config.clone(), index.clone(), leading, shutdown.clone());
    tasks.spawn("controller", async move {
        controller.await;
        Ok(())
    });
    let delivery = Delivery::new(DeliveryParts {
        store: store.clone(),
        index,
        outbound: outbound.clone(),
        client: client.clone(),
        subscriptions: ctx.subscriptions.clone(),
        tenancy: ctx.tenancy.clone(),
        config: config.delivery.clone(),
        dead_letter_retention: Duration::from_secs(config.store.dead_letter_retention_seconds),
        metrics: metrics.clone(),
        status_budget: status_budget.clone(),
        shards: shards.clone(),
        shutdown: shutdown.clone(),
    });
    let auth = Arc::new(Authenticator::new(client.clone(), &config.api.auth, esb, metrics.clone()));

    let caches = async {
        // The catalog is fed after the controller's cache, so its being ready covers both.
        ctx.catalog.wait_ready().await;
        controller::cache_ready(&ctx.namespaces).await.is_ok()
    };
    let synced = tokio::select! {
        synced = caches => synced,
        failed = tasks.watch() => return failed,
    };
    if !synced {
        return Err(RunError::TaskEnded { task: "controller" });
    }
    let primed = controller::prime_index(&ctx);
    tracing::info!(subscriptions = primed, "publish matching knows every subscription the cache holds");
    let services =
        Services { controller: ctx.clone(), delivery: delivery.clone(), outbound, auth, names: Default::default() };
    if state.services.set(Arc::new(services)).is_err() {
        tracing::warn!("services were already set; keeping the first");
    }
    let sources = Arc::new(SourceContext {
        client: client.clone(),
        store: store.clone(),
        delivery: delivery.clone(),
        tenancy: ctx.tenancy.clone(),
        config: config.clone(),
        metrics: metrics.clone(),
        recorder: ctx.recorder.clone(),
        status_budget,
        read_budget: crate::outbound::body::ByteBudget::new(config.sources.read_budget_bytes),
    });
    let stopping = shutdown.clone();
    match leadership {
        None => tasks.spawn("event sources", async move {
            crate::source::run(sources, stopping).await;
            Ok(())
        }),
        Some(leadership) => {
            let controller = ctx.clone();
            tasks.spawn("leadership", async move {
                if !leadership.acquire(&stopping).await? {
                    return Ok(());
                }
                controller.lead();
                // Losing the Lease ends herald (Kubernetes restarts it as a follower).
                let reading = crate::source::run(sources, stopping.clone());
                let keeping = leadership.keep(&stopping);
                tokio::pin!(keeping);
                tokio::select! {
                    kept = &mut keeping => return Ok(kept?),
                    () = reading => {}
                }
                Ok(keeping.await?)
            });
        }
    }
    if let Some(shards) = shards {
        let listener = ShardedDelivery(delivery.clone());
        let stopping = shutdown.clone();
        tasks.spawn("delivery shards", async move {
            shards.run(&listener, stopping).await;
            Ok(())
        });
    }
    let dispatcher = delivery.clone();
    tasks.spawn("delivery dispatcher", async move {
        dispatcher.run(changes).await;
        Ok(())
    });
    tasks.spawn("status projector", async move {
        delivery.project_status().await;
        Ok(())
    });
    state.ready.store(true, Ordering::Release);
    tracing::info!("caches synced; ready");
    tasks.watch().await
}

/// The long-running tasks of one herald process. Each should run until shutdown.
struct Supervisor {
    tasks: JoinSet<Result<(), RunError>>,
    names: HashMap<Id, &'static str>,
    shutdown: CancellationToken,
}

impl Supervisor {
    fn new(shutdown: CancellationToken) -> Self {
        Supervisor { tasks: JoinSet::new(), names: HashMap::new(), shutdown }
    }

    fn spawn(&mut self, name: &'static str, task: impl Future<Output = Result<(), RunError>> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Turns one finished task into the process's result: before shutdown, ending at all
    /// is a failure.
    fn judge(&mut self, joined: Result<(Id, Result<(), RunError>), JoinError>) -> Result<(), RunError> {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        let task = self.names.remove(&id).unwrap_or("unnamed task");
        match joined {
            Ok((_, Err(error))) => Err(error),
            Ok((_, Ok(()))) if self.shutdown.is_cancelled() => Ok(()),
            Ok((_, Ok(()))) => Err(RunError::TaskEnded { task }),
            Err(source) => Err(RunError::TaskPanicked { task, source }),
        }
    }

    /// Returns at shutdown (Ok), or as soon as a task ends before it (the failure).
    async fn watch(&mut self) -> Result<(), RunError> {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                Some(joined) = self.tasks.join_next_with_id() => self.judge(joined)?,
            }
        }
    }

    /// After shutdown began: waits for every task and returns the first failure.
    async fn drain(mut self) -> Result<(), RunError> {
        let mut first = Ok(());
        while let Some(joined) = self.tasks.join_next_with_id().await {
            if let Err(error) = self.judge(joined) {
                tracing::error!(%error, "task failed while stopping");
                first = first.and(Err(error));
            }
        }
        first
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                tracing::warn!("cannot listen for SIGTERM; stopping on SIGINT only");
                if ctrl_c.await.is_err() {
                    tracing::error!("cannot listen for SIGINT either; stop herald with SIGKILL");
                    return;
                }
                token.cancel();
                return;
            };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        if ctrl_c.await.is_err() {
            return;
        }
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_before_shutdown_is_a_failure_and_names_itself() {
        let mut tasks = Supervisor::new(CancellationToken::new());
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("quitter", async { Ok(()) });
        let error = tasks.watch().await.unwrap_err();
        assert!(matches!(error, RunError::TaskEnded { task: "quitter" }), "{error}");
    }

    #[tokio::test]
    async fn a_panicking_task_is_reported_with_its_name() {
        let mut tasks = Supervisor::new(CancellationToken::new());
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("crasher", async { panic!("boom") });
        let error = tasks.watch().await.unwrap_err();
        assert!(matches!(error, RunError::TaskPanicked { task: "crasher", .. }), "{error}");
    }

    #[tokio::test]
    async fn tasks_that_stop_at_shutdown_end_cleanly() {
        let shutdown = CancellationToken::new();
        let mut tasks = Supervisor::new(shutdown.clone());
        for name in ["one", "two"] {
            let stop = shutdown.clone();
            tasks.spawn(name, async move {
                stop.cancelled().await;
                Ok(())
            });
        }
        shutdown.cancel();
        assert!(tasks.watch().await.is_ok());
        assert!(tasks.drain().await.is_ok());
    }
}
