//! How ordo connects to a PostgreSQL URL (its TLS on this machine).

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// How ordo connects to `url`: as the URL says, except that a connection to this machine
/// (loopback address, `localhost` or a Unix socket) that does not ask for TLS (no `sslmode` in
/// the URL, no `PGSSLMODE`) goes without it. There TLS guards nothing that the machine's own
/// users could not read anyway, and it cost a fifth of ordo's CPU under load (sqlx's default,
/// like libpq's, is `prefer`: TLS whenever the server offers it, which Debian's does).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    options_for(url, std::env::var_os("PGSSLMODE").is_some())
}

/// [`connect_options`], with `PGSSLMODE` set or not.
fn options_for(url: &str, pgsslmode_set: bool) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let asks_for_tls = pgsslmode_set
        || query.split('&').any(|pair| {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            key == "sslmode" || key == "ssl-mode"
        });
    Ok(if !asks_for_tls && is_this_machine(options.get_host()) {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    })
}

fn is_this_machine(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> PgSslMode {
        options_for(url, false).expect("a valid URL").get_ssl_mode()
    }

    #[test]
    fn a_connection_to_this_machine_goes_without_tls_unless_the_url_or_pgsslmode_asks_for_it() {
        // With PGSSLMODE set, sqlx's own reading of the URL and the environment stands.
        let url = "postgres://postgres@127.0.0.1/ordo";
        let as_sqlx_reads_it: PgConnectOptions = url.parse().unwrap();
        assert_eq!(
            format!("{:?}", options_for(url, true).unwrap().get_ssl_mode()),
            format!("{:?}", as_sqlx_reads_it.get_ssl_mode())
        );
        for url in [
            "postgres://postgres@127.0.0.1:5432/ordo",
            "postgres://postgres@localhost/ordo",
            "postgres://postgres@[::1]:5432/ordo",
            "postgres://postgres@127.0.0.2/ordo",
            "postgres:///ordo?host=/var/run/postgresql",
        ] {
            assert!(matches!(tls(url), PgSslMode::Disable), "{url}");
        }
        assert!(matches!(
            tls("postgres://postgres@127.0.0.1/ordo?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            tls("postgres://postgres@localhost/ordo?ssl-mode=verify-full"),
            PgSslMode::VerifyFull
        ));
        // Another machine: what sqlx (and libpq) would do.
        assert!(matches!(
            tls("postgres://ordo@db.example.com/ordo"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            tls("postgres://ordo@10.0.0.5/ordo"),
            PgSslMode::Prefer
        ));
    }
}
