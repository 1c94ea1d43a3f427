//! Watching the partitions while the drill runs, of every group that shares them (the command
//! service's writers, the saga's intake, each view's projectors): each partition must be served
//! again within [`SERVED_AGAIN_WITHIN`] of losing its owner (a kill, a hand-over), whenever some
//! instance of its group is there to serve it.
//!
//! The watch reads the bucket of leases and heartbeats (`ownership::status`, what `ordo
//! partitions status` shows) a few times a second. A member is alive while the watch sees its
//! heartbeat's revision change (measured on the drill's clock alone, never against the
//! server's). A partition is served when its lease names a live member. When it is not, it has
//! been unserved since its owner's last heartbeat seen (or, for a lease let go, the last sample
//! that saw it served), or since some instance became able to serve it, whichever is later:
//! while every command service is down (an outage) or cut off, nobody can serve anything and no
//! time is counted, and a stretch of reads that failed (nats-server down, a slow read), or while
//! the bucket's stream had no leader (it can be read then, but nobody can claim a lease), is left
//! out, not counted and not forgotten. The tracking is [`Handovers`], a pure function of the
//! samples, so its rules are tested without a drill.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
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

/// A heartbeat not seen to change for this long says its instance is gone (instances beat four
/// times a second).
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
    /// member → its heartbeat's revision, and when the watch saw it change (none until it has).
    beats: HashMap<String, (u64, Option<Duration>)>,
    /// Since when some instance has been able to serve (a live member in every sample).
    serving_since: Option<Duration>,
    /// partition → since when it has been unserved, moved later by the stretches of failed reads
    /// left out, and how much those were (to name the real start in a violation).
    unserved_since: BTreeMap<u32, (Duration, Duration)>,
    /// partition → the last sample that saw it served.
    last_served: BTreeMap<u32, Duration>,
    /// Since when reads have failed.
    unread_since: Option<Duration>,
    report: PartitionsReport,
    violations: Vec<Violation>,
}

impl Handovers {
    /// A sample that could not be read `at`: that stretch counts for nobody.
    pub fn unread(&mut self, at: Duration) {
        self.report.unread_samples += 1;
        self.unread_since.get_or_insert(at);
    }

    /// A sample read `at` (time since the drill started).
    pub fn sample(&mut self, at: Duration, status: &GroupStatus) {
        // Reads failed for a while: move every time counted so far past that stretch.
        if let Some(from) = self.unread_since.take() {
            let gap = at.saturating_sub(from);
            let shift = |time: &mut Duration| *time = (*time + gap).min(at);
            for (since, left_out) in self.unserved_since.values_mut() {
                let before = *since;
                shift(since);
                *left_out += *since - before;
            }
            self.last_served.values_mut().for_each(shift);
            self.beats
                .values_mut()
                .filter_map(|(_, seen)| seen.as_mut())
                .for_each(shift);
            if let Some(since) = self.serving_since.as_mut() {
                shift(since);
            }
        }
        for member in &status.members {
            let beat = self
                .beats
                .entry(member.instance.clone())
                .or_insert((member.heartbeat_revision, None));
            if beat.0 != member.heartbeat_revision {
                *beat = (member.heartbeat_revision, Some(at));
            }
        }
        let beats = &self.beats;
        let last_beat = |instance: &str| beats.get(instance).and_then(|(_, seen)| *seen);
        let alive: HashSet<&str> = status
            .members
            .iter()
            .map(|member| member.instance.as_str())
            .filter(|instance| {
                last_beat(instance).is_some_and(|beat| at.saturating_sub(beat) < FRESH_HEARTBEAT)
            })
            .collect();
        if alive.is_empty() {
            // Nobody could serve: an outage of every command service, or all of them cut off.
            self.serving_since = None;
            self.unserved_since.clear();
            return;
        }
        let serving_since = *self.serving_since.get_or_insert(at);
        let mut served_again = Vec::new();
        for partition in &status.partitions {
            let number = partition.partition;
            let owner = partition.owner.as_deref();
            if owner.is_some_and(|owner| alive.contains(owner)) {
                self.last_served.insert(number, at);
                if let Some(unserved) = self.unserved_since.remove(&number) {
                    served_again.push((number, unserved));
                }
            } else {
                let last_served = owner
                    .and_then(last_beat)
                    .or_else(|| self.last_served.get(&number).copied())
                    .unwrap_or(at);
                self.unserved_since
                    .entry(number)
                    .or_insert((last_served.max(serving_since), Duration::ZERO));
            }
        }
        for (partition, since) in served_again {
            self.served_again(partition, since, at);
        }
    }

