//! `docker/` and `deploy/kubernetes/` as a specification, checked without a Docker engine or a
//! cluster: the compose file runs every component with settings ordo understands, the
//! Kubernetes manifests run the same components with the same settings, users and secrets, the
//! alert rules and the dashboard are valid PromQL over metrics ordo exports, and those metrics
//! are the ones docs/operations.md lists.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use promql_parser::{
    parser::{self, Expr},
    util::{ExprVisitor, walk_expr},
};
use serde::Deserialize;
use serde_yaml_ng::Value;

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repository().join(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
}

fn yaml(path: &str) -> Value {
    let mut value: Value =
        serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|err| panic!("{path}: {err}"));
    // `<<: *anchor` merges, as Docker Compose applies them.
    value.apply_merge().unwrap();
    value
}

/// The compose file's services, their merges applied.
fn services() -> serde_yaml_ng::Mapping {
    let compose = yaml("docker/compose.yaml");
    let mut services = compose["services"].as_mapping().unwrap().clone();
    for (_, service) in services.iter_mut() {
        service.apply_merge().unwrap();
        if let Some(environment) = service.get_mut("environment") {
            environment.apply_merge().unwrap();
        }
    }
    services
}

/// A sequence of scalars, each as text.
fn texts(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("not a sequence: {value:?}"))
        .iter()
        .map(text)
        .collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// The services that run ordo against NATS (all but `migrate`, which only sets up PostgreSQL).
const ORDO_SERVICES: [&str; 6] = [
    "streams",
    "commands",
    "projectors",
    "sagas",
    "notifier",
    "api",
];

#[test]
fn the_compose_file_runs_every_component_of_ordo_and_its_operations_stack() {
    let services = services();
    let names: BTreeSet<String> = services.keys().map(text).collect();
    for expected in [
        "nats-1",
        "nats-2",
        "nats-3",
        "postgres",
        "streams",
        "migrate",
        "commands",
        "projectors",
        "sagas",
        "notifier",
        "api",
        "otel-collector",
        "jaeger",
        "prometheus",
        "alertmanager",
        "alert-sink",
        "nats-exporter-1",
        "postgres-exporter",
        "grafana",
    ] {
        assert!(names.contains(expected), "no service {expected}: {names:?}");
    }
    let replicas = |name: &str| services[name]["deploy"]["replicas"].as_u64().unwrap_or(1);
    for worker in ["commands", "projectors", "sagas"] {
        assert_eq!(replicas(worker), 2, "{worker} runs twice");
    }
    for (name, command) in [
        ("streams", "streams apply --wait 120"),
        (
            "migrate",
            "migrate --grant-to ordo_worker --grant-read-to ordo_reader",
        ),
        ("commands", "run commands"),
        ("projectors", "run projector"),
        ("sagas", "run saga"),
        ("notifier", "run notifier"),
        ("api", "run api"),
    ] {
        let args = texts(&services[name]["command"]);
        assert_eq!(args.join(" "), command, "{name}");
    }
}

#[test]
fn every_ordo_service_agrees_on_the_cluster_and_three_replicas_in_settings_ordo_knows() {
    let services = services();
    for name in ORDO_SERVICES {
        let service = &services[name];
        let env = environment(service);
        assert_eq!(env["ORDO_STREAM_REPLICAS"], "3", "{name}");
        assert_eq!(
            env["ORDO_NATS_URL"], "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222",
            "{name}"
        );
        assert_eq!(
            env["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "http://otel-collector:4317"
        );
        // Authenticated as its own user of docker/nats-accounts.conf, with the password the nats
        // containers give that user, which the operator sets (never one written here).
        let (user, variable) = nats_user_of(name);
        assert_eq!(env["ORDO_NATS_USER"], user, "{name}");
        assert!(
            env["ORDO_NATS_PASSWORD"].starts_with(&format!("${{{variable}:?")),
            "{name}: {}",
            env["ORDO_NATS_PASSWORD"]
        );
        reads_every_setting(name, service);
    }
}

/// The NATS user each ordo service of compose.yaml connects as, and its password variable.
fn nats_user_of(service: &str) -> (&'static str, &'static str) {
    match service {
        "streams" => ("ordo-admin", "ORDO_ADMIN_NATS_PASSWORD"),
        "commands" => ("ordo-commands", "ORDO_COMMANDS_NATS_PASSWORD"),
        "projectors" => ("ordo-projector", "ORDO_PROJECTOR_NATS_PASSWORD"),
        "sagas" => ("ordo-saga", "ORDO_SAGA_NATS_PASSWORD"),
        "notifier" => ("ordo-notifier", "ORDO_NOTIFIER_NATS_PASSWORD"),
        "api" => ("ordo-api", "ORDO_API_NATS_PASSWORD"),
        other => panic!("{other} is not an ordo service"),
    }
}

#[test]
fn every_nats_user_is_defined_with_the_password_compose_gives_the_servers() {
    let conf = read("docker/nats-accounts.conf");
    let services = services();
    let nats = environment(&services["nats-1"]);
    let mut users: Vec<(&str, &str)> = ORDO_SERVICES
        .iter()
        .map(|name| nats_user_of(name))
        .collect();
    users.extend([
        ("ordo-operator", "ORDO_OPERATOR_NATS_PASSWORD"),
        ("shop", "SHOP_NATS_PASSWORD"),
        ("warehouse", "WAREHOUSE_NATS_PASSWORD"),
    ]);
    for (user, variable) in users {
        let defined = format!("user: {user}\n        password: ${variable}\n");
        assert!(
            conf.contains(&defined),
            "docker/nats-accounts.conf: no {defined:?}"
        );
        assert!(
            nats[variable].starts_with(&format!("${{{variable}:?")),
            "the nats servers are not given {variable}"
        );
        // Each of ordo's users reads replies only under its own inbox prefix, the one ordo
        // uses for it by default.
        if user.starts_with("ordo-") {
            assert!(
                conf.contains(&format!("\"_INBOX_{user}.>\"")),
                "{user}'s inbox"
            );
        }
    }
    assert!(
        !conf.contains("password: \""),
        "a password written in docker/nats-accounts.conf"
    );
}

#[test]
fn monitoring_answers_on_this_host_only_and_grafana_asks_for_a_password() {
    let services = services();
    for name in ["jaeger", "prometheus", "alertmanager", "grafana"] {
        for port in services[name]["ports"].as_sequence().unwrap() {
            assert!(
                text(port).starts_with("127.0.0.1:"),
                "{name} publishes {}",
                text(port)
            );
        }
    }
    assert!(
        services["nats-1"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|port| !text(port).contains("8222"))
    );
    let grafana = environment(&services["grafana"]);
    assert_eq!(grafana["GF_AUTH_ANONYMOUS_ENABLED"], "false");
    assert_eq!(
        grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"],
        "/run/secrets/grafana_admin_password"
    );
    let compose = yaml("docker/compose.yaml");
    assert_eq!(
        text(&compose["secrets"]["grafana_admin_password"]["environment"]),
        "GRAFANA_ADMIN_PASSWORD"
    );
    // ordo's image runs as a user without privileges.
    let dockerfile = read("docker/Dockerfile");
    assert!(dockerfile.contains("\nUSER 65532:65532\n"), "{dockerfile}");
}

/// Every ORDO_ setting of `service` is one the command it runs reads (clap shows them in --help).
fn reads_every_setting(name: &str, service: &Value) {
    let args = texts(&service["command"]);
    let help = Command::new(ORDO)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success(), "ordo {args:?} --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for key in environment(service)
        .keys()
        .filter(|key| key.starts_with("ORDO_"))
    {
        assert!(
            help.contains(&format!("env: {key}")),
            "{name}: `ordo {}` does not read {key}",
            args.join(" ")
        );
    }
}

/// A service's environment as text.
fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(key, value)| (text(key), text(value)))
        .collect()
}

