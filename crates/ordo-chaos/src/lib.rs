//! `ordo chaos`: a drill that runs the whole system as separate processes, drives a mixed load
//! through NATS, injects faults (SIGKILLs of random workers, nats-server killed and kept down,
//! whole components taken away), waits for the system to settle and checks every invariant of
//! the README's "Chaos drills" against what the streams and the views hold.
//!
//! - [`accounts`]: the NATS accounts and users docker/nats-accounts.conf ships, which servers of the
//!   drill's own run, with a user per component and the load sent as the applications.
//! - [`fleet`]: the processes, started, killed and started again.
//! - [`faults`]: the schedule of kills, nats-server restarts, node kills and outages.
//! - [`load`]: the clients and the history of what they were told.
//! - [`hostile`]: an attacker among the applications, whose attacks must all fail.
//! - [`partitions`]: watching that every partition of the command service is served again
//!   within 5 s of losing its owner.
//! - [`observe`]: reading the streams, views, sagas, notifications and payments back.
//! - [`check`]: the checker, a pure function with its own fold of the streams.
//! - `options` and `report`: what a drill is asked for ([`ChaosOptions`]) and what it reports
//!   ([`Report`], [`print`]), with its progress while it runs.
//!
//! A run is driven by a seed (printed, and `--seed` repeats it): the load and the schedule of
//! faults come from it. Timing on a real machine still varies, so a seed repeats the drill, not
//! every interleaving.

pub mod accounts;
pub mod check;
pub mod faults;
pub mod fleet;
pub mod hostile;
pub mod load;
pub mod observe;
mod options;
pub mod partitions;
mod report;

pub use options::{ChaosOptions, Outage};
pub use report::{Progress, Report, print};

use ordo_contract::{CommandRequest, Quantity, ReceiveStock};
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use accounts::Accounts;
use anyhow::Context;
use fleet::{Component, Fleet, Launch};
use ordo_local::{NatsCluster, NatsServer, TestDatabase};
use rand::{SeedableRng, rngs::StdRng};

/// SIGKILLs `server`, keeps it down for `down` seconds, then starts it again on its store.
async fn down_for(server: &NatsServer, down: f64, what: &str) -> anyhow::Result<()> {
    server.kill();
    tokio::time::sleep(secs(down)).await;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.restart())).map_err(|_| {
        anyhow::anyhow!(
            "{what} did not start again; see {}",
            server.log_file().display()
        )
    })
}

