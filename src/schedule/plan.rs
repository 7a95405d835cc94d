//! The BackupSchedule's decisions as pure functions of a clock: which run is due, and which
//! Backups retention keeps. The reconciler reads the cluster and does what these decide.

use std::collections::{BTreeMap, BTreeSet};

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};

use crate::api::schedule::{BackupRef, KeptBackup, Retention, ScheduleVerification};

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Clock {
    cron: Cron,
    tz: TimeZone,
}

impl Clock {
    /// Five cron fields, or six with seconds first; an IANA zone (default UTC).
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Clock, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(schedule)
            .map_err(|e| format!("schedule {schedule:?}: {e}"))?;
        let tz = match time_zone {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|e| format!("time zone {name:?}: {e}"))?,
        };
        Ok(Clock { cron, tz })
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    fn zoned(&self, at: Timestamp) -> Zoned {
        at.to_zoned(self.tz.clone())
    }

    /// The first run strictly after `at`.
    pub fn next_after(&self, at: Timestamp) -> Option<Timestamp> {
        let next = self
            .cron
            .find_next_occurrence(&self.zoned(at), false)
            .ok()?;
        Some(next.timestamp())
    }

    /// The longest time between two of the next few runs after `at`: the interval an alert
    /// may expect (a weekday schedule's is its weekend).
    pub fn interval_after(&self, at: Timestamp) -> Option<std::time::Duration> {
        let mut runs = vec![self.next_after(at)?];
        for _ in 0..8 {
            let last = *runs.last()?;
            runs.push(self.next_after(last)?);
        }
        runs.windows(2)
            .map(|w| w[1].duration_since(w[0]).unsigned_abs())
            .max()
    }

    /// The last run at or before `at`.
    fn last_at_or_before(&self, at: Timestamp) -> Option<Timestamp> {
        let last = self
            .cron
            .find_previous_occurrence(&self.zoned(at), true)
            .ok()?;
        Some(last.timestamp())
    }
}

/// What a reconcile at `now` does about runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    /// No run came due since the last one acted on.
    None,
    /// Back up now for the run due at this time: the latest due one, however many were
    /// missed (at most one catch-up, never a burst).
    Due(Timestamp),
    /// The latest due run is older than the starting deadline: skipped, and recorded as acted
    /// on so that it is not tried again.
    Missed(Timestamp),
}

/// The run due at `now`, given the last one acted on (or when the schedule was created).
pub fn due(
    clock: &Clock,
    acted_on: Timestamp,
    now: Timestamp,
    starting_deadline: std::time::Duration,
) -> Run {
    let Some(latest) = clock.last_at_or_before(now) else {
        return Run::None;
    };
    if latest <= acted_on {
        return Run::None;
    }
    let late = now.duration_since(latest);
    match late <= SignedDuration::try_from(starting_deadline).unwrap_or(SignedDuration::MAX) {
        true => Run::Due(latest),
        false => Run::Missed(latest),
    }
}

/// A Backup of the schedule, as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub state: State,
    /// A Restore in progress reads it.
    pub restoring: bool,
    /// Annotated `pgsnap.io/keep: "true"`.
    pub annotated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    /// Completed; the time its backup mode ended.
    Completed(Timestamp),
    /// Failed; when it was created.
    Failed(Timestamp),
}

/// The period a time falls in, in the schedule's time zone: (year, month or week, day, hour,
/// UTC offset: the hour repeated when clocks go back is two hours).
type Bucket = fn(&Zoned) -> (i32, i32, i32, i32, i32);

/// What retention decided: what stays (newest first, with why) and what goes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub kept: Vec<KeptBackup>,
    pub prune: Vec<String>,
}

