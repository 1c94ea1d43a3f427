//! Watching the command service's partitions while the drill runs: each partition must be served
//! again within [`SERVED_AGAIN_WITHIN`] of losing its owner (a kill, a hand-over), whenever some
//! instance is there to serve it.
//!
//! The watch reads the bucket of leases and heartbeats (`ownership::status`, what `ordo
//! partitions status` shows) a few times a second. A partition is served when its lease is held
//! and its owner's heartbeat is fresh. When it is not, it has been unserved since its owner's last
//! heartbeat, or since some instance became able to serve it, whichever is later: while nats-server
//! is down, or every command service is (an outage), nobody can serve anything and no time is
//! counted. The tracking is [`Handovers`], a pure function of the samples, so its rules are tested
//! without a drill.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ordo_eventstore::{GroupStatus, OwnershipConfig, ownership};
use serde::Serialize;

use crate::check::Violation;

/// The bound: a dead owner's partitions are served again within 5 s.
pub const SERVED_AGAIN_WITHIN: Duration = Duration::from_secs(5);

/// A heartbeat older than this says its instance is gone (instances beat four times a second).
pub const FRESH_HEARTBEAT: Duration = Duration::from_millis(1_000);

/// How often the watch reads the bucket.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// What the drill reports of its partitions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PartitionsReport {
    /// Times a partition was unserved and then served again.
    pub served_again: u64,
    /// The longest of those times, in milliseconds.
    pub longest_unserved_ms: u64,
    /// Samples of the bucket that failed (nats-server down, a leader being elected).
    pub unread_samples: u64,
}

/// The tracker: fed each sample of the bucket (or its failure) with the time since the drill
/// started.
#[derive(Debug, Default)]
pub struct Handovers {
    /// Since when some instance has been able to serve (a fresh heartbeat in every sample).
    serving_since: Option<Duration>,
    /// partition → since when it has been unserved.
    unserved_since: BTreeMap<u32, Duration>,
    report: PartitionsReport,
    violations: Vec<Violation>,
}

impl Handovers {
    /// A sample that could not be read: nothing can be said, and nothing counts until samples
    /// come again.
    pub fn unread(&mut self) {
        self.report.unread_samples += 1;
        self.serving_since = None;
        self.unserved_since.clear();
    }

    /// A sample read `at` (time since the drill started).
    pub fn sample(&mut self, at: Duration, status: &GroupStatus) {
        let heartbeat_at = |instance: &str| {
            status
                .members
                .iter()
                .find(|member| member.instance == instance)
                .map(|member| at.saturating_sub(Duration::from_millis(member.heartbeat_ms_ago)))
        };
        let fresh = |instance: &str| {
            heartbeat_at(instance).is_some_and(|beat| at.saturating_sub(beat) < FRESH_HEARTBEAT)
        };
        if !status.members.iter().any(|member| fresh(&member.instance)) {
            // Nobody could serve: an outage of every command service, or all of them cut off.
            self.serving_since = None;
            self.unserved_since.clear();
            return;
        }
        let serving_since = *self.serving_since.get_or_insert(at);
        for partition in &status.partitions {
            let owner = partition.owner.as_deref().filter(|_| partition.held);
            if owner.is_some_and(fresh) {
                if let Some(since) = self.unserved_since.remove(&partition.partition) {
                    self.served_again(partition.partition, since, at);
                }
            } else {
                let last_served = owner
                    .or(partition.owner.as_deref())
                    .and_then(heartbeat_at)
                    .unwrap_or(at);
                self.unserved_since
                    .entry(partition.partition)
                    .or_insert(last_served.max(serving_since));
            }
        }
    }

    fn served_again(&mut self, partition: u32, since: Duration, at: Duration) {
        let unserved = at.saturating_sub(since);
        self.report.served_again += 1;
        self.report.longest_unserved_ms = self
            .report
            .longest_unserved_ms
            .max(unserved.as_millis() as u64);
        if unserved > SERVED_AGAIN_WITHIN {
            self.violations
                .push(too_long(partition, since, unserved, "served again"));
        }
    }

    /// The report, and a violation for each partition unserved too long, counting those still
    /// unserved at `at` (the end of the watch).
    pub fn finish(mut self, at: Duration) -> (PartitionsReport, Vec<Violation>) {
        for (partition, since) in std::mem::take(&mut self.unserved_since) {
            let unserved = at.saturating_sub(since);
            if unserved > SERVED_AGAIN_WITHIN {
                self.violations
                    .push(too_long(partition, since, unserved, "still not served"));
            }
        }
        (self.report, self.violations)
    }
}

