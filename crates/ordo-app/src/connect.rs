//! Finding and connecting to NATS: the configured URL, the local defaults of `ordo up`, and a
//! first connection that waits for the server with backoff instead of failing.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use ordo_eventstore::backoff::Backoff;
use ordo_local::{MINIMUM_VERSION, NatsServer, parse_version};

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

/// `ordo up`'s NATS: the configured URL; else 127.0.0.1:4222 if a nats-server >= 2.12 with
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
            write_nats_context(DEFAULT_URL, home);
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
            write_nats_context(&url, home);
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
        "started a local nats-server; `ordo …` finds it"
    );
    write_nats_context(&url, home);
    Ok((
        url,
        Some(LocalNats {
            _server: server,
            url_file: home.join(URL_FILE),
        }),
    ))
}

/// Writes the `nats` CLI's context `ordo` for the local server `ordo up` uses at `url` (each
/// start writes it again, so it names the server in use), and says how to use it; a failure to
/// write it is only logged (the engine runs without it).
fn write_nats_context(url: &str, home: &Path) {
    match crate::nats_tools::write_up_context(url, home, &|name| std::env::var(name).ok()) {
        Ok(file) => tracing::info!(
            context = %file.display(),
            "wrote the nats CLI's context `{}`: `nats --context {} req …` reaches this server",
            crate::nats_tools::CONTEXT_NAME,
            crate::nats_tools::CONTEXT_NAME,
        ),
        Err(why) => tracing::warn!(
            %url,
            "did not write the nats CLI's context `{}` ({why}); use `nats --server {url} …`",
            crate::nats_tools::CONTEXT_NAME,
        ),
    }
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

/// Ok when a nats-server of at least [`MINIMUM_VERSION`] with JetStream answers at `url`.
async fn probe(url: &str) -> Result<(), String> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(500))
        .connect(url)
        .await
        .map_err(|err| format!("nothing answers: {err}"))?;
    let version = client.server_info().version;
    match parse_version(&version) {
        Some(found) if found >= MINIMUM_VERSION => {}
        _ => {
            let (major, minor) = MINIMUM_VERSION;
            return Err(format!(
                "nats-server {version} is older than {major}.{minor}"
            ));
        }
    }
    let js = async_nats::jetstream::new(client);
    tokio::time::timeout(Duration::from_secs(2), js.query_account())
        .await
        .map_err(|_| "JetStream does not answer".to_owned())?
        .map_err(|err| format!("JetStream is not enabled: {err}"))?;
    Ok(())
}

/// The servers of a URL list: `nats://a:4222,nats://b:4222` names a cluster. Credentials in
/// the URL are left out: [`NatsAuth::options`] passes them, and the client logs the addresses it
/// is given (at debug level, password included).
pub fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(|one| {
            let addr = one
                .trim()
                .parse::<async_nats::ServerAddr>()
                .with_context(|| format!("{:?} is not a NATS URL", redacted(one)))?;
            let mut without_credentials = addr.into_inner();
            let _ = without_credentials.set_password(None);
            let _ = without_credentials.set_username("");
            async_nats::ServerAddr::from_url(without_credentials)
                .with_context(|| format!("{:?} is not a NATS URL", redacted(one)))
        })
        .collect()
}

/// A password, token or other secret: never printed, not even by `{:?}`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

