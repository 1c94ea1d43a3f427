//! The operator's commands: migrate the database, apply the streams, see who owns the partitions,
//! see and rebuild the projections, retry a stuck saga or a dead-lettered notification.

use ordo_app::{Settings, components, connect, database};
use ordo_eventstore::streams::apply_all;
use ordo_projections::{ProjectorConfig, View};
use sqlx::PgPool;

use crate::cli::{
    NotificationsAction, PartitionsAction, ProjectionsAction, SagasAction, StreamsAction,
};

pub async fn migrate(
    settings: &Settings,
    grant_to: Option<&str>,
    grant_read_to: Option<&str>,
) -> anyhow::Result<()> {
    database::migrate(&settings.database_url(), grant_to, grant_read_to).await
}

pub async fn streams(settings: &Settings, action: StreamsAction) -> anyhow::Result<()> {
    let StreamsAction::Apply { dir, wait } = action;
    let streams = components::StreamSettings {
        streams_dir: dir.or(settings.streams.streams_dir.clone()),
        ..settings.streams.clone()
    };
    let definitions = streams.definitions()?;
    let url = settings.nats_url();
    // A cluster just started answers connections before it has elected a JetStream meta
    // leader, and a stream's creation fails until it has: with --wait, try again until the
    // deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let nats = if wait == 0 {
        connect::connect_once(&url, &settings.nats_auth).await?
    } else {
        tokio::time::timeout_at(
            deadline.into(),
            connect::connect_with_backoff(&url, &settings.nats_auth),
        )
        .await
        .map_err(|_| anyhow::anyhow!("NATS did not answer within {wait} s"))??
    };
    let js = async_nats::jetstream::new(nats);
    loop {
        match apply_all(&js, &definitions).await {
            Ok(applied) => {
                for (stream, applied) in applied {
                    println!("{stream}: {applied}");
                }
                return Ok(());
            }
            Err(err) if not_ready_yet(&err) && std::time::Instant::now() < deadline => {
                eprintln!("JetStream is not ready yet ({err:#}); trying again in a second");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(err) if wait == 0 => return Err(err.into()),
            Err(err) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("JetStream was not ready within {wait} s")));
            }
        }
    }
}

/// Whether JetStream may take the streams a moment later: it did not answer, or a cluster is
/// still electing its leader. A definition it refuses, or one that cannot be read, fails at once.
fn not_ready_yet(err: &ordo_eventstore::streams::StreamsError) -> bool {
    let ordo_eventstore::streams::StreamsError::JetStream { reason, .. } = err else {
        return false;
    };
    let reason = reason.to_lowercase();
    [
        "timed out",
        "timeout",
        "no responders",
        "unavailable",
        "not enabled",
        "leader",
    ]
    .iter()
    .any(|sign| reason.contains(sign))
}

pub async fn partitions(settings: &Settings, action: PartitionsAction) -> anyhow::Result<()> {
    let PartitionsAction::Status { json, group } = action;
    let known: Vec<String> = std::iter::once(ordo_commands::service::PARTITION_GROUP.to_owned())
        .chain(
            View::ALL
                .iter()
                .map(|view| ordo_projections::runtime::group_of(*view).to_owned()),
        )
        .collect();
    anyhow::ensure!(
        known.contains(&group),
        "no partition group {group:?} (there are: {})",
        known.join(", ")
    );
    let nats = connect::connect_once(&settings.nats_url(), &settings.nats_auth).await?;
    // The count the live instances run with, as their heartbeats say; this setting when none is.
    let config = ordo_eventstore::OwnershipConfig::new(&group, settings.partitions);
    let status = ordo_eventstore::ownership::status(&async_nats::jetstream::new(nats), &config)
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", partitions_table(&status));
    }
    Ok(())
}

/// `ordo partitions status` as tables: the partitions, then the instances.
pub fn partitions_table(status: &ordo_eventstore::GroupStatus) -> String {
    let seconds = |ms: u64| format!("{:.1} s ago", ms as f64 / 1000.0);
    let mut out = format!(
        "{:<9} {:<18} {:>12} {}\n",
        "partition", "owner", "renewed", "lease"
    );
    for partition in &status.partitions {
        out.push_str(&format!(
            "{:<9} {:<18} {:>12} {}\n",
            partition.partition,
            partition.owner.as_deref().unwrap_or("-"),
            partition.renewed_ms_ago.map_or("-".to_owned(), seconds),
            if partition.held {
                "held"
            } else if partition.owner.is_some() {
                "expired: the next owner takes it"
            } else {
                "unowned"
            },
        ));
    }
    out.push_str(&format!(
        "\n{:<18} {:>12} {:>10} {:>8} {}\n",
        "instance", "heartbeat", "holds", "of", "state"
    ));
    for member in &status.members {
        out.push_str(&format!(
            "{:<18} {:>12} {:>10} {:>8} {}\n",
            member.instance,
            seconds(member.heartbeat_ms_ago),
            member.owns,
            member
                .partitions
                .map_or("?".to_owned(), |count| count.to_string()),
            if member.alive { "alive" } else { "silent" },
        ));
    }
    if status.members.is_empty() {
        out.push_str("(no command service has joined)\n");
    }
    out
}