#[test]
fn only_migrate_connects_to_postgresql_as_the_owner_and_every_secret_is_the_operators() {
    let services = services();
    let roles_script = read("docker/postgres-roles.sh");
    let postgres = environment(&services["postgres"]);
    let mounted = texts(&services["postgres"]["volumes"]);
    assert!(
        mounted.contains(
            &"./postgres-roles.sh:/docker-entrypoint-initdb.d/postgres-roles.sh:ro".to_owned()
        ),
        "{mounted:?}"
    );
    // The script creates the roles with the passwords compose hands the container.
    for (role, password) in [
        ("ordo_owner", "ORDO_DB_OWNER_PASSWORD"),
        ("ordo_worker", "ORDO_DB_WORKER_PASSWORD"),
        ("ordo_reader", "ORDO_DB_READER_PASSWORD"),
        ("ordo_monitor", "ORDO_DB_MONITOR_PASSWORD"),
    ] {
        assert!(
            roles_script.contains(&format!("CREATE ROLE {role} LOGIN")),
            "{role}"
        );
        assert!(
            roles_script.contains(&format!("\"${password}\"")),
            "{password}"
        );
        assert!(
            postgres[password].starts_with(&format!("${{{password}:?")),
            "{password}"
        );
    }
    assert!(roles_script.contains("CREATE DATABASE ordo OWNER ordo_owner"));
    assert!(postgres["POSTGRES_PASSWORD"].starts_with("${POSTGRES_PASSWORD:?"));

    reads_every_setting("migrate", &services["migrate"]);
    let migrate = environment(&services["migrate"]);
    assert!(
        migrate["ORDO_DATABASE_URL"]
            .starts_with("postgres://ordo_owner:${ORDO_DB_OWNER_PASSWORD:?"),
        "{migrate:?}"
    );
    // Streams are NATS's alone: that job gets neither the database nor the metrics token.
    let streams = environment(&services["streams"]);
    assert!(
        !streams.contains_key("ORDO_DATABASE_URL") && !streams.contains_key("ORDO_METRICS_TOKEN")
    );
    for name in ORDO_SERVICES.into_iter().filter(|name| *name != "streams") {
        let env = environment(&services[name]);
        // The read API only reads, as a role that may only SELECT.
        let role = if name == "api" {
            "postgres://ordo_reader:${ORDO_DB_READER_PASSWORD:?"
        } else {
            "postgres://ordo_worker:${ORDO_DB_WORKER_PASSWORD:?"
        };
        assert!(
            env["ORDO_DATABASE_URL"].starts_with(role),
            "{name}: {}",
            env["ORDO_DATABASE_URL"]
        );
        assert!(
            env["ORDO_METRICS_TOKEN"].starts_with("${ORDO_METRICS_TOKEN:?"),
            "{name}"
        );
        let depends = &services[name]["depends_on"]["migrate"]["condition"];
        assert_eq!(text(depends), "service_completed_successfully", "{name}");
    }
    let api = environment(&services["api"]);
    assert!(api["ORDO_HTTP_TOKEN"].starts_with("${ORDO_HTTP_TOKEN:?"));

    // Prometheus sends the metrics token on every scrape, from the secret compose mounts.
    let prometheus = yaml("docker/prometheus/prometheus.yml");
    let ordo_jobs = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|job| text(&job["job_name"]).starts_with("ordo-"));
    for job in ordo_jobs {
        assert_eq!(
            text(&job["authorization"]["credentials_file"]),
            "/run/secrets/metrics_token",
            "{}",
            text(&job["job_name"])
        );
    }
    let secrets = texts(&services["prometheus"]["secrets"]);
    assert_eq!(secrets, ["metrics_token"]);
    let compose = yaml("docker/compose.yaml");
    assert_eq!(
        text(&compose["secrets"]["metrics_token"]["environment"]),
        "ORDO_METRICS_TOKEN"
    );
}

