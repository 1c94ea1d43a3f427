//! Finding and connecting to NATS: the configured URL, the local defaults of `ordo up`, and a
//! first connection that waits for the server with backoff instead of failing.

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use ordo_eventstore::backoff::Backoff;
use ordo_testkit::{MINIMUM_VERSION, NatsServer, parse_version};

pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// Written by `ordo up` while it runs a nats-server of its own, read by the client commands.
const URL_FILE: &str = "nats.url";

/// The URL to use when one is configured, else the server `ordo up` started, else the default.
pub fn configured_url(configured: Option<String>, home: &Path) -> String {
    configured_or_recorded(configured, &home.join(URL_FILE), DEFAULT_URL)
}

/// `configured`, else the URL recorded in `file` by a running `ordo up`, else `default`.
pub fn configured_or_recorded(configured: Option<String>, file: &Path, default: &str) -> String {
    configured
        .or_else(|| {
            std::fs::read_to_string(file)
                .ok()
                .map(|url| url.trim().to_owned())
        })
        .unwrap_or_else(|| default.to_owned())
}

/// `ordo up`'s NATS: the configured URL; else 127.0.0.1:4222 if a nats-server >= 2.10 with
/// JetStream answers there; else the one an earlier `ordo up` left running; else one started here
/// with its data under `<home>/nats`.
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
    // A server an earlier `ordo up` started and could not stop (it was killed) still holds the
    // store: use it rather than start a second one on the same data.
    if let Ok(url) = std::fs::read_to_string(home.join(URL_FILE)) {
        let url = url.trim().to_owned();
        if probe(&url).await.is_ok() {
            tracing::info!(%url, "using the nats-server an earlier `ordo up` left running");
            return Ok((url, None));
        }
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

/// The servers of a URL list: `nats://a:4222,nats://b:4222` names a cluster.
pub(crate) fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(|one| {
            one.trim()
                .parse::<async_nats::ServerAddr>()
                .with_context(|| format!("{one:?} is not a NATS URL"))
        })
        .collect()
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
                async_nats::Event::Connected => tracing::info!("NATS connection up"),
                other => tracing::info!(event = %other, "NATS"),
            }
        })
}

/// Connects, waiting for the server with exponential backoff (capped at 30 s) and saying so.
/// Once connected, the client reconnects by itself whenever the connection drops.
pub async fn connect_with_backoff(url: &str) -> anyhow::Result<async_nats::Client> {
    let servers = server_addrs(url)?;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        match options().connect(servers.as_slice()).await {
            Ok(client) => {
                tracing::info!(url = %redacted(url), "connected to NATS");
                return Ok(client);
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(url = %redacted(url), %err, retry_in = ?delay, "NATS is unreachable; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The URL without a password or token, for logs.
pub fn redacted(url: &str) -> String {
    url.split(',')
        .map(|one| match one.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}"),
                None => one.to_owned(),
            },
            None => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One attempt, for commands a person runs and waits for.
pub async fn connect_once(url: &str) -> anyhow::Result<async_nats::Client> {
    match options().connect(server_addrs(url)?.as_slice()).await {
        Ok(client) => Ok(client),
        Err(err) => bail!(
            "NATS at {url} is unreachable: {err}. Is `ordo up` running? (or set ORDO_NATS_URL)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_carry_no_password() {
        assert_eq!(
            redacted("nats://ordo:s3cret@127.0.0.1:4222,nats://tok@b:4223"),
            "nats://***@127.0.0.1:4222,nats://***@b:4223"
        );
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn a_url_list_names_every_server_of_a_cluster() {
        let servers = server_addrs("nats://a:4222, nats://b:4223").unwrap();
        let ports: Vec<u16> = servers.iter().map(|server| server.port()).collect();
        assert_eq!(ports, [4222, 4223]);
        assert!(server_addrs("nats://a:4222,:::").is_err());
    }

    #[test]
    fn without_configuration_the_client_finds_the_server_ordo_up_started() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(configured_url(None, home.path()), DEFAULT_URL);
        std::fs::write(home.path().join(URL_FILE), "nats://127.0.0.1:4555\n").unwrap();
        assert_eq!(configured_url(None, home.path()), "nats://127.0.0.1:4555");
        let given = Some("nats://elsewhere:4222".to_owned());
        assert_eq!(configured_url(given, home.path()), "nats://elsewhere:4222");
    }
}