pub async fn projections(settings: &Settings, action: ProjectionsAction) -> anyhow::Result<()> {
    let nats = connect::connect_once(&settings.nats_url(), &settings.nats_auth).await?;
    match action {
        ProjectionsAction::Status { json } => {
            let pool =
                PgPool::connect_with(database::connect_options(&settings.database_url())?).await?;
            let status = ordo_api::ops::projection_status(&pool, &nats)
                .await
                .map_err(|err| anyhow::anyhow!("{err:?}"))?;
            if json {
                // GET /projections' document.
                let document = ordo_api::bodies::Projections {
                    projections: status,
                };
                println!("{}", serde_json::to_string_pretty(&document)?);
            } else {
                print!("{}", status_table(&status));
            }
            Ok(())
        }
        ProjectionsAction::Rebuild { view } => {
            let pool = database::connect_and_prepare(&settings.database_url()).await?;
            rebuild(view, &pool, &nats, settings.partitions).await
        }
    }
}

pub async fn sagas(settings: &Settings, action: SagasAction) -> anyhow::Result<()> {
    let SagasAction::Retry { order_id } = action;
    let order_id = ordo_domain::OrderId::parse(order_id)?;
    let nats = connect::connect_once(&settings.nats_url(), &settings.nats_auth).await?;
    let pool = PgPool::connect_with(database::connect_options(&settings.database_url())?).await?;
    match settings
        .saga
        .coordinator(pool, nats, settings.partitions, 1)
        .retry_stuck(&order_id)
        .await?
    {
        ordo_saga::StuckRetry::Retried(state) => println!("saga of {order_id}: {}", state.as_str()),
        ordo_saga::StuckRetry::NotStuck(state) => anyhow::bail!(
            "the saga of {order_id} is {}, not compensation_stuck: nothing to retry",
            state.as_str()
        ),
        ordo_saga::StuckRetry::NoSaga => anyhow::bail!("no saga for order {order_id}"),
    }
    Ok(())
}

pub async fn notifications(settings: &Settings, action: NotificationsAction) -> anyhow::Result<()> {
    use ordo_saga::notifier::Redelivery;
    let NotificationsAction::Retry { order_id, kind } = action;
    let nats = connect::connect_once(&settings.nats_url(), &settings.nats_auth).await?;
    let pool = PgPool::connect_with(database::connect_options(&settings.database_url())?).await?;
    match components::notifier_of(&settings.saga, pool, nats)
        .await?
        .retry_dead_lettered(&order_id, &kind)
        .await?
    {
        Redelivery::Delivered(status) => println!("notification {kind} of {order_id}: {status}"),
        Redelivery::NotDeadLettered(status) => anyhow::bail!(
            "the {kind} notification of {order_id} is {status}, not dead_lettered: nothing to \
             deliver again"
        ),
        Redelivery::NoNotification => anyhow::bail!("no {kind} notification for order {order_id}"),
    }
    Ok(())
}

/// Rebuilds the view `name` with a progress bar (events/s, ETA) on a terminal, plain lines
/// otherwise.
/// The new view keeps the checkpoints of `partitions` partitions, the count its projectors run
/// with.
pub async fn rebuild(
    view: View,
    pool: &PgPool,
    nats: &async_nats::Client,
    partitions: u32,
) -> anyhow::Result<()> {
    use ordo_projections::rebuild::Progress;
    use std::io::IsTerminal;

    let js = async_nats::jetstream::new(nats.clone());
    let bar = indicatif::ProgressBar::new(0);
    let terminal = std::io::stderr().is_terminal();
    if terminal {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} events · {per_sec} · ETA {eta}",
            )?
            .progress_chars("=> "),
        );
        bar.set_message(format!("rebuilding {view}"));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    let mut report = |progress: Progress| {
        bar.set_length(progress.target);
        bar.set_position(progress.applied);
        if !terminal && (last_line.elapsed().as_secs() >= 1 || progress.applied >= progress.target)
        {
            let rate = progress.applied as f64 / started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "rebuilding {view}: {}/{} events, {rate:.0} events/s",
                progress.applied, progress.target
            );
            last_line = std::time::Instant::now();
        }
    };
    let rebuilt = view
        .rebuild(
            pool,
            &js,
            ProjectorConfig {
                partitions,
                ..ProjectorConfig::for_rebuild()
            },
            &mut report,
        )
        .await?;
    bar.finish_and_clear();
    println!(
        "{view}: rebuilt up to sequence {} in {:.1?} and swapped in",
        rebuilt.checkpoint, rebuilt.took
    );
    Ok(())
}

/// The projection status as a table for a terminal.
pub fn status_table(status: &[ordo_api::bodies::ProjectionStatus]) -> String {
    let mut out = format!(
        "{:<12} {:<14} {:>10} {:>10} {:>8} {:>7}\n",
        "projection", "stream", "checkpoint", "head", "lag", "parked"
    );
    let show = |value: Option<u64>| value.map_or("-".to_owned(), |value| value.to_string());
    for projection in status {
        out.push_str(&format!(
            "{:<12} {:<14} {:>10} {:>10} {:>8} {:>7}\n",
            projection.name,
            projection.stream,
            projection.checkpoint,
            show(projection.stream_head),
            show(projection.lag),
            projection.parked,
        ));
        for parked in &projection.parked_events {
            out.push_str(&format!(
                "  parked: seq {} on {}: {}\n",
                parked.seq, parked.subject, parked.reason
            ));
        }
    }
    out
}