#[test]
fn prometheus_scrapes_the_port_the_workers_serve_metrics_on_and_loads_the_rules() {
    let prometheus = yaml("docker/prometheus/prometheus.yml");
    let services = services();
    let metrics_port = text(&services["commands"]["environment"]["ORDO_METRICS_ADDR"])
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let workers = &prometheus["scrape_configs"][0]["dns_sd_configs"][0];
    assert_eq!(text(&workers["port"]), metrics_port);
    let scraped: BTreeSet<String> = workers["names"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    for worker in ["commands", "projectors", "sagas", "notifier"] {
        assert!(scraped.contains(worker), "{worker} is not scraped");
        assert_eq!(
            text(&services[worker]["environment"]["ORDO_METRICS_ADDR"]),
            format!("0.0.0.0:{metrics_port}")
        );
    }
    assert_eq!(
        text(&prometheus["rule_files"][0]),
        "/etc/prometheus/alerts.yml"
    );
}

/// Prometheus's rule file format; unknown keys are errors, as they are to Prometheus.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn alert_rules() -> Vec<Rule> {
    let file: RuleFile = serde_yaml_ng::from_str(&read("docker/prometheus/alerts.yml")).unwrap();
    assert!(file.groups.iter().all(|group| !group.name.is_empty()));
    file.groups
        .into_iter()
        .flat_map(|group| group.rules)
        .collect()
}

/// The metric names an expression reads.
fn metrics_read_by(expr: &str) -> BTreeSet<String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
            let selector = match expr {
                Expr::VectorSelector(selector) => Some(selector),
                Expr::MatrixSelector(matrix) => Some(&matrix.vs),
                _ => None,
            };
            if let Some(name) = selector.and_then(|selector| selector.name.clone()) {
                self.0.insert(name);
            }
            Ok(true)
        }
    }
    let parsed = parser::parse(expr).unwrap_or_else(|err| panic!("invalid PromQL {expr:?}: {err}"));
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &parsed).unwrap();
    names.0
}

#[test]
fn the_alert_rules_are_valid_and_cover_the_service_level_objectives() {
    let rules = alert_rules();
    let operations = read("docs/operations.md");
    let mut read = BTreeSet::new();
    for rule in &rules {
        read.extend(metrics_read_by(&rule.expr));
        if let Some(duration) = &rule.for_ {
            promql_parser::util::parse_duration(duration)
                .unwrap_or_else(|err| panic!("{}: for {duration:?}: {err}", rule.alert));
        }
        assert!(
            ["page", "ticket"].contains(&rule.labels["severity"].as_str()),
            "{}",
            rule.alert
        );
        assert!(rule.annotations.contains_key("summary"), "{}", rule.alert);
        // Every alert has its runbook.
        let anchor = format!("docs/operations.md#{}", rule.alert.to_lowercase());
        assert_eq!(rule.annotations["runbook"], anchor);
        assert!(
            operations.contains(&format!("\n### {}\n", rule.alert)),
            "docs/operations.md has no runbook section for {}",
            rule.alert
        );
    }
    for objective in [
        "ordo_command_duration_seconds_bucket",
        "ordo_order_settle_seconds_bucket",
        "ordo_projection_lag_events",
        "ordo_sagas",
        "ordo_notifications_total",
        "ordo_commands_shed_total",
    ] {
        assert!(read.contains(objective), "no alert reads {objective}");
    }
}

/// The metrics docs/operations.md lists: name → type.
fn documented_metrics() -> BTreeMap<String, String> {
    read("docs/operations.md")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`ordo_")?.strip_suffix('`')?;
            Some((format!("ordo_{name}"), cells.get(2)?.to_string()))
        })
        .collect()
}

/// The series names a documented metric appears as in Prometheus.
fn series_names(metrics: &BTreeMap<String, String>) -> BTreeSet<String> {
    metrics
        .iter()
        .flat_map(|(name, kind)| match kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect::<Vec<_>>(),
            _ => vec![name.clone()],
        })
        .collect()
}

#[test]
fn the_dashboard_and_the_rules_read_only_metrics_ordo_exports() {
    let mut exported = series_names(&documented_metrics());
    // Prometheus's own series of every target it scrapes.
    exported.insert("up".to_owned());
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docker/grafana/dashboards/ordo.json")).unwrap();
    let mut expressions: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap().to_owned();
            panel["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |target| (title.clone(), target["expr"].as_str().unwrap().to_owned()))
        })
        .collect();
    assert!(expressions.len() >= 10, "the dashboard shows too little");
    expressions.extend(
        alert_rules()
            .into_iter()
            .map(|rule| (rule.alert, rule.expr)),
    );
    // The servers' series come from the exporters Prometheus scrapes for them.
    let prometheus = yaml("docker/prometheus/prometheus.yml");
    let jobs: BTreeSet<String> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|job| text(&job["job_name"]))
        .collect();
    for (source, expr) in expressions {
        for metric in metrics_read_by(&expr) {
            if metric.starts_with("nats_") {
                assert!(
                    jobs.contains("nats"),
                    "{source} reads {metric}, nothing scrapes NATS"
                );
            } else if metric.starts_with("pg_") {
                assert!(
                    jobs.contains("postgres"),
                    "{source} reads {metric}, nothing scrapes PostgreSQL"
                );
            } else {
                assert!(
                    exported.contains(&metric),
                    "{source} reads {metric}, which ordo does not export"
                );
            }
        }
    }
}

