//! Command throughput and latency. Starts its own nats-server (file storage, temporary store),
//! applies the streams, runs command service instances in this process and drives them with plain
//! NATS requests, as clients would. Prints the figures and writes `bench/reports/commands.md`.
//!
//! `cargo run --release -p ordo-bench -- --commands 5000 --concurrency 64`

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use futures::{StreamExt, stream};
use ordo_commands::{CommandHandler, CommandService, outcomes::OUTCOMES_STREAM};
use ordo_eventstore::{EventStore, StreamDefinition, streams::apply_all};
use ordo_testkit::NatsServer;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Commands per scenario.
    #[arg(long, default_value_t = 5000)]
    commands: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Command service instances (each with its own connection and cache).
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Where the report goes.
    #[arg(long, default_value = "bench/reports/commands.md")]
    report: std::path::PathBuf,
}

struct Figures {
    scenario: &'static str,
    commands: usize,
    outcomes: std::collections::BTreeMap<String, usize>,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn percentile(&self, p: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[index]
    }

    fn row(&self) -> String {
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
        format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} |",
            self.scenario,
            self.commands,
            self.commands as f64 / self.elapsed.as_secs_f64(),
            ms(self.percentile(0.50)),
            ms(self.percentile(0.99)),
            ms(*self.latencies.last().unwrap()),
            self.outcomes
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

async fn drive(
    client: &async_nats::Client,
    scenario: &'static str,
    concurrency: usize,
    requests: Vec<(&'static str, Value)>,
) -> Figures {
    let commands = requests.len();
    let started = Instant::now();
    let results: Vec<(Duration, String)> = stream::iter(requests)
        .map(|(subject, body)| async move {
            let sent = Instant::now();
            let reply = client
                .request(subject, serde_json::to_vec(&body).unwrap().into())
                .await;
            let code = match reply {
                Ok(reply) => {
                    let reply: Value =
                        serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
                    if reply["ok"] == true {
                        "ok".to_owned()
                    } else {
                        reply["error"]["code"].as_str().unwrap_or("?").to_owned()
                    }
                }
                Err(err) => format!("no reply ({err})"),
            };
            (sent.elapsed(), code)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = results.iter().map(|(latency, _)| *latency).collect();
    latencies.sort();
    let mut outcomes = std::collections::BTreeMap::new();
    for (_, code) in results {
        *outcomes.entry(code).or_insert(0) += 1;
    }
    Figures {
        scenario,
        commands,
        outcomes,
        elapsed,
        latencies,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = NatsServer::start();
    let client = server.client().await;
    NatsServer::wait_for_jetstream(&client).await;
    apply_all(
        &async_nats::jetstream::new(client.clone()),
        &StreamDefinition::built_in(),
    )
    .await?;
    for _ in 0..args.instances {
        let connection = server.client().await;
        let store = EventStore::open(
            connection.clone(),
            &["ORDO_ORDERS", "ORDO_STOCK", OUTCOMES_STREAM],
        )
        .await?;
        let service = CommandService::start(
            connection,
            Arc::new(CommandHandler::new(store)),
            Default::default(),
        )
        .await?;
        tokio::spawn(service.run(std::future::pending()));
    }
    let n = args.commands;

    let receives = (0..n)
        .map(|i| {
            (
                "ordo.cmd.stock.receive",
                json!({"sku": format!("S{}", i % 1000), "qty": 1_000_000}),
            )
        })
        .collect();
    let receive = drive(&client, "receive, 1000 SKUs", args.concurrency, receives).await;

    let places = (0..n)
        .map(|i| {
            let line = json!({"sku": format!("S{}", i % 1000), "qty": 1, "unit_price_cents": 100});
            (
                "ordo.cmd.order.place",
                json!({"customer_id": format!("c{}", i % 100), "lines": [line]}),
            )
        })
        .collect();
    let place = drive(&client, "place, new orders", args.concurrency, places).await;

    let hot_units = n / 2;
    let receive_hot = (
        "ordo.cmd.stock.receive",
        json!({"sku": "HOT", "qty": hot_units}),
    );
    drive(&client, "setup", 1, vec![receive_hot]).await;
    let reserves = (0..n)
        .map(|i| {
            (
                "ordo.cmd.stock.reserve",
                json!({"sku": "HOT", "order_id": format!("h{i}"), "qty": 1}),
            )
        })
        .collect();
    let hot = drive(&client, "reserve, one hot SKU", args.concurrency, reserves).await;

    let version =
        std::process::Command::new(ordo_testkit::find_nats_server().map_err(anyhow::Error::msg)?)
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut report = format!(
        "# Command throughput and latency\n\n\
         {} · {cores} cores · {version} (file storage, one node, fsync by the OS) · \
         {} command service instances in the benchmark's process · {} requests in flight\n\n\
         Each command is one NATS request: outcome record + conditional append to JetStream.\n\
         The benchmark, nats-server and the service share the same cores.\n\n\
         | scenario | commands | commands/s | p50 ms | p99 ms | max ms | outcomes |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        args.instances,
        args.concurrency,
    );
    for figures in [&receive, &place, &hot] {
        report.push_str(&figures.row());
        report.push('\n');
    }
    report.push_str(&format!(
        "\nThe hot SKU has {hot_units} units for {n} reserves: exactly {hot_units} must be `ok`.\n\
         Reproduce: `cargo run --release -p ordo-bench -- --commands {n} --concurrency {} --instances {}`\n",
        args.concurrency, args.instances
    ));
    print!("{report}");
    std::fs::write(&args.report, &report)
        .with_context(|| format!("writing {}", args.report.display()))?;
    eprintln!("report written to {}", args.report.display());
    Ok(())
}
