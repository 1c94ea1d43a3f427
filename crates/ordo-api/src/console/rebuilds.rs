//! Rebuilds started from the console: run by the API process itself (a rebuild creates a schema,
//! which only a role allowed to create one may do: the database's owner, as `ordo up` connects),
//! with their progress kept here for the projections page to show.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use ordo_projections::{ProjectorConfig, View};

/// Where a rebuild started here is.
#[derive(Debug, Clone)]
pub struct RebuildStatus {
    pub started_at: DateTime<Utc>,
    /// Events applied to the new view, and the stream's head when it started.
    pub applied: u64,
    pub target: u64,
    /// None while it runs; then what it came to.
    pub outcome: Option<Result<String, String>>,
}

/// The rebuilds this process started, by view.
#[derive(Clone, Default)]
pub struct Rebuilds(Arc<Mutex<BTreeMap<&'static str, RebuildStatus>>>);

impl Rebuilds {
    pub fn of(&self, view: View) -> Option<RebuildStatus> {
        self.0
            .lock()
            .expect("never poisoned")
            .get(view.name())
            .cloned()
    }

    fn update(&self, view: View, change: impl FnOnce(&mut RebuildStatus)) {
        if let Some(status) = self.0.lock().expect("never poisoned").get_mut(view.name()) {
            change(status);
        }
    }

    /// Starts rebuilding `view` in the background, unless one started here still runs (a
    /// rebuild started elsewhere is refused by the rebuild itself, and shows as failed).
    pub fn start(
        &self,
        view: View,
        pool: sqlx::PgPool,
        nats: async_nats::Client,
        partitions: u32,
    ) -> Result<(), &'static str> {
        {
            let mut running = self.0.lock().expect("never poisoned");
            if running
                .get(view.name())
                .is_some_and(|status| status.outcome.is_none())
            {
                return Err("a rebuild of this view started here is still running");
            }
            running.insert(
                view.name(),
                RebuildStatus {
                    started_at: Utc::now(),
                    applied: 0,
                    target: 0,
                    outcome: None,
                },
            );
        }
        let rebuilds = self.clone();
        tokio::spawn(async move {
            let js = async_nats::jetstream::new(nats);
            let config = ProjectorConfig {
                partitions,
                ..ProjectorConfig::for_rebuild()
            };
            let report = |progress: ordo_projections::rebuild::Progress| {
                rebuilds.update(view, |status| {
                    status.applied = progress.applied;
                    status.target = progress.target;
                });
            };
            let outcome = view
                .rebuild(&pool, &js, config, report)
                .await
                .map(|rebuilt| {
                    format!(
                        "rebuilt up to sequence {} in {:.1?} and swapped in",
                        rebuilt.checkpoint, rebuilt.took
                    )
                })
                .map_err(|err| err.to_string());
            match &outcome {
                Ok(done) => tracing::info!(view = view.name(), done, "rebuild from the console"),
                Err(err) => {
                    tracing::warn!(view = view.name(), err, "rebuild from the console failed")
                }
            }
            rebuilds.update(view, |status| status.outcome = Some(outcome));
        });
        Ok(())
    }
}

/// Whether this process's database role may create schemas, as a rebuild does.
pub async fn may_rebuild(pool: &sqlx::PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT has_database_privilege(current_database(), 'CREATE')")
        .fetch_one(pool)
        .await
}
