//! The conventions of the NATS tools, which a NATS user already has set up: the variables every
//! NATS client reads (`NATS_URL`, `NATS_CREDS`, …) and the `nats` CLI's contexts
//! (`~/.config/nats/context/<name>.json`). ordo reads them under its own settings, and `ordo up`
//! writes a context (`ordo`) for the nats-server it started, so that `nats --context ordo …`
//! reaches it from anywhere.
//!
//! Only the commands a person types read them (`ordo order …`, `ordo stock …`, the operator's
//! commands): `ordo up`, `ordo run` and `ordo chaos` read ordo's own settings alone, so that a
//! shell's NATS setup never points a running engine at another system. Precedence: ordo's flags
//! and `ORDO_NATS_*` variables, and if any of them is given nothing else; else the `NATS_*`
//! variables over the context named by `--nats-context` or `NATS_CONTEXT`; else what `ordo up`
//! recorded in its home. Credentials and TLS files are each taken whole from one place, never
//! mixed. The context the `nats` CLI has *selected* is not followed unless named.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::connect::{NatsAuth, Secret};

/// The context `ordo up` writes for the nats-server it started.
pub const CONTEXT_NAME: &str = "ordo";
/// How a context written by `ordo up` begins its description: such a context may be written
/// again; any other of that name is the user's and is left alone.
const WRITTEN_BY_UP: &str = "written by `ordo up`";

/// The fields of a `nats` CLI context that ordo uses (the CLI writes more). Empty strings, as
/// the CLI writes unset fields, count as unset.
#[derive(Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct NatsContext {
    pub description: String,
    pub url: String,
    pub user: String,
    pub password: String,
    pub token: String,
    pub creds: String,
    pub nkey: String,
    pub cert: String,
    pub key: String,
    pub ca: String,
    pub inbox_prefix: String,
}

