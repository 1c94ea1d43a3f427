//! The command path alone: `ordo run commands` instances against the benchmark's nats-server,
//! driven with plain NATS requests, next to raw JetStream publishes of the same size and
//! concurrency (the baseline).

use ordo_contract::Endpoint;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::{StreamExt, stream as futures_stream};
use serde_json::{Value, json};

use crate::{
    measure::{Figures, closed_loop, reply_outcome},
    system::{CpuMeter, Ordo, Servers, free_port, wait_until},
};

/// Starts `instances` command services and waits until they answer.
pub async fn start_command_services(
    servers: &Servers,
    instances: usize,
) -> anyhow::Result<Vec<Ordo>> {
    let services = (0..instances)
        .map(|i| servers.spawn(&format!("commands-{i}"), &["run", "commands"], &[]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    servers
        .received("WARMUP", 1, "the command services answering")
        .await?;
    partitions_shared(servers, instances).await?;
    Ok(services)
}

/// Waits until `instances` command services are live and every partition is held by the one
/// that rendezvous hashing deals it to: until then a partition may be moving, and a command wait
/// for its next owner. (Not "each holds some": with 4 instances and 16 partitions, about one
/// dealing in 25 gives an instance none.)
pub async fn partitions_shared(servers: &Servers, instances: usize) -> anyhow::Result<()> {
    let js = jetstream::new(servers.client.clone());
    let config = ordo_eventstore::OwnershipConfig::new(
        ordo_commands::service::PARTITION_GROUP,
        ordo_commands::service::DEFAULT_PARTITIONS,
    );
    wait_until(Duration::from_secs(60), "the partitions shared", || async {
        ordo_eventstore::ownership::status(&js, &config)
            .await
            .is_ok_and(|status| {
                let live: Vec<String> = status
                    .members
                    .iter()
                    .filter(|m| m.alive)
                    .map(|m| m.instance.clone())
                    .collect();
                live.len() == instances
                    && status.partitions.iter().all(|p| {
                        p.held
                            && p.owner.as_deref()
                                == Some(ordo_eventstore::ownership::rendezvous(p.partition, &live))
                    })
            })
    })
    .await
}

/// The size of a place-order request body, to publish raw messages of the same size.
pub fn place_body(i: usize) -> Value {
    let line = json!({"sku": format!("S{}", i % 1000), "qty": 1, "unit_price_cents": 100});
    json!({"customer_id": format!("c{}", i % 1000), "lines": [line]})
}

/// Raw JetStream publishes with acks: `count` messages of `size` bytes, `concurrency` in flight,
/// to a stream of their own with the same storage as ordo's.
pub async fn raw_publish(
    client: &async_nats::Client,
    count: usize,
    size: usize,
    concurrency: usize,
) -> anyhow::Result<Figures> {
    let js = jetstream::new(client.clone());
    let name = format!("BENCH_RAW_{concurrency}");
    let _ = js.delete_stream(&name).await;
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("bench.raw.{concurrency}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let samples = futures_stream::iter(0..count)
        .map(|i| {
            let (js, payload) = (js.clone(), payload.clone());
            let subject = format!("bench.raw.{concurrency}.{}", i % 1000);
            async move {
                let sent = Instant::now();
                let outcome = match js.publish(subject, payload).await {
                    Ok(ack) => match ack.await {
                        Ok(_) => "ok".to_owned(),
                        Err(_) => "no ack".to_owned(),
                    },
                    Err(_) => "not sent".to_owned(),
                };
                (sent.elapsed(), outcome)
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    js.delete_stream(&name).await?;
    Ok(Figures::new(
        format!("raw JetStream publish + ack, {concurrency} in flight"),
        started.elapsed(),
        samples,
    ))
}

/// One rung of the concurrency ladder: place-order and its baseline.
pub struct Rung {
    pub clients: usize,
    pub place: Figures,
    pub raw: Figures,
}

pub async fn ladder(
    servers: &Servers,
    rungs: &[usize],
    commands: usize,
) -> anyhow::Result<Vec<Rung>> {
    let size = serde_json::to_vec(&place_body(0))?.len();
    let mut ladder = Vec::new();
    for &clients in rungs {
        let raw = raw_publish(&servers.client, commands, size, clients).await?;
        let places = (0..commands)
            .map(|i| (Endpoint::OrderPlace, place_body(i)))
            .collect();
        let place = closed_loop(
            &servers.client,
            format!("place-order, {clients} clients"),
            clients,
            places,
        )
        .await;
        ladder.push(Rung {
            clients,
            place,
            raw,
        });
    }
    Ok(ladder)
}

/// Reserves of one unit each on one SKU holding half as many units: exactly half must be ok.
pub async fn hot_sku(
    servers: &Servers,
    reserves: usize,
    concurrency: usize,
) -> anyhow::Result<(Figures, usize)> {
    let units = reserves / 2;
    let receive = json!({"sku": "HOT", "qty": units});
    receive_all(servers, vec![receive], 1).await?;
    let requests = (0..reserves)
        .map(|i| {
            let body = json!({"sku": "HOT", "order_id": format!("h{i}"), "qty": 1});
            (Endpoint::StockReserve, body)
        })
        .collect();
    let figures = closed_loop(
        &servers.client,
        format!("reserve, one hot SKU, {concurrency} in flight"),
        concurrency,
        requests,
    )
    .await;
    Ok((figures, units))
}

/// A SKU with a long history and no snapshot: its first command (which replays it all and
/// leaves a snapshot), the first command after the command services restart (snapshot and the
/// events after it), and one more (cached).
pub struct LongHistory {
    pub events: usize,
    pub written: Duration,
    pub full_replay: Duration,
    pub after_restart: Duration,
    pub cached: Duration,
}

/// Writes `events` StockReceived events of one SKU straight into `ORDO_STOCK` (as years of
/// receipts would have), then sends it a command.
pub async fn long_history(
    servers: &Servers,
    events: usize,
    services: &mut Vec<Ordo>,
) -> anyhow::Result<LongHistory> {
    let started = Instant::now();
    let receipts = (0..events).map(|_| ordo_domain::stock::StockEvent::StockReceived { qty: 1 });
    write_history(servers, "LONG", receipts).await?;
    let written = started.elapsed();
    let full_replay = receive(servers, "LONG", "long-command-0").await?;
    let instances = services.len();
    services.clear();
    *services = start_command_services(servers, instances).await?;
    let after_restart = receive(servers, "LONG", "long-command-1").await?;
    let cached = receive(servers, "LONG", "long-command-2").await?;
    Ok(LongHistory {
        events,
        written,
        full_replay,
        after_restart,
        cached,
    })
}

/// Writes `events` as the whole history of `sku`, straight into `ORDO_STOCK`: sent one after the
/// other (a subject's versions must follow each other in the stream), acknowledged up to 1,000
/// at a time.
async fn write_history(
    servers: &Servers,
    sku: &str,
    events: impl Iterator<Item = ordo_domain::stock::StockEvent>,
) -> anyhow::Result<()> {
    let js = jetstream::new(servers.client.clone());
    let subject = format!("ordo.stock.events.{sku}");
    let mut acks = Vec::with_capacity(1000);
    for (i, event) in events.enumerate() {
        let version = i as u64 + 1;
        let metadata = ordo_eventstore::EventMetadata {
            command_id: format!("{sku}-{version}"),
            correlation_id: format!("{sku}-{version}"),
            causation_id: None,
            traceparent: None,
        };
        let envelope = ordo_eventstore::EventEnvelope::new(
            sku,
            version,
            &event,
            &metadata,
            chrono::Utc::now(),
        );
        acks.push(
            js.publish(subject.clone(), envelope.to_bytes().into())
                .await?,
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// A SKU that served many orders, each reserved and then released or shipped, against a SKU
/// with one event (the baseline, measured after the same restart).
pub struct SettledHistory {
    pub orders: usize,
    pub written: Duration,
    /// The SKU's snapshot as stored, in bytes (`None`: none was written).
    pub snapshot_bytes: Option<usize>,
    /// The first command on it after the command services restart.
    pub after_restart: Duration,
    /// The first command on a SKU with one event after the same restart.
    pub baseline_after_restart: Duration,
    /// Resident memory of the command services (summed) right after the restart, and after the
    /// command on the settled SKU.
    pub resident_before_mib: f64,
    pub resident_after_mib: f64,
}

/// Writes one SKU's history of `orders` orders (UUID ids), each reserved then released or
/// deducted, straight into `ORDO_STOCK`; one command on it leaves a snapshot; then the command
/// services restart and the first command on it is timed against one on a fresh SKU.
pub async fn settled_history(
    servers: &Servers,
    orders: usize,
    services: &mut Vec<Ordo>,
) -> anyhow::Result<SettledHistory> {
    use ordo_domain::{OrderId, stock::StockEvent};
    let started = Instant::now();
    let mut events = vec![StockEvent::StockReceived {
        qty: 2 * orders as u64,
    }];
    for i in 0..orders {
        let order_id = OrderId::parse(uuid::Uuid::new_v4().to_string())?;
        events.push(StockEvent::StockReserved {
            order_id: order_id.clone(),
            qty: 1,
        });
        events.push(if i % 2 == 0 {
            StockEvent::StockReleased { order_id, qty: 1 }
        } else {
            StockEvent::StockDeducted { order_id, qty: 1 }
        });
    }
    write_history(servers, "SETTLED", events.into_iter()).await?;
    let written = started.elapsed();
    receive(servers, "FRESH", "settled-fresh-0").await?;
    // The first command replays the whole history and leaves a snapshot behind.
    receive(servers, "SETTLED", "settled-command-0").await?;
    let snapshot_bytes = jetstream::new(servers.client.clone())
        .get_stream(ordo_eventstore::StreamId::Snapshots.name())
        .await?
        .direct_get_last_for_subject("ordo.snapshots.stock.SETTLED")
        .await
        .ok()
        .map(|message| message.payload.len());
    let instances = services.len();
    services.clear();
    *services = start_command_services(servers, instances).await?;
    let resident =
        |services: &Vec<Ordo>| services.iter().filter_map(Ordo::resident_mib).sum::<f64>();
    let resident_before_mib = resident(services);
    let baseline_after_restart = receive(servers, "FRESH", "settled-fresh-1").await?;
    let after_restart = receive(servers, "SETTLED", "settled-command-1").await?;
    let resident_after_mib = resident(services);
    Ok(SettledHistory {
        orders,
        written,
        snapshot_bytes,
        after_restart,
        baseline_after_restart,
        resident_before_mib,
        resident_after_mib,
    })
}

/// Receives one unit of `sku` under `command_id`; returns how long the command took.
async fn receive(servers: &Servers, sku: &str, command_id: &str) -> anyhow::Result<Duration> {
    let body = json!({"sku": sku, "qty": 1}).to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ordo_contract::headers::MSG_ID, command_id);
    let request = async_nats::Request::new()
        .payload(body.into())
        .headers(headers)
        .timeout(Some(Duration::from_secs(300)));
    let sent = Instant::now();
    let reply = servers
        .client
        .send_request(Endpoint::StockReceive.subject(), request)
        .await?;
    anyhow::ensure!(
        reply_outcome(&reply.payload) == "ok",
        "receiving {sku}: {}",
        String::from_utf8_lossy(&reply.payload)
    );
    Ok(sent.elapsed())
}

/// Sends every stock receive in `receives`, `concurrency` at a time; all must be accepted.
async fn receive_all(
    servers: &Servers,
    receives: Vec<Value>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let requests = receives
        .into_iter()
        .map(|body| (Endpoint::StockReceive, body))
        .collect();
    let received = closed_loop(&servers.client, "receive", concurrency, requests).await;
    anyhow::ensure!(
        received.errors() == 0,
        "receive: {}",
        received.outcomes_text()
    );
    Ok(())
}

/// One step of the scale scenario: `instances` command services on a contended workload.
pub struct ScaleStep {
    pub instances: usize,
    pub figures: Figures,
    /// Appends refused or unanswered, summed over the instances (`ordo_appends_total` with
    /// outcome `conflict` or `failed`): with one writer per partition, none is expected.
    pub conflicts: f64,
    /// Commands an instance took from the queue group and passed to the partition's owner.
    pub forwarded: f64,
    /// Milliseconds of CPU of the whole machine per command.
    pub cpu_per_command_ms: f64,
}

/// `instances` fresh command services sharing the partitions, then `reserves` reserves spread
/// over `skus` SKUs with `concurrency` in flight: every SKU is contended, and every instance
/// takes requests from the queue group whatever partition they belong to.
pub async fn scale(
    servers: &Servers,
    instances: usize,
    reserves: usize,
    skus: usize,
    concurrency: usize,
) -> anyhow::Result<ScaleStep> {
    let ports: Vec<u16> = (0..instances).map(|_| free_port()).collect();
    let _services = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            servers.spawn(
                &format!("scale-{instances}-{i}"),
                &["run", "commands"],
                &[("ORDO_METRICS_ADDR", format!("127.0.0.1:{port}"))],
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let http = reqwest::Client::new();
    let metric = |name: &'static str, label: &'static str| {
        let (http, ports) = (http.clone(), ports.clone());
        async move {
            let mut sums = Vec::new();
            for port in ports {
                let text = match http
                    .get(format!("http://127.0.0.1:{port}/metrics"))
                    .send()
                    .await
                {
                    Ok(response) => response.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                sums.push(metric_sum(&text, name, label));
            }
            sums
        }
    };
    partitions_shared(servers, instances).await?;
    let sku = |s: usize| format!("K{instances}-{s}");
    let receives = (0..skus)
        .map(|s| json!({"sku": sku(s), "qty": reserves}))
        .collect();
    receive_all(servers, receives, 4).await?;
    let requests = (0..reserves)
        .map(|i| {
            let body =
                json!({"sku": sku(i % skus), "order_id": format!("k{instances}-{i}"), "qty": 1});
            (Endpoint::StockReserve, body)
        })
        .collect();
    let cpu = CpuMeter::start(&[]);
    let figures = closed_loop(
        &servers.client,
        format!(
            "reserve, {skus} SKUs, {instances} instance{}",
            if instances == 1 { "" } else { "s" }
        ),
        concurrency,
        requests,
    )
    .await;
    let (machine, _) = cpu.read();
    let total = |sums: Vec<f64>| sums.into_iter().fold(0.0, |sum, value| sum + value);
    let conflicts = total(metric("ordo_appends_total", "outcome=\"conflict\"").await)
        + total(metric("ordo_appends_total", "outcome=\"failed\"").await);
    let forwarded = total(metric("ordo_commands_forwarded_total", "").await);
    Ok(ScaleStep {
        instances,
        cpu_per_command_ms: machine * 1000.0 / reserves.max(1) as f64,
        figures,
        conflicts,
        forwarded,
    })
}

/// The sum of the samples of metric `name` (with `label` among its labels, when not empty) in
/// a Prometheus text exposition.
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name && series.contains(label)).then(|| value.parse::<f64>().ok())?
        })
        .fold(0.0, |sum, value| sum + value)
}
