//! ordo's load report: every scenario against servers of the benchmark's own, with its
//! baseline measured in the same run, written to `bench/reports/`.
//!
//! `scripts/bench` builds and runs it; `scripts/bench --smoke` checks in seconds that every
//! scenario runs (its figures mean nothing).

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;

mod commands;
mod measure;
mod pipeline;
mod report;
mod system;

use measure::ms;
use report::{FIGURES_HEADER, figures_row, ratio};

#[derive(Parser)]
#[command(about = "ordo's load report: throughput and latency of every scenario, with baselines")]
struct Args {
    /// Requests per rung of the place-order ladder, and reserves of the hot SKU.
    #[arg(long, default_value_t = 20_000)]
    commands: usize,
    /// Clients (requests in flight) of each rung of the place-order ladder.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
    ladder: Vec<usize>,
    /// Command service instances (`ordo run commands` processes).
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Orders of the end-to-end burst through `ordo up`.
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    /// Requests in flight of the burst and the hot SKU.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Offered loads of the open-loop runs, orders per second.
    #[arg(long, value_delimiter = ',', default_value = "250,1000,2000")]
    rates: Vec<u32>,
    /// Seconds each open-loop rate runs.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The groups of scenarios to run: `commands` (ladder, hot SKU), `pipeline` (burst, reads,
    /// rebuild), `open-loop`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "commands,pipeline,open-loop"
    )]
    only: Vec<String>,
    /// Tiny sizes: checks that every scenario runs; the figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Where the report goes (`latest.md`, `latency.svg`).
    #[arg(long, default_value = "bench/reports")]
    report_dir: PathBuf,
}

