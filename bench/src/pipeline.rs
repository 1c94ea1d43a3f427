//! The whole order pipeline through `ordo up`: orders placed over NATS, taken through the saga
//! (reserve, authorise, deduct, confirm) and into the views.

use ordo_contract::Endpoint;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::Row;

use crate::{
    measure::{Figures, closed_loop},
    system::{CpuMeter, Ordo, Servers, free_port, wait_until},
};

/// SKUs the orders draw on, each with far more stock than the orders need.
const SKUS: usize = 50;

/// `ordo up` on fresh servers, with stock received, ready for orders.
pub async fn start_up(servers: &Servers, name: &str) -> anyhow::Result<(Ordo, u16)> {
    let port = free_port();
    let up = servers.spawn(
        name,
        &["up"],
        &[("ORDO_HTTP_ADDR", format!("127.0.0.1:{port}"))],
    )?;
    servers
        .received("S0", 1_000_000, "ordo up answering commands")
        .await?;
    let receives = (1..SKUS)
        .map(|i| {
            let body = json!({"sku": format!("S{i}"), "qty": 1_000_000});
            (Endpoint::StockReceive, body)
        })
        .collect();
    let received = closed_loop(&servers.client, "receive", 16, receives).await;
    anyhow::ensure!(
        received.errors() == 0,
        "receiving stock: {}",
        received.outcomes_text()
    );
    Ok((up, port))
}

/// A one-line order of one of the SKUs, with an id of its own, so that it can be sent again.
pub fn order(run: &str, i: usize) -> serde_json::Value {
    let line = json!({"sku": format!("S{}", i % SKUS), "qty": 1, "unit_price_cents": 100});
    json!({"order_id": format!("{run}-{i}"), "customer_id": format!("c{}", i % 1000), "lines": [line]})
}

/// Places an order as a well-behaved client does: a reply `unavailable` (ordo shedding load)
/// is waited out for its `retry_after_ms` and the same order sent again. Returns the reply of
/// the last try, and how many were shed.
pub async fn place(
    client: &async_nats::Client,
    body: &serde_json::Value,
) -> (Option<serde_json::Value>, u32) {
    let mut shed = 0;
    loop {
        let reply = match client
            .request(Endpoint::OrderPlace.subject(), body.to_string().into())
            .await
        {
            Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply.payload).ok(),
            Err(_) => None,
        };
        match &reply {
            Some(reply) if reply["error"]["code"] == "unavailable" && shed < 1000 => {
                shed += 1;
                let pause = reply["error"]["retry_after_ms"].as_u64().unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            _ => return (reply, shed),
        }
    }
}

fn outcome_of(reply: &Option<serde_json::Value>) -> String {
    match reply {
        Some(reply) if reply["ok"] == true => "ok".into(),
        Some(reply) => reply["error"]["code"]
            .as_str()
            .unwrap_or("unreadable reply")
            .into(),
        None => "no reply".into(),
    }
}