/// Runs the drill; returns its report (`passed` is true only with no violation).
pub async fn run(
    options: ChaosOptions,
    nats_url: Option<String>,
    database_url: Option<String>,
) -> anyhow::Result<Report> {
    let seed = options.seed.unwrap_or_else(rand::random);
    let rng = StdRng::seed_from_u64(seed);
    eprintln!("ordo chaos: seed {seed} (repeat with --seed {seed})");
    if nats_url.is_some() && options.nats_restarts > 0 {
        anyhow::bail!(
            "--nats-restarts needs a nats-server the drill starts itself: leave --nats-url unset"
        );
    }
    let logs = match &options.logs {
        Some(dir) => dir.clone(),
        None => tempfile::Builder::new()
            .prefix("ordo-chaos-")
            .tempdir()?
            .keep(),
    };

    if options.kill_nodes > 0 && options.cluster < 3 {
        anyhow::bail!("--kill-nodes needs a cluster of at least 3 nodes: add --cluster 3");
    }
    if options.cluster > 0 && (nats_url.is_some() || options.nats_restarts > 0) {
        anyhow::bail!(
            "--cluster starts a cluster of the drill's own: leave --nats-url and --nats-restarts unset"
        );
    }

    // The servers: a nats-server (or cluster) of the drill's own, or the one given; a fresh
    // database.
    // Servers of the drill's own run the accounts and users docker/nats-accounts.conf ships. A missing
    // nats-server is said plainly, before anything starts.
    if nats_url.is_none() {
        ordo_local::find_nats_server().map_err(anyhow::Error::msg)?;
    }
    let accounts = nats_url.is_none().then(Accounts::generate);
    let server_config = accounts.as_ref().map(Accounts::server_config);
    let cluster = if options.cluster > 0 {
        let (size, config) = (options.cluster, server_config.clone());
        Some(
            tokio::task::spawn_blocking(move || match config {
                Some(config) => NatsCluster::start_with_config(size, &config),
                None => NatsCluster::start(size),
            })
            .await?,
        )
    } else {
        None
    };
    let nats_server = match (&nats_url, &cluster) {
        (None, None) => {
            let config = server_config.clone();
            Some(
                tokio::task::spawn_blocking(move || match config {
                    Some(config) => NatsServer::start_with_config(&config),
                    None => NatsServer::start(),
                })
                .await?,
            )
        }
        _ => None,
    };
    let nats_url = match (&cluster, &nats_server) {
        (Some(cluster), _) => cluster.url(),
        (None, Some(server)) => server.url(),
        (None, None) => nats_url.expect("given"),
    };
    let streams = ordo_app::components::StreamSettings {
        stream_replicas: (options.cluster > 1).then_some(options.cluster),
        ..Default::default()
    };
    let (admin_url, _private_postgres) = postgres_server(database_url).await?;
    let database = TestDatabase::create_on(&admin_url).await;
    // The drill's own connection is the operator's: it creates the streams and reads them all.
    let nats = match &accounts {
        Some(accounts) => accounts.connect(&nats_url, accounts::ADMIN).await?,
        None => async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 50).min(500))
            })
            .connect(ordo_app::connect::server_addrs(&nats_url)?)
            .await
            .with_context(|| format!("connecting to {nats_url}"))?,
    };
    ordo_local::NatsServer::wait_for_jetstream(&nats).await;
    // A new cluster may still be electing its leaders: try for a while.
    let definitions = streams.definitions()?;
    let mut ensured = ordo_app::components::ensure_streams(&nats, &definitions).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ensured.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensured = ordo_app::components::ensure_streams(&nats, &definitions).await;
    }
    ensured?;
    ordo_app::database::prepare(database.pool()).await?;
    let js = async_nats::jetstream::new(nats.clone());

    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let launch = Launch {
        binary: std::env::current_exe()?,
        env: vec![
            ("ORDO_NATS_URL".into(), nats_url.clone()),
            ("ORDO_DATABASE_URL".into(), database.url().to_owned()),
            ("ORDO_HTTP_ADDR".into(), format!("127.0.0.1:{http_port}")),
            (
                "ORDO_STREAM_REPLICAS".into(),
                streams.stream_replicas.unwrap_or(1).to_string(),
            ),
            ("ORDO_HOME".into(), logs.join("home").display().to_string()),
            (
                "ORDO_PAYMENT_DECLINE_RATE".into(),
                options.decline_rate.to_string(),
            ),
            (
                "ORDO_NOTIFY_FAILURE_RATE".into(),
                options.notify_failure_rate.to_string(),
            ),
            (
                "ORDO_PARTITIONS".into(),
                options
                    .partitions
                    .unwrap_or(ordo_commands::service::DEFAULT_PARTITIONS)
                    .to_string(),
            ),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ],
        users: accounts
            .iter()
            .flat_map(|accounts| {
                [Component::Api]
                    .into_iter()
                    .chain(Component::WORKERS)
                    .map(|component| {
                        let user = Accounts::user_of(component);
                        (
                            component,
                            (user.to_owned(), accounts.password(user).to_owned()),
                        )
                    })
            })
            .collect(),
        logs: logs.clone(),
    };
    let fleet = Arc::new(Mutex::new(Fleet::start(launch, options.instances)?));
    eprintln!(
        "ordo chaos: {} processes, nats {nats_url}, database {}, logs in {}",
        options.instances * Component::WORKERS.len() + 1,
        database.name(),
        logs.display()
    );
    wait_for_commands(&nats).await?;
    for index in 0..load::SKUS {
        let receive = CommandRequest::ReceiveStock(ReceiveStock {
            sku: load::sku(index),
            qty: Quantity::new(20).expect("positive"),
        });
        nats.request(receive.subject(), receive.body_bytes().into())
            .await?;
    }

    // The load, sent as the applications; and the attacks, sent as them too.
    let callers = match &accounts {
        Some(accounts) => load::Callers {
            shop: load::Caller {
                client: accounts.connect(&nats_url, accounts::SHOP.0).await?,
                account: Some(accounts::SHOP.1),
                tag: "shop",
            },
            warehouse: load::Caller {
                client: accounts.connect(&nats_url, accounts::WAREHOUSE.0).await?,
                account: Some(accounts::WAREHOUSE.1),
                tag: "warehouse",
            },
        },
        None => load::Callers {
            shop: load::Caller {
                client: nats.clone(),
                account: None,
                tag: "shop",
            },
            warehouse: load::Caller {
                client: nats.clone(),
                account: None,
                tag: "warehouse",
            },
        },
    };
    let history = Arc::new(load::History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(hostile::Attacks::default());
    let mut clients = tokio::task::JoinSet::new();
    if accounts.is_some() {
        clients.spawn(hostile::attack(
            callers.clone(),
            seed,
            history.clone(),
            attacks.clone(),
            stop.clone(),
        ));
    } else {
        eprintln!(
            "ordo chaos: no hostile client: the server given has no accounts of the drill's own"
        );
    }
    for client in 0..options.clients {
        let every = Duration::from_secs_f64(options.clients as f64 / options.rate.max(0.1));
        clients.spawn(load::client(
            callers.clone(),
            seed,
            client,
            every,
            history.clone(),
            stop.clone(),
        ));
    }

    // The faults, on a schedule drawn from the seed.
    let started = Instant::now();
    let duration = Duration::from_secs_f64(options.duration);
    let progress = Progress::new(duration);
    let mut faults = faults::Faults::new(&options, duration, rng, started);
    let watching = Arc::new(AtomicBool::new(false));
    let partition_watch = tokio::spawn(partitions::watch(
        js.clone(),
        options
            .partitions
            .unwrap_or(ordo_commands::service::DEFAULT_PARTITIONS),
        started,
        watching.clone(),
    ));
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let elapsed = started.elapsed();
        faults.tick(&mut fleet.lock().expect("not poisoned"), elapsed, &progress)?;
        if faults.nats_server_due(elapsed) {
            let server = nats_server.as_ref().expect("the drill's own server");
            progress.note(format!(
                "nats-server SIGKILLed, down for {} s",
                options.nats_down
            ));
            down_for(server, options.nats_down, "nats-server").await?;
            faults.nats_restarts += 1;
        }
        if let Some(stream) = faults.node_kill_due(elapsed) {
            let cluster = cluster.as_ref().expect("--kill-nodes needs --cluster");
            // Asked with a short timeout: while the cluster elects, an answer may not come, and
            // the kill is tried again on the next tick rather than after a client's timeout.
            let asked = async {
                let mut live = js.get_stream(stream).await.map_err(|err| err.to_string())?;
                let info = live.info().await.map_err(|err| err.to_string())?;
                info.cluster
                    .clone()
                    .and_then(|cluster| cluster.leader)
                    .ok_or_else(|| "no leader named".to_owned())
            };
            let leader = tokio::time::timeout(Duration::from_secs(1), asked)
                .await
                .unwrap_or_else(|_| Err("no answer within 1 s".to_owned()));
            if let Err(why) = &leader
                && faults.note_leader_unknown()
            {
                progress.note(format!(
                    "the leader of {stream} is not known yet ({why}); the kill waits for it"
                ));
            }
            let leader = leader.ok();
            if let Some(node) = leader.as_deref().and_then(|name| cluster.node(name)) {
                let name = leader.clone().unwrap_or_default();
                progress.note(format!(
                    "nats node {name} (leader of {stream}) SIGKILLed, down for {} s",
                    options.node_down
                ));
                down_for(node, options.node_down, &format!("nats node {name}")).await?;
                faults.node_killed(format!("{name} (leader of {stream})"));
            }
        }
        progress.tick(
            elapsed,
            &history,
            &fleet.lock().expect("not poisoned").kills,
        );
    }
    let (nats_restarts, node_kills, mut unexpected_exits) = (
        faults.nats_restarts,
        faults.node_kills,
        faults.unexpected_exits,
    );
    stop.store(true, Ordering::Relaxed);
    {
        let mut fleet = fleet.lock().expect("not poisoned");
        fleet.restart_stopped(None)?;
    }
    progress.note("load stopped; every component is back; waiting for the system to settle".into());
    while clients.join_next().await.is_some() {}

    // Quiescence, then the check.
    let settling = Instant::now();
    let mut quiet_polls = 0;
    let mut moving = Vec::new();
    while settling.elapsed() < secs(options.settle_timeout) && quiet_polls < 3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        unexpected_exits.extend(
            fleet
                .lock()
                .expect("not poisoned")
                .exited()
                .into_iter()
                .map(|(_, component, index, status)| (component, index, status)),
        );
        fleet.lock().expect("not poisoned").restart_stopped(None)?;
        moving = observe::still_moving(&js, database.pool())
            .await
            .unwrap_or_else(|err| vec![format!("{err:#}")]);
        quiet_polls = if moving.is_empty() {
            quiet_polls + 1
        } else {
            0
        };
        progress.settling(settling.elapsed(), &moving);
    }
    let settle_secs = settling.elapsed().as_secs_f64();
    watching.store(true, Ordering::Relaxed);
    let (partitions, partition_violations) = partition_watch.await?;
    progress.finish();
    let observed = observe::observe(&js, database.pool()).await?;
    let acknowledged = history.acknowledged.lock().expect("not poisoned").clone();
    let mut violations = check::check(&acknowledged, &observed);
    // The load sends only well-formed commands: refused as invalid, one lost its command id to
    // someone else.
    if let Some(refused) = history.counts().refused.get("invalid_command") {
        violations.push(check::Violation {
            invariant: "caller_acts_only_on_its_own_behalf",
            detail: format!("{refused} well-formed commands of the load were refused as invalid"),
        });
    }
    // A repeat of an accepted command gets the outcome recorded for it, whatever the load.
    for repeat in history
        .repeats_answered_otherwise
        .lock()
        .expect("not poisoned")
        .drain(..)
    {
        violations.push(check::Violation {
            invariant: "a_repeat_gets_its_recorded_outcome",
            detail: repeat,
        });
    }
    violations.extend(partition_violations);
    violations.extend(attacks.succeeded.lock().expect("not poisoned").drain(..));
    violations.extend(hostile::traces(&observed));
    if accounts.is_some() {
        violations.extend(refused_by_the_server(&logs));
    }
    fleet
        .lock()
        .expect("not poisoned")
        .stop(Duration::from_secs(5));

    let mut orders: BTreeMap<String, u64> = BTreeMap::new();
    for row in &observed.orders_view {
        *orders.entry(row.status.clone()).or_default() += 1;
    }
    let mut notifications: BTreeMap<String, u64> = BTreeMap::new();
    for status in observed.notifications.values() {
        *notifications.entry(status.clone()).or_default() += 1;
    }
    let kills = fleet.lock().expect("not poisoned").kills.clone();
    let rejections = observe::rejections(database.pool())
        .await
        .unwrap_or_default();
    Ok(Report {
        seed,
        passed: violations.is_empty(),
        duration_secs: options.duration,
        settle_secs,
        settled: quiet_polls >= 3,
        instances: options.instances,
        rate: options.rate,
        commands: history.counts(),
        attacks: attacks.sent.lock().expect("not poisoned").clone(),
        kills,
        nats_restarts,
        node_kills,
        outages: options.outages.clone(),
        partitions,
        unexpected_exits,
        orders,
        rejections,
        notifications,
        events: [
            (
                ordo_eventstore::StreamId::Orders.name().to_owned(),
                observed.order_events.len(),
            ),
            (
                ordo_eventstore::StreamId::Stock.name().to_owned(),
                observed.stock_events.len(),
            ),
        ]
        .into(),
        still_moving: moving,
        violations,
        logs,
    })
}

