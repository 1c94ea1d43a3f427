//! Rebuilds started from the console: run by the API process itself, when its database role may
//! (a rebuild creates a schema and replaces the live view's: the database's owner, as `ordo up`
//! connects, may; the read-only role of the shipped deployment may not, and the page says to run
//! `ordo projections rebuild` instead), with their progress kept here for the projections page.
//! One rebuild of a view runs at a time, across processes: the rebuild takes an advisory lock.

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
            let progress = rebuilds.clone();
            let report = move |progress_now: ordo_projections::rebuild::Progress| {
                progress.update(view, |status| {
                    status.applied = progress_now.applied;
                    status.target = progress_now.target;
                });
            };
            // In a task of its own, so that a panic in it still ends the status.
            let rebuilding = tokio::spawn(async move {
                view.rebuild(&pool, &js, config, report)
                    .await
                    .map(|rebuilt| {
                        format!(
                            "rebuilt up to sequence {} in {:.1?} and swapped in",
                            rebuilt.checkpoint, rebuilt.took
                        )
                    })
                    .map_err(|err| err.to_string())
            });
            let outcome = rebuilding
                .await
                .unwrap_or_else(|err| Err(format!("the rebuild stopped: {err}")));
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

/// Whether this process's database role may rebuild `view`: create schemas (the new view is
/// built in one) and replace the live one, which takes owning it (or being a member of the role
/// that does). A view not created yet is the rebuild's to create.
pub async fn may_rebuild(pool: &sqlx::PgPool, view: View) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT has_database_privilege(current_database(), 'CREATE')
            AND coalesce((SELECT pg_has_role(nspowner, 'MEMBER') FROM pg_namespace
                          WHERE nspname = $1), true)",
    )
    .bind(view.info().schema())
    .fetch_one(pool)
    .await
}