/// Every metric the code records: the name after `counter!(`, `gauge!(` or `histogram!(` (or a
/// helper named so), with the kind.
fn recorded_metrics() -> BTreeMap<String, String> {
    let pattern = regex::Regex::new(r#"(counter|gauge|histogram)!?\(\s*"(ordo_[a-z_]+)""#).unwrap();
    let mut recorded = BTreeMap::new();
    let crates = repository().join("crates");
    let mut files = Vec::new();
    let mut dirs = vec![crates];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                // Sources only: tests and the bench may name metrics to check them.
                if path.file_name().is_some_and(|name| name != "tests") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for found in pattern.captures_iter(&source) {
            recorded.insert(found[2].to_owned(), found[1].to_owned());
        }
    }
    recorded
}

#[test]
fn every_metric_ordo_records_is_documented_and_named_by_prometheus_conventions() {
    let recorded = recorded_metrics();
    let documented = documented_metrics();
    assert_eq!(
        recorded.keys().collect::<Vec<_>>(),
        documented.keys().collect::<Vec<_>>(),
        "docs/operations.md lists exactly the metrics the code records"
    );
    for (name, kind) in &recorded {
        assert_eq!(
            &documented[name], kind,
            "{name} is documented as another type"
        );
        match kind.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds") || name.ends_with("_size"),
                "histogram {name} must name its unit (_seconds) or be a _size"
            ),
            _ => assert!(
                !name.ends_with("_total"),
                "gauge {name} must not end in _total"
            ),
        }
        for unit in ["_ms", "_millis", "_milliseconds", "_bytes_total_"] {
            assert!(
                !name.contains(unit),
                "{name}: use base units (seconds, bytes)"
            );
        }
    }
}

/// Every durable consumer of the catalogue may be created, read, pulled and acknowledged by the
/// user of the component that owns it, in that user's block of docker/nats-accounts.conf; a view's
/// projectors may read its stream by sequence and hear its events, create no consumer, and
/// delete the durable consumer of earlier builds; and every consumer nats.conf names is one of
/// the catalogue's. (A consumer renamed or added in one place only
/// fails here, not only when a worker is refused at run time.)
#[test]
fn every_durable_consumer_is_permitted_to_its_owner_and_nats_conf_names_no_other() {
    use ordo_eventstore::ConsumerId;
    let conf = read("docker/nats-accounts.conf");
    let block_of = |user: &str| -> &str {
        let start = conf
            .find(&format!("user: {user}\n"))
            .unwrap_or_else(|| panic!("no user {user} in docker/nats-accounts.conf"));
        let end = conf[start + 1..]
            .find("user: ")
            .map_or(conf.len(), |end| start + 1 + end);
        &conf[start..end]
    };
    for consumer in ConsumerId::ALL {
        let owner = match consumer {
            ConsumerId::Saga => "ordo-saga",
            ConsumerId::Notifier => "ordo-notifier",
            ConsumerId::OrdersView | ConsumerId::StockView => "ordo-projector",
        };
        let (stream, name) = (consumer.stream().name(), consumer.name());
        let needed = if let Some(group) = consumer.partition_group() {
            assert!(
                !block_of(owner).contains(&format!("\"$JS.API.CONSUMER.CREATE.{stream}")),
                "{owner} may create consumers on {stream}, and so change the notifier's"
            );
            vec![
                format!("\"$JS.API.DIRECT.GET.{stream}\""),
                format!("\"{}\"", consumer.stream().subjects()),
                format!("\"$JS.API.CONSUMER.DELETE.{stream}.{name}\""),
                format!("\"$KV.ordo_partitions.{group}.>\""),
                format!("\"ordo.ownership.{group}.>\""),
            ]
        } else {
            vec![
                format!("\"$JS.API.CONSUMER.CREATE.{stream}.{name}\""),
                format!("\"$JS.API.CONSUMER.CREATE.{stream}.{name}.>\""),
                format!("\"$JS.API.CONSUMER.INFO.{stream}.{name}\""),
                format!("\"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}\""),
                format!("\"$JS.ACK.{stream}.{name}.>\""),
            ]
        };
        for permission in needed {
            assert!(
                block_of(owner).contains(&permission),
                "{owner} lacks {permission} for {consumer}"
            );
        }
    }
    // The other way round: a consumer named in a permission is one of the catalogue's.
    let named = regex::Regex::new(
        r#"\$JS\.(?:API\.CONSUMER\.[A-Z.]+?|ACK)\.(ORDO_[A-Z_]+)\.([A-Za-z0-9_-]+)(?:\.>)?""#,
    )
    .unwrap();
    for found in named.captures_iter(&conf) {
        let (stream, name) = (&found[1], &found[2]);
        assert!(
            ConsumerId::ALL
                .iter()
                .any(|consumer| consumer.name() == name && consumer.stream().name() == stream),
            "docker/nats-accounts.conf names a consumer {stream}.{name} that is not in ConsumerId"
        );
    }
}

/// The strings of a compose healthcheck's `test`.
fn healthcheck(service: &Value) -> Vec<String> {
    service["healthcheck"]["test"]
        .as_sequence()
        .unwrap_or_else(|| panic!("no healthcheck: {service:?}"))
        .iter()
        .map(text)
        .collect()
}