/// The default time Failed Backups stay for inspection.
pub const KEEP_FAILED_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Grandfather-father-son over the Completed Backups, in the schedule's time zone: the newest
/// `keep_last`, and the newest of each of the last N hours, days, ISO weeks, months, years
/// that have one. Without any rule, every Completed Backup stays. Never pruned: the newest
/// Completed, one running, one a Restore reads, one annotated to keep.
pub fn retain(
    candidates: &[Candidate],
    retention: &Retention,
    tz: &TimeZone,
    now: Timestamp,
) -> Decision {
    let mut reasons: BTreeMap<&str, BTreeSet<&'static str>> = BTreeMap::new();
    let mut completed: Vec<(&Candidate, Timestamp)> = candidates
        .iter()
        .filter_map(|c| match c.state {
            State::Completed(at) => Some((c, at)),
            _ => None,
        })
        .collect();
    completed.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.name.cmp(&a.0.name)));
    let any_rule = [
        retention.keep_last,
        retention.hourly,
        retention.daily,
        retention.weekly,
        retention.monthly,
        retention.yearly,
    ]
    .iter()
    .any(Option::is_some);
    for (i, (c, _)) in completed.iter().enumerate() {
        let why = reasons.entry(&c.name).or_default();
        if i == 0 {
            why.insert("newest");
        }
        if !any_rule {
            why.insert("noRetention");
        }
        if retention.keep_last.is_some_and(|n| i < n as usize) {
            why.insert("last");
        }
    }
    let periods: [(&'static str, Option<u32>, Bucket); 5] = [
        ("hourly", retention.hourly, |z| {
            let offset = z.offset().seconds();
            (
                z.year().into(),
                z.month().into(),
                z.day().into(),
                z.hour().into(),
                offset,
            )
        }),
        ("daily", retention.daily, |z| {
            (z.year().into(), z.month().into(), z.day().into(), 0, 0)
        }),
        ("weekly", retention.weekly, |z| {
            let week = z.date().iso_week_date();
            (week.year().into(), week.week().into(), 0, 0, 0)
        }),
        ("monthly", retention.monthly, |z| {
            (z.year().into(), z.month().into(), 0, 0, 0)
        }),
        ("yearly", retention.yearly, |z| {
            (z.year().into(), 0, 0, 0, 0)
        }),
    ];
    for (label, count, bucket) in periods {
        let Some(count) = count else { continue };
        let mut seen = BTreeSet::new();
        for (c, at) in &completed {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(bucket(&at.to_zoned(tz.clone()))) {
                reasons.entry(&c.name).or_default().insert(label);
            }
        }
    }
    let keep_failed_for = retention
        .keep_failed_for
        .map(|d| d.0)
        .unwrap_or(KEEP_FAILED_FOR);
    let keep_failed_for = SignedDuration::try_from(keep_failed_for).unwrap_or(SignedDuration::MAX);
    for c in candidates {
        let why = reasons.entry(&c.name).or_default();
        match c.state {
            State::Running => {
                why.insert("running");
            }
            State::Failed(at) if now.duration_since(at) < keep_failed_for => {
                why.insert("failedRecently");
            }
            _ => {}
        }
        if c.restoring {
            why.insert("restoring");
        }
        if c.annotated {
            why.insert("annotated");
        }
    }
    let order = |c: &Candidate| match c.state {
        State::Completed(at) | State::Failed(at) => Some(at),
        State::Running => None,
    };
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| {
        // Running first (newest of all), then newest first.
        order(b)
            .is_none()
            .cmp(&order(a).is_none())
            .then_with(|| order(b).cmp(&order(a)))
            .then_with(|| b.name.cmp(&a.name))
    });
    let mut decision = Decision::default();
    for c in sorted {
        let why = reasons.remove(c.name.as_str()).unwrap_or_default();
        if why.is_empty() {
            decision.prune.push(c.name.clone());
        } else {
            decision.kept.push(KeptBackup {
                name: c.name.clone(),
                reasons: why.into_iter().map(str::to_string).collect(),
            });
        }
    }
    decision
}

/// The name of the Backup for the run due at `at`: the schedule's name and the UTC time, so
/// names sort by time and a run never makes two.
pub fn backup_name(schedule: &str, at: Timestamp) -> String {
    let stamp = at.strftime("%Y%m%d-%H%M%S").to_string();
    crate::controller::bounded_name(schedule, &stamp, 253)
}

