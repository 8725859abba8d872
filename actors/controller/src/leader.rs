//! Leader election with a `coordination.k8s.io/v1` Lease: one controller replica
//! serves and reconciles (allocation must go through one registry); the others wait.
//!
//! Rules: the lease is taken when it does not exist, is already ours (a restarted
//! container of the same pod keeps its identity and takes over at once), or was not
//! renewed for `lease_duration`. Every write is conditional on the resourceVersion
//! read, so two candidates never both win. The holder renews every third of the
//! duration; if it cannot renew for a whole duration it must stop ([`Leadership::lost`]
//! resolves and the process exits), since another replica may take over then.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;

/// Where the lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long an unrenewed lease stays valid.
    pub duration: Duration,
}

/// Held leadership; renewal runs in the background until dropped.
#[derive(Debug)]
pub struct Leadership {
    lost: watch::Receiver<bool>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves when the lease could not be renewed for a whole duration.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Try once: `Ok(true)` if we hold the lease now.
async fn try_take(api: &Api<Lease>, c: &LeaseConfig) -> Result<bool, kube::Error> {
    let spec = LeaseSpec {
        holder_identity: Some(c.identity.clone()),
        lease_duration_seconds: Some(secs(c.duration)),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = api.get_opt(&c.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(c.name.clone()),
                namespace: Some(c.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let ours = current.holder_identity.as_deref() == Some(c.identity.as_str());
    let expired = current.renew_time.as_ref().is_none_or(|t| {
        let valid = Duration::from_secs(
            u64::try_from(current.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        let renewed_ms = t.0.as_millisecond();
        let until = renewed_ms.saturating_add(i64::try_from(valid.as_millis()).unwrap_or(i64::MAX));
        Timestamp::now().as_millisecond() > until
    });
    if !ours && !expired && current.holder_identity.is_some() {
        return Ok(false);
    }
    let mut next = spec;
    if ours {
        next.acquire_time = current.acquire_time;
    }
    next.lease_transitions = Some(current.lease_transitions.unwrap_or(0) + i32::from(!ours));
    lease.spec = Some(next);
    // Conditional on the resourceVersion we read (kept in `lease.metadata`).
    match api.replace(&c.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Wait until this replica holds the lease, then keep renewing it.
pub async fn acquire(client: Client, config: LeaseConfig) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let retry = config.duration / 3;
    loop {
        match try_take(&api, &config).await {
            Ok(true) => break,
            Ok(false) => tracing::info!(lease = %config.name, "another replica leads; waiting"),
            Err(e) => tracing::warn!(lease = %config.name, error = %e, "leader election"),
        }
        tokio::time::sleep(retry).await;
    }
    tracing::info!(lease = %config.name, identity = %config.identity, "leading");
    let (tx, lost) = watch::channel(false);
    let renewal = tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            match try_take(&api, &config).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %config.name, "lease taken by another replica");
                    let _ = tx.send(true);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
            if last_ok.elapsed() >= config.duration {
                tracing::error!(lease = %config.name, "lease not renewed for its whole duration");
                let _ = tx.send(true);
                return;
            }
        }
    });
    Leadership { lost, renewal }
}