/// Samples the bucket every [`SAMPLE_EVERY`] until `stop` is set; `started` is the drill's start.
pub async fn watch(
    js: async_nats::jetstream::Context,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> (PartitionsReport, Vec<Violation>) {
    let config = OwnershipConfig::new(
        ordo_commands::service::PARTITION_GROUP,
        ordo_commands::service::DEFAULT_PARTITIONS,
    );
    let mut handovers = Handovers::default();
    while !stop.load(Ordering::Relaxed) {
        let at = started.elapsed();
        // A short timeout: while a leader is elected or nats-server is down, a read may hang.
        match tokio::time::timeout(Duration::from_secs(1), ownership::status(&js, &config)).await {
            Ok(Ok(status)) => handovers.sample(at, &status),
            _ => handovers.unread(),
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    handovers.finish(started.elapsed())
}

fn too_long(partition: u32, since: Duration, unserved: Duration, then: &str) -> Violation {
    Violation {
        invariant: "partition_served_again_within_5s",
        detail: format!(
            "partition {partition} unserved from {:.1} s into the drill, {then} after {:.1} s",
            since.as_secs_f64(),
            unserved.as_secs_f64()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_eventstore::ownership::{MemberStatus, PartitionStatus};

    fn secs(secs: f64) -> Duration {
        Duration::from_millis((secs * 1_000.0).round() as u64)
    }

    /// A bucket with two partitions, owned as given, and members whose last heartbeats were the
    /// given milliseconds ago.
    fn bucket(owners: [Option<&str>; 2], beats: &[(&str, u64)]) -> GroupStatus {
        GroupStatus {
            group: "commands".into(),
            partitions: owners
                .iter()
                .enumerate()
                .map(|(partition, owner)| PartitionStatus {
                    partition: partition as u32,
                    owner: owner.map(str::to_owned),
                    renewed_ms_ago: owner.map(|_| 100),
                    held: owner.is_some(),
                })
                .collect(),
            members: beats
                .iter()
                .map(|(instance, ago)| MemberStatus {
                    instance: (*instance).into(),
                    heartbeat_ms_ago: *ago,
                    alive: *ago < 3_000,
                    owns: 0,
                    partitions: Some(2),
                })
                .collect(),
        }
    }

    #[test]
    fn a_dead_owners_partition_taken_within_a_second_passes() {
        let mut watch = Handovers::default();
        watch.sample(
            secs(10.0),
            &bucket([Some("a"), Some("b")], &[("a", 100), ("b", 100)]),
        );
        // a is killed at 10.1 s: its heartbeat ages, its lease still reads as held.
        watch.sample(
            secs(11.2),
            &bucket([Some("a"), Some("b")], &[("a", 1_100), ("b", 100)]),
        );
        watch.sample(
            secs(11.4),
            &bucket([Some("b"), Some("b")], &[("a", 1_300), ("b", 100)]),
        );
        let (report, violations) = watch.finish(secs(12.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 1);
        // From a's last heartbeat (10.1 s) to the sample that saw b hold it.
        assert_eq!(report.longest_unserved_ms, 1_300);
    }

    #[test]
    fn a_partition_left_unserved_longer_than_5_s_is_reported() {
        let mut watch = Handovers::default();
        watch.sample(
            secs(10.0),
            &bucket([Some("a"), Some("b")], &[("a", 100), ("b", 100)]),
        );
        watch.sample(
            secs(12.0),
            &bucket([Some("a"), Some("b")], &[("a", 2_000), ("b", 100)]),
        );
        watch.sample(secs(16.5), &bucket([None, Some("b")], &[("b", 100)]));
        watch.sample(secs(16.7), &bucket([Some("b"), Some("b")], &[("b", 100)]));
        let (report, violations) = watch.finish(secs(20.0));
        assert_eq!(report.served_again, 1);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].invariant, "partition_served_again_within_5s");
        assert!(
            violations[0]
                .detail
                .starts_with("partition 0 unserved from 10.0 s")
        );
    }

    #[test]
    fn a_partition_never_served_again_is_reported_at_the_end() {
        let mut watch = Handovers::default();
        watch.sample(
            secs(1.0),
            &bucket([Some("a"), Some("b")], &[("a", 100), ("b", 100)]),
        );
        watch.sample(secs(2.0), &bucket([None, Some("b")], &[("b", 100)]));
        let (_, violations) = watch.finish(secs(8.0));
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("still not served"));
    }

    #[test]
    fn no_time_counts_while_nobody_could_serve() {
        let mut watch = Handovers::default();
        watch.sample(
            secs(1.0),
            &bucket([Some("a"), Some("b")], &[("a", 100), ("b", 100)]),
        );
        // Every command service down for 15 s (an outage): every heartbeat ages.
        watch.sample(
            secs(9.0),
            &bucket([Some("a"), Some("b")], &[("a", 8_000), ("b", 8_000)]),
        );
        // nats-server down: the bucket cannot be read.
        watch.unread();
        // c starts at 16 s and takes both within 2 s.
        watch.sample(secs(16.2), &bucket([Some("a"), Some("b")], &[("c", 100)]));
        watch.sample(secs(18.0), &bucket([Some("c"), Some("c")], &[("c", 100)]));
        let (report, violations) = watch.finish(secs(20.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 2);
        assert_eq!(report.longest_unserved_ms, 1_800);
        assert_eq!(report.unread_samples, 1);
    }

    #[test]
    fn a_hand_over_between_live_instances_counts_from_when_it_was_let_go() {
        let mut watch = Handovers::default();
        watch.sample(secs(1.0), &bucket([Some("a"), Some("a")], &[("a", 100)]));
        // b joins; a lets partition 1 go (its lease deleted) and b takes it.
        watch.sample(
            secs(1.2),
            &bucket([Some("a"), None], &[("a", 100), ("b", 50)]),
        );
        watch.sample(
            secs(1.4),
            &bucket([Some("a"), Some("b")], &[("a", 100), ("b", 50)]),
        );
        let (report, violations) = watch.finish(secs(2.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 1);
        assert_eq!(report.longest_unserved_ms, 200);
    }
}