/// What the server refused ordo's own processes, from their logs: the shipped permissions must
/// be enough for everything ordo does, or some of it silently stops working.
fn refused_by_the_server(logs: &std::path::Path) -> Vec<check::Violation> {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return Vec::new();
    };
    let mut refused = BTreeMap::<String, u64>::new();
    for entry in entries.flatten() {
        let Ok(log) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in log
            .lines()
            .filter(|line| line.contains("Permissions Violation"))
        {
            let what = line
                .split("Permissions Violation")
                .nth(1)
                .unwrap_or_default()
                .trim_end_matches('"');
            *refused
                .entry(format!("{}: {what}", entry.file_name().to_string_lossy()))
                .or_default() += 1;
        }
    }
    refused
        .into_iter()
        .map(|(what, times)| check::Violation {
            invariant: "shipped_permissions_suffice",
            detail: format!("{what} ({times} times)"),
        })
        .collect()
}

/// The PostgreSQL server the drill creates its database on: the one given, else
/// `ORDO_TEST_DATABASE_URL`, else a local one that accepts `postgres` without a password, else a
/// private cluster of its own (stopped and deleted with the drill).
async fn postgres_server(
    given: Option<String>,
) -> anyhow::Result<(String, Option<ordo_local::PostgresServer>)> {
    if let Some(url) = given.or_else(|| std::env::var("ORDO_TEST_DATABASE_URL").ok()) {
        return Ok((url, None));
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres";
    let answers = tokio::time::timeout(
        Duration::from_secs(2),
        <sqlx::PgConnection as sqlx::Connection>::connect(local),
    )
    .await;
    if matches!(answers, Ok(Ok(_))) {
        return Ok((local.to_owned(), None));
    }
    eprintln!("ordo chaos: no PostgreSQL answers on 127.0.0.1:5432; starting a private one");
    let server = tokio::task::spawn_blocking(ordo_local::PostgresServer::start).await?;
    Ok((server.url("postgres"), Some(server)))
}

pub(crate) fn secs(secs: f64) -> Duration {
    Duration::from_secs_f64(secs.max(0.0))
}

/// Waits until a command service answers (the fleet has just started).
async fn wait_for_commands(nats: &async_nats::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ping = nats.request("$SRV.PING.ordo", "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), ping).await {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no command service answered within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
