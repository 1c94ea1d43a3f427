//! Stream definitions as data (`streams/*.json`, JetStream's own config JSON) and their idempotent
//! application: create what is missing, update what differs, leave the rest alone.

use std::path::Path;

use async_nats::jetstream::{self, stream};
use serde_json::Value;

/// Every JetStream stream of ordo: the one list that the definitions, the event store, the
/// projections and the tools take stream names from. A new stream is a new variant here (and its
/// definition in streams/); the compiler then asks for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    /// Order events, `ordo.order.events.<order id>`.
    Orders,
    /// Stock events, `ordo.stock.events.<sku>`.
    Stock,
    /// The first outcome of each command id (see ordo-commands' `outcomes`).
    CommandOutcomes,
    /// The latest state snapshot of each aggregate: a cache, not a log.
    Snapshots,
}

impl StreamId {
    /// In the order they are applied.
    pub const ALL: [StreamId; 4] = [
        Self::Orders,
        Self::Stock,
        Self::CommandOutcomes,
        Self::Snapshots,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Orders => "ORDO_ORDERS",
            Self::Stock => "ORDO_STOCK",
            Self::CommandOutcomes => "ORDO_COMMAND_OUTCOMES",
            Self::Snapshots => "ORDO_SNAPSHOTS",
        }
    }

    /// The subjects it stores, as its definition names them.
    pub const fn subjects(self) -> &'static str {
        match self {
            Self::Orders => "ordo.order.events.*",
            Self::Stock => "ordo.stock.events.*",
            Self::CommandOutcomes => "ordo.outcomes.*",
            Self::Snapshots => "ordo.snapshots.*.*",
        }
    }

    /// The stream of an aggregate category's events (`order`, `stock`), if it is one.
    pub fn of_category(category: &str) -> Option<StreamId> {
        match category {
            "order" => Some(Self::Orders),
            "stock" => Some(Self::Stock),
            _ => None,
        }
    }

    /// The built-in definition, compiled in from streams/: its file name and JSON.
    fn built_in(self) -> (&'static str, &'static str) {
        match self {
            Self::Orders => ("orders.json", include_str!("../../../streams/orders.json")),
            Self::Stock => ("stock.json", include_str!("../../../streams/stock.json")),
            Self::CommandOutcomes => (
                "command-outcomes.json",
                include_str!("../../../streams/command-outcomes.json"),
            ),
            Self::Snapshots => (
                "snapshots.json",
                include_str!("../../../streams/snapshots.json"),
            ),
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error("stream definition {file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("cannot read stream definitions from {dir}: {source}")]
    Read { dir: String, source: std::io::Error },
    #[error("JetStream did not accept stream {stream}: {reason}")]
    JetStream { stream: String, reason: String },
}

/// One stream as its file defines it. `fields` keeps the JSON as written, so that `apply` compares
/// only what the file says (the server fills in defaults for the rest).
#[derive(Debug, Clone)]
pub struct StreamDefinition {
    pub file: String,
    pub config: stream::Config,
    fields: serde_json::Map<String, Value>,
}

/// What `ensure` found of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Matches,
    /// The running stream differs from its definition in these fields; it was left as it is.
    Differs(Vec<String>),
}

/// What `apply` did to one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        })
    }
}

