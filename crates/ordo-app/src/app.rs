//! [`App`]: ordo assembled. [`App::build`] connects to NATS and PostgreSQL (starting local
//! servers for [`Role::Everything`] when none answer), applies the streams and prepares the
//! database; [`App::run_until_stopped`] runs the components until the shutdown is triggered or
//! one of them stops, then stops the rest. `ordo up`, `ordo run` and the tests all run ordo so.

use tokio::task::JoinSet;

use crate::{Settings, Shutdown, components, connect, database};

/// A long-running component, as `ordo run` names it.
#[derive(clap::Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum Component {
    /// The command service (NATS micro service `ordo`, queue group `ordo-commands`).
    Commands,
    /// Projector workers; the instances share each view's partitions.
    Projector {
        /// Only this projection (orders or stock); all when absent.
        #[arg(long)]
        projection: Option<ordo_projections::View>,
    },
    /// The HTTP read API.
    Api,
    /// A saga coordinator: reserve, pay, confirm, or compensate (run as many as you like).
    Saga,
    /// The notifier: one notification per (order, kind).
    Notifier,
}

/// What one process runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every component (`ordo up`), starting a nats-server and a PostgreSQL of its own when none
    /// answers at the configured (or default) address.
    Everything,
    /// One component (`ordo run <component>`), against the servers configured.
    Only(Component),
}

impl Role {
    fn components(&self) -> Vec<Component> {
        match self {
            Self::Everything => vec![
                Component::Commands,
                Component::Projector { projection: None },
                Component::Saga,
                Component::Notifier,
                Component::Api,
            ],
            Self::Only(component) => vec![component.clone()],
        }
    }

    /// Every component but the command service reads or writes PostgreSQL.
    fn needs_database(&self) -> bool {
        self.components()
            .iter()
            .any(|component| *component != Component::Commands)
    }
}

/// ordo, connected and ready to run.
pub struct App {
    settings: Settings,
    role: Role,
    nats: async_nats::Client,
    pool: Option<sqlx::PgPool>,
    // Servers `ordo up` started: they stop when the app is dropped, after every component.
    _local_nats: Option<connect::LocalNats>,
    _local_postgres: Option<database::LocalPostgres>,
}

impl App {
    /// Connects and prepares what `role` needs, waiting for servers that do not answer yet.
    /// `None` when `shutdown` is triggered first.
    pub async fn build(
        settings: Settings,
        role: Role,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Option<Self>> {
        // The process-wide metrics recorder, before anything records a metric.
        ordo_api::prometheus();
        let (nats_url, local_nats, database_url, local_postgres) = match role {
            Role::Everything => {
                let (nats_url, local_nats) =
                    connect::url_for_up(settings.nats_url.clone(), &settings.home()).await?;
                let (database_url, local_postgres) =
                    database::url_for_up(settings.database_url.clone(), &settings.home()).await?;
                (nats_url, local_nats, database_url, local_postgres)
            }
            Role::Only(_) => (settings.nats_url(), None, settings.database_url(), None),
        };
        let Some(nats) = connect_nats(shutdown, &nats_url, &settings).await? else {
            return Ok(None);
        };
        let pool = if role.needs_database() {
            match shutdown
                .unless_triggered(database::connect_and_prepare(&database_url))
                .await
            {
                None => return Ok(None),
                Some(pool) => Some(pool?),
            }
        } else {
            None
        };
        Ok(Some(Self {
            settings,
            role,
            nats,
            pool,
            _local_nats: local_nats,
            _local_postgres: local_postgres,
        }))
    }

    /// The NATS connection the components share.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Runs every component of the role until `shutdown` is triggered or one of them stops on
    /// its own (which stops the rest); then waits for all of them. Fails if any failed.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let mut components = JoinSet::new();
        // `ordo up` serves the metrics on the API's address only.
        if let (Role::Only(_), Some(addr)) = (&self.role, self.settings.metrics_addr) {
            components.spawn(named(
                "metrics",
                components::metrics(
                    addr,
                    self.settings.http_access.clone(),
                    ordo_api::WorkerChecks::new(self.nats.clone(), self.pool.clone()),
                    shutdown.clone(),
                ),
            ));
        }
        for component in self.role.components() {
            self.spawn(&mut components, &component, &shutdown);
        }
        if self.role == Role::Everything {
            tracing::info!(api = %format!("http://{}", self.settings.http_addr), "ordo is up");
        }
        let result = supervise(components, shutdown).await;
        // Close the connection before a nats-server `ordo up` started is stopped.
        self.nats.drain().await.ok();
        result
    }