    fn served_again(&mut self, partition: u32, since: (Duration, Duration), at: Duration) {
        let unserved = at.saturating_sub(since.0);
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
    /// unserved at `at` (the end of the watch, or of its last successful read).
    pub fn finish(mut self, at: Duration) -> (PartitionsReport, Vec<Violation>) {
        let end = self.unread_since.map_or(at, |from| from.min(at));
        for (partition, since) in std::mem::take(&mut self.unserved_since) {
            let unserved = end.saturating_sub(since.0);
            if unserved > SERVED_AGAIN_WITHIN {
                self.violations
                    .push(too_long(partition, since, unserved, "still not served"));
            }
        }
        (self.report, self.violations)
    }
}

/// The groups that share partitions: the command service's, and each partitioned reader's.
pub fn groups() -> Vec<&'static str> {
    std::iter::once(ordo_commands::service::PARTITION_GROUP)
        .chain(
            ordo_eventstore::ConsumerId::ALL
                .into_iter()
                .filter_map(ordo_eventstore::ConsumerId::partition_group),
        )
        .collect()
}

/// Whether the bucket's stream has a leader, which every claim of a lease needs. Its reads do
/// not (followers answer direct gets), so a bucket can be read while nobody can take a lease
/// from it: such a stretch, an outage of the coordination service as a nats-server down is, is
/// left out like a failed read.
async fn bucket_writable(js: &async_nats::jetstream::Context) -> bool {
    // Its info names the leader (in a cluster; a single server leads its streams itself).
    let stream = format!("KV_{}", ownership::BUCKET);
    match tokio::time::timeout(Duration::from_secs(1), js.get_stream(&stream)).await {
        Ok(Ok(stream)) => stream
            .cached_info()
            .cluster
            .as_ref()
            .is_none_or(|cluster| cluster.leader.is_some()),
        _ => false,
    }
}