/// How every ordo process authenticates to NATS and secures the connection. A user and
/// password (`nats://user:password@host`) or a token (`nats://token@host`) in the URL work too.
/// Secrets are read from the environment or files, never logged, and hidden from `--help`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NatsAuth {
    /// NATS user name (with --nats-password).
    #[arg(
        long,
        env = "ORDO_NATS_USER",
        global = true,
        requires = "nats_password"
    )]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(
        long,
        env = "ORDO_NATS_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub nats_password: Option<Secret>,
    /// NATS token.
    #[arg(long, env = "ORDO_NATS_TOKEN", hide_env_values = true, global = true)]
    pub nats_token: Option<Secret>,
    /// A file holding an nkey seed (`SU…`), for a server that knows the user by its public key.
    #[arg(long, env = "ORDO_NATS_NKEY_FILE", global = true)]
    pub nats_nkey_file: Option<PathBuf>,
    /// A credentials file (a user JWT and its nkey seed, as `nsc` writes them).
    #[arg(long, env = "ORDO_NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the server's: turns TLS on and trusts only it.
    #[arg(long, env = "ORDO_NATS_CA", global = true)]
    pub nats_ca: Option<PathBuf>,
    /// A client certificate (PEM), for a server that verifies its clients (with --nats-key).
    #[arg(long, env = "ORDO_NATS_CERT", global = true, requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "ORDO_NATS_KEY", global = true, requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// The prefix of this process's reply subjects (its inbox): replies, pull-consumer
    /// deliveries and direct gets come back under it. Unset: `_INBOX_<user>` when a NATS user
    /// is configured, so that a server can let each user read its own inbox only
    /// (docker/nats-accounts.conf), else `_INBOX`.
    #[arg(long, env = "ORDO_NATS_INBOX_PREFIX", global = true, value_parser = inbox_prefix)]
    pub nats_inbox_prefix: Option<String>,
}

/// An inbox prefix: subject tokens without wildcards or spaces.
fn inbox_prefix(text: &str) -> Result<String, String> {
    let valid_token = |token: &str| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>' && b != b'.')
    };
    if text.split('.').all(valid_token) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not an inbox prefix: use subject tokens without wildcards or spaces"
        ))
    }
}

/// Credentials written into a URL: `user:password@` or `token@`.
#[derive(Debug, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// Whether a server of `url` carries credentials (`user:password@` or `token@`).
pub fn url_names_credentials(url: &str) -> bool {
    url_credentials(url).is_some()
}

/// The credentials of the first server in `url` that names some (percent-decoded).
fn url_credentials(url: &str) -> Option<UrlCredentials> {
    url.split(',').find_map(|one| {
        let addr: async_nats::ServerAddr = one.trim().parse().ok()?;
        let user = addr.username()?;
        // URLs carry a password's reserved characters as `%XX` escapes.
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8_lossy()
                .into_owned()
        };
        Some(match addr.password() {
            Some(password) => UrlCredentials::UserPassword(decode(user), decode(password)),
            None => UrlCredentials::Token(decode(user)),
        })
    })
}

impl NatsAuth {
    /// The connect options for `url`: ordo's own settings plus the one way to authenticate
    /// that is configured (more than one is an error), and TLS when asked for.
    pub async fn options(&self, url: &str) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut options = base_options();
        let from_url = url_credentials(url);
        let configured = [
            self.nats_user.is_some(),
            self.nats_token.is_some(),
            self.nats_nkey_file.is_some(),
            self.nats_creds.is_some(),
            from_url.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if configured > 1 {
            bail!(
                "more than one way to authenticate to NATS is configured (a user and password, a \
                 token, an nkey, a credentials file, or credentials in the URL): keep one"
            );
        }
        let user = match (&self.nats_user, &from_url) {
            (Some(user), _) => Some(user.clone()),
            (None, Some(UrlCredentials::UserPassword(user, _))) => Some(user.clone()),
            _ => None,
        };
        let prefix = match (&self.nats_inbox_prefix, user) {
            (Some(prefix), _) => prefix.clone(),
            (None, Some(user)) => format!("_INBOX_{user}"),
            (None, None) => "_INBOX".to_owned(),
        };
        inbox_prefix(&prefix).map_err(anyhow::Error::msg)?;
        options = options.custom_inbox_prefix(prefix);
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        } else if let Some(token) = &self.nats_token {
            options = options.token(token.expose().to_owned());
        } else if let Some(file) = &self.nats_nkey_file {
            let seed = std::fs::read_to_string(file)
                .with_context(|| format!("reading the nkey seed file {}", file.display()))?;
            options = options.nkey(seed.trim().to_owned());
        } else if let Some(file) = &self.nats_creds {
            options = options
                .credentials_file(file)
                .await
                .with_context(|| format!("reading the NATS credentials file {}", file.display()))?;
        } else if let Some(credentials) = from_url {
            options = match credentials {
                UrlCredentials::UserPassword(user, password) => {
                    options.user_and_password(user, password)
                }
                UrlCredentials::Token(token) => options.token(token),
            };
        }
        let tls_url = url.split(',').any(|one| one.trim().starts_with("tls://"));
        if let Some(ca) = &self.nats_ca {
            ensure_readable(ca, "--nats-ca")?;
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        } else if tls_url {
            options = options.require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.nats_cert, &self.nats_key) {
            ensure_readable(cert, "--nats-cert")?;
            ensure_readable(key, "--nats-key")?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }
}

