//! How far a view's projectors are, for processes that cannot read the view (the command
//! service's load shedding has no database): each projector instance puts the checkpoints of the
//! partitions it holds in the partition bucket (`<group>.progress.<instance>`), at most every
//! [`REPORT_EVERY`], and a [`Progress`] watches a group's reports.
//!
//! A partition's checkpoint is the highest any instance reported for it (an instance that lost
//! it, or died, reported less), and the view's is the lowest of those; a partition nobody
//! reported yet (projectors starting) is left out rather than counted as at 0, which would shed
//! every placing of a large system for the second its projectors take to report. Reports are
//! hints for load shedding; the view's own tables stay the answer. A live instance reports again
//! every [`REFRESH_EVERY`] while idle, so that its report outlives the bucket's one minute for
//! keys nobody renews. A view whose projectors all stopped
//! reports nothing new, so its position stays while its stream grows: it counts as behind, until
//! its reports are a minute old; a watcher that starts after that finds none, and a view without
//! reports does not shed (as a consumer that does not exist).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

use crate::{Partition, ownership::BUCKET};

/// How often a projector instance reports, at most.
pub const REPORT_EVERY: Duration = Duration::from_millis(250);

/// How often an idle projector instance reports again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

fn key(group: &str, instance: &str) -> String {
    format!("{group}.progress.{instance}")
}

/// `<partition>:<checkpoint>,…`
fn encode(checkpoints: &BTreeMap<Partition, u64>) -> String {
    checkpoints
        .iter()
        .map(|(partition, checkpoint)| format!("{partition}:{checkpoint}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn decode(report: &str) -> impl Iterator<Item = (Partition, u64)> + '_ {
    report.split(',').filter_map(|pair| {
        let (partition, checkpoint) = pair.split_once(':')?;
        Some((partition.parse().ok()?, checkpoint.parse().ok()?))
    })
}

/// The position of a view of `partitions` partitions from its instances' reports: the lowest
/// over the partitions reported of the highest checkpoint reported for each. `None` without a
/// report. Partitions past the count (from before a rebuild changed it) are left out.
pub fn position<'r>(reports: impl IntoIterator<Item = &'r str>, partitions: u32) -> Option<u64> {
    let mut highest: Vec<Option<u64>> = vec![None; partitions as usize];
    for report in reports {
        for (partition, checkpoint) in decode(report) {
            if let Some(seen) = highest.get_mut(partition as usize) {
                *seen = Some(seen.unwrap_or(0).max(checkpoint));
            }
        }
    }
    highest.into_iter().flatten().min()
}

/// One projector instance's reports.
pub struct Reporter {
    store: kv::Store,
    key: String,
    last: Option<Instant>,
    /// What was held back because the last report was too recent.
    unsent: Option<String>,
    /// The last report sent, sent again while idle.
    sent: Option<String>,
}

impl Reporter {
    /// Reports for `instance` of `group`; the bucket exists once the instance has joined it.
    pub async fn open(
        js: &jetstream::Context,
        group: &str,
        instance: &str,
    ) -> Result<Self, String> {
        let store = js
            .get_key_value(BUCKET)
            .await
            .map_err(|err| err.to_string())?;
        Ok(Self {
            store,
            key: key(group, instance),
            last: None,
            unsent: None,
            sent: None,
        })
    }

    /// Puts `checkpoints`, or holds them back until [`Self::sent_late`] if a report went out
    /// less than [`REPORT_EVERY`] ago. A report that is not stored is only late: the next one
    /// says more.
    pub async fn report(&mut self, checkpoints: &BTreeMap<Partition, u64>) {
        self.unsent = Some(encode(checkpoints));
        if self.last.is_none_or(|last| last.elapsed() >= REPORT_EVERY) {
            self.send().await;
        }
    }

    /// Sends what was held back once [`REPORT_EVERY`] has passed since the last report, or the
    /// last report again once [`REFRESH_EVERY`] has; never completes before anything was
    /// reported. For a projector waiting for events: the last batch before a pause is reported
    /// too, and an idle instance's report does not expire.
    pub async fn sent_late(&mut self) {
        let Some(last) = self.last else {
            return match self.unsent {
                Some(_) => self.send().await,
                None => std::future::pending().await,
            };
        };
        if self.unsent.is_some() {
            tokio::time::sleep_until((last + REPORT_EVERY).into()).await;
        } else {
            tokio::time::sleep_until((last + REFRESH_EVERY).into()).await;
            self.unsent = self.sent.clone();
        }
        self.send().await;
    }

    /// Sends what was held back. Cancel-safe: a send dropped before it was stored is sent by
    /// the next call.
    async fn send(&mut self) {
        let Some(report) = self.unsent.clone() else {
            return;
        };
        if let Err(err) = self.store.put(&self.key, report.clone().into()).await {
            tracing::debug!(key = %self.key, %err, "progress not reported");
        }
        self.last = Some(Instant::now());
        self.unsent = None;
        self.sent = Some(report);
    }
}

/// A group's reports as they come, kept in the background for as long as this lives.
pub struct Progress {
    reports: Arc<Mutex<HashMap<String, String>>>,
    watching: tokio::task::JoinHandle<()>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.watching.abort();
    }
}

impl Progress {
    pub fn watch(js: jetstream::Context, group: &str) -> Self {
        let reports = Arc::new(Mutex::new(HashMap::new()));
        let watching = tokio::spawn(watch_forever(
            js,
            format!("{group}.progress.*"),
            reports.clone(),
        ));
        Self { reports, watching }
    }

    /// The position of the view of `partitions` partitions as its projectors last reported it.
    pub fn position(&self, partitions: u32) -> Option<u64> {
        let reports = self.reports.lock().expect("never poisoned");
        position(reports.values().map(String::as_str), partitions)
    }
}

async fn watch_forever(
    js: jetstream::Context,
    keys: String,
    reports: Arc<Mutex<HashMap<String, String>>>,
) {
    loop {
        let watched = async {
            let store = js
                .get_key_value(BUCKET)
                .await
                .map_err(|err| err.to_string())?;
            let mut watch = store
                .watch_with_history(&keys)
                .await
                .map_err(|err| err.to_string())?;
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|err| err.to_string())?;
                let mut reports = reports.lock().expect("never poisoned");
                match entry.operation {
                    kv::Operation::Put => {
                        reports.insert(
                            entry.key,
                            String::from_utf8_lossy(&entry.value).into_owned(),
                        );
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        reports.remove(&entry.key);
                    }
                }
            }
            Ok::<(), String>(())
        };
        if let Err(err) = watched.await {
            tracing::debug!(%keys, %err, "progress reports not watched; watching again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_is_where_its_partition_furthest_behind_is_by_its_best_report() {
        let first = encode(&BTreeMap::from([(0, 40), (1, 10)]));
        assert_eq!(first, "0:40,1:10");
        // Another instance took partition 1 over and went on; its old holder's report stays.
        let second = encode(&BTreeMap::from([(1, 35), (2, 30)]));
        assert_eq!(position([first.as_str(), second.as_str()], 3), Some(30));
        assert_eq!(position([first.as_str()], 2), Some(10));
        assert_eq!(
            position([first.as_str()], 3),
            Some(10),
            "partition 2 not reported yet"
        );
        assert_eq!(
            position([first.as_str(), second.as_str()], 2),
            Some(35),
            "partition 2 is no longer one of the view's"
        );
        assert_eq!(position(Vec::<&str>::new(), 3), None);
        assert_eq!(position(["garbage", "3:x"], 4), None, "nothing readable");
    }
}