pub struct Burst {
    pub orders: usize,
    /// The place requests: their replies and latencies (retries after `unavailable` included).
    pub placed: Figures,
    /// Place requests answered `unavailable` (and sent again after `retry_after_ms`).
    pub shed: u64,
    /// From the first place request until the last saga settled (or the wait ended).
    pub to_settle: Duration,
    /// From the first place request until the last confirmed order's notification was sent (or
    /// the wait ended).
    pub to_notify: Duration,
    /// Sagas by final state (`unsettled` for those still active when the wait ended).
    pub by_state: BTreeMap<String, usize>,
    /// Rejected orders by reason.
    pub rejected: BTreeMap<String, usize>,
    /// Placed → settled, per order, from the saga's own timestamps.
    pub settle_latency: Figures,
    pub resident_mib: Option<f64>,
    /// CPU seconds from the first place until the last saga settled: the whole machine's, and
    /// `ordo up`'s, nats-server's and the load generator's (PostgreSQL is most of the rest).
    pub cpu: (f64, Vec<(&'static str, f64)>),
    /// `ordo up`, still running, and its HTTP port.
    pub up: (Ordo, u16),
}

impl Burst {
    pub fn confirmed(&self) -> usize {
        self.by_state.get("confirmed").copied().unwrap_or(0)
    }

    pub fn confirmed_per_second(&self) -> f64 {
        self.confirmed() as f64 / self.to_settle.as_secs_f64().max(1e-9)
    }

    /// Milliseconds of CPU per confirmed order: the whole machine's, and each measured process's.
    pub fn cpu_per_confirmed_ms(&self) -> (f64, Vec<(&'static str, f64)>) {
        let per_order = |seconds: f64| seconds * 1000.0 / self.confirmed().max(1) as f64;
        let (machine, processes) = &self.cpu;
        (
            per_order(*machine),
            processes
                .iter()
                .map(|(name, seconds)| (*name, per_order(*seconds)))
                .collect(),
        )
    }
}

/// Places `orders` one-line orders, `concurrency` in flight, and waits up to `settle_timeout`
/// for every saga to settle.
pub async fn burst(
    servers: &Servers,
    orders: usize,
    concurrency: usize,
    settle_timeout: Duration,
) -> anyhow::Result<Burst> {
    let (up, port) = start_up(servers, "up-burst").await?;
    let pool = servers.database.pool();
    let mut measured = vec![
        ("ordo up", up.pid()),
        ("load generator", std::process::id()),
    ];
    measured.extend(servers.nats.pid().map(|pid| ("nats-server", pid)));
    let cpu = CpuMeter::start(&measured);
    let started = Instant::now();
    let client = &servers.client;
    let results: Vec<(Duration, String, u32)> = futures::stream::iter(0..orders)
        .map(|i| async move {
            let sent = Instant::now();
            let (reply, shed) = place(client, &order("burst", i)).await;
            (sent.elapsed(), outcome_of(&reply), shed)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let shed = results.iter().map(|(_, _, shed)| u64::from(*shed)).sum();
    let placed = Figures::new(
        "place (burst)",
        started.elapsed(),
        results
            .into_iter()
            .map(|(latency, outcome, _)| (latency, outcome))
            .collect(),
    );
    let accepted = placed.outcomes.get("ok").copied().unwrap_or(0) as i64;
    let settle_deadline = Instant::now() + settle_timeout;
    loop {
        let row = sqlx::query(
            "SELECT count(*) AS taken_in,
                    count(*) FILTER (WHERE state IN ('running', 'compensating', 'cancelling',
                                                     'shipping', 'compensation_stuck')) AS active
             FROM sagas",
        )
        .fetch_one(pool)
        .await?;
        let (taken_in, active): (i64, i64) = (row.get("taken_in"), row.get("active"));
        if (taken_in >= accepted && active == 0) || Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let to_settle = started.elapsed();
    let cpu = cpu.read();
    // The customers told: every confirmed order's notification sent (the notifier runs behind
    // the saga, and no backlog of its sheds load).
    let notify_deadline = Instant::now() + settle_timeout;
    loop {
        let (confirmed, sent): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM sagas WHERE state = 'confirmed'),
                    (SELECT count(*) FROM notifications WHERE kind = 'confirmed' AND status = 'sent')",
        )
        .fetch_one(pool)
        .await?;
        if sent >= confirmed || Instant::now() > notify_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let to_notify = started.elapsed();
    let resident_mib = up.resident_mib();
    let rows = sqlx::query(
        "SELECT state, coalesce(reason, '') AS reason,
                extract(epoch FROM updated_at - started_at)::float8 AS seconds
         FROM sagas",
    )
    .fetch_all(pool)
    .await?;
    let mut by_state = BTreeMap::new();
    let mut rejected = BTreeMap::new();
    let mut samples = Vec::new();
    for row in &rows {
        let state: String = row.get("state");
        let settled = !matches!(
            state.as_str(),
            "running" | "compensating" | "cancelling" | "shipping" | "compensation_stuck"
        );
        if settled {
            let seconds: f64 = row.get("seconds");
            samples.push((Duration::from_secs_f64(seconds.max(0.0)), state.clone()));
        }
        if state == "rejected" {
            let reason: String = row.get("reason");
            let kind = reason.split(':').next().unwrap_or_default().to_owned();
            *rejected.entry(kind).or_insert(0) += 1;
        }
        let key = if settled { state } else { "unsettled".into() };
        *by_state.entry(key).or_insert(0) += 1;
    }
    let missing = accepted as usize - rows.len().min(accepted as usize);
    if missing > 0 {
        *by_state.entry("not taken in".into()).or_insert(0) += missing;
    }
    Ok(Burst {
        orders,
        placed,
        shed,
        to_settle,
        to_notify,
        by_state,
        rejected,
        settle_latency: Figures::new("placed → settled", to_settle, samples),
        resident_mib,
        cpu,
        up: (up, port),
    })
}

/// One open-loop run: orders sent at a fixed rate whatever the answers, each followed by a read
/// of the order at the sequence its reply gave (`GET /orders/{id}?min_seq=`).
pub struct OpenLoop {
    pub offered_per_second: u32,
    /// The first run after `ordo up` started (every cache, pool and file cold), reported apart
    /// and left out of the targets and the plot.
    pub cold: bool,
    /// Command sent → the order readable in the view at that sequence.
    pub to_view: Figures,
    /// Command sent → its answer: the command path's share of `to_view`.
    pub placed: Figures,
}

/// Runs `rates` one after the other against one `ordo up`, each for `seconds`, after a first run
/// at the lowest rate right after start (the cold one), and returns the figures and the resident
/// memory of `ordo up` after each.
pub async fn open_loop(
    servers: &Servers,
    rates: &[u32],
    seconds: f64,
) -> anyhow::Result<Vec<(OpenLoop, Option<f64>)>> {
    let (up, port) = start_up(servers, "up-open-loop").await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let mut runs = Vec::new();
    let cold_first = rates.iter().min().map(|rate| (*rate, true));
    for (run, (rate, cold)) in cold_first
        .into_iter()
        .chain(rates.iter().map(|rate| (*rate, false)))
        .enumerate()
    {
        let count = (f64::from(rate) * seconds).round() as usize;
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            // Sent on schedule, not after the previous answer: a slow system gets more work.
            tokio::time::sleep_until((started + interval * i as u32).into()).await;
            let (client, http) = (servers.client.clone(), http.clone());
            // Ids of this run alone: a run that sent ids of an earlier one would find those
            // orders placed already, and measure only their replays.
            let body = order(&format!("open{run}r{rate}"), i);
            tasks.spawn(async move {
                let sent = Instant::now();
                let reply = client
                    .request(Endpoint::OrderPlace.subject(), body.to_string().into())
                    .await
                    .ok()
                    .and_then(|reply| {
                        serde_json::from_slice::<serde_json::Value>(&reply.payload).ok()
                    });
                let outcome = outcome_of(&reply);
                let placed = (sent.elapsed(), outcome.clone());
                if outcome != "ok" {
                    return ((sent.elapsed(), format!("place: {outcome}")), placed);
                }
                let reply = reply.expect("ok");
                let url = format!(
                    "http://127.0.0.1:{port}/orders/{}?min_seq={}",
                    reply["order_id"].as_str().unwrap_or_default(),
                    reply["seq"]
                );
                let outcome = match http.get(url).send().await {
                    Ok(response) if response.status().is_success() => "ok".to_owned(),
                    Ok(response) => format!("read: HTTP {}", response.status().as_u16()),
                    Err(_) => "read: no answer".to_owned(),
                };
                ((sent.elapsed(), outcome), placed)
            });
        }
        let (samples, placed): (Vec<_>, Vec<_>) = tasks.join_all().await.into_iter().unzip();
        let cold_label = if cold {
            " (first after start, cold)"
        } else {
            ""
        };
        let to_view = Figures::new(
            format!("open loop, {rate} orders/s{cold_label}"),
            started.elapsed(),
            samples,
        );
        let placed = Figures::new(
            format!("open loop, {rate} orders/s{cold_label}: placed (answer only)"),
            started.elapsed(),
            placed,
        );
        runs.push((
            OpenLoop {
                offered_per_second: rate,
                cold,
                to_view,
                placed,
            },
            up.resident_mib(),
        ));
        // Let the pipeline drain before the next rate.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(runs)
}

/// Waits until both views have applied their whole stream.
pub async fn views_caught_up(servers: &Servers) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(servers.client.clone());
    for (schema, stream) in [
        ("view_orders", ordo_eventstore::StreamId::Orders.name()),
        ("view_stock", ordo_eventstore::StreamId::Stock.name()),
    ] {
        let last = js
            .get_stream(stream)
            .await?
            .info()
            .await?
            .state
            .last_sequence;
        let pool = servers.database.pool().clone();
        wait_until(Duration::from_secs(300), "the views catching up", || {
            let pool = pool.clone();
            async move {
                ordo_projections::schema::checkpoint_of(&pool, schema, stream)
                    .await
                    .is_ok_and(|seq| seq >= last)
            }
        })
        .await?;
    }
    Ok(())
}

/// `GET /orders/{id}` of orders in the view, `concurrency` at a time.
pub async fn http_reads(
    port: u16,
    order_ids: &[String],
    reads: usize,
    concurrency: usize,
) -> Figures {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    let samples = futures::stream::iter(0..reads)
        .map(|i| {
            let url = format!(
                "http://127.0.0.1:{port}/orders/{}",
                order_ids[i % order_ids.len()]
            );
            let http = http.clone();
            async move { timed_get(&http, url).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    Figures::new(
        format!("GET /orders/{{id}}, {concurrency} in flight"),
        started.elapsed(),
        samples,
    )
}

/// A rebuild of the orders view (`ordo projections rebuild orders`) and its baseline: the same
/// rows written by batched `INSERT … SELECT FROM unnest … ON CONFLICT DO UPDATE` into a table
/// of the same shape.
pub struct Rebuild {
    pub events: u64,
    pub rows: u64,
    pub rebuild: Duration,
    pub raw_upsert: Duration,
}

/// `ordo projections rebuild orders` against the benchmark's servers, ready to run.
fn rebuild_orders(servers: &Servers) -> anyhow::Result<std::process::Command> {
    let mut command = std::process::Command::new(crate::system::ordo_binary()?);
    command
        .args(["projections", "rebuild", "orders"])
        .env("ORDO_NATS_URL", servers.nats.url())
        .env("ORDO_DATABASE_URL", servers.database.url())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    Ok(command)
}

/// `GET url`: how long it took, and `ok` or what came instead.
async fn timed_get(http: &reqwest::Client, url: String) -> (Duration, String) {
    let sent = Instant::now();
    let outcome = match http.get(url).send().await {
        Ok(response) if response.status().is_success() => "ok".to_owned(),
        Ok(response) => format!("HTTP {}", response.status().as_u16()),
        Err(_) => "no answer".to_owned(),
    };
    (sent.elapsed(), outcome)
}

pub async fn rebuild(servers: &Servers) -> anyhow::Result<Rebuild> {
    let pool = servers.database.pool();
    let js = async_nats::jetstream::new(servers.client.clone());
    let events = js
        .get_stream(ordo_eventstore::StreamId::Orders.name())
        .await?
        .info()
        .await?
        .state
        .messages;
    let started = Instant::now();
    let status = rebuild_orders(servers)?.status()?;
    anyhow::ensure!(
        status.success(),
        "ordo projections rebuild orders: {status}"
    );
    let rebuild = started.elapsed();
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM view_orders.orders) + (SELECT count(*) FROM view_orders.order_lines)",
    )
    .fetch_one(pool)
    .await?;

    sqlx::query("CREATE TABLE bench_orders (LIKE view_orders.orders INCLUDING ALL)")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE bench_order_lines (LIKE view_orders.order_lines INCLUDING ALL)")
        .execute(pool)
        .await?;
    // The rows as a client holds them; the timed part sends them in batches of 1,000.
    let orders: Vec<Value> = sqlx::query_scalar("SELECT to_jsonb(o) FROM view_orders.orders o")
        .fetch_all(pool)
        .await?;
    let lines: Vec<Value> = sqlx::query_scalar("SELECT to_jsonb(l) FROM view_orders.order_lines l")
        .fetch_all(pool)
        .await?;
    let started = Instant::now();
    for (orders, lines) in orders.chunks(1000).zip(lines.chunks(1000)) {
        sqlx::query(
            "INSERT INTO bench_orders SELECT * FROM jsonb_populate_recordset(NULL::bench_orders, $1)
             ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, version = excluded.version",
        )
        .bind(Value::Array(orders.to_vec()))
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO bench_order_lines
             SELECT * FROM jsonb_populate_recordset(NULL::bench_order_lines, $1)
             ON CONFLICT (order_id, line_no) DO UPDATE SET qty = excluded.qty",
        )
        .bind(Value::Array(lines.to_vec()))
        .execute(pool)
        .await?;
    }
    let raw_upsert = started.elapsed();
    Ok(Rebuild {
        events,
        rows: rows as u64,
        rebuild,
        raw_upsert,
    })
}

/// Reads of the orders view while orders are written at a fixed rate, without and then with a
/// rebuild of the view running (`ordo projections rebuild orders` beside `ordo up`).
pub struct ReadsDuringRebuild {
    pub write_rate: u32,
    /// Reads while only the writes run (the baseline), for as long as the rebuild took.
    pub quiet: Figures,
    /// Reads while the rebuild ran.
    pub rebuilding: Figures,
    pub rebuild: Duration,
}

/// `GET /orders/{id}` of `order_ids`, `concurrency` at a time, until `until` completes, while
/// orders are placed at `write_rate` per second.
async fn reads_while(
    servers: &Servers,
    port: u16,
    order_ids: &[String],
    concurrency: usize,
    write_rate: u32,
    run: &str,
    until: impl std::future::Future<Output = ()>,
) -> (Figures, Duration) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop, run) = (servers.client.clone(), stop.clone(), run.to_owned());
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / f64::from(write_rate));
            let started = Instant::now();
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep_until((started + interval * i as u32).into()).await;
                let client = client.clone();
                let body = order(&run, i);
                tokio::spawn(async move {
                    let _ = client
                        .request(Endpoint::OrderPlace.subject(), body.to_string().into())
                        .await;
                });
                i += 1;
            }
        })
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    let readers = futures::future::join_all((0..concurrency).map(|reader| {
        let (http, stop) = (http.clone(), stop.clone());
        async move {
            let mut samples = Vec::new();
            let mut i = reader;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!(
                    "http://127.0.0.1:{port}/orders/{}",
                    order_ids[i % order_ids.len()]
                );
                i += concurrency;
                samples.push(timed_get(&http, url).await);
            }
            samples
        }
    }));
    let stopper = async {
        until.await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (samples, ()) = tokio::join!(readers, stopper);
    let took = started.elapsed();
    let _ = writer.await;
    let name =
        format!("GET /orders/{{id}}, {concurrency} in flight, {write_rate} orders/s written");
    (
        Figures::new(name, took, samples.into_iter().flatten().collect()),
        took,
    )
}

