//! The views' checkpoints as the projectors announce them: each batch's transaction ends with a
//! `NOTIFY` on [`CHECKPOINT_CHANNEL`] (`<view>:<checkpoint>:<partition>,…`: the partitions the
//! batch moved to that checkpoint), delivered when it commits. A read that waits for `min_seq`
//! wakes on the announcement instead of polling the database. Announcements are hints: the
//! checkpoints in the view's own table stay the answer, and a waiting read checks them at least
//! every [`RECHECK`] (announcements sent while the listener reconnects are lost).

use std::{collections::HashMap, sync::Arc, time::Duration};

use ordo_eventstore::ownership::MAX_PARTITIONS;
use ordo_projections::runtime::CHECKPOINT_CHANNEL;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::watch;

/// How often a waiting read looks at the checkpoint without an announcement.
pub const RECHECK: Duration = Duration::from_millis(100);

/// The highest checkpoint announced for each partition of a view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announced {
    /// By partition number; 0 for a partition never announced.
    partitions: Vec<u64>,
}

impl Announced {
    pub fn of_partition(&self, partition: u32) -> u64 {
        self.partitions
            .get(partition as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The lowest of the partitions announced so far.
    pub fn of_view(&self) -> u64 {
        self.partitions.iter().copied().min().unwrap_or(0)
    }

    /// Takes in `seq` for `partitions`; whether anything moved.
    fn record(&mut self, seq: u64, partitions: impl Iterator<Item = u32>) -> bool {
        let mut moved = false;
        for partition in partitions.filter(|partition| *partition < MAX_PARTITIONS) {
            let index = partition as usize;
            if self.partitions.len() <= index {
                self.partitions.resize(index + 1, 0);
            }
            if seq > self.partitions[index] {
                self.partitions[index] = seq;
                moved = true;
            }
        }
        moved
    }
}

/// Reads `<checkpoint>:<partition>,…` of an announcement, after the view's name.
fn parse(announcement: &str) -> Option<(u64, Vec<u32>)> {
    let (seq, partitions) = announcement.split_once(':')?;
    let partitions = partitions
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()
        .ok()?;
    Some((seq.parse().ok()?, partitions))
}

/// The highest checkpoints announced for each view, by projection name.
#[derive(Clone)]
pub struct CheckpointSignals {
    views: Arc<HashMap<&'static str, watch::Sender<Announced>>>,
    _listener: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl CheckpointSignals {
    /// Listens on `pool`'s database for as long as the signals (or a clone) live.
    pub fn listen(pool: PgPool, views: &[&'static str]) -> Self {
        let views: Arc<HashMap<_, _>> = Arc::new(
            views
                .iter()
                .map(|view| (*view, watch::Sender::new(Announced::default())))
                .collect(),
        );
        let listener = tokio::spawn(listen_forever(pool, views.clone()));
        Self {
            views,
            _listener: Arc::new(AbortOnDrop(listener)),
        }
    }

    pub fn subscribe(&self, view: &str) -> Option<watch::Receiver<Announced>> {
        self.views.get(view).map(watch::Sender::subscribe)
    }
}

async fn listen_forever(pool: PgPool, views: Arc<HashMap<&'static str, watch::Sender<Announced>>>) {
    loop {
        if let Err(err) = listen(&pool, &views).await {
            tracing::debug!(%err, "checkpoint announcements interrupted; reads fall back to polling");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen(
    pool: &PgPool,
    views: &HashMap<&'static str, watch::Sender<Announced>>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHECKPOINT_CHANNEL).await?;
    loop {
        let notification = listener.recv().await?;
        if let Some((view, announcement)) = notification.payload().split_once(':')
            && let (Some(signal), Some((seq, partitions))) = (views.get(view), parse(announcement))
        {
            signal.send_if_modified(|announced| announced.record(seq, partitions.into_iter()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_moves_the_partitions_it_names_and_never_back() {
        let mut announced = Announced::default();
        let (seq, partitions) = parse("40:0,2").unwrap();
        assert!(announced.record(seq, partitions.into_iter()));
        assert_eq!(
            (
                announced.of_partition(0),
                announced.of_partition(1),
                announced.of_partition(2)
            ),
            (40, 0, 40)
        );
        assert_eq!(announced.of_view(), 0, "partition 1 was never announced");
        assert!(
            !announced.record(30, [0].into_iter()),
            "older than what was announced"
        );
        assert!(announced.record(50, [1, 9999].into_iter()));
        assert_eq!(announced.of_view(), 40);
        assert_eq!(
            announced.of_partition(9999),
            0,
            "past the most partitions a view has"
        );
        assert!(parse("40").is_none() && parse("x:1").is_none() && parse("1:a").is_none());
    }
}
