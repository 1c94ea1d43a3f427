//! The NATS accounts, users and permissions docker/nats-accounts.conf ships, as the drill runs
//! them: the file as it is, with passwords drawn for this drill. Every component
//! connects as its own user, the load as the applications `shop` and `warehouse`, and the
//! hostile client attacks as them too, so that a drill proves the configuration users deploy.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;

use super::fleet::Component;

/// docker/nats-accounts.conf, compiled in.
const SHIPPED: &str = include_str!("../../../docker/nats-accounts.conf");

/// The users of docker/nats-accounts.conf and the variables their passwords come from.
const USERS: [(&str, &str); 9] = [
    ("ordo-operator", "ORDO_OPERATOR_NATS_PASSWORD"),
    ("ordo-admin", "ORDO_ADMIN_NATS_PASSWORD"),
    ("ordo-commands", "ORDO_COMMANDS_NATS_PASSWORD"),
    ("ordo-projector", "ORDO_PROJECTOR_NATS_PASSWORD"),
    ("ordo-saga", "ORDO_SAGA_NATS_PASSWORD"),
    ("ordo-notifier", "ORDO_NOTIFIER_NATS_PASSWORD"),
    ("ordo-api", "ORDO_API_NATS_PASSWORD"),
    ("shop", "SHOP_NATS_PASSWORD"),
    ("warehouse", "WAREHOUSE_NATS_PASSWORD"),
];

/// The application users, and the accounts the server names them by.
pub const SHOP: (&str, &str) = ("shop", "SHOP");
pub const WAREHOUSE: (&str, &str) = ("warehouse", "WAREHOUSE");
/// The operator's user: the drill creates the streams and reads everything as it.
pub const ADMIN: &str = "ordo-admin";

pub struct Accounts {
    passwords: BTreeMap<&'static str, String>,
}

impl Accounts {
    /// A password for every user, new for this drill.
    pub fn generate() -> Self {
        Self {
            passwords: USERS
                .iter()
                .map(|(user, _)| (*user, uuid::Uuid::new_v4().simple().to_string()))
                .collect(),
        }
    }

    /// The user a component runs as, as compose.yaml runs it.
    pub fn user_of(component: Component) -> &'static str {
        match component {
            Component::Commands => "ordo-commands",
            Component::Projector => "ordo-projector",
            Component::Saga => "ordo-saga",
            Component::Notifier => "ordo-notifier",
            Component::Api => "ordo-api",
        }
    }

    pub fn password(&self, user: &str) -> &str {
        &self.passwords[user]
    }

    /// The servers' configuration: the password variables, then the shipped accounts.
    pub fn server_config(&self) -> String {
        let variables: String = USERS
            .iter()
            .map(|(user, variable)| format!("{variable}: \"{}\"\n", self.passwords[user]))
            .collect();
        format!("{variables}{SHIPPED}")
    }

    /// A connection as `user`, reading the inbox the configuration gives it (ordo's own users
    /// `_INBOX_<user>`, applications `_INBOX`), that comes back quickly after a server restart.
    pub async fn connect(&self, url: &str, user: &str) -> anyhow::Result<async_nats::Client> {
        let inbox = if user.starts_with("ordo-") {
            format!("_INBOX_{user}")
        } else {
            "_INBOX".to_owned()
        };
        async_nats::ConnectOptions::with_user_and_password(
            user.to_owned(),
            self.password(user).to_owned(),
        )
        .custom_inbox_prefix(inbox)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(500)))
        .connect(ordo_app::connect::server_addrs(url)?)
        .await
        .with_context(|| format!("connecting to {url} as {user}"))
    }
}