/// Compose starts the stack the same way every time: each service waits for what it needs to
/// be really ready, not only started.
#[test]
fn every_service_waits_for_what_it_needs_to_be_ready() {
    let services = services();
    // NATS: JetStream current on the node (a meta leader elected), not only enabled.
    for node in ["nats-1", "nats-2", "nats-3"] {
        let test = healthcheck(&services[node]);
        assert_eq!(
            test.last().map(String::as_str),
            Some("http://127.0.0.1:8222/healthz"),
            "{node}: {test:?}"
        );
    }
    // PostgreSQL: over TCP, which it listens on only once its init scripts have run.
    let test = healthcheck(&services["postgres"]);
    assert!(
        test.windows(2)
            .any(|pair| pair[0] == "-h" && pair[1] == "127.0.0.1"),
        "postgres: {test:?}"
    );
    // ordo's long-running processes: each one's own readiness, on the port it serves it on.
    let metrics_port = text(&services["commands"]["environment"]["ORDO_METRICS_ADDR"])
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    for name in ["commands", "projectors", "sagas", "notifier", "api"] {
        let test = healthcheck(&services[name]);
        assert!(
            test.contains(&format!("http://127.0.0.1:{metrics_port}/readyz")),
            "{name}: {test:?}"
        );
        assert_eq!(
            text(&services[name]["environment"]["ORDO_METRICS_ADDR"]),
            format!("0.0.0.0:{metrics_port}"),
            "{name}"
        );
    }
    // The image has what the healthchecks run.
    let dockerfile = read("docker/Dockerfile");
    assert!(dockerfile.contains(" curl"), "the image has no curl");
}

/// The nats-server compose runs is the release the tests run (the one scripts/lib.sh installs),
/// and at least the one ordo needs.
#[test]
fn compose_runs_the_nats_server_release_ordo_is_tested_with() {
    let services = services();
    let image = text(&services["nats-1"]["image"]);
    let tag = image
        .strip_prefix("nats:")
        .and_then(|tag| tag.strip_suffix("-alpine"))
        .unwrap_or_else(|| panic!("nats image {image:?}"));
    let lib = read("scripts/lib.sh");
    let tested = lib
        .lines()
        .find_map(|line| line.strip_prefix("NATS_SERVER_VERSION="))
        .expect("scripts/lib.sh names NATS_SERVER_VERSION");
    assert_eq!(tag, tested);
    let found = ordo_local::parse_version(tag).expect("a version");
    assert!(found >= ordo_local::MINIMUM_VERSION, "{tag}");
}

/// The build context leaves out what the image does not need (gigabytes of target/ and .ordo/,
/// and the secrets file).
#[test]
fn the_image_build_sends_neither_build_output_nor_secrets() {
    let ignored: BTreeSet<String> = read(".dockerignore")
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    for path in [
        "target/",
        ".ordo/",
        ".git/",
        "docker/.env",
        "deploy/kubernetes/secrets.env",
    ] {
        assert!(
            ignored.contains(path),
            ".dockerignore does not leave out {path}"
        );
    }
}

/// docker/.env.example names exactly the variables compose.yaml requires: those it
/// substitutes (`${NAME:?…}`) and those its secrets are read from.
#[test]
fn the_env_example_names_every_variable_compose_requires() {
    let compose = read("docker/compose.yaml");
    let pattern = regex::Regex::new(r"\$\{([A-Z_]+):\?").unwrap();
    let mut required: BTreeSet<String> = pattern
        .captures_iter(&compose)
        .map(|found| found[1].to_owned())
        .collect();
    let secrets = yaml("docker/compose.yaml")["secrets"].clone();
    for (_, secret) in secrets.as_mapping().unwrap() {
        required.insert(text(&secret["environment"]));
    }
    assert_eq!(env_example_variables(), required);
}

/// The variables docker/.env.example names: every secret of a deployment.
fn env_example_variables() -> BTreeSet<String> {
    read("docker/.env.example")
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim().to_owned()))
        .collect()
}

/// Prometheus sends alerts to the Alertmanager compose runs, which sends them to a receiver
/// compose runs too; the operator's NATS user is in the system account.
#[test]
fn alerts_reach_a_receiver_and_operators_reach_the_system_account() {
    let services = services();
    let prometheus = yaml("docker/prometheus/prometheus.yml");
    let target =
        text(&prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]);
    let (host, port) = target.split_once(':').unwrap();
    assert!(services.contains_key(host), "no service {host}");
    let alertmanager = yaml("docker/alertmanager.yml");
    let route = text(&alertmanager["route"]["receiver"]);
    let receiver = alertmanager["receivers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|receiver| text(&receiver["name"]) == route)
        .expect("the route's receiver");
    let url = text(&receiver["webhook_configs"][0]["url"]);
    let sink = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split(':').next())
        .unwrap();
    assert!(services.contains_key(sink), "no service {sink}");
    assert_eq!((host, port), ("alertmanager", "9093"));
    assert!(
        text(&services["alertmanager"]["command"][0]).contains("/alertmanager.yml"),
        "alertmanager runs the configuration checked here"
    );

    // The operator's user (defined with its password in every_nats_user_is_defined_…) is in
    // the system account.
    let conf = read("docker/nats-accounts.conf");
    assert!(conf.contains("\nsystem_account: SYS\n"));
    let sys = conf.find("\n  SYS {").expect("an account SYS");
    let operator = conf.find("user: ordo-operator").unwrap();
    let next_account = conf.find("\n  ORDO {").unwrap();
    assert!(sys < operator && operator < next_account);
}

