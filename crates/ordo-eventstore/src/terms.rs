//! A reader's share of a partitioned stream, taken in terms.
//!
//! The workers that read a stream by partition (a view's projectors, the saga's intake) join
//! their group in the partition bucket and work in terms: a term is the set of partitions the
//! instance holds, begun by reading their checkpoints and opening a reader, and ended as soon as
//! one of them is taken away or another is granted. A worker takes a change in only between two
//! batches, never in the middle of one's transaction.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use async_nats::jetstream;

use crate::{Grant, Grants, Ownership, OwnershipConfig, Partition, ownership::OwnershipError};

/// How long a member waits, once a partition is granted, for the others dealt with it: an
/// instance that joins is granted its partitions one by one within a few milliseconds, and each
/// new set of partitions begins a term (a reader, the checkpoints read again).
const GRANTS_SETTLE: Duration = Duration::from_millis(50);

/// The least time between the starts of two terms: a grant revoked at once (the leases stopped
/// being renewed) is not a loop of readers opened and dropped.
const TERMS_APART: Duration = Duration::from_millis(100);

/// The longest pause before a member tries a failed term again, or joins its group again after
/// its membership ended. While a member pauses in a term it still renews its leases, so nobody
/// else serves its partitions; and when every member of a group failed at once (a stream's leader
/// killed), the partitions wait for the first to come back. A partition must be served again
/// within 5 s of its owner's failure (the drills hold this), so the pause stays well under it
/// however often terms fail, where an exponential pause that grows over a run of failures would
/// reach seconds. Trying again costs a few requests.
pub const RETRY_AT_MOST: Duration = Duration::from_secs(1);

/// The leases stopped: the membership cannot go on, and the worker joins again.
#[derive(Debug, thiserror::Error)]
#[error("the partition leases of group {0} stopped")]
pub struct LeasesStopped(String);

/// An instance's membership of a reading group: the partitions it holds.
pub struct Membership {
    /// Held for as long as the membership lasts: dropping it leaves the group.
    ownership: Ownership,
    group: String,
    grants: Grants,
    held: BTreeMap<Partition, Grant>,
    /// A partition was granted since the last term began.
    granted: bool,
    term_began: Option<Instant>,
}

impl Membership {
    pub async fn join(
        js: &jetstream::Context,
        config: OwnershipConfig,
    ) -> Result<Self, OwnershipError> {
        let group = config.group.clone();
        let (ownership, grants) = Ownership::join(js, config).await?;
        Ok(Self {
            ownership,
            group,
            grants,
            held: BTreeMap::new(),
            granted: false,
            term_began: None,
        })
    }

    pub fn instance(&self) -> &str {
        self.ownership.instance()
    }

    /// The partitions of the next term: those held, once there is at least one, and once the
    /// grants that came with the last one have settled.
    pub async fn next_term(&mut self) -> Result<Vec<Partition>, LeasesStopped> {
        loop {
            while let Ok(grant) = self.grants.try_recv() {
                self.take(grant);
            }
            self.held.retain(|_, grant| grant.is_valid());
            if self.held.is_empty() {
                let grant = self.grants.recv().await.ok_or_else(|| self.stopped())?;
                self.take(grant);
            }
            if std::mem::take(&mut self.granted) {
                tokio::time::sleep(GRANTS_SETTLE).await;
                continue;
            }
            if let Some(began) = self.term_began
                && began.elapsed() < TERMS_APART
            {
                tokio::time::sleep(TERMS_APART - began.elapsed()).await;
                continue;
            }
            self.term_began = Some(Instant::now());
            return Ok(self.held.keys().copied().collect());
        }
    }

    /// Completes when the partitions held change: one is revoked (or its lease ran out) or
    /// another is granted. Cancel-safe: a grant taken in by a call that is dropped is kept.
    pub async fn changed(&mut self) -> Result<(), LeasesStopped> {
        if self.held.is_empty() {
            let grant = self.grants.recv().await.ok_or_else(|| self.stopped())?;
            self.take(grant);
            return Ok(());
        }
        let any_revoked =
            futures::future::select_all(self.held.values().map(|grant| Box::pin(grant.revoked())));
        let grant = tokio::select! {
            _ = any_revoked => return Ok(()),
            grant = self.grants.recv() => grant,
        };
        let grant = grant.ok_or_else(|| self.stopped())?;
        self.take(grant);
        Ok(())
    }

    fn take(&mut self, grant: Grant) {
        self.granted = true;
        self.held.insert(grant.partition, grant);
    }

    fn stopped(&self) -> LeasesStopped {
        LeasesStopped(self.group.clone())
    }
}