/// Where the `nats` CLI keeps its contexts: `$XDG_CONFIG_HOME/nats/context`, else
/// `$HOME/.config/nats/context`.
pub fn contexts_dir(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let config = env("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(config.join("nats").join("context"))
}

/// The context `name` (or the file, when `name` is a path to a `.json` file).
pub fn read_context(
    name: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<NatsContext> {
    let file = if name.ends_with(".json") || name.contains('/') {
        PathBuf::from(name)
    } else {
        contexts_dir(env)
            .context("neither XDG_CONFIG_HOME nor HOME is set: cannot find the nats contexts")?
            .join(format!("{name}.json"))
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("NATS context {name:?}: cannot read {}", file.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("NATS context {name:?}: {} is not a context", file.display()))
}

fn set(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Whether `auth` names any way to authenticate (or part of one).
fn names_credentials(auth: &NatsAuth) -> bool {
    auth.nats_user.is_some()
        || auth.nats_password.is_some()
        || auth.nats_token.is_some()
        || auth.nats_nkey_file.is_some()
        || auth.nats_creds.is_some()
}

/// Whether any of ordo's own NATS settings (flags, `ORDO_NATS_*`) is given.
fn ordo_configures_nats(nats_url: &Option<String>, auth: &NatsAuth) -> bool {
    nats_url.is_some()
        || names_credentials(auth)
        || auth.nats_ca.is_some()
        || auth.nats_cert.is_some()
        || auth.nats_key.is_some()
        || auth.nats_inbox_prefix.is_some()
}

/// When none of ordo's own NATS settings is given, takes them from the `NATS_*` variables and
/// from the context named by `context` (see the module's precedence); with any of ordo's given,
/// takes nothing, so that a deployment's settings are never mixed with a shell's. `env` reads
/// the environment (a map in tests).
pub fn fill_in(
    nats_url: &mut Option<String>,
    auth: &mut NatsAuth,
    context: Option<&str>,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let context = context.filter(|name| !name.is_empty());
    if ordo_configures_nats(nats_url, auth) {
        if let Some(name) = context {
            anyhow::bail!(
                "the NATS context {name:?} is named (--nats-context or NATS_CONTEXT) while ordo's \
                 own NATS settings (--nats-*, ORDO_NATS_*) are given too: ordo takes one or the \
                 other, never a mix; drop one"
            );
        }
        return Ok(());
    }
    let var = |name: &str| env(name).filter(|value| !value.is_empty());
    let context = context
        .map(|name| read_context(name, env))
        .transpose()?
        .unwrap_or_default();

    *nats_url = var("NATS_URL").or(set(context.url));
    // Credentials come whole from the variables, else whole from the context; none when the URL
    // carries some (`nats://user:password@host`).
    let url_has_credentials = nats_url
        .as_deref()
        .is_some_and(crate::connect::url_names_credentials);
    let from_vars = NatsAuth {
        nats_user: var("NATS_USER"),
        nats_password: var("NATS_PASSWORD").map(Secret::from),
        nats_creds: var("NATS_CREDS").map(PathBuf::from),
        nats_nkey_file: var("NATS_NKEY").map(PathBuf::from),
        ..NatsAuth::default()
    };
    let from_context = NatsAuth {
        nats_user: set(context.user),
        nats_password: set(context.password).map(Secret::from),
        nats_token: set(context.token).map(Secret::from),
        nats_creds: set(context.creds).map(PathBuf::from),
        nats_nkey_file: set(context.nkey).map(PathBuf::from),
        ..NatsAuth::default()
    };
    let (chosen, inbox_prefix) = if url_has_credentials {
        (NatsAuth::default(), None)
    } else if names_credentials(&from_vars) {
        (from_vars, None)
    } else {
        // The context's inbox prefix goes with the context's user.
        let prefix = names_credentials(&from_context)
            .then(|| set(context.inbox_prefix))
            .flatten();
        (from_context, prefix)
    };
    auth.nats_user = chosen.nats_user;
    auth.nats_password = chosen.nats_password;
    auth.nats_token = chosen.nats_token;
    auth.nats_creds = chosen.nats_creds;
    auth.nats_nkey_file = chosen.nats_nkey_file;
    auth.nats_inbox_prefix = inbox_prefix;
    // TLS files whole from the variables, else whole from the context.
    let from_vars = (
        var("NATS_CA").map(PathBuf::from),
        var("NATS_CERT").map(PathBuf::from),
        var("NATS_KEY").map(PathBuf::from),
    );
    (auth.nats_ca, auth.nats_cert, auth.nats_key) = if from_vars != (None, None, None) {
        from_vars
    } else {
        (
            set(context.ca).map(PathBuf::from),
            set(context.cert).map(PathBuf::from),
            set(context.key).map(PathBuf::from),
        )
    };
    // The same checks as the flags': a user without a password, a certificate without its key.
    if auth.nats_user.is_some() != auth.nats_password.is_some() {
        anyhow::bail!(
            "a NATS user needs its password, and a password its user (NATS_USER and \
             NATS_PASSWORD, or the context's user and password)"
        );
    }
    if auth.nats_cert.is_some() != auth.nats_key.is_some() {
        anyhow::bail!(
            "a NATS client certificate needs its key, and a key its certificate (NATS_CERT and \
             NATS_KEY, or the context's cert and key)"
        );
    }
    Ok(())
}

/// Writes the context [`CONTEXT_NAME`] for the nats-server `ordo up` runs at `url`, unless a
/// context of that name that `ordo up` did not write exists (the user's own). Returns the file
/// written, or why not.
pub fn write_up_context(
    url: &str,
    home: &Path,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<PathBuf, String> {
    let dir = contexts_dir(env).ok_or("neither XDG_CONFIG_HOME nor HOME is set")?;
    let file = dir.join(format!("{CONTEXT_NAME}.json"));
    if let Ok(text) = std::fs::read_to_string(&file) {
        let theirs = serde_json::from_str::<NatsContext>(&text).map_or(true, |context| {
            !context.description.starts_with(WRITTEN_BY_UP)
        });
        if theirs {
            return Err(format!(
                "{} exists and was not written by `ordo up`: left as it is",
                file.display()
            ));
        }
    }
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_owned());
    let context = NatsContext {
        description: format!(
            "{WRITTEN_BY_UP} for its nats-server (data in {})",
            home.display()
        ),
        url: url.to_owned(),
        ..NatsContext::default()
    };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let text = serde_json::to_string_pretty(&context).map_err(std::io::Error::other)?;
        std::fs::write(&file, text)
    };
    write().map_err(|err| format!("{}: {err}", file.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn write_context(config: &Path, name: &str, json: serde_json::Value) {
        let dir = config.join("nats").join("context");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.json")), json.to_string()).unwrap();
    }

    #[test]
    fn the_nats_variables_win_over_the_named_context_and_each_group_comes_from_one_place() {
        let config = tempfile::tempdir().unwrap();
        write_context(
            config.path(),
            "prod",
            serde_json::json!({"url": "nats://context:4222", "creds": "/context.creds", "ca": "/context-ca.pem", "inbox_prefix": "_INBOX_ctx"}),
        );
        let config_dir = config.path().to_str().unwrap();

        // The variables give the URL and the credentials; the context what they leave unset
        // (its TLS files), but not its inbox prefix, which goes with its own user.
        let env = env_of(&[
            ("XDG_CONFIG_HOME", config_dir),
            ("NATS_URL", "nats://variable:4222"),
            ("NATS_CREDS", "/variable.creds"),
        ]);
        let (mut url, mut auth) = (None, NatsAuth::default());
        fill_in(&mut url, &mut auth, Some("prod"), &env).unwrap();
        assert_eq!(url.as_deref(), Some("nats://variable:4222"));
        assert_eq!(auth.nats_creds, Some(PathBuf::from("/variable.creds")));
        assert_eq!(auth.nats_ca, Some(PathBuf::from("/context-ca.pem")));
        assert_eq!(auth.nats_inbox_prefix, None);

        // Only the context: all of it, its inbox prefix with its credentials.
        let env = env_of(&[("XDG_CONFIG_HOME", config_dir)]);
        let (mut url, mut auth) = (None, NatsAuth::default());
        fill_in(&mut url, &mut auth, Some("prod"), &env).unwrap();
        assert_eq!(url.as_deref(), Some("nats://context:4222"));
        assert_eq!(auth.nats_creds, Some(PathBuf::from("/context.creds")));
        assert_eq!(auth.nats_inbox_prefix.as_deref(), Some("_INBOX_ctx"));

        // No context named (or an empty name): the selected one is not followed.
        for named in [None, Some("")] {
            let (mut url, mut auth) = (None, NatsAuth::default());
            fill_in(&mut url, &mut auth, named, &env).unwrap();
            assert_eq!(url, None);
            assert_eq!(auth.nats_creds, None);
        }
    }

    /// A deployment's settings are never mixed with a shell's: any one of ordo's own NATS
    /// settings, and nothing is taken from the variables or a context.
    #[test]
    fn any_of_ordos_own_nats_settings_and_nothing_else_is_taken() {
        let config = tempfile::tempdir().unwrap();
        write_context(
            config.path(),
            "prod",
            serde_json::json!({"url": "nats://context:4222", "creds": "/context.creds"}),
        );
        let env = env_of(&[
            ("XDG_CONFIG_HOME", config.path().to_str().unwrap()),
            ("NATS_URL", "nats://variable:4222"),
            ("NATS_USER", "someone"),
            ("NATS_PASSWORD", "theirs"),
            ("NATS_CA", "/variable-ca.pem"),
        ]);
        let ordos = [
            (Some("nats://ordo:4222".to_owned()), NatsAuth::default()),
            (
                None,
                NatsAuth {
                    nats_user: Some("ordo-commands".into()),
                    nats_password: Some(Secret::from("ours".to_owned())),
                    ..NatsAuth::default()
                },
            ),
            (
                None,
                NatsAuth {
                    nats_password: Some(Secret::from("ours".to_owned())),
                    ..NatsAuth::default()
                },
            ),
            (
                None,
                NatsAuth {
                    nats_cert: Some("/ours.pem".into()),
                    nats_key: Some("/ours.key".into()),
                    ..NatsAuth::default()
                },
            ),
        ];
        for (url, auth) in ordos {
            let (mut filled_url, mut filled) = (url.clone(), auth.clone());
            fill_in(&mut filled_url, &mut filled, None, &env).unwrap();
            assert_eq!(filled_url, url);
            assert_eq!(format!("{filled:?}"), format!("{auth:?}"));
            // Naming a context as well is a contradiction, said at once.
            let err = fill_in(&mut filled_url, &mut filled, Some("prod"), &env).unwrap_err();
            assert!(err.to_string().contains("never a mix"), "{err}");
        }
    }

    #[test]
    fn a_url_with_credentials_takes_none_from_the_variables() {
        let env = env_of(&[
            ("NATS_URL", "nats://me:secret@host:4222"),
            ("NATS_CREDS", "/x.creds"),
        ]);
        let (mut url, mut auth) = (None, NatsAuth::default());
        fill_in(&mut url, &mut auth, None, &env).unwrap();
        assert_eq!(auth.nats_creds, None);
    }

    #[test]
    fn a_context_that_is_missing_or_half_set_is_a_clear_error() {
        let config = tempfile::tempdir().unwrap();
        let env = env_of(&[("XDG_CONFIG_HOME", config.path().to_str().unwrap())]);
        let err = fill_in(&mut None, &mut NatsAuth::default(), Some("nowhere"), &env).unwrap_err();
        assert!(
            format!("{err:#}").contains("NATS context \"nowhere\""),
            "{err:#}"
        );

        write_context(config.path(), "half", serde_json::json!({"user": "me"}));
        let err = fill_in(&mut None, &mut NatsAuth::default(), Some("half"), &env).unwrap_err();
        assert!(err.to_string().contains("needs its password"), "{err}");
    }

    #[test]
    fn ordo_up_writes_its_context_and_leaves_a_users_own_of_the_same_name_alone() {
        let config = tempfile::tempdir().unwrap();
        let env = env_of(&[("XDG_CONFIG_HOME", config.path().to_str().unwrap())]);
        let file = write_up_context("nats://127.0.0.1:4333", Path::new(".ordo"), &env).unwrap();
        let written = read_context(CONTEXT_NAME, &env).unwrap();
        assert_eq!(written.url, "nats://127.0.0.1:4333");
        // Its own context is written again with the next server's URL.
        write_up_context("nats://127.0.0.1:4444", Path::new(".ordo"), &env).unwrap();
        assert_eq!(
            read_context(CONTEXT_NAME, &env).unwrap().url,
            "nats://127.0.0.1:4444"
        );

        std::fs::write(
            &file,
            r#"{"description": "my prod", "url": "nats://prod:4222"}"#,
        )
        .unwrap();
        let refused = write_up_context("nats://127.0.0.1:4555", Path::new(".ordo"), &env);
        assert!(refused.unwrap_err().contains("not written by `ordo up`"));
        assert_eq!(
            read_context(CONTEXT_NAME, &env).unwrap().url,
            "nats://prod:4222"
        );
    }
}