/// Each NATS node's exporter shares the node's network (its monitoring port answers on the
/// node's loopback only) and is scraped at the node's address; PostgreSQL's reads as a role
/// that may read the statistics views only.
#[test]
fn the_servers_metrics_are_scraped_where_their_exporters_listen() {
    let services = services();
    let prometheus = yaml("docker/prometheus/prometheus.yml");
    let job = |name: &str| {
        let job = prometheus["scrape_configs"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|job| text(&job["job_name"]) == name)
            .unwrap_or_else(|| panic!("no job {name}"));
        texts(&job["static_configs"][0]["targets"])
    };
    for (n, target) in (1..=3).zip(job("nats")) {
        let exporter = &services[format!("nats-exporter-{n}").as_str()];
        assert_eq!(text(&exporter["network_mode"]), format!("service:nats-{n}"));
        assert_eq!(target, format!("nats-{n}:7777"));
        let args = texts(&exporter["command"]);
        assert!(args.contains(&"-port=7777".to_owned()), "{args:?}");
        assert_eq!(
            args.last().map(String::as_str),
            Some("http://127.0.0.1:8222")
        );
    }
    assert_eq!(job("postgres"), ["postgres-exporter:9187"]);
    let source = text(&services["postgres-exporter"]["environment"]["DATA_SOURCE_NAME"]);
    assert!(source.starts_with("postgresql://ordo_monitor:"), "{source}");
    assert!(
        read("docker/postgres-roles.sh")
            .contains("ordo_monitor LOGIN PASSWORD :'monitor_password' IN ROLE pg_monitor")
    );
}

// ---- Kubernetes (deploy/kubernetes) ----

/// Every document of the files deploy/kubernetes/kustomization.yaml lists, in order.
fn kubernetes_objects() -> Vec<Value> {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let mut objects = Vec::new();
    for file in kustomization["resources"].as_sequence().unwrap() {
        let path = format!("deploy/kubernetes/{}", text(file));
        for document in serde_yaml_ng::Deserializer::from_str(&read(&path)) {
            let object = Value::deserialize(document).unwrap_or_else(|err| panic!("{path}: {err}"));
            assert!(
                object["kind"].is_string(),
                "{path}: a document without a kind"
            );
            objects.push(object);
        }
    }
    objects
}

fn kubernetes_object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn kubernetes_names(objects: &[Value], kind: &str) -> BTreeSet<String> {
    objects
        .iter()
        .filter(|object| object["kind"] == kind)
        .map(|object| text(&object["metadata"]["name"]))
        .collect()
}

/// A variable's value in a form both deployments share: a secret is `secret:<variable of
/// docker/.env.example>`, wherever it appears in the value.
fn compose_form(value: &str) -> String {
    let secret = regex::Regex::new(r"\$\{([A-Z_]+):\?[^}]*\}").unwrap();
    secret.replace_all(value, "secret:$1").into_owned()
}

/// The environment of a pod's only container, in [`compose_form`]: the ConfigMaps it takes
/// whole, then its own variables, `$(NAME)` references expanded as Kubernetes expands them.
fn kubernetes_environment(objects: &[Value], workload: &Value) -> BTreeMap<String, String> {
    let container = &workload["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_sequence().into_iter().flatten() {
        let name = text(&source["configMapRef"]["name"]);
        let map = kubernetes_object(objects, "ConfigMap", &name);
        for (key, value) in map["data"].as_mapping().unwrap() {
            env.insert(text(key), text(value));
        }
    }
    let reference = regex::Regex::new(r"\$\(([A-Z_]+)\)").unwrap();
    for variable in container["env"].as_sequence().into_iter().flatten() {
        let name = text(&variable["name"]);
        let value = if let Some(value) = variable.get("value") {
            reference
                .replace_all(&text(value), |found: &regex::Captures| {
                    env.get(&found[1])
                        .unwrap_or_else(|| {
                            panic!("{name} refers to {} before it is set", &found[1])
                        })
                        .clone()
                })
                .into_owned()
        } else if let Some(secret) = variable["valueFrom"].get("secretKeyRef") {
            assert_eq!(text(&secret["name"]), "ordo-secrets", "{name}");
            format!("secret:{}", text(&secret["key"]))
        } else if let Some(config) = variable["valueFrom"].get("configMapKeyRef") {
            let map = kubernetes_object(objects, "ConfigMap", &text(&config["name"]));
            text(&map["data"][text(&config["key"]).as_str()])
        } else {
            panic!("{name}: a value ordo's manifests do not use: {variable:?}")
        };
        env.insert(name, value);
    }
    env
}

/// Each compose service and the Kubernetes workload that runs the same command.
const KUBERNETES_WORKLOADS: [(&str, &str, &str); 7] = [
    ("streams", "Job", "ordo-streams"),
    ("migrate", "Job", "ordo-migrate"),
    ("commands", "Deployment", "ordo-commands"),
    ("projectors", "Deployment", "ordo-projector"),
    ("sagas", "Deployment", "ordo-saga"),
    ("notifier", "Deployment", "ordo-notifier"),
    ("api", "Deployment", "ordo-api"),
];

