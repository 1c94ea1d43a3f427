//! A PostgreSQL database owned by one test or one drill: created empty, dropped afterwards.

use sqlx::{AssertSqlSafe, ConnectOptions, Executor, PgPool, postgres::PgPoolOptions};

use crate::connect_options;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
    pool: PgPool,
}

impl TestDatabase {
    /// Creates `ordo_test_<uuid>` on the server of `ORDO_TEST_DATABASE_URL`.
    pub async fn create() -> Self {
        let admin_url =
            std::env::var("ORDO_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        Self::create_on(&admin_url).await
    }

    /// Creates `ordo_test_<uuid>` on the server of `admin_url`.
    pub async fn create_on(admin_url: &str) -> Self {
        let admin_url = admin_url.to_owned();
        let name = format!("ordo_test_{}", uuid::Uuid::new_v4().simple());
        let admin = async { connect_options(&admin_url)?.connect().await };
        let mut admin = admin.await.unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {admin_url}: {err}. Run `scripts/test`, which starts one, \
                 or set ORDO_TEST_DATABASE_URL"
            )
        });
        admin
            .execute(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create the test database");
        let url = with_database(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            // Like ordo's own pools: a database that is down is an error in seconds, not 30.
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect_with(connect_options(&url).expect("a valid URL"))
            .await
            .expect("connect to the test database");
        Self {
            admin_url,
            name,
            url,
            pool,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee, so the clean-up gets a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = async { connect_options(&admin_url)?.connect().await };
                let mut admin = admin.await.map_err(std::io::Error::other)?;
                admin
                    .execute(AssertSqlSafe(format!(
                        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                    )))
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            })
        })
        .join();
    }
}

/// The same server URL with another database name.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = match base.rfind('/') {
        Some(slash) if slash > base.find("//").map_or(0, |i| i + 1) => &base[..slash],
        _ => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }

    #[tokio::test]
    async fn each_test_gets_an_empty_database_of_its_own() {
        let first = TestDatabase::create().await;
        let second = TestDatabase::create().await;
        assert_ne!(first.name(), second.name());
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(first.pool())
        .await
        .unwrap();
        assert_eq!(tables, 0);
        let name = first.name().to_owned();
        drop(first);
        let exists: bool =
            sqlx::query_scalar("SELECT exists(SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(second.pool())
                .await
                .unwrap();
        assert!(!exists, "a dropped test database is gone");
    }
}
