//! Finding and connecting to NATS: the configured URL, the local defaults of `ordo up`, and a
//! first connection that waits for the server with backoff instead of failing.

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use ordo_testkit::{MINIMUM_VERSION, NatsServer, parse_version};

pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// Written by `ordo up` while it runs a nats-server of its own, read by the client commands.
const URL_FILE: &str = "nats.url";

/// The URL to use when one is configured, else the server `ordo up` started, else the default.
pub fn configured_url(configured: Option<String>, home: &Path) -> String {
    configured
        .or_else(|| {
            std::fs::read_to_string(home.join(URL_FILE))
                .ok()
                .map(|url| url.trim().to_owned())
        })
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// `ordo up`'s NATS: the configured URL; else 127.0.0.1:4222 if a nats-server >= 2.10 with
/// JetStream answers there; else one started here with its data under `<home>/nats`.
pub async fn url_for_up(
    configured: Option<String>,
    home: &Path,
) -> anyhow::Result<(String, Option<LocalNats>)> {
    if let Some(url) = configured {
        return Ok((url, None));
    }
    match probe(DEFAULT_URL).await {
        Ok(()) => {
            tracing::info!(
                url = DEFAULT_URL,
                "using the nats-server that answers there"
            );
            return Ok((DEFAULT_URL.to_owned(), None));
        }
        Err(reason) => tracing::info!(url = DEFAULT_URL, %reason, "not using it"),
    }
    let server = NatsServer::start_kept(&home.join("nats"), 4222)
        .map_err(anyhow::Error::msg)
        .context("starting a local nats-server")?;
    let url = server.url();
    std::fs::write(home.join(URL_FILE), &url).context("recording the local NATS URL")?;
    tracing::info!(
        %url,
        data = %home.join("nats").display(),
        log = %server.log_file().display(),
        "started a local nats-server; use `nats --server {url} …` or `ordo …` (it finds it)"
    );
    Ok((
        url,
        Some(LocalNats {
            _server: server,
            url_file: home.join(URL_FILE),
        }),
    ))
}

/// A nats-server `ordo up` started: it stops with `ordo up`, its data stays.
pub struct LocalNats {
    _server: NatsServer,
    url_file: std::path::PathBuf,
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.url_file);
    }
}

/// Ok when a nats-server >= 2.10 with JetStream answers at `url`.
async fn probe(url: &str) -> Result<(), String> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(500))
        .connect(url)
        .await
        .map_err(|err| format!("nothing answers: {err}"))?;
    let version = client.server_info().version;
    match parse_version(&version) {
        Some(found) if found >= MINIMUM_VERSION => {}
        _ => return Err(format!("nats-server {version} is older than 2.10")),
    }
    let js = async_nats::jetstream::new(client);
    tokio::time::timeout(Duration::from_secs(2), js.query_account())
        .await
        .map_err(|_| "JetStream does not answer".to_owned())?
        .map_err(|err| format!("JetStream is not enabled: {err}"))?;
    Ok(())
}

fn options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name(concat!("ordo ", env!("CARGO_PKG_VERSION")))
        .connection_timeout(Duration::from_secs(2))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the NATS connection; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::info!(event = %other, "NATS"),
            }
        })
}

/// Connects, waiting for the server with exponential backoff (capped at 30 s) and saying so.
/// Once connected, the client reconnects by itself whenever the connection drops.
pub async fn connect_with_backoff(url: &str) -> async_nats::Client {
    let mut delay = Duration::from_millis(250);
    loop {
        match options().connect(url).await {
            Ok(client) => {
                tracing::info!(url, "connected to NATS");
                return client;
            }
            Err(err) => {
                tracing::warn!(url, %err, retry_in = ?delay, "NATS is unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One attempt, for commands a person runs and waits for.
pub async fn connect_once(url: &str) -> anyhow::Result<async_nats::Client> {
    match options().connect(url).await {
        Ok(client) => Ok(client),
        Err(err) => bail!(
            "NATS at {url} is unreachable: {err}. Is `ordo up` running? (or set ORDO_NATS_URL)"
        ),
    }
}
