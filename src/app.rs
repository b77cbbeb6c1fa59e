//! `herald run`: leadership, store, controller, delivery and HTTP server in one process,
//! stopped together by one cancellation token.

use crate::api::auth::{Authenticator, EsbApps};
use crate::api::{self, AppState, Services};
use crate::config::Config;
use crate::controller;
use crate::delivery::{self, Delivery, index::SubscriptionIndex};
use crate::leader::{LeaderError, Leadership};
use crate::store::sqlite::SqliteStore;
use crate::store::{Limits, StoreError};
use crate::telemetry::Metrics;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    HttpClient(#[from] delivery::ClientError),
    #[error("reading ESB credentials {source_name}: {reason}")]
    EsbCredentials { source_name: String, reason: String },
}

async fn esb_apps(client: &kube::Client, config: &Config) -> Result<EsbApps, RunError> {
    let fail = |source_name: String, reason: String| RunError::EsbCredentials { source_name, reason };
    let mut apps = EsbApps::default();
    if let Some(path) = &config.api.esb_credentials_file {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| fail(shown.clone(), e.to_string()))?;
        apps.apps.extend(EsbApps::from_yaml(&text).map_err(|e| fail(shown, e.to_string()))?.apps);
    }
    if let Some(name) = &config.api.esb_credentials_secret {
        let shown = format!("Secret {}/{name}", config.namespace);
        let secret = kube::Api::<Secret>::namespaced(client.clone(), &config.namespace)
            .get(name)
            .await
            .map_err(|e| fail(shown.clone(), e.to_string()))?;
        let text = secret
            .data
            .and_then(|d| d.get("apps.yaml").map(|v| String::from_utf8_lossy(&v.0).into_owned()))
            .ok_or_else(|| fail(shown.clone(), "no key apps.yaml".into()))?;
        apps.apps.extend(EsbApps::from_yaml(&text).map_err(|e| fail(shown, e.to_string()))?.apps);
    }
    Ok(apps)
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
    let router = api::router(state.clone()).layer(axum::extract::DefaultBodyLimit::max(config.api.max_body_bytes));
    let server = tokio::spawn(api::serve(listener, router, config.api.tls.clone(), shutdown.clone()));

    let result = serve(&config, client, state, metrics, shutdown.clone()).await;
    shutdown.cancel();
    let served = server.await.unwrap_or(Ok(()));
    result?;
    served.map_err(RunError::Serve)
}

async fn serve(
    config: &Arc<Config>,
    client: kube::Client,
    state: Arc<AppState>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let leadership = config.leader_election.enabled.then(|| {
        Leadership::new(
            kube::Api::<Lease>::namespaced(client.clone(), &config.namespace),
            config.leader_election.lease_name.clone(),
            config.instance.clone(),
            Duration::from_secs(config.leader_election.lease_duration_seconds.max(3)),
        )
    });
    if let Some(leadership) = &leadership {
        if !leadership.acquire(&shutdown).await? {
            return Ok(());
        }
    }
    let store = Arc::new(SqliteStore::open(
        &config.store.path,
        Limits { quota_bytes: config.store.quota_bytes, backlog_cap: config.store.backlog_cap },
    )?);
    let (http, guard) = delivery::http_client(&config.callback_guard)?;
    let esb = esb_apps(&client, config).await?;

    let (index, changes) = SubscriptionIndex::new();
    let (ctx, controller) = controller::build(client.clone(), config.clone(), index.clone(), shutdown.clone());
    let delivery = Delivery::new(
        store,
        index,
        http,
        guard,
        client.clone(),
        ctx.subscriptions.clone(),
        config.delivery.clone(),
        Duration::from_secs(config.store.dead_letter_retention_seconds),
        metrics,
        shutdown.clone(),
    );
    let auth = Arc::new(Authenticator::new(client.clone(), &config.api.auth, esb));
    let controller_task = tokio::spawn(controller);
    let keep_lease = async {
        match &leadership {
            Some(leadership) => leadership.keep(&shutdown).await,
            None => {
                shutdown.cancelled().await;
                Ok(())
            }
        }
    };
    let start = async {
        if controller::cache_ready(&ctx.subscriptions).await.is_err()
            || controller::cache_ready(&ctx.namespaces).await.is_err()
        {
            return None;
        }
        let _ = state.services.set(Arc::new(Services {
            controller: ctx.clone(),
            delivery: delivery.clone(),
            auth,
            names: Default::default(),
        }));
        let delivery_task = tokio::spawn(delivery.clone().run(changes, client.clone()));
        state.ready.store(true, Ordering::Release);
        tracing::info!("caches synced; ready");
        Some(delivery_task)
    };
    // Renew the lease while starting and serving; losing it ends herald.
    let (kept, delivery_task) = tokio::join!(keep_lease, start);
    state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    if let Some(task) = delivery_task {
        let _ = task.await;
    }
    let _ = controller_task.await;
    kept.map_err(RunError::from)
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                let _ = ctrl_c.await;
                token.cancel();
                return;
            };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}
