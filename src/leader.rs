//! Leader election on a coordination.k8s.io Lease, so that two replicas never run one backup:
//! only the holder runs the controller, and it stops (aborting its sessions) when it cannot
//! renew before the lease would expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaseSettings {
    fn renew_every(&self) -> Duration {
        self.duration / 3
    }
}

/// Whether `identity` may take the lease now: it is free, ours, or its holder stopped renewing.
pub fn may_take(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    match &spec.renew_time {
        Some(renewed) => renewed.0 + duration < now,
        None => true,
    }
}

fn claim(existing: Option<Lease>, settings: &LeaseSettings) -> Lease {
    let now = MicroTime(Timestamp::now());
    let mut lease = existing.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(settings.identity.clone());
    spec.lease_duration_seconds = Some(settings.duration.as_secs() as i32);
    spec.renew_time = Some(now);
    lease.spec = Some(spec);
    lease
}

/// One attempt to take or renew the lease; a conflict means another replica won.
async fn try_take(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let existing = api.get_opt(&settings.name).await?;
    let result = match existing {
        None => api
            .create(&PostParams::default(), &claim(None, settings))
            .await
            .map(|_| ()),
        Some(lease) => {
            if !may_take(
                lease.spec.as_ref().unwrap_or(&LeaseSpec::default()),
                &settings.identity,
                Timestamp::now(),
            ) {
                return Ok(false);
            }
            // resourceVersion is kept: the replace fails if someone else wrote in between.
            api.replace(
                &settings.name,
                &PostParams::default(),
                &claim(Some(lease), settings),
            )
            .await
            .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: &Client, settings: &LeaseSettings) -> Api<Lease> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    loop {
        match try_take(&api, settings).await {
            Ok(true) => {
                info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return api;
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not read the leader lease"),
        }
        // The holder's lease can only expire with time, so a timer (not a watch) is the signal.
        tokio::time::sleep(settings.renew_every()).await;
    }
}

/// Renews the lease until a renewal has failed for longer than the lease lasts; then returns,
/// and the caller must stop acting as leader.
pub async fn hold(api: Api<Lease>, settings: LeaseSettings) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(settings.renew_every()).await;
        match try_take(&api, &settings).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                warn!("another replica took the leader lease");
                return;
            }
            Err(e) => warn!(error = %e, "could not renew the leader lease"),
        }
        // Stop a margin before expiry, so the next leader never overlaps with us.
        if last_renewed.elapsed() + settings.renew_every() >= settings.duration {
            warn!("leader lease about to expire without renewal");
            return;
        }
    }
}

/// Gives the lease up on a clean exit so another replica takes over at once.
pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
    if let Ok(Some(mut lease)) = api.get_opt(&settings.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(settings.identity.as_str())
    {
        spec.holder_identity = None;
        if let Err(e) = api
            .replace(&settings.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "could not release the leader lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_when_unheld_ours_or_expired() {
        let now = Timestamp::from_second(1_000).unwrap();
        let held = |who: &str, renewed: i64| LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        };
        assert!(may_take(&LeaseSpec::default(), "a", now));
        assert!(may_take(&held("a", 999), "a", now));
        assert!(!may_take(&held("b", 990), "a", now));
        assert!(may_take(&held("b", 980), "a", now));
    }
}
