//! `herald run`: controller and HTTP server in one process, one cancellation token.

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::controller;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let config = Arc::new(config);
    let client = kube::Client::try_default().await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen { addr: config.listen, source })?;
    tracing::info!(addr = %config.listen, namespace = %config.namespace, "herald starting");

    let (ctx, controller) = controller::build(client, config.clone(), shutdown.clone());
    let state = ApiState::default();
    let ready = state.ready.clone();
    let readiness = async move {
        if controller::cache_ready(&ctx.subscriptions).await.is_ok() && controller::cache_ready(&ctx.namespaces).await.is_ok() {
            ready.store(true, Ordering::Release);
            tracing::info!("caches synced; ready");
        }
    };
    let server = api::serve(listener, api::router(state), shutdown.clone());
    let controller_task = tokio::spawn(controller);
    let readiness_task = tokio::spawn(readiness);
    let served = server.await;
    shutdown.cancel();
    readiness_task.abort();
    let _ = controller_task.await;
    served.map_err(RunError::Serve)
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
