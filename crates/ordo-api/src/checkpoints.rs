//! The views' checkpoints as the projectors announce them: each batch's transaction ends with a
//! `NOTIFY` on [`CHECKPOINT_CHANNEL`], delivered when it commits. A read that waits for
//! `min_seq` wakes on the announcement instead of polling the database. Announcements are
//! hints: the checkpoint in the view's own table stays the answer, and a waiting read checks it
//! at least every [`RECHECK`] (announcements sent while the listener reconnects are lost).

use std::{collections::HashMap, sync::Arc, time::Duration};

use ordo_projections::runtime::CHECKPOINT_CHANNEL;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::watch;

/// How often a waiting read looks at the checkpoint without an announcement.
pub const RECHECK: Duration = Duration::from_millis(100);

/// The highest checkpoint announced for each view, by projection name.
#[derive(Clone)]
pub struct CheckpointSignals {
    views: Arc<HashMap<&'static str, watch::Sender<u64>>>,
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
                .map(|view| (*view, watch::Sender::new(0)))
                .collect(),
        );
        let listener = tokio::spawn(listen_forever(pool, views.clone()));
        Self {
            views,
            _listener: Arc::new(AbortOnDrop(listener)),
        }
    }

    pub fn subscribe(&self, view: &str) -> Option<watch::Receiver<u64>> {
        self.views.get(view).map(watch::Sender::subscribe)
    }
}

async fn listen_forever(pool: PgPool, views: Arc<HashMap<&'static str, watch::Sender<u64>>>) {
    loop {
        if let Err(err) = listen(&pool, &views).await {
            tracing::debug!(%err, "checkpoint announcements interrupted; reads fall back to polling");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen(
    pool: &PgPool,
    views: &HashMap<&'static str, watch::Sender<u64>>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHECKPOINT_CHANNEL).await?;
    loop {
        let notification = listener.recv().await?;
        if let Some((view, seq)) = notification.payload().split_once(':')
            && let (Some(signal), Ok(seq)) = (views.get(view), seq.parse::<u64>())
        {
            signal.send_if_modified(|announced| {
                let newer = seq > *announced;
                if newer {
                    *announced = seq;
                }
                newer
            });
        }
    }
}