/// A clear error now rather than a TLS failure later.
fn ensure_readable(path: &Path, flag: &str) -> anyhow::Result<()> {
    std::fs::metadata(path)
        .map(|_| ())
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))
}

/// Whether connecting again could help: not when the server refused who we are or the TLS
/// handshake failed, which only a change of configuration fixes.
fn worth_retrying(err: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind::*;
    match err.kind() {
        Authentication | AuthorizationViolation | Tls | ServerParse => false,
        Io => !tls_refused(err),
        _ => true,
    }
}

/// A handshake that TLS itself ended: the server sent an alert (it wants a client certificate,
/// or rejects ours) or ours rejected the server's certificate. async-nats reports both as I/O.
fn tls_refused(err: &async_nats::ConnectError) -> bool {
    let text = err.to_string();
    text.contains("fatal alert") || text.contains("invalid peer certificate")
}

/// What to tell the operator about a connection the server will not accept.
fn refused(url: &str, err: &async_nats::ConnectError) -> anyhow::Error {
    let tls = matches!(err.kind(), async_nats::ConnectErrorKind::Tls) || tls_refused(err);
    let hint = if tls {
        "the TLS handshake failed: check --nats-ca (the CA that signed the server's \
         certificate), --nats-cert and --nats-key (a server that verifies clients needs them), \
         and that the URL names the host the certificate was issued for"
    } else if matches!(err.kind(), async_nats::ConnectErrorKind::ServerParse) {
        "the URL is not a NATS URL"
    } else {
        "the server refused the credentials: check ORDO_NATS_USER and ORDO_NATS_PASSWORD, \
         ORDO_NATS_TOKEN, ORDO_NATS_NKEY_FILE or ORDO_NATS_CREDS (or the credentials in the URL)"
    };
    anyhow::anyhow!(
        "NATS at {} does not accept this connection ({err}): {hint}. Not retrying.",
        redacted(url)
    )
}

fn base_options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name(concat!("ordo ", env!("CARGO_PKG_VERSION")))
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the NATS connection; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connection up"),
                // A permissions violation among them: the server's configuration does not let
                // this user do what this process needs (or a caller tried what it may not).
                async_nats::Event::ServerError(err) => {
                    tracing::warn!(%err, "the NATS server refused something this process sent")
                }
                other => tracing::info!(event = %other, "NATS"),
            }
        })
}

/// The longest pause between two attempts to reconnect (to one of the servers known; a server
/// that does not answer at all adds the connection timeout).
const RECONNECT_AT_MOST: Duration = Duration::from_secs(1);
/// The longest pause between two attempts to connect at start-up. A process started while
/// nats-server is down (restarted by its supervisor, or starting a member a drill killed) finds
/// it this late at most (with 30 s, a 20 s outage could make it more than 10 s).
const CONNECT_AT_MOST: Duration = Duration::from_secs(2);

/// How long the client waits before its `attempts`-th attempt to reconnect: none for the first,
/// then doubling from 2 ms up to a second, plus up to a fifth more at random so that a fleet
/// does not knock at once. async-nats's own pauses grow to 4 s: after a nats-server restart a
/// process could then find the server back 4 s late, and the partitions it holds or would take
/// over stay unserved that long (a 300 s drill read 5.0 s, 5 s allowed, after a 20 s outage).
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(20);
    let delay = Duration::from_millis(1 << exponent).min(RECONNECT_AT_MOST);
    delay + delay.mul_f64(rand::random_range(0.0..0.2))
}