/// Samples the bucket, every group of [`groups`] with `partitions` partitions, every
/// [`SAMPLE_EVERY`] until `stop` is set; `started` is the drill's start. The report adds up the
/// groups'; a violation names its group.
pub async fn watch(
    js: async_nats::jetstream::Context,
    partitions: u32,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> (PartitionsReport, Vec<Violation>) {
    let mut watched: Vec<(OwnershipConfig, Handovers)> = groups()
        .into_iter()
        .map(|group| {
            (
                OwnershipConfig::new(group, partitions),
                Handovers::default(),
            )
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let writable = bucket_writable(&js).await;
        for (config, handovers) in &mut watched {
            let at = started.elapsed();
            if !writable {
                handovers.unread(at);
                continue;
            }
            // A short timeout: while a leader is elected or nats-server is down, a read may hang.
            match tokio::time::timeout(Duration::from_secs(1), ownership::status(&js, config)).await
            {
                Ok(Ok(status)) => handovers.sample(at, &status),
                _ => handovers.unread(at),
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let mut report = PartitionsReport::default();
    let mut violations = Vec::new();
    for (config, handovers) in watched {
        let (of_group, group_violations) = handovers.finish(started.elapsed());
        report.served_again += of_group.served_again;
        report.longest_unserved_ms = report.longest_unserved_ms.max(of_group.longest_unserved_ms);
        report.unread_samples += of_group.unread_samples;
        violations.extend(group_violations.into_iter().map(|violation| Violation {
            detail: format!("group {}: {}", config.group, violation.detail),
            ..violation
        }));
    }
    (report, violations)
}

/// `since`: when it became unserved, moved later by the failed reads left out, and those.
fn too_long(
    partition: u32,
    (since, left_out): (Duration, Duration),
    unserved: Duration,
    then: &str,
) -> Violation {
    let note = if left_out.is_zero() {
        String::new()
    } else {
        format!(
            " ({:.1} s of failed reads left out)",
            left_out.as_secs_f64()
        )
    };
    Violation {
        invariant: "partition_served_again_within_5s",
        detail: format!(
            "partition {partition} unserved from {:.1} s into the drill, {then} after {:.1} s{note}",
            since.saturating_sub(left_out).as_secs_f64(),
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

    /// A bucket with two partitions, owned as given, and members with their heartbeats'
    /// revisions.
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
                .map(|(instance, revision)| MemberStatus {
                    instance: (*instance).into(),
                    // What the server's clock says is not read: the watch counts on its own.
                    heartbeat_ms_ago: 0,
                    alive: true,
                    owns: 0,
                    partitions: Some(2),
                    heartbeat_revision: *revision,
                })
                .collect(),
        }
    }

    /// a owns partition 0 and b partition 1, both beating, from 10.0 s (first seen) and 10.2 s.
    fn a_and_b_serving() -> Handovers {
        let mut watch = Handovers::default();
        watch.sample(
            secs(10.0),
            &bucket([Some("a"), Some("b")], &[("a", 1), ("b", 1)]),
        );
        watch.sample(
            secs(10.2),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 2)]),
        );
        watch
    }

    #[test]
    fn a_dead_owners_partition_taken_within_a_second_passes() {
        let mut watch = a_and_b_serving();
        // a is killed at 10.3 s: its heartbeat stops changing, its lease still names it.
        watch.sample(
            secs(10.4),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 3)]),
        );
        watch.sample(
            secs(11.4),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 7)]),
        );
        watch.sample(
            secs(11.6),
            &bucket([Some("b"), Some("b")], &[("a", 2), ("b", 8)]),
        );
        let (report, violations) = watch.finish(secs(12.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 1);
        // From a's last heartbeat seen (10.2 s) to the sample that saw b hold it.
        assert_eq!(report.longest_unserved_ms, 1_400);
    }

    #[test]
    fn a_partition_left_unserved_longer_than_5_s_is_reported() {
        let mut watch = a_and_b_serving();
        watch.sample(
            secs(12.0),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 9)]),
        );
        watch.sample(secs(16.5), &bucket([None, Some("b")], &[("b", 20)]));
        watch.sample(secs(16.7), &bucket([Some("b"), Some("b")], &[("b", 21)]));
        let (report, violations) = watch.finish(secs(20.0));
        assert_eq!(report.served_again, 1);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].invariant, "partition_served_again_within_5s");
        assert!(
            violations[0]
                .detail
                .starts_with("partition 0 unserved from 10.2 s"),
            "{violations:?}"
        );
    }

    #[test]
    fn a_partition_never_served_again_is_reported_at_the_end() {
        let mut watch = a_and_b_serving();
        watch.sample(secs(11.0), &bucket([None, Some("b")], &[("b", 5)]));
        let (_, violations) = watch.finish(secs(17.0));
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("still not served"));
    }

    #[test]
    fn no_time_counts_while_nobody_could_serve() {
        let mut watch = a_and_b_serving();
        // Every command service down (an outage): no heartbeat changes.
        watch.sample(
            secs(18.0),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 2)]),
        );
        // nats-server down: the bucket cannot be read.
        watch.unread(secs(18.2));
        // c starts: first seen at 26.2 s, beating at 26.4 s, and takes both by 28.0 s.
        watch.sample(secs(26.2), &bucket([Some("a"), Some("b")], &[("c", 1)]));
        watch.sample(secs(26.4), &bucket([Some("a"), Some("b")], &[("c", 2)]));
        watch.sample(secs(28.0), &bucket([Some("c"), Some("c")], &[("c", 9)]));
        let (report, violations) = watch.finish(secs(30.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 2);
        assert_eq!(report.longest_unserved_ms, 1_600);
        assert_eq!(report.unread_samples, 1);
    }

    #[test]
    fn reads_that_fail_leave_out_their_stretch_and_keep_what_was_counted() {
        let mut watch = a_and_b_serving();
        // a dies; from 11.4 s partition 0 is unserved since 10.2 s.
        watch.sample(
            secs(11.4),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 7)]),
        );
        // Reads fail from 11.6 s to 13.6 s: 2 s left out.
        watch.unread(secs(11.6));
        watch.unread(secs(12.6));
        watch.sample(
            secs(13.6),
            &bucket([Some("a"), Some("b")], &[("a", 2), ("b", 12)]),
        );
        // Still not served when the drill ends at 18.0 s: 18.0 - 10.2 - 2.0 = 5.8 s.
        let (report, violations) = watch.finish(secs(18.0));
        assert_eq!(report.unread_samples, 2);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].detail.starts_with(
                "partition 0 unserved from 10.2 s into the drill, still not served after 5.8 s \
                 (2.0 s of failed reads left out)"
            ),
            "{violations:?}"
        );
    }

    #[test]
    fn a_hand_over_between_live_instances_counts_from_when_it_was_last_served() {
        let mut watch = Handovers::default();
        watch.sample(secs(1.0), &bucket([Some("a"), Some("a")], &[("a", 1)]));
        watch.sample(secs(1.2), &bucket([Some("a"), Some("a")], &[("a", 2)]));
        // b joins; a lets partition 1 go (its lease deleted) and b takes it.
        watch.sample(secs(1.4), &bucket([Some("a"), None], &[("a", 3), ("b", 1)]));
        watch.sample(
            secs(1.6),
            &bucket([Some("a"), Some("b")], &[("a", 4), ("b", 2)]),
        );
        let (report, violations) = watch.finish(secs(2.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 1);
        assert_eq!(report.longest_unserved_ms, 400);
    }

    #[test]
    fn a_member_first_seen_is_not_taken_for_alive_until_its_heartbeat_changes() {
        let mut watch = Handovers::default();
        // A dead member's heartbeat is still in the bucket when the watch starts.
        watch.sample(secs(0.2), &bucket([Some("a"), None], &[("a", 7)]));
        watch.sample(secs(0.4), &bucket([Some("a"), None], &[("a", 7), ("b", 1)]));
        // b beats; nothing counted before it did.
        watch.sample(secs(0.6), &bucket([Some("a"), None], &[("a", 7), ("b", 2)]));
        watch.sample(
            secs(1.0),
            &bucket([Some("b"), Some("b")], &[("a", 7), ("b", 3)]),
        );
        let (report, violations) = watch.finish(secs(2.0));
        assert_eq!(violations, vec![]);
        assert_eq!(report.served_again, 2);
        assert_eq!(report.longest_unserved_ms, 400);
    }
}