impl StreamDefinition {
    pub fn parse(file: &str, json: &str) -> Result<Self, StreamsError> {
        let invalid = |reason: String| StreamsError::Invalid {
            file: file.to_owned(),
            reason,
        };
        let fields = match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => return Err(invalid("must be a JSON object".into())),
            Err(err) => return Err(invalid(err.to_string())),
        };
        let config: stream::Config = serde_json::from_value(Value::Object(fields.clone()))
            .map_err(|err| invalid(err.to_string()))?;
        if config.name.is_empty() {
            return Err(invalid("needs a name".into()));
        }
        Ok(Self {
            file: file.to_owned(),
            config,
            fields,
        })
    }

    /// The definitions of `streams/`, as compiled into this binary.
    pub fn built_in() -> Vec<Self> {
        StreamId::ALL
            .iter()
            .map(|stream| {
                let (file, json) = stream.built_in();
                let definition =
                    Self::parse(file, json).expect("built-in stream definitions parse");
                assert_eq!(definition.config.name, stream.name(), "streams/{file}");
                definition
            })
            .collect()
    }

    /// The `*.json` files of a directory, in file-name order.
    pub fn from_dir(dir: &Path) -> Result<Vec<Self>, StreamsError> {
        let read_err = |source| StreamsError::Read {
            dir: dir.display().to_string(),
            source,
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|path| {
                let json = std::fs::read_to_string(path).map_err(read_err)?;
                Self::parse(&path.display().to_string(), &json)
            })
            .collect()
    }

    /// The fields of the file that the live configuration does not match. Both sides go through
    /// the same serializer, so a field at its default (which it leaves out) compares equal.
    fn differences(&self, live: &stream::Config) -> Vec<String> {
        let wanted = serde_json::to_value(&self.config).unwrap_or(Value::Null);
        let live = serde_json::to_value(live).unwrap_or(Value::Null);
        self.fields
            .keys()
            .filter(|key| wanted.get(key.as_str()) != live.get(key.as_str()))
            .cloned()
            .collect()
    }

    /// The same definition with `replicas` replicas (a cluster's setting, not the file's).
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.config.num_replicas = replicas;
        self.fields
            .insert("num_replicas".into(), Value::from(replicas as u64));
        self
    }

    /// How the running stream differs from this definition: `None` when it does not exist.
    pub async fn drift(
        &self,
        js: &jetstream::Context,
    ) -> Result<Option<Vec<String>>, StreamsError> {
        match js.get_stream(&self.config.name).await {
            Ok(mut live) => {
                let info = live.info().await.map_err(|err| self.failed(err))?;
                Ok(Some(self.differences(&info.config)))
            }
            Err(err) if is_stream_not_found(&err) => Ok(None),
            Err(err) => Err(self.failed(err)),
        }
    }

    /// Creates the stream if it is missing; never changes a running one, only says how it
    /// differs. What every component does at start-up: a stream's settings change only through
    /// `ordo streams apply`, so that one component cannot undo an operator's choice (a stream at
    /// 3 replicas reset to 1 by a process started with the defaults).
    pub async fn ensure(&self, js: &jetstream::Context) -> Result<Ensured, StreamsError> {
        match self.drift(js).await? {
            Some(differences) if differences.is_empty() => Ok(Ensured::Matches),
            Some(differences) => Ok(Ensured::Differs(differences)),
            None => {
                self.create(js).await?;
                Ok(Ensured::Created)
            }
        }
    }

    /// Creates the stream if it is missing, updates it if a field of the file differs.
    pub async fn apply(&self, js: &jetstream::Context) -> Result<Applied, StreamsError> {
        match self.drift(js).await? {
            Some(differences) if differences.is_empty() => Ok(Applied::Unchanged),
            Some(differences) => {
                tracing::info!(stream = %self.config.name, ?differences, "updating stream");
                js.update_stream(&self.config)
                    .await
                    .map_err(|err| self.failed(err))?;
                Ok(Applied::Updated)
            }
            None => {
                self.create(js).await?;
                Ok(Applied::Created)
            }
        }
    }

    async fn create(&self, js: &jetstream::Context) -> Result<(), StreamsError> {
        js.create_stream(self.config.clone())
            .await
            .map_err(|err| self.failed(err))?;
        tracing::info!(stream = %self.config.name, "created stream");
        Ok(())
    }

    fn failed(&self, err: impl std::fmt::Display) -> StreamsError {
        StreamsError::JetStream {
            stream: self.config.name.clone(),
            reason: err.to_string(),
        }
    }
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(js_err)
            if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Ensures every definition in order and reports what it found of each stream.
pub async fn ensure_all(
    js: &jetstream::Context,
    definitions: &[StreamDefinition],
) -> Result<Vec<(String, Ensured)>, StreamsError> {
    let mut ensured = Vec::with_capacity(definitions.len());
    for definition in definitions {
        ensured.push((definition.config.name.clone(), definition.ensure(js).await?));
    }
    Ok(ensured)
}

/// Applies every definition in order and reports what happened to each stream.
pub async fn apply_all(
    js: &jetstream::Context,
    definitions: &[StreamDefinition],
) -> Result<Vec<(String, Applied)>, StreamsError> {
    let mut applied = Vec::with_capacity(definitions.len());
    for definition in definitions {
        applied.push((definition.config.name.clone(), definition.apply(js).await?));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_holds_every_definition_in_streams_and_nothing_else() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../streams");
        let mut in_dir: Vec<String> = StreamDefinition::from_dir(&dir)
            .unwrap()
            .into_iter()
            .map(|definition| definition.config.name)
            .collect();
        in_dir.sort();
        let mut catalogued: Vec<&str> = StreamId::ALL.iter().map(|id| id.name()).collect();
        catalogued.sort();
        assert_eq!(in_dir, catalogued, "streams/*.json and StreamId::ALL");
    }

    #[test]
    fn built_in_definitions_are_durable_append_only_logs() {
        for definition in StreamDefinition::built_in() {
            let config = &definition.config;
            if config.name == StreamId::Snapshots.name() {
                // A cache, not a log: the latest snapshot per aggregate, deletable.
                assert_eq!(config.max_messages_per_subject, 1);
                assert_eq!(config.discard, stream::DiscardPolicy::Old);
                assert!(config.allow_direct);
                continue;
            }
            assert_eq!(config.storage, stream::StorageType::File, "{}", config.name);
            assert_eq!(config.retention, stream::RetentionPolicy::Limits);
            assert!(config.allow_direct && config.deny_delete, "{}", config.name);
            assert!(!config.duplicate_window.is_zero(), "{}", config.name);
        }
    }

    #[test]
    fn each_stream_names_the_subjects_of_its_definition() {
        for stream in StreamId::ALL {
            let (file, json) = stream.built_in();
            let definition = StreamDefinition::parse(file, json).unwrap();
            assert_eq!(definition.config.subjects, [stream.subjects()], "{file}");
        }
    }

    #[test]
    fn a_definition_that_is_not_a_stream_config_is_refused() {
        let err =
            StreamDefinition::parse("x.json", r#"{"name": "X", "storage": "floppy"}"#).unwrap_err();
        assert!(
            err.to_string().starts_with("stream definition x.json:"),
            "{err}"
        );
        assert!(StreamDefinition::parse("y.json", "[]").is_err());
    }
}