/// Whether the schedule's newest Completed backup, `newest`, is to be verified now, and the
/// count of Completed backups since the last verified one afterwards. `seen` is the newest
/// Completed backup the last pass saw: only a new one counts.
pub fn to_verify(
    policy: &ScheduleVerification,
    newest: &BackupRef,
    seen: Option<&BackupRef>,
    last_verified: Option<&BackupRef>,
    since: u32,
    tz: &TimeZone,
) -> (bool, u32) {
    if seen.is_some_and(|s| s.name == newest.name)
        || last_verified.is_some_and(|v| v.name == newest.name)
    {
        return (false, since);
    }
    let since = since + 1;
    let day = |b: &BackupRef| b.time.as_ref().map(|t| t.0.to_zoned(tz.clone()).date());
    let due = match (policy.every, last_verified) {
        (_, None) => true,
        (Some(every), Some(_)) => since >= every,
        (None, Some(last)) => day(last) != day(newest),
    };
    match due {
        true => (true, 0),
        false => (false, since),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn secs(n: u64) -> std::time::Duration {
        std::time::Duration::from_secs(n)
    }

    #[test]
    fn the_latest_due_run_and_only_it_is_made_up() {
        let clock = Clock::parse("0 3 * * *", None).unwrap();
        let created = ts("2026-01-01T12:00:00Z");
        assert_eq!(
            due(&clock, created, ts("2026-01-02T02:59:59Z"), secs(3600)),
            Run::None
        );
        assert_eq!(
            due(&clock, created, ts("2026-01-02T03:00:10Z"), secs(3600)),
            Run::Due(ts("2026-01-02T03:00:00Z"))
        );
        // Acted on: nothing more until the next day.
        let acted = ts("2026-01-02T03:00:00Z");
        assert_eq!(
            due(&clock, acted, ts("2026-01-02T09:00:00Z"), secs(3600 * 8)),
            Run::None
        );
        // The operator was down for three days: one catch-up for the latest run, not three.
        assert_eq!(
            due(&clock, acted, ts("2026-01-05T03:30:00Z"), secs(3600)),
            Run::Due(ts("2026-01-05T03:00:00Z"))
        );
        // Past the starting deadline: missed, not made up.
        assert_eq!(
            due(&clock, acted, ts("2026-01-05T05:00:00Z"), secs(3600)),
            Run::Missed(ts("2026-01-05T03:00:00Z"))
        );
        assert_eq!(
            clock.next_after(ts("2026-01-05T03:00:00Z")),
            Some(ts("2026-01-06T03:00:00Z"))
        );
        assert_eq!(
            clock.interval_after(ts("2026-01-05T03:00:00Z")),
            Some(secs(86400))
        );
    }

    #[test]
    fn seconds_time_zones_and_bad_patterns() {
        let every5 = Clock::parse("*/5 * * * * *", None).unwrap();
        assert_eq!(
            every5.next_after(ts("2026-01-01T00:00:02Z")),
            Some(ts("2026-01-01T00:00:05Z"))
        );
        // 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer.
        let berlin = Clock::parse("0 3 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            berlin.next_after(ts("2026-01-10T00:00:00Z")),
            Some(ts("2026-01-10T02:00:00Z"))
        );
        assert_eq!(
            berlin.next_after(ts("2026-07-10T00:00:00Z")),
            Some(ts("2026-07-10T01:00:00Z"))
        );
        // The spring-forward night (29 March 2026) skips 02:00-03:00 local: the 02:30 run
        // happens at the first instant after the gap, 03:00 CEST, once.
        let gap = Clock::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            gap.next_after(ts("2026-03-28T02:00:00Z")),
            Some(ts("2026-03-29T01:00:00Z"))
        );
        // A weekday schedule's interval is its weekend.
        let weekdays = Clock::parse("0 3 * * 1-5", None).unwrap();
        assert_eq!(
            weekdays.interval_after(ts("2026-01-01T00:00:00Z")),
            Some(secs(3 * 86400))
        );
        assert!(Clock::parse("61 * * * *", None).is_err());
        assert!(Clock::parse("0 3 * * *", Some("Mars/Olympus")).is_err());
    }

    fn completed(name: &str, at: &str) -> Candidate {
        Candidate {
            name: name.into(),
            state: State::Completed(ts(at)),
            restoring: false,
            annotated: false,
        }
    }

    fn names(decision: &Decision) -> (Vec<&str>, Vec<&str>) {
        (
            decision.kept.iter().map(|k| k.name.as_str()).collect(),
            decision.prune.iter().map(String::as_str).collect(),
        )
    }

    #[test]
    fn keep_last_and_what_is_never_pruned() {
        let mut candidates = vec![
            completed("b1", "2026-01-01T00:00:00Z"),
            completed("b2", "2026-01-02T00:00:00Z"),
            completed("b3", "2026-01-03T00:00:00Z"),
            completed("b4", "2026-01-04T00:00:00Z"),
            Candidate {
                name: "b5".into(),
                state: State::Running,
                restoring: false,
                annotated: false,
            },
            Candidate {
                name: "f-old".into(),
                state: State::Failed(ts("2026-01-01T00:00:00Z")),
                restoring: false,
                annotated: false,
            },
            Candidate {
                name: "f-new".into(),
                state: State::Failed(ts("2026-01-04T12:00:00Z")),
                restoring: false,
                annotated: false,
            },
        ];
        candidates[0].restoring = true;
        candidates[1].annotated = true;
        let retention = Retention {
            keep_last: Some(1),
            ..Default::default()
        };
        let d = retain(
            &candidates,
            &retention,
            &TimeZone::UTC,
            ts("2026-01-05T00:00:00Z"),
        );
        assert_eq!(
            names(&d),
            (vec!["b5", "f-new", "b4", "b2", "b1"], vec!["b3", "f-old"])
        );
        assert_eq!(d.kept[2].reasons, ["last", "newest"]);
        assert_eq!(d.kept[3].reasons, ["annotated"]);
        assert_eq!(d.kept[4].reasons, ["restoring"]);
        // Without any rule nothing Completed goes.
        let d = retain(
            &candidates,
            &Retention::default(),
            &TimeZone::UTC,
            ts("2026-01-05T00:00:00Z"),
        );
        assert_eq!(d.prune, ["f-old"]);
    }

    #[test]
    fn grandfather_father_son_in_the_schedules_time_zone() {
        // Two backups a day for 70 days, at 01:00 and 23:30 UTC.
        let mut candidates = Vec::new();
        let start = ts("2026-01-01T01:00:00Z");
        for day in 0..70i64 {
            for (i, offset) in [0i64, 22 * 3600 + 1800].iter().enumerate() {
                let at = start + SignedDuration::from_secs(day * 86400 + offset);
                candidates.push(Candidate {
                    name: format!("d{day:02}-{i}"),
                    state: State::Completed(at),
                    restoring: false,
                    annotated: false,
                });
            }
        }
        let retention = Retention {
            daily: Some(3),
            weekly: Some(2),
            monthly: Some(3),
            ..Default::default()
        };
        let now = ts("2026-03-12T00:00:00Z");
        let d = retain(&candidates, &retention, &TimeZone::UTC, now);
        let kept = names(&d).0;
        // Daily: the newest of each of the last three UTC days.
        assert_eq!(&kept[..3], ["d69-1", "d68-1", "d67-1"]);
        // Monthly: the newest of March (d69-1), February (d58-1 = 28 Feb) and January.
        assert!(
            kept.contains(&"d58-1") && kept.contains(&"d30-1"),
            "{kept:?}"
        );
        // In Tokyo (UTC+9) the 23:30 UTC backup belongs to the next day: the days differ.
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        let d = retain(&candidates, &retention, &tokyo, now);
        let kept_tokyo = names(&d).0;
        assert_eq!(&kept_tokyo[..3], ["d69-1", "d69-0", "d68-0"]);
        assert_eq!(d.kept.len() + d.prune.len(), candidates.len());
    }

    #[test]
    fn backup_names_sort_by_time_and_stay_valid() {
        assert_eq!(
            backup_name("nightly", ts("2026-01-02T03:04:05Z")),
            "nightly-20260102-030405"
        );
        assert!(backup_name(&"x".repeat(253), ts("2026-01-02T03:04:05Z")).len() <= 253);
    }

    #[test]
    fn every_nth_backup_or_the_first_of_each_day_is_verified() {
        let at = |name: &str, time: &str| BackupRef {
            name: name.into(),
            time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                time.parse().unwrap(),
            )),
        };
        let every = |n| ScheduleVerification {
            every: Some(n),
            daily: false,
            template: Default::default(),
        };
        let utc = TimeZone::UTC;
        let (a, b, c, d) = (
            at("a", "2026-12-03T10:00:00Z"),
            at("b", "2026-12-03T11:00:00Z"),
            at("c", "2026-12-03T12:00:00Z"),
            at("d", "2026-12-03T13:00:00Z"),
        );
        // The first one is verified; then each 3rd; a pass that sees no new backup counts none.
        assert_eq!(to_verify(&every(3), &a, None, None, 0, &utc), (true, 0));
        assert_eq!(
            to_verify(&every(3), &a, Some(&a), Some(&a), 0, &utc),
            (false, 0)
        );
        assert_eq!(
            to_verify(&every(3), &b, Some(&a), Some(&a), 0, &utc),
            (false, 1)
        );
        assert_eq!(
            to_verify(&every(3), &b, Some(&b), Some(&a), 1, &utc),
            (false, 1)
        );
        assert_eq!(
            to_verify(&every(3), &c, Some(&b), Some(&a), 1, &utc),
            (false, 2)
        );
        assert_eq!(
            to_verify(&every(3), &d, Some(&c), Some(&a), 2, &utc),
            (true, 0)
        );
        assert_eq!(
            to_verify(&every(1), &b, Some(&a), Some(&a), 0, &utc),
            (true, 0)
        );

        // Daily, in the schedule's zone: 23:30 UTC on the 3rd is the 4th in Tokyo.
        let daily = ScheduleVerification {
            every: None,
            daily: true,
            template: Default::default(),
        };
        let late = at("late", "2026-12-03T23:30:00Z");
        assert_eq!(
            to_verify(&daily, &b, Some(&a), Some(&a), 0, &utc),
            (false, 1)
        );
        assert_eq!(
            to_verify(&daily, &late, Some(&b), Some(&a), 1, &utc),
            (false, 2)
        );
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        assert_eq!(
            to_verify(&daily, &late, Some(&b), Some(&a), 1, &tokyo),
            (true, 0)
        );
    }
}