impl Args {
    fn smoke(mut self) -> Self {
        if self.smoke {
            self.commands = 200;
            self.ladder = vec![4, 16];
            self.burst = 200;
            self.concurrency = 8;
            self.rates = vec![20, 50];
            self.seconds = 1.0;
        }
        self
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse().smoke();
    let mut md = String::new();
    writeln!(md, "# ordo load report\n\n{}\n", machine())?;
    writeln!(
        md,
        "Everything runs on this one machine: the load generator, nats-server (file storage, one \
         node), PostgreSQL and ordo share its cores. Each baseline is measured in the same run, \
         on the same servers. Produced by `scripts/bench{}`.\n",
        if args.smoke { " --smoke" } else { "" }
    )?;

    let runs = |group: &str| args.only.iter().any(|only| only == group);
    if runs("commands") {
        eprintln!("command path: ladder, hot SKU");
        let servers = system::Servers::start().await?;
        let _services = commands::start_command_services(&servers, args.instances).await?;
        let ladder = commands::ladder(&servers, &args.ladder, args.commands).await?;
        let (hot, units) = commands::hot_sku(&servers, args.commands, args.concurrency).await?;
        let hot_raw =
            commands::raw_publish(&servers.client, args.commands, 64, args.concurrency).await?;
        writeln!(
            md,
            "## Command path\n\n{} `ordo run commands` processes. Each place-order is one NATS \
             request; the baseline is a raw JetStream publish with ack of the same size, with as \
             many in flight.\n",
            args.instances
        )?;
        md += FIGURES_HEADER;
        for rung in &ladder {
            md += &figures_row(&rung.raw);
            md += &figures_row(&rung.place);
        }
        md += &figures_row(&hot_raw);
        md += &figures_row(&hot);
        md += "\n| figure | ordo | baseline | ratio |\n| --- | --- | --- | --- |\n";
        for rung in &ladder {
            writeln!(
                md,
                "| place-order/s, {} clients | {:.0} | {:.0} | {} |",
                rung.clients,
                rung.place.per_second(),
                rung.raw.per_second(),
                ratio(rung.place.per_second(), rung.raw.per_second())
            )?;
        }
        writeln!(
            md,
            "| reserves/s, one hot SKU | {:.0} | {:.0} | {} |",
            hot.per_second(),
            hot_raw.per_second(),
            ratio(hot.per_second(), hot_raw.per_second())
        )?;
        let reserved = hot.outcomes.get("ok").copied().unwrap_or(0);
        writeln!(
            md,
            "\nThe hot SKU held {units} units for {} reserves: {reserved} were ok ({}).\n",
            args.commands,
            if reserved == units {
                "exactly the stock"
            } else {
                "NOT the stock"
            }
        )?;
    }

    if runs("pipeline") {
        eprintln!("whole pipeline: burst through ordo up, reads, rebuild");
        let servers = system::Servers::start().await?;
        let burst = pipeline::burst(
            &servers,
            args.burst,
            args.concurrency,
            Duration::from_secs(300),
        )
        .await?;
        writeln!(
            md,
            "## Whole pipeline: a burst of {} orders through `ordo up`\n\n\
             {} clients place one-line orders (50 SKUs with ample stock, payments approved, 5 ms \
             each), retrying a shed request after its `retry_after_ms`; the saga reserves, \
             authorises and confirms each.\n",
            burst.orders, args.concurrency
        )?;
        md += FIGURES_HEADER;
        md += &figures_row(&burst.placed);
        md += &figures_row(&burst.settle_latency);
        writeln!(
            md,
            "\n| figure | value |\n| --- | --- |\n\
             | first place → last saga settled | {:.1} s |\n\
             | confirmed per second over that time | {:.0} |\n\
             | sagas by state | {:?} |\n\
             | rejected by reason | {:?} |\n\
             | place requests shed (`unavailable`, sent again) | {} |\n\
             | `ordo up` resident memory after | {:.0} MiB |\n",
            burst.to_settle.as_secs_f64(),
            burst.confirmed_per_second(),
            burst.by_state,
            burst.rejected,
            burst.shed,
            burst.resident_mib.unwrap_or(0.0)
        )?;
        let order_ids: Vec<String> = (0..burst.orders.min(1000))
            .map(|i| format!("burst-{i}"))
            .collect();
        pipeline::views_caught_up(&servers).await?;
        let reads =
            pipeline::http_reads(burst.up.1, &order_ids, args.commands, args.concurrency).await;
        drop(burst);
        writeln!(
            md,
            "## HTTP reads\n\nOrders of the burst, read by id through the API of `ordo up`.\n"
        )?;
        md += FIGURES_HEADER;
        md += &figures_row(&reads);
        let rebuild = pipeline::rebuild(&servers).await?;
        writeln!(
            md,
            "\n## Rebuild of the orders view\n\n`ordo projections rebuild orders` after the burst \
             (with `ordo up` stopped), against its baseline: the same rows (orders and lines) \
             written by batched upserts of 1,000 rows into tables of the same shape.\n\n\
             | figure | value |\n| --- | --- |\n\
             | events replayed | {} |\n| view rows | {} |\n\
             | rebuild | {:.2} s ({:.0} events/s) |\n| raw batched upsert of the rows | {:.2} s |\n\
             | rebuild speed against the baseline | {} |\n",
            rebuild.events,
            rebuild.rows,
            rebuild.rebuild.as_secs_f64(),
            rebuild.events as f64 / rebuild.rebuild.as_secs_f64(),
            rebuild.raw_upsert.as_secs_f64(),
            ratio(
                rebuild.raw_upsert.as_secs_f64(),
                rebuild.rebuild.as_secs_f64()
            ),
        )?;
    }

    if runs("open-loop") {
        eprintln!("open loop: command → view latency at fixed rates");
        let servers = system::Servers::start().await?;
        let runs = pipeline::open_loop(&servers, &args.rates, args.seconds).await?;
        writeln!(
            md,
            "## Command → visible in the view, open loop\n\nOrders sent at a fixed rate for {} s \
             each, whatever the answers, through `ordo up`; each placed order is then read with \
             `GET /orders/{{id}}?min_seq=<its seq>` (which waits up to 5 s for the view). Latency \
             is from sending the command to the read's answer.\n",
            args.seconds
        )?;
        md += FIGURES_HEADER;
        for (run, _) in &runs {
            md += &figures_row(&run.to_view);
        }
        md += "\n| offered orders/s | p99 ms | `ordo up` resident memory after |\n| --- | --- | --- |\n";
        for (run, rss) in &runs {
            writeln!(
                md,
                "| {} | {} | {:.0} MiB |",
                run.offered_per_second,
                ms(run.to_view.percentile(0.99)),
                rss.unwrap_or(0.0)
            )?;
        }
        let points: Vec<(f64, &measure::Figures)> = runs
            .iter()
            .map(|(run, _)| (f64::from(run.offered_per_second), &run.to_view))
            .collect();
        std::fs::create_dir_all(&args.report_dir)?;
        std::fs::write(
            args.report_dir.join("latency.svg"),
            report::latency_plot(&points),
        )?;
        md += "\n![latency against offered load](latency.svg)\n";
    }

    print!("{md}");
    std::fs::create_dir_all(&args.report_dir)?;
    let path = args.report_dir.join("latest.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// The date, cores, memory and server versions the figures come from.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kib: f64 = info
                .lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.0} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    let version = |binary: PathBuf| {
        std::process::Command::new(binary)
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let nats = ordo_testkit::find_nats_server()
        .map(&version)
        .unwrap_or_default();
    let postgres = ordo_testkit::find_postgres_bin()
        .map(|bin| version(bin.join("postgres")))
        .unwrap_or_default();
    format!(
        "{} · {cores} cores · {memory} · {nats} · {postgres}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}
