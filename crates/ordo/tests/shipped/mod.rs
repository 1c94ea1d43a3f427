//! The NATS configuration docker/ ships, for the tests that run ordo under it: its accounts
//! (docker/nats-accounts.conf) as they are, a password for each of its users, and which user each component runs as.

use std::path::Path;

/// The users of docker/nats-accounts.conf and the variable each one's password is read from.
pub const USERS: [(&str, &str); 9] = [
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

/// The long-running components (`ordo run …`) and the user each connects as, as compose.yaml
/// runs them.
pub const COMPONENTS: [(&str, &str); 5] = [
    ("commands", "ordo-commands"),
    ("projector", "ordo-projector"),
    ("saga", "ordo-saga"),
    ("notifier", "ordo-notifier"),
    ("api", "ordo-api"),
];

/// The password this test run gives `user`.
pub fn password(user: &str) -> String {
    format!("{user}-pw-4e1d")
}

/// The inbox `user` may read: ordo's users their own, applications `_INBOX` (the default of
/// NATS clients).
pub fn inbox_prefix(user: &str) -> String {
    if user.starts_with("ordo-") {
        format!("_INBOX_{user}")
    } else {
        "_INBOX".to_owned()
    }
}

/// The password variables, then docker/nats-accounts.conf as shipped: the part of a test
/// server's configuration that says who may do what.
pub fn accounts_config() -> String {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docker/nats-accounts.conf"),
    )
    .unwrap();
    let variables: String = USERS
        .iter()
        .map(|(user, variable)| format!("{variable}: \"{}\"\n", password(user)))
        .collect();
    format!("{variables}{shipped}")
}
