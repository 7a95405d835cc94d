//! Logs, metrics and the health endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr; `RUST_LOG` (or `--log-level`) filters them.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: Outcome,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    Completed,
    Failed,
}

/// One BackupSchedule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabels {
    pub namespace: String,
    pub schedule: String,
}

/// One database: its PostgreSQL system identifier (`status.postgres.systemIdentifier`), which
/// stays the same across pods, failovers and restarts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatabaseLabels {
    pub namespace: String,
    pub database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: TimedStep,
}

/// The timed steps of a backup.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TimedStep {
    /// `pg_backup_start` called → returned: the checkpoint.
    Start,
    /// Snapshots requested → all cut: the storage driver.
    Cut,
    /// One VolumeGroupSnapshot of every volume requested → cut: the storage driver.
    GroupCut,
    /// `pg_backup_stop` called → returned: mostly the archive wait.
    Stop,
    /// Cut → ready to use, outside backup mode.
    Ready,
    /// Time in backup mode minus start, cut and stop: what pgsnap itself adds.
    Overhead,
    /// After backup mode: the WAL snapshot requested → cut and its segments listed.
    WalSnapshot,
    /// After backup mode: until the backup's last WAL segment was archived.
    ArchiveWait,
}

/// The operator's metrics, registered once and shared by every reconciler.
pub struct Metrics {
    pub registry: Registry,
    pub backups: Family<ResultLabels, Counter>,
    pub restores: Family<ResultLabels, Counter>,
    pub step_seconds: Family<StepLabels, Histogram>,
    pub backup_mode_seconds: Histogram,
    pub in_flight: Gauge,
    /// 1 while this replica runs the controllers (holds the lease, or elects none).
    pub leader: Gauge,
    /// Per schedule: when its newest Completed Backup left backup mode (Unix seconds).
    pub schedule_last_success: Family<ScheduleLabels, Gauge>,
    /// Per schedule: the longest time between its next runs, for "no success within 2
    /// intervals".
    pub schedule_interval: Family<ScheduleLabels, Gauge>,
    /// Per schedule: the Backups retention keeps.
    pub schedule_kept: Family<ScheduleLabels, Gauge>,
    /// Per schedule: when its newest Failed Backup failed (Unix seconds).
    pub schedule_last_failure: Family<ScheduleLabels, Gauge>,
    /// Per database: when its newest Completed backup left backup mode (Unix seconds).
    pub database_last_success: Family<DatabaseLabels, Gauge>,
    /// Per database: when its newest backup failed (Unix seconds).
    pub database_last_failure: Family<DatabaseLabels, Gauge>,
    pub verifications: Family<VerificationLabels, Counter>,
    /// Per database: when one of its backups last passed a Verification (Unix seconds).
    pub database_last_verified: Family<DatabaseLabels, Gauge>,
    pub verification_seconds: Histogram,
}