/// Connects, waiting for the server with exponential backoff (capped at [`CONNECT_AT_MOST`]) and
/// saying so.
/// Once connected, the client reconnects by itself whenever the connection drops. A server
/// that refuses the credentials or the TLS handshake is an error at once: retrying would only
/// repeat the refusal (and lock an account that counts failures).
pub async fn connect_with_backoff(
    url: &str,
    auth: &NatsAuth,
) -> anyhow::Result<async_nats::Client> {
    let servers = server_addrs(url)?;
    let mut backoff = Backoff::new(Duration::from_millis(250), CONNECT_AT_MOST);
    loop {
        match auth.options(url).await?.connect(servers.as_slice()).await {
            Ok(client) => {
                tracing::info!(url = %redacted(url), "connected to NATS");
                return Ok(client);
            }
            Err(err) if !worth_retrying(&err) => return Err(refused(url, &err)),
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
pub async fn connect_once(url: &str, auth: &NatsAuth) -> anyhow::Result<async_nats::Client> {
    match auth
        .options(url)
        .await?
        .connect(server_addrs(url)?.as_slice())
        .await
    {
        Ok(client) => Ok(client),
        Err(err) if !worth_retrying(&err) => Err(refused(url, &err)),
        Err(err) => bail!(
            "NATS at {} is unreachable: {err}. Is `ordo up` running? (or set ORDO_NATS_URL)",
            redacted(url)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_tried_again_at_once_then_at_least_every_1_2_seconds() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert!(reconnect_delay(2) < Duration::from_millis(3));
        for attempts in [11, 12, 40, usize::MAX] {
            let delay = reconnect_delay(attempts);
            assert!(
                (RECONNECT_AT_MOST..=RECONNECT_AT_MOST.mul_f64(1.2)).contains(&delay),
                "attempt {attempts}: {delay:?}"
            );
        }
    }

    #[test]
    fn credentials_in_the_url_are_found_and_decoded() {
        assert_eq!(
            url_credentials("nats://a:4222,nats://ordo:p%40ss@b:4222"),
            Some(UrlCredentials::UserPassword("ordo".into(), "p@ss".into()))
        );
        assert_eq!(
            url_credentials("nats://s3cr3t@a:4222"),
            Some(UrlCredentials::Token("s3cr3t".into()))
        );
        assert_eq!(url_credentials("nats://a:4222"), None);
    }

    #[tokio::test]
    async fn two_ways_to_authenticate_are_refused_before_connecting() {
        let auth = NatsAuth {
            nats_token: Some("t".parse().unwrap()),
            ..Default::default()
        };
        let err = auth.options("nats://u:p@a:4222").await.unwrap_err();
        assert!(err.to_string().contains("keep one"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let auth = NatsAuth {
            nats_user: Some("ordo".into()),
            nats_password: Some("hunter2".parse().unwrap()),
            nats_token: Some("tok3n".parse().unwrap()),
            ..Default::default()
        };
        let printed = format!("{auth:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("tok3n"),
            "{printed}"
        );
    }

    #[test]
    fn the_client_is_given_addresses_without_credentials() {
        let addrs = server_addrs("nats://a:4222,nats://ordo:s3cret@b:4222").unwrap();
        let printed = format!("{addrs:?}");
        assert!(
            !printed.contains("s3cret") && !printed.contains("ordo"),
            "{printed}"
        );
        assert_eq!(addrs[1].host(), "b");
    }

    #[test]
    fn an_inbox_prefix_is_subject_tokens_without_wildcards() {
        assert!(inbox_prefix("_INBOX_ordo-saga").is_ok());
        assert!(inbox_prefix("_INBOX.>").is_err() && inbox_prefix("a b").is_err());
    }

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
