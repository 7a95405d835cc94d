//! Measures, for every major 10-18, how long a server stays in backup mode: start (the
//! checkpoint) and stop (end-of-backup record, WAL switch, archive wait, also measured
//! without the wait), with `fast` and with a spread checkpoint, on an idle server and under pgbench load. Prints a markdown
//! table. Not a test: timings depend on the machine.
//!
//!   cargo bench -p pgsnap --bench backup_window            # all majors
//!   cargo bench -p pgsnap --bench backup_window -- 16 17   # some

use std::time::Duration;

use pgsnap::postgres::Session;
use pgsnap_e2e::pgharness::{MAJORS, Pg, TestDir, archive_command};

/// Spread checkpoints take checkpoint_completion_target × checkpoint_timeout when there is
/// enough to write: 0.5 × 30 s (the smallest checkpoint_timeout) bounds them at ~15 s.
const SETTINGS: &[(&str, &str)] = &[
    ("archive_mode", "on"),
    ("checkpoint_timeout", "'30s'"),
    ("checkpoint_completion_target", "0.5"),
    ("max_wal_size", "'1GB'"),
];

struct Sample {
    start: Duration,
    stop: Duration,
}

async fn measure(pg: &Pg, fast: bool, wait_for_archive: bool) -> Sample {
    let mut s = Session::connect(&pg.opts("postgres", None))
        .await
        .expect("connect");
    let started = s
        .start("benchmark", fast, Duration::from_secs(600))
        .await
        .expect("start");
    let stopped = s.stop(wait_for_archive).await.expect("stop");
    Sample {
        start: started.took,
        stop: stopped.took,
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let majors: Vec<u32> = {
        let args: Vec<u32> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if args.is_empty() {
            MAJORS.to_vec()
        } else {
            args
        }
    };
    println!(
        "| major | load | fast: start | fast: stop | fast: in backup mode | fast, no archive wait: stop | spread: start | spread: stop | spread: in backup mode |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for major in majors {
        let dir = TestDir::new(&format!("bench{major}"));
        let archive = dir.owned("archive");
        let mut settings = SETTINGS.to_vec();
        let cmd = archive_command(&archive);
        settings.push(("archive_command", &cmd));
        let mut pg = Pg::init(major, &dir, "primary", &settings);
        pg.start(Duration::from_secs(60))
            .await
            .expect("server start");
        pg.pgbench_init(1);
        for load in [false, true] {
            // The same amount of dirty data before each measurement: 5 s of pgbench.
            let warmup = pg.pgbench_load(2, 5);
            tokio::time::sleep(Duration::from_secs(5)).await;
            warmup.finish();
            let running = load.then(|| pg.pgbench_load(2, 600));
            let fast = measure(&pg, true, true).await;
            let no_wait = measure(&pg, true, false).await;
            let warmup = (!load).then(|| pg.pgbench_load(2, 5));
            if let Some(w) = warmup {
                tokio::time::sleep(Duration::from_secs(5)).await;
                w.finish();
            }
            let spread = measure(&pg, false, true).await;
            if let Some(r) = running {
                r.finish();
            }
            println!(
                "| {major} | {} | {} | {} | {} | {} | {} | {} | {} |",
                if load { "pgbench -c 2" } else { "idle" },
                secs(fast.start),
                secs(fast.stop),
                secs(fast.start + fast.stop),
                secs(no_wait.stop),
                secs(spread.start),
                secs(spread.stop),
                secs(spread.start + spread.stop),
            );
        }
        pg.stop();
    }
}
