//! Leader election on a coordination.k8s.io Lease, so that two replicas never run one backup:
//! only the holder runs the controller, and it stops (aborting its sessions) when it cannot
//! renew before the lease would expire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

/// How long a failed attempt waits before the next (client-go's retry period).
const RETRY: Duration = Duration::from_secs(2);

impl LeaseSettings {
    fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How long after a renewal was sent this replica may act: the rest of the lease is the
    /// margin in which it stops before another replica can take over.
    fn valid_for(&self) -> Duration {
        self.duration - self.renew_every()
    }
}

/// The lease as this replica last saw it change, and when by its own clock. Expiry is judged
/// from that moment, the way client-go does: the holder's `renewTime` comes from its clock,
/// and comparing it with ours would let clock skew hand the lease to two replicas.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(LeaseSpec, Instant)>,
}

impl Observer {
    pub fn observe(&mut self, spec: &LeaseSpec, now: Instant) {
        if self.last.as_ref().map(|(seen, _)| seen) != Some(spec) {
            self.last = Some((spec.clone(), now));
        }
    }

    /// Whether `identity` may take the lease now: free, ours, or unchanged for as long as its
    /// holder asked for since this replica saw it change.
    pub fn may_take(&self, identity: &str, now: Instant) -> bool {
        let Some((spec, seen_at)) = &self.last else {
            return true;
        };
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        if holder.is_empty() || holder == identity {
            return true;
        }
        let seconds = spec.lease_duration_seconds.unwrap_or(15).max(1);
        now >= *seen_at + Duration::from_secs(seconds as u64)
    }
}

/// Until when this replica may act on the cluster. Every request of the controllers' client
/// passes through it (see [`fenced`]), so a replica that froze past its lease (SIGSTOP, a hung
/// node) writes nothing when it thaws, before it has even noticed. Best effort, not a fencing
/// token: the monotonic clock stops while a machine is suspended (a paused VM thaws believing
/// less time passed), and a request sent just before a freeze may still arrive after it.
#[derive(Clone, Debug)]
pub struct Fence(Arc<Mutex<Option<Instant>>>);

impl Fence {
    /// Without leader election: always open.
    pub fn open() -> Fence {
        Fence(Arc::new(Mutex::new(None)))
    }

    /// Closed until the lease is taken.
    pub fn closed() -> Fence {
        Fence(Arc::new(Mutex::new(Some(Instant::now()))))
    }

    fn extend_to(&self, until: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }

    pub fn holds(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|until| Instant::now() < until)
    }
}

/// The controllers' client: requests pass only while `fence` holds.
pub fn fenced(config: kube::Config, fence: Fence) -> Result<Client, kube::Error> {
    let filter = tower::filter::FilterLayer::new(move |request| match fence.holds() {
        true => Ok(request),
        false => Err(LeaseLost),
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&filter)
        .build())
}

#[derive(Debug, thiserror::Error)]
#[error("this replica no longer holds the leader lease")]
pub struct LeaseLost;

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
async fn try_take(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let existing = api.get_opt(&settings.name).await?;
    let result = match existing {
        None => api
            .create(&PostParams::default(), &claim(None, settings))
            .await
            .map(|_| ()),
        Some(lease) => {
            observer.observe(
                lease.spec.as_ref().unwrap_or(&LeaseSpec::default()),
                Instant::now(),
            );
            if !observer.may_take(&settings.identity, Instant::now()) {
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

/// The lease, held: what [`hold`] needs to keep it.
pub struct Held {
    api: Api<Lease>,
    observer: Observer,
    /// When the last successful claim was sent.
    renewed_at: Instant,
}

/// Waits until this replica holds the lease, and opens `fence` for as long as it may act.
pub async fn acquire(client: &Client, settings: &LeaseSettings, fence: &Fence) -> Held {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let mut observer = Observer::default();
    loop {
        let sent = Instant::now();
        // A claim that answers later than the lease lasts proves nothing about now.
        match timeout(
            settings.valid_for(),
            try_take(&api, settings, &mut observer),
        )
        .await
        {
            Ok(Ok(true)) => {
                fence.extend_to(sent + settings.valid_for());
                info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return Held {
                    api,
                    observer,
                    renewed_at: sent,
                };
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(error = %e, "could not read the leader lease"),
            Err(_) => warn!("reading the leader lease timed out"),
        }
        // The holder's lease can only expire with time, so a timer (not a watch) is the signal.
        tokio::time::sleep(RETRY).await;
    }
}

/// Renews the lease, each renewal bounded by the time left, until it cannot be renewed before
/// this replica must stop acting; then returns, and the caller stops. The fence closes by
/// itself at that moment, whatever the caller does.
pub async fn hold(held: &mut Held, settings: &LeaseSettings, fence: &Fence) {
    let mut wait = settings.renew_every();
    loop {
        let stop_at = held.renewed_at + settings.valid_for();
        sleep_until((Instant::now() + wait).min(stop_at)).await;
        if Instant::now() >= stop_at {
            warn!("leader lease not renewed in time: stopping");
            return;
        }
        let sent = Instant::now();
        match timeout_at(stop_at, try_take(&held.api, settings, &mut held.observer)).await {
            Ok(Ok(true)) => {
                held.renewed_at = sent;
                fence.extend_to(sent + settings.valid_for());
                wait = settings.renew_every();
            }
            Ok(Ok(false)) => {
                warn!("another replica took the leader lease");
                return;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "could not renew the leader lease");
                wait = RETRY;
            }
            Err(_) => {
                warn!("renewing the leader lease did not finish in time: stopping");
                return;
            }
        }
    }
}

/// Gives the lease up on a clean exit so another replica takes over at once.
pub async fn release(held: &Held, settings: &LeaseSettings) {
    let api = &held.api;
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

    fn held(who: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_free_when_unheld_ours_or_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let mut observer = Observer::default();
        assert!(observer.may_take("a", t0), "no lease yet");
        observer.observe(&held("a", 1), t0);
        assert!(observer.may_take("a", t0), "ours");
        observer.observe(&held("b", 1), t0);
        assert!(!observer.may_take("a", secs(14)));
        assert!(observer.may_take("a", secs(15)));
        // A renewal restarts the count, from when this replica saw it.
        observer.observe(&held("b", 2), secs(10));
        assert!(!observer.may_take("a", secs(24)));
        assert!(observer.may_take("a", secs(25)));
        observer.observe(&LeaseSpec::default(), secs(26));
        assert!(observer.may_take("a", secs(26)), "released");
    }

    #[test]
    fn clock_skew_cannot_hand_the_lease_over() {
        // The holder's clock runs an hour behind: its renewTime looks long expired, but it
        // keeps changing, so the lease stays its own.
        let t0 = Instant::now();
        let mut observer = Observer::default();
        for (i, renewed) in [1, 6, 11, 16].into_iter().enumerate() {
            let now = t0 + Duration::from_secs(5 * i as u64);
            observer.observe(&held("b", renewed - 3600), now);
            assert!(!observer.may_take("a", now + Duration::from_secs(4)));
        }
    }

    #[test]
    fn a_leader_stops_a_third_of_the_lease_before_anyone_may_take_it() {
        let settings = LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert_eq!(settings.valid_for(), Duration::from_secs(10));
        assert!(Fence::open().holds());
        let fence = Fence::closed();
        assert!(!fence.holds());
        fence.extend_to(Instant::now() + settings.valid_for());
        assert!(fence.holds());
        fence.extend_to(Instant::now());
        assert!(!fence.holds());
    }
}
