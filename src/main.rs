use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use pgsnap::cli::{Cli, Command, RunArgs};
use pgsnap::telemetry::{self, Health, Metrics};
use pgsnap::{backup, leader, restore};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", pgsnap::api::crds_yaml()?),
        Command::Run(args) => run(args).await?,
        Command::RestorePrepare(args) => std::process::exit(pgsnap::restore::prepare::main(args)),
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init_logging(&args.log_level, args.log_format);
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    tokio::spawn(telemetry::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");

    let settings = backup::Settings {
        max_concurrent: args.max_concurrent_backups.into(),
        connect_timeout: args.connect_timeout.0,
        namespace: args.namespace.clone(),
    };
    let lease = leader::LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: args.identity.clone().unwrap_or_else(hostname),
        duration: Duration::from_secs(15),
    };

    // A signal cancels `stop`; so does losing the leader lease.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
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
    });
    let lease_api = if args.leader_election {
        tokio::select! {
            api = leader::acquire(&client, &lease) => Some(api),
            _ = stop.cancelled() => return Ok(()),
        }
    } else {
        None
    };
    if let Some(api) = lease_api.clone() {
        let (stop, lease) = (stop.clone(), lease.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = leader::hold(api, lease) => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }
    // A controller wants a Sync future; a oneshot receiver is one.
    let shutdown_on = |stop: tokio_util::sync::CancellationToken| {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            stop.cancelled().await;
            let _ = stop_tx.send(());
        });
        async move {
            let _ = stop_rx.await;
        }
    };
    let shutdown = shutdown_on(stop.clone());
    let restore_settings = restore::Settings {
        namespace: args.namespace.clone(),
        image: args.restore_image.clone(),
    };
    let restores = restore::run(
        client.clone(),
        restore_settings,
        metrics.clone(),
        shutdown_on(stop.clone()),
    );
    let ready = {
        let health = health.clone();
        move || health.ready.store(true, Ordering::Relaxed)
    };
    // Both controllers run under the same lease: a replica that loses it stops both.
    tokio::join!(
        backup::run(client, settings, metrics, ready, shutdown),
        restores
    );
    if let Some(api) = lease_api {
        leader::release(&api, &lease).await;
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "pgsnap".into())
}