pub async fn reads_during_rebuild(
    servers: &Servers,
    port: u16,
    order_ids: &[String],
    concurrency: usize,
    write_rate: u32,
) -> anyhow::Result<ReadsDuringRebuild> {
    let mut rebuild = rebuild_orders(servers)?.spawn()?;
    let finished = async move {
        loop {
            if let Ok(Some(status)) = rebuild.try_wait() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let status = std::sync::Mutex::new(None);
    let (mut rebuilding, took) = reads_while(
        servers,
        port,
        order_ids,
        concurrency,
        write_rate,
        "rebuilding",
        async {
            *status.lock().expect("not poisoned") = Some(finished.await);
        },
    )
    .await;
    let status = status.lock().expect("not poisoned").take();
    anyhow::ensure!(
        status.is_some_and(|status| status.success()),
        "ordo projections rebuild orders beside ordo up: {status:?}"
    );
    rebuilding.scenario = format!("{} — during the rebuild", rebuilding.scenario);
    let (mut quiet, _) = reads_while(
        servers,
        port,
        order_ids,
        concurrency,
        write_rate,
        "quiet",
        tokio::time::sleep(took),
    )
    .await;
    quiet.scenario = format!("{} — no rebuild (baseline)", quiet.scenario);
    Ok(ReadsDuringRebuild {
        write_rate,
        quiet,
        rebuilding,
        rebuild: took,
    })
}