#[test]
fn kubernetes_runs_what_compose_runs_with_the_same_settings_users_and_secrets() {
    let services = services();
    let objects = kubernetes_objects();
    let mut workloads = kubernetes_names(&objects, "Deployment");
    workloads.extend(kubernetes_names(&objects, "Job"));
    assert_eq!(
        workloads,
        KUBERNETES_WORKLOADS
            .iter()
            .map(|(_, _, name)| name.to_string())
            .collect()
    );
    let secrets = env_example_variables();
    for (service, kind, name) in KUBERNETES_WORKLOADS {
        let workload = kubernetes_object(&objects, kind, name);
        let container = &workload["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["args"], services[service]["command"], "{name}");
        assert_eq!(text(&container["image"]), "ordo", "{name}");
        // The same settings as compose, but for where NATS is: the chart's Service rather
        // than compose's three nodes by name.
        let ordo_settings = |env: BTreeMap<String, String>| -> BTreeMap<String, String> {
            env.into_iter()
                .filter(|(key, _)| {
                    (key.starts_with("ORDO_") || key.starts_with("OTEL_") || key == "RUST_LOG")
                        && key != "ORDO_NATS_URL"
                })
                .map(|(key, value)| (key, compose_form(&value)))
                .collect()
        };
        let kubernetes = kubernetes_environment(&objects, workload);
        assert_eq!(
            ordo_settings(kubernetes.clone()),
            ordo_settings(environment(&services[service])),
            "{name} and compose's {service}"
        );
        if kubernetes.contains_key("ORDO_NATS_URL") {
            assert_eq!(kubernetes["ORDO_NATS_URL"], "nats://nats:4222", "{name}");
        }
        for value in kubernetes.values() {
            if let Some(secret) = value.strip_prefix("secret:") {
                assert!(
                    secrets.contains(secret),
                    "{name}: {secret} is not in docker/.env.example"
                );
            }
        }
    }
    // The Secret is made from those variables, and they are never committed.
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let generator = &kustomization["secretGenerator"][0];
    assert_eq!(text(&generator["name"]), "ordo-secrets");
    assert_eq!(text(&generator["envs"][0]), "secrets.env");
    assert!(read(".gitignore").contains("/deploy/kubernetes/secrets.env\n"));
    assert_eq!(text(&kustomization["namespace"]), "ordo");
}

#[test]
fn each_kubernetes_worker_is_probed_budgeted_and_scaled_as_it_can_be() {
    let objects = kubernetes_objects();
    let deployments: Vec<&Value> = objects
        .iter()
        .filter(|object| object["kind"] == "Deployment")
        .collect();
    let budgets = kubernetes_names(&objects, "PodDisruptionBudget");
    let scalers = kubernetes_names(&objects, "HorizontalPodAutoscaler");
    for deployment in deployments {
        let name = text(&deployment["metadata"]["name"]);
        let spec = &deployment["spec"];
        let pod = &spec["template"]["spec"];
        let container = &pod["containers"][0];
        let labels = &spec["template"]["metadata"]["labels"];
        for (key, value) in spec["selector"]["matchLabels"].as_mapping().unwrap() {
            assert_eq!(&labels[key], value, "{name}: the selector matches its pods");
        }
        // Probes on the port ordo serves them on, without a token.
        let env = kubernetes_environment(&objects, deployment);
        let metrics_port: u64 = env["ORDO_METRICS_ADDR"]
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let port = container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|port| port["name"] == "metrics")
            .unwrap_or_else(|| panic!("{name}: no metrics port"));
        assert_eq!(port["containerPort"].as_u64(), Some(metrics_port), "{name}");
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            assert_eq!(
                text(&container[probe]["httpGet"]["path"]),
                path,
                "{name} {probe}"
            );
            assert_eq!(
                text(&container[probe]["httpGet"]["port"]),
                "metrics",
                "{name} {probe}"
            );
        }
        // Sized, and without privileges: the image's own user.
        let resources = &container["resources"];
        assert!(
            resources["requests"]["cpu"].is_string() && resources["requests"]["memory"].is_string(),
            "{name}: requests"
        );
        assert!(
            resources["limits"]["memory"].is_string(),
            "{name}: a memory limit"
        );
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}"
        );
        assert!(read("docker/Dockerfile").contains(&format!(
            "\nUSER {}:{}\n",
            pod["securityContext"]["runAsUser"].as_u64().unwrap(),
            pod["securityContext"]["runAsGroup"].as_u64().unwrap()
        )));
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}"
        );
        // A worker that runs twice or more, as its autoscaler says (a count of its own would
        // reset the autoscaler's on every apply), keeps one through a voluntary disruption; the
        // notifier runs once, and a budget would block every drain of its node.
        if scalers.contains(&name) {
            assert!(
                spec.get("replicas").is_none(),
                "{name}: replicas beside an autoscaler"
            );
            let scaler = kubernetes_object(&objects, "HorizontalPodAutoscaler", &name);
            assert_eq!(text(&scaler["spec"]["scaleTargetRef"]["name"]), name);
            let replicas = scaler["spec"]["minReplicas"].as_u64().unwrap();
            assert!(replicas >= 2, "{name}");
            assert!(budgets.contains(&name), "{name}: no PodDisruptionBudget");
            let budget = kubernetes_object(&objects, "PodDisruptionBudget", &name);
            assert!(budget["spec"]["minAvailable"].as_u64().unwrap() < replicas);
            assert_eq!(budget["spec"]["selector"], spec["selector"], "{name}");
        } else {
            assert_eq!(spec["replicas"].as_u64(), Some(1), "{name}");
            assert!(!budgets.contains(&name), "{name}");
        }
        // Scraped where its metrics are: a worker's on its metrics port, the API's on its own
        // port, where the views' gauges are read afresh (as compose's Prometheus does).
        let scraped = text(&spec["template"]["metadata"]["annotations"]["prometheus.io/port"]);
        let expected = if name == "ordo-api" {
            env["ORDO_HTTP_ADDR"].rsplit(':').next().unwrap().to_owned()
        } else {
            metrics_port.to_string()
        };
        assert_eq!(scraped, expected, "{name}");
    }
    // More command services than partitions would own none.
    let commands = kubernetes_object(&objects, "HorizontalPodAutoscaler", "ordo-commands");
    assert!(
        commands["spec"]["maxReplicas"].as_u64().unwrap()
            <= u64::from(ordo_eventstore::partition::DEFAULT_PARTITIONS)
    );
    // The projectors' backlog, which docs/kubernetes.md adds where an adapter serves it, is a
    // metric ordo exports.
    let docs = read("docs/kubernetes.md");
    let backlog = regex::Regex::new(r"metric: \{ name: (ordo_[a-z_]+) \}")
        .unwrap()
        .captures(&docs)
        .expect("docs/kubernetes.md adds the backlog metric")[1]
        .to_owned();
    assert!(documented_metrics().contains_key(&backlog), "{backlog}");
    // The API's Service reaches the port it listens on.
    let api = kubernetes_object(&objects, "Deployment", "ordo-api");
    let http_port: u64 = kubernetes_environment(&objects, api)["ORDO_HTTP_ADDR"]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let service = kubernetes_object(&objects, "Service", "ordo-api");
    assert_eq!(text(&service["spec"]["ports"][0]["targetPort"]), "http");
    let container = &api["spec"]["template"]["spec"]["containers"][0];
    let http = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|port| port["name"] == "http")
        .unwrap();
    assert_eq!(http["containerPort"].as_u64(), Some(http_port));
}

