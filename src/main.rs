use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use pgsnap::cli::{Cli, Command, RunArgs};
use pgsnap::telemetry::{self, Health, Metrics};
use pgsnap::{backup, leader, restore, schedule, verify};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", pgsnap::api::crds_yaml()?),
        Command::Run(args) => run(args).await?,
        Command::RestorePrepare(args) => std::process::exit(pgsnap::restore::prepare::main(args)),
        Command::VerifyServer(args) => std::process::exit(pgsnap::verify::server::main(args).await),
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init_logging(&args.log_level, args.log_format);
    let config = kube::Config::infer().await?;
    // The lease's own client is never fenced: it is how the fence opens.
    let lease_client = kube::Client::try_from(config.clone())?;
    let fence = match args.leader_election {
        true => leader::Fence::closed(),
        false => leader::Fence::open(),
    };
    let client = leader::fenced(config, fence.clone())?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    tokio::spawn(telemetry::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    // Ready means serving, not leading: a standby replica is ready too, or a rolling update
    // would wait for a pod that cannot lead while the old one holds the lease.
    lease_client.apiserver_version().await?;
    health.ready.store(true, Ordering::Relaxed);

    // A signal cancels `stop`; so does losing the leader lease.
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    let lease = leader::LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: args.identity.clone().unwrap_or_else(hostname),
        duration: Duration::from_secs(15),
    };
    let held = if args.leader_election {
        tokio::select! {
            held = leader::acquire(&lease_client, &lease, &fence) => Some(held),
            _ = stop.cancelled() => return Ok(()),
        }
    } else {
        None
    };
    metrics.leader.set(1);
    // The lease is renewed until the controllers have stopped, so a shutdown's last writes
    // (aborted backups' statuses, their snapshots deleted) still pass the fence.
    let stopped = CancellationToken::new();
    let hold = held.map(|held| {
        let (lease, fence, stop, stopped) =
            (lease.clone(), fence.clone(), stop.clone(), stopped.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut held = held;
            tokio::select! {
                _ = leader::hold(&mut held, &lease, &fence) => {
                    metrics.leader.set(0);
                    stop.cancel();
                }
                _ = stopped.cancelled() => {}
            }
            held
        })
    });
    run_controllers(client, &args, metrics.clone(), &stop).await;
    metrics.leader.set(0);
    stopped.cancel();
    if let Some(hold) = hold
        && let Ok(held) = hold.await
    {
        leader::release(&held, &lease).await;
    }
    Ok(())
}

/// The controllers, under one lease: a replica that loses it stops them all.
async fn run_controllers(
    client: kube::Client,
    args: &RunArgs,
    metrics: Arc<Metrics>,
    stop: &CancellationToken,
) {
    let backups = backup::Settings {
        max_concurrent: args.max_concurrent_backups.into(),
        connect_timeout: args.connect_timeout.0,
        namespace: args.namespace.clone(),
    };
    let restores = restore::Settings {
        namespace: args.namespace.clone(),
        image: args.restore_image.clone(),
    };
    let verifications = verify::Settings {
        namespace: args.namespace.clone(),
        image: args.restore_image.clone(),
    };
    tokio::join!(
        backup::run(
            client.clone(),
            backups,
            metrics.clone(),
            shutdown_on(stop.clone())
        ),
        restore::run(
            client.clone(),
            restores,
            metrics.clone(),
            shutdown_on(stop.clone())
        ),
        verify::run(
            client.clone(),
            verifications,
            metrics.clone(),
            shutdown_on(stop.clone())
        ),
        schedule::run(
            client,
            args.namespace.clone(),
            metrics,
            shutdown_on(stop.clone())
        ),
    );
}

async fn stop_on_signal(stop: CancellationToken) {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => return tracing::error!(error = %e, "cannot handle SIGTERM"),
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
    }
    stop.cancel();
}

/// A controller wants a Sync shutdown future; a oneshot receiver is one.
fn shutdown_on(stop: CancellationToken) -> impl Future<Output = ()> + Send + Sync + 'static {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        stop.cancelled().await;
        let _ = stop_tx.send(());
    });
    async move {
        let _ = stop_rx.await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "pgsnap".into())
}
