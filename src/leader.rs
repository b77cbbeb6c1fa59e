//! Leadership: one active herald per namespace holds a coordination.k8s.io Lease
//! (docs/design.md §6), taken and renewed with optimistic concurrency. A herald that sees
//! another instance holding the lease stops (Kubernetes restarts it), as linkerd and
//! kaniop do. A herald that merely cannot reach the API server keeps going: events must
//! keep flowing through an API-server outage, and the exclusive lock on the store
//! directory (one PersistentVolume) is what keeps a second writer out meanwhile.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading lease {name}: {source}")]
    Read { name: String, source: kube::Error },
    #[error("writing lease {name}: {source}")]
    Write { name: String, source: kube::Error },
    #[error("lost lease {name}: another instance holds it")]
    Lost { name: String },
}

pub struct Leadership {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Whether `lease` is free for `identity` at `now`: unheld, held by us, or expired.
pub fn available(lease: &LeaseSpec, identity: &str, now: jiff::Timestamp) -> bool {
    let holder = lease.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = i64::from(lease.lease_duration_seconds.unwrap_or(0).max(0));
    match &lease.renew_time {
        Some(MicroTime(renewed)) => renewed.as_second().saturating_add(duration) < now.as_second(),
        None => true,
    }
}

impl Leadership {
    pub fn new(api: Api<Lease>, name: String, identity: String, duration: Duration) -> Self {
        Leadership { api, name, identity, duration }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn spec(&self, acquired: Option<MicroTime>, now: jiff::Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the lease; true when we hold it afterwards.
    pub async fn try_hold(&self) -> Result<bool, LeaderError> {
        let now = jiff::Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaderError::Read { name: self.name.clone(), source })?;
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(self.spec(None, now)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                if !available(&spec, &self.identity, now) {
                    return Ok(false);
                }
                let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                lease.spec = Some(self.spec(if ours { spec.acquire_time } else { None }, now));
                // The resourceVersion we read makes this a compare-and-swap.
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(LeaderError::Write { name: self.name.clone(), source }),
        }
    }

    /// Waits until this instance holds the lease (or `shutdown`; then false).
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Result<bool, LeaderError> {
        let retry = (self.duration / 5).max(Duration::from_millis(200));
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leadership acquired");
                    return Ok(true);
                }
                Ok(false) => tracing::debug!(lease = %self.name, "lease held by another instance; waiting"),
                Err(error) => tracing::warn!(%error, "taking the lease failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.cancelled() => return Ok(false),
            }
        }
    }

    /// Renews until `shutdown`; returns an error once another instance holds the lease.
    pub async fn keep(&self, shutdown: &CancellationToken) -> Result<(), LeaderError> {
        let period = self.duration / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => {
                    self.release().await;
                    return Ok(());
                }
            }
            match self.try_hold().await {
                Ok(true) => {}
                Ok(false) => return Err(LeaderError::Lost { name: self.name.clone() }),
                Err(error) => tracing::warn!(%error, "renewing the lease failed; still serving"),
            }
        }
    }

    /// Hands the lease back on a clean shutdown so a successor need not wait it out.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let ours = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str());
            if ours {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                }
                let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            renew_time: Some(MicroTime(jiff::Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_available_when_free_ours_or_expired() {
        let now = jiff::Timestamp::from_second(1000).unwrap();
        assert!(available(&lease(None, 990, 15), "me", now));
        assert!(available(&lease(Some("me"), 999, 15), "me", now));
        assert!(!available(&lease(Some("other"), 990, 15), "me", now));
        assert!(available(&lease(Some("other"), 980, 15), "me", now));
    }
}