/// deploy/kubernetes/nats-values.yaml: the NATS chart runs the servers compose runs (release,
/// cluster of 3, JetStream), with the accounts of docker/nats-accounts.conf and the passwords
/// of the Secret.
#[test]
fn the_nats_chart_runs_the_servers_compose_runs_with_the_shipped_accounts() {
    let values = yaml("deploy/kubernetes/nats-values.yaml");
    let services = services();
    let compose_image = text(&services["nats-1"]["image"]);
    assert_eq!(
        format!("nats:{}", text(&values["container"]["image"]["tag"])),
        compose_image
    );
    assert_eq!(values["config"]["cluster"]["enabled"].as_bool(), Some(true));
    assert_eq!(values["config"]["cluster"]["replicas"].as_u64(), Some(3));
    assert_eq!(
        values["config"]["jetstream"]["enabled"].as_bool(),
        Some(true)
    );
    // The accounts: one file, included by compose's servers and by the chart's.
    assert_eq!(
        text(&values["config"]["merge"]["$include"]),
        "./nats-accounts.conf"
    );
    assert!(read("docker/nats.conf").contains("\ninclude ./nats-accounts.conf\n"));
    for n in 1..=3 {
        let volumes = texts(&services[format!("nats-{n}").as_str()]["volumes"]);
        assert!(
            volumes.contains(&"./nats-accounts.conf:/etc/nats/nats-accounts.conf:ro".to_owned()),
            "nats-{n}: {volumes:?}"
        );
    }
    let install =
        "--set-file 'configMap.merge.data.nats-accounts\\.conf=docker/nats-accounts.conf'";
    for doc in ["deploy/kubernetes/nats-values.yaml", "docs/kubernetes.md"] {
        let text = read(doc);
        assert!(
            text.contains(install),
            "{doc} does not install the accounts"
        );
        assert!(
            text.contains("helm install nats nats/nats --namespace ordo"),
            "{doc}"
        );
    }
    // The servers' environment holds exactly the passwords compose gives its servers, from the
    // Secret's variables of the same names.
    let compose_passwords: BTreeSet<String> =
        environment(&services["nats-1"]).into_keys().collect();
    let env = values["container"]["env"].as_mapping().unwrap();
    let chart_passwords: BTreeSet<String> = env.keys().map(text).collect();
    assert_eq!(chart_passwords, compose_passwords);
    for (variable, value) in env {
        let secret = &value["valueFrom"]["secretKeyRef"];
        assert_eq!(text(&secret["name"]), "ordo-secrets");
        assert_eq!(secret["key"], *variable);
    }
}

/// Where kubectl is installed (its Kustomize builds offline), the kustomization builds with the
/// secrets docker/.env.example names, into the objects the tests above read, each in namespace
/// ordo and running the image `images:` names. Without kubectl, the tests above still read every
/// file; this one says it did not build.
#[test]
fn the_kustomization_builds_into_the_objects_read_above() {
    let Ok(version) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        eprintln!("kubectl is not installed: deploy/kubernetes was read, not built");
        return;
    };
    assert!(version.status.success());
    // A copy with a secrets.env of placeholders: Kustomize reads only inside its directory.
    let dir = tempfile::tempdir().unwrap();
    let source = repository().join("deploy/kubernetes");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let placeholders: String = env_example_variables()
        .iter()
        .map(|variable| format!("{variable}=placeholder\n"))
        .collect();
    std::fs::write(dir.path().join("secrets.env"), placeholders).unwrap();
    let built = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let built: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(&String::from_utf8_lossy(&built.stdout))
            .map(|document| Value::deserialize(document).unwrap())
            .collect();
    let identity = |object: &Value| (text(&object["kind"]), text(&object["metadata"]["name"]));
    let mut expected: BTreeSet<(String, String)> =
        kubernetes_objects().iter().map(identity).collect();
    expected.insert(("Secret".into(), "ordo-secrets".into()));
    assert_eq!(
        built.iter().map(identity).collect::<BTreeSet<_>>(),
        expected
    );
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let image = format!(
        "{}:{}",
        text(&kustomization["images"][0]["newName"]),
        text(&kustomization["images"][0]["newTag"])
    );
    for object in &built {
        let (kind, name) = identity(object);
        if kind != "Namespace" {
            assert_eq!(
                text(&object["metadata"]["namespace"]),
                "ordo",
                "{kind} {name}"
            );
        }
        if let Some(containers) = object["spec"]["template"]["spec"]["containers"].as_sequence() {
            for container in containers {
                assert_eq!(text(&container["image"]), image, "{kind} {name}");
            }
        }
    }
}