/// A Verification's end: passed or failed, and the reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    pub result: VerificationResult,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum VerificationResult {
    Passed,
    Failed,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pgsnap");
        let backups = Family::<ResultLabels, Counter>::default();
        let restores = Family::<ResultLabels, Counter>::default();
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                900.0,
            ])
        });
        let backup_mode_seconds = Histogram::new([
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
        ]);
        let in_flight = Gauge::default();
        let leader = Gauge::default();
        let schedule_last_success = Family::<ScheduleLabels, Gauge>::default();
        let schedule_interval = Family::<ScheduleLabels, Gauge>::default();
        let schedule_kept = Family::<ScheduleLabels, Gauge>::default();
        let schedule_last_failure = Family::<ScheduleLabels, Gauge>::default();
        let database_last_success = Family::<DatabaseLabels, Gauge>::default();
        let database_last_failure = Family::<DatabaseLabels, Gauge>::default();
        let verifications = Family::<VerificationLabels, Counter>::default();
        let database_last_verified = Family::<DatabaseLabels, Gauge>::default();
        let verification_seconds =
            Histogram::new([10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]);
        registry.register(
            "verifications",
            "Verifications that ended, by result and reason",
            verifications.clone(),
        );
        registry.register(
            "database_last_verified_timestamp_seconds",
            "When a backup of each database last passed a Verification",
            database_last_verified.clone(),
        );
        registry.register(
            "verification_seconds",
            "Duration of a Verification, restore and checks",
            verification_seconds.clone(),
        );
        registry.register(
            "schedule_last_failure_timestamp_seconds",
            "When each schedule's newest Failed Backup failed",
            schedule_last_failure.clone(),
        );
        registry.register(
            "database_last_success_timestamp_seconds",
            "When each database's newest Completed backup left backup mode",
            database_last_success.clone(),
        );
        registry.register(
            "database_last_failure_timestamp_seconds",
            "When each database's newest backup failed",
            database_last_failure.clone(),
        );
        registry.register(
            "schedule_last_success_timestamp_seconds",
            "When each schedule's newest Completed Backup left backup mode",
            schedule_last_success.clone(),
        );
        registry.register(
            "schedule_interval_seconds",
            "Each schedule's expected time between runs",
            schedule_interval.clone(),
        );
        registry.register(
            "schedule_backups_kept",
            "Backups each schedule's retention keeps",
            schedule_kept.clone(),
        );
        registry.register(
            "backups",
            "Backups that ended, by result and reason",
            backups.clone(),
        );
        registry.register(
            "restores",
            "Restores that ended, by result and reason",
            restores.clone(),
        );
        registry.register(
            "backup_step_seconds",
            "Duration of each step of a backup",
            step_seconds.clone(),
        );
        registry.register(
            "backup_mode_seconds",
            "Time a server spent in backup mode",
            backup_mode_seconds.clone(),
        );
        registry.register(
            "backups_in_flight",
            "Backups holding a database session now",
            in_flight.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica runs the controllers",
            leader.clone(),
        );
        Metrics {
            registry,
            backups,
            restores,
            step_seconds,
            backup_mode_seconds,
            in_flight,
            leader,
            schedule_last_success,
            schedule_interval,
            schedule_kept,
            schedule_last_failure,
            database_last_success,
            database_last_failure,
            verifications,
            database_last_verified,
            verification_seconds,
        }
    }
}

impl Metrics {
    pub fn observe(&self, step: TimedStep, seconds: f64) {
        self.step_seconds
            .get_or_create(&StepLabels { step })
            .observe(seconds);
    }

    /// A database's backup that ended at `at` (Unix seconds): its freshness gauge moves
    /// forward, never back, so replaying old Backups after a restart rebuilds it.
    pub fn database_backup_ended(&self, labels: DatabaseLabels, result: Outcome, at: i64) {
        let family = match result {
            Outcome::Completed => &self.database_last_success,
            Outcome::Failed => &self.database_last_failure,
        };
        let gauge = family.get_or_create(&labels);
        if gauge.get() < at {
            gauge.set(at);
        }
    }

    /// A Verification that ended at `at`, `seconds` after its turn came.
    pub fn verification_ended(
        &self,
        passed: bool,
        reason: &str,
        database: DatabaseLabels,
        at: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
        seconds: Option<f64>,
    ) {
        let result = match passed {
            true => VerificationResult::Passed,
            false => VerificationResult::Failed,
        };
        self.verifications
            .get_or_create(&VerificationLabels {
                result,
                reason: reason.to_string(),
            })
            .inc();
        if let Some(s) = seconds {
            self.verification_seconds.observe(s);
        }
        if passed {
            let gauge = self.database_last_verified.get_or_create(&database);
            gauge.set(gauge.get().max(at.0.as_second()));
        }
    }

    /// The OpenMetrics text `/metrics` serves.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }

    pub fn ended(&self, result: Outcome, reason: &str) {
        self.backups
            .get_or_create(&ResultLabels {
                result,
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn restore_ended(&self, result: Outcome, reason: &str) {
        self.restores
            .get_or_create(&ResultLabels {
                result,
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// Readiness: true once the replica serves and reaches the API server, leading or not.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Shared { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

async fn render_metrics(State(shared): State<Shared>) -> impl IntoResponse {
    match shared.metrics.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding failed".into(),
        ),
    }
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving yet")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_never_goes_back() {
        let m = Metrics::default();
        let db = || DatabaseLabels {
            namespace: "shop".into(),
            database: "7350000000000000001".into(),
        };
        m.database_backup_ended(db(), Outcome::Completed, 200);
        // An older Backup replayed after a restart, then a failure: success stays at 200.
        m.database_backup_ended(db(), Outcome::Completed, 100);
        m.database_backup_ended(db(), Outcome::Failed, 300);
        assert_eq!(m.database_last_success.get_or_create(&db()).get(), 200);
        assert_eq!(m.database_last_failure.get_or_create(&db()).get(), 300);
    }
}
