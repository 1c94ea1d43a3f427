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
    /// Events of the SKU with a long history.
    #[arg(long, default_value_t = 1_000_000)]
    long_history: usize,
    /// Orders the SKU with settled orders served (each reserved, then released or shipped).
    #[arg(long, default_value_t = 100_000)]
    settled_orders: usize,
    /// Offered loads of the open-loop runs, orders per second.
    #[arg(long, value_delimiter = ',', default_value = "250,1000,2000")]
    rates: Vec<u32>,
    /// Seconds each open-loop rate runs.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Command-service instances of each step of the scale scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    scale: Vec<usize>,
    /// The groups of scenarios to run: `commands` (ladder, hot SKU), `scale` (1, 2, 4 command
    /// services on a contended workload), `pipeline` (burst, reads, rebuild), `open-loop`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "commands,scale,pipeline,open-loop"
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
            self.long_history = 1_000;
            self.settled_orders = 500;
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
    let mut targets = Targets::default();
    if runs("commands") {
        eprintln!("command path: ladder, hot SKU");
        let servers = system::Servers::start().await?;
        let mut services = commands::start_command_services(&servers, args.instances).await?;
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
        targets.place_ratio = ladder
            .iter()
            .map(|rung| rung.place.per_second() / rung.raw.per_second())
            .reduce(f64::min);
        targets.hot = Some((hot.per_second(), reserved == units));

        let long = commands::long_history(&servers, args.long_history, &mut services).await?;
        writeln!(
            md,
            "### A SKU with a long history\n\n{} events of one SKU, written straight into \
             `ORDO_STOCK` ({:.1} s) with no snapshot, then commands on it.\n\n\
             | command | ms |\n| --- | --- |\n\
             | first: replays the whole history, leaves a snapshot | {} |\n\
             | first after the command services restart: the snapshot and the events after it | {} |\n\
             | next: cached | {} |\n",
            long.events,
            long.written.as_secs_f64(),
            ms(long.full_replay),
            ms(long.after_restart),
            ms(long.cached),
        )?;
        targets.long_history = Some((long.events, long.after_restart));

        let settled =
            commands::settled_history(&servers, args.settled_orders, &mut services).await?;
        writeln!(
            md,
            "### A SKU that served many orders\n\n{} orders (UUID ids), each reserved and then \
             released or shipped: {} events of one SKU, written straight into `ORDO_STOCK` \
             ({:.1} s). One command on it leaves a snapshot; then the command services restart. \
             The baseline is the first command on a SKU with one event after the same restart.\n\n\
             | figure | value |\n| --- | --- |\n\
             | snapshot of the SKU | {} |\n\
             | first command on it after the restart | {} ms |\n\
             | first command on a SKU with one event after the restart (baseline) | {} ms |\n\
             | against the baseline | {} |\n\
             | command services' resident memory before → after that command | {:.0} → {:.0} MiB |\n",
            settled.orders,
            2 * settled.orders + 1,
            settled.written.as_secs_f64(),
            settled
                .snapshot_bytes
                .map_or("none written".to_owned(), |bytes| format!("{bytes} bytes")),
            ms(settled.after_restart),
            ms(settled.baseline_after_restart),
            ratio(
                settled.after_restart.as_secs_f64(),
                settled.baseline_after_restart.as_secs_f64()
            ),
            settled.resident_before_mib,
            settled.resident_after_mib,
        )?;
        targets.settled = Some((
            settled.orders,
            settled.snapshot_bytes.is_some(),
            settled.after_restart,
        ));
    }

    if runs("scale") {
        eprintln!("scale: command services on a contended workload");
        let skus = 8;
        let mut steps = Vec::new();
        for &instances in &args.scale {
            let servers = system::Servers::start().await?;
            steps.push(
                commands::scale(&servers, instances, args.commands, skus, args.concurrency).await?,
            );
        }
        writeln!(
            md,
            "## Scale: command services on a contended workload\n\n\
             {} reserves spread over {skus} SKUs, {} in flight, against 1, 2 and 4 `ordo run \
             commands` processes on fresh servers, once every instance holds its share of the 16 \
             partitions. Every instance takes requests from the queue group and passes those of \
             partitions it does not own to their owner. On this 2-core machine more instances \
             cannot add cores: what the scenario shows is that they add no conflicts and what \
             the forwarding costs.\n",
            args.commands, args.concurrency
        )?;
        md += FIGURES_HEADER;
        for step in &steps {
            md += &figures_row(&step.figures);
        }
        md += "\n| instances | reserves/s | against 1 instance | append conflicts | forwarded | CPU per command |\n| --- | --- | --- | --- | --- | --- |\n";
        let one = steps.first().map(|step| step.figures.per_second());
        for step in &steps {
            writeln!(
                md,
                "| {} | {:.0} | {} | {:.0} | {:.0} | {:.3} ms |",
                step.instances,
                step.figures.per_second(),
                one.map_or("-".to_owned(), |one| ratio(step.figures.per_second(), one)),
                step.conflicts,
                step.forwarded,
                step.cpu_per_command_ms,
            )?;
        }
        md += "\n";
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
        let cpu_per_order = burst.cpu_per_confirmed_ms();
        writeln!(
            md,
            "\n| figure | value |\n| --- | --- |\n\
             | first place → last saga settled | {:.1} s |\n\
             | confirmed per second over that time | {:.0} |\n\
             | first place → last customer notified | {:.1} s |\n\
             | sagas by state | {:?} |\n\
             | rejected by reason | {:?} |\n\
             | place requests shed (`unavailable`, sent again) | {} |\n\
             | `ordo up` resident memory after | {:.0} MiB |\n\
             | CPU per confirmed order, whole machine (from /proc/stat) | {:.2} ms |",
            burst.to_settle.as_secs_f64(),
            burst.confirmed_per_second(),
            burst.to_notify.as_secs_f64(),
            burst.by_state,
            burst.rejected,
            burst.shed,
            burst.resident_mib.unwrap_or(0.0),
            cpu_per_order.0,
        )?;
        for (process, ms) in &cpu_per_order.1 {
            writeln!(md, "| … of which {process} | {ms:.2} ms |")?;
        }
        let measured: f64 = cpu_per_order.1.iter().map(|(_, ms)| ms).sum();
        writeln!(
            md,
            "| … of which PostgreSQL and the rest of the machine | {:.2} ms |\n",
            cpu_per_order.0 - measured
        )?;
        targets.burst = Some((
            burst.confirmed_per_second(),
            burst.confirmed(),
            burst.orders,
        ));
        targets.cpu_per_order_ms = Some(cpu_per_order.0);
        targets.resident(burst.resident_mib);
        let order_ids: Vec<String> = (0..burst.orders.min(1000))
            .map(|i| format!("burst-{i}"))
            .collect();
        pipeline::views_caught_up(&servers).await?;
        let reads =
            pipeline::http_reads(burst.up.1, &order_ids, args.commands, args.concurrency).await;
        writeln!(
            md,
            "## HTTP reads\n\nOrders of the burst, read by id through the API of `ordo up`.\n"
        )?;
        md += FIGURES_HEADER;
        md += &figures_row(&reads);
        let during = pipeline::reads_during_rebuild(
            &servers,
            burst.up.1,
            &order_ids,
            args.concurrency.min(16),
            // In smoke mode ordo is a debug build, whose rebuild barely outruns 50 orders a
            // second: the scenario is only shown to run.
            if args.smoke { 10 } else { 500 },
        )
        .await?;
        writeln!(
            md,
            "\n## Reads while the orders view is rebuilt\n\nOrders placed at {} per second \
             through `ordo up` while reads of the burst's orders run; first while \
             `ordo projections rebuild orders` runs beside it ({:.1} s), then for as long \
             without it (the baseline).\n",
            during.write_rate,
            during.rebuild.as_secs_f64()
        )?;
        md += FIGURES_HEADER;
        md += &figures_row(&during.quiet);
        md += &figures_row(&during.rebuilding);
        writeln!(
            md,
            "\n| read p99 | ms |\n| --- | --- |\n| without a rebuild | {} |\n| during the rebuild | {} |\n",
            ms(during.quiet.percentile(0.99)),
            ms(during.rebuilding.percentile(0.99)),
        )?;
        targets.reads_during_rebuild = Some((
            during.write_rate,
            during.quiet.percentile(0.99),
            during.rebuilding.percentile(0.99),
        ));
        drop(burst);
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
        targets.rebuild_ratio =
            Some(rebuild.raw_upsert.as_secs_f64() / rebuild.rebuild.as_secs_f64());
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
             is from sending the command to the read's answer; the rows \"placed\" take the \
             same orders from sending to the command's answer alone. The first run, right after \
             `ordo up` started, is the cold one (reported, left out of the targets and the \
             plot).\n",
            args.seconds
        )?;
        md += FIGURES_HEADER;
        for (run, _) in &runs {
            md += &figures_row(&run.to_view);
            md += &figures_row(&run.placed);
        }
        md += "\n| offered orders/s | p99 ms | `ordo up` resident memory after |\n| --- | --- | --- |\n";
        for (run, rss) in runs.iter().filter(|(run, _)| !run.cold) {
            writeln!(
                md,
                "| {} | {} | {:.0} MiB |",
                run.offered_per_second,
                ms(run.to_view.percentile(0.99)),
                rss.unwrap_or(0.0)
            )?;
        }
        for (run, rss) in &runs {
            if run.cold {
                continue;
            }
            targets.resident(*rss);
            targets.open_loop = Some((
                run.offered_per_second,
                run.to_view.percentile(0.99),
                run.to_view.errors(),
            ));
        }
        let points: Vec<(f64, &measure::Figures)> = runs
            .iter()
            .filter(|(run, _)| !run.cold)
            .map(|(run, _)| (f64::from(run.offered_per_second), &run.to_view))
            .collect();
        std::fs::create_dir_all(&args.report_dir)?;
        std::fs::write(
            args.report_dir.join("latency.svg"),
            report::latency_plot(&points),
        )?;
        md += "\n![latency against offered load](latency.svg)\n";
    }

    md += &targets.table();
    print!("{md}");
    std::fs::create_dir_all(&args.report_dir)?;
    let path = args.report_dir.join("latest.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// The targets, against this run's figures.
#[derive(Default)]
struct Targets {
    /// (confirmed per second, confirmed, orders)
    burst: Option<(f64, usize, usize)>,
    /// CPU per confirmed order of the burst, whole machine, in ms.
    cpu_per_order_ms: Option<f64>,
    /// The lowest place-order rate of the ladder as a share of its raw baseline.
    place_ratio: Option<f64>,
    /// (reserves per second, exactly the stock)
    hot: Option<(f64, bool)>,
    rebuild_ratio: Option<f64>,
    /// (offered orders/s, p99, errors) of the highest open-loop rate.
    open_loop: Option<(u32, Duration, usize)>,
    /// (events, first command)
    long_history: Option<(usize, Duration)>,
    /// (orders written per second, read p99 without, during a rebuild)
    reads_during_rebuild: Option<(u32, Duration, Duration)>,
    /// (settled orders, a snapshot was written, first command after a restart)
    settled: Option<(usize, bool, Duration)>,
    /// The largest resident memory of `ordo up` seen.
    resident_mib: Option<f64>,
}

impl Targets {
    fn resident(&mut self, mib: Option<f64>) {
        if let Some(mib) = mib {
            self.resident_mib = Some(self.resident_mib.map_or(mib, |seen| seen.max(mib)));
        }
    }

    fn table(&self) -> String {
        let verdict = |met: bool| if met { "met" } else { "**not met**" };
        let mut rows = Vec::new();
        if let Some((rate, confirmed, orders)) = self.burst {
            rows.push(format!(
                "| burst through `ordo up`: ≥ 3,000 orders/s, all confirmed | {rate:.0}/s, {confirmed} of {orders} confirmed | {} |",
                verdict(rate >= 3000.0 && confirmed == orders)
            ));
        }
        if let Some(ms) = self.cpu_per_order_ms {
            rows.push(format!(
                "| CPU per confirmed order of the burst, whole machine: ≤ 0.4 ms | {ms:.2} ms | {} |",
                verdict(ms <= 0.4)
            ));
        }
        if let Some(share) = self.place_ratio {
            rows.push(format!(
                "| place-order ≥ 35 % of raw publish (lowest rung) | {:.1} % | {} |",
                share * 100.0,
                verdict(share >= 0.35)
            ));
        }
        if let Some((rate, exact)) = self.hot {
            rows.push(format!(
                "| one hot SKU ≥ 15,000 reserves/s, exactly the stock | {rate:.0}/s, {} | {} |",
                if exact {
                    "exactly the stock"
                } else {
                    "NOT the stock"
                },
                verdict(rate >= 15_000.0 && exact)
            ));
        }
        if let Some(share) = self.rebuild_ratio {
            rows.push(format!(
                "| rebuild ≥ 80 % of a raw batched upsert | {:.1} % | {} |",
                share * 100.0,
                verdict(share >= 0.8)
            ));
        }
        if let Some((rate, p99, errors)) = self.open_loop {
            rows.push(format!(
                "| command → view at {rate} orders/s: p99 < 20 ms | p99 {} ms, {errors} not ok | {} |",
                ms(p99),
                verdict(p99 < Duration::from_millis(20) && errors == 0)
            ));
        }
        if let Some((events, first)) = self.long_history {
            rows.push(format!(
                "| first command on a SKU of {events} events after a restart < 1 s | {} ms | {} |",
                ms(first),
                verdict(first < Duration::from_secs(1))
            ));
        }
        if let Some((orders, snapshot, first)) = self.settled {
            rows.push(format!(
                "| a SKU that served {orders} orders has a snapshot; first command after a restart < 50 ms | {}, {} ms | {} |",
                if snapshot { "snapshot" } else { "NO snapshot" },
                ms(first),
                verdict(snapshot && first < Duration::from_millis(50))
            ));
        }
        if let Some((rate, quiet, rebuilding)) = self.reads_during_rebuild {
            rows.push(format!(
                "| read p99 during a rebuild under {rate} orders/s of writes (no lock on reads) | {} ms (without: {} ms) | {} |",
                ms(rebuilding),
                ms(quiet),
                verdict(rebuilding < quiet * 5 + Duration::from_millis(50))
            ));
        }
        if let Some(mib) = self.resident_mib {
            rows.push(format!(
                "| `ordo up` resident memory < 150 MiB | at most {mib:.0} MiB | {} |",
                verdict(mib < 150.0)
            ));
        }
        format!(
            "\n## Targets\n\nThe performance targets, against this run. Why those not met are not, and what would close them: [profiles.md](profiles.md).\n\n| target | this run | |\n| --- | --- | --- |\n{}\n",
            rows.join("\n")
        )
    }
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