    fn spawn(
        &self,
        components: &mut JoinSet<(String, anyhow::Result<()>)>,
        component: &Component,
        shutdown: &Shutdown,
    ) {
        let settings = &self.settings;
        let nats = &self.nats;
        let pool = || {
            self.pool
                .clone()
                .expect("every component but the command service is given a database")
        };
        match component {
            Component::Commands => {
                components.spawn(named(
                    "commands",
                    components::commands(
                        nats.clone(),
                        settings.load_shedding.clone(),
                        settings.streams.clone(),
                        settings.partitions,
                        shutdown.clone(),
                    ),
                ));
            }
            Component::Projector { projection } => {
                let views = match projection {
                    Some(view) => vec![*view],
                    None => ordo_projections::View::ALL.to_vec(),
                };
                for view in views {
                    let task = components::projector(
                        view,
                        pool(),
                        nats.clone(),
                        settings.partitions,
                        settings.streams.clone(),
                        shutdown.clone(),
                    );
                    components.spawn(async move { (format!("projector {view}"), task.await) });
                }
            }
            Component::Api => {
                components.spawn(named(
                    "api",
                    components::api(settings.clone(), pool(), nats.clone(), shutdown.clone()),
                ));
            }
            Component::Saga => {
                let saga = components::saga(
                    settings.saga.clone(),
                    pool(),
                    nats.clone(),
                    settings.partitions,
                    settings.streams.clone(),
                    shutdown.clone(),
                );
                components.spawn(named("saga", saga));
            }
            Component::Notifier => {
                let notifier = components::notifier(
                    settings.saga.clone(),
                    pool(),
                    nats.clone(),
                    shutdown.clone(),
                );
                components.spawn(named("notifier", notifier));
            }
        }
    }
}

async fn named(
    name: &'static str,
    component: impl Future<Output = anyhow::Result<()>>,
) -> (String, anyhow::Result<()>) {
    (name.to_owned(), component.await)
}

/// NATS, waited for (unless a stop comes first: `None`), with the streams applied.
async fn connect_nats(
    shutdown: &Shutdown,
    url: &str,
    settings: &Settings,
) -> anyhow::Result<Option<async_nats::Client>> {
    let Some(nats) = shutdown
        .unless_triggered(connect::connect_with_backoff(url, &settings.nats_auth))
        .await
        .transpose()?
    else {
        return Ok(None);
    };
    // Bad definition files are an error now; a JetStream that does not answer yet (a cluster
    // electing its leaders, a node down) is waited for.
    let definitions = settings.streams.definitions()?;
    let mut backoff = ordo_eventstore::backoff::Backoff::new(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(10),
    );
    loop {
        match shutdown
            .unless_triggered(components::ensure_streams(&nats, &definitions))
            .await
        {
            None => return Ok(None),
            Some(Ok(())) => return Ok(Some(nats)),
            Some(Err(err)) => {
                let delay = backoff.next_delay();
                tracing::warn!(err = %format!("{err:#}"), retry_in = ?delay, "the streams cannot be created or checked yet; retrying");
                if shutdown
                    .unless_triggered(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Ok(None);
                }
            }
        }
    }
}

/// Waits for the shutdown, or for a component to stop on its own (which stops the rest), then
/// for every component to finish. Fails if any component failed.
async fn supervise(
    mut components: JoinSet<(String, anyhow::Result<()>)>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut failed = None;
    tokio::select! {
        // A component that ends because the shutdown began did not stop on its own.
        biased;
        () = shutdown.signal() => {}
        Some(ended) = components.join_next() => {
            let (name, result) = ended?;
            match result {
                Ok(()) => tracing::error!(component = %name, "stopped on its own; stopping the rest"),
                Err(err) => {
                    tracing::error!(component = %name, err = format!("{err:#}"), "failed; stopping the rest");
                    failed = Some(err.context(name));
                }
            }
        }
    }
    shutdown.trigger();
    while let Some(ended) = components.join_next().await {
        let (name, result) = ended?;
        if let Err(err) = result {
            tracing::error!(component = %name, err = format!("{err:#}"), "failed while stopping");
        }
    }
    failed.map_or(Ok(()), Err)
}
