//! Every projection of ordo as one list. Running a projector, rebuilding a view, preparing the
//! views and reporting on them all go through [`View`]: a new projection is its module plus a
//! variant here, and the compiler points at each `match` below that must learn it.

use async_nats::jetstream;
use sqlx::PgPool;

use crate::{
    Projector, ProjectorConfig,
    orders::OrdersView,
    rebuild::{Progress, Rebuilt, rebuild},
    runtime::ProjectorError,
    schema::{self, ProjectionInfo},
    stock::StockView,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Orders,
    Stock,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no projection named {name:?} (there are: {known})")]
pub struct UnknownView {
    name: String,
    known: String,
}

impl View {
    pub const ALL: [View; 2] = [Self::Orders, Self::Stock];

    /// Its name, stream and schema.
    pub fn info(self) -> ProjectionInfo {
        match self {
            Self::Orders => ProjectionInfo::of::<OrdersView>(),
            Self::Stock => ProjectionInfo::of::<StockView>(),
        }
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Runs this view's projector until `shutdown` completes.
    pub async fn run_projector(
        self,
        pool: PgPool,
        js: jetstream::Context,
        config: ProjectorConfig,
        shutdown: impl Future<Output = ()>,
    ) {
        match self {
            Self::Orders => {
                Projector::<OrdersView>::new(pool, js, config)
                    .run(shutdown)
                    .await
            }
            Self::Stock => {
                Projector::<StockView>::new(pool, js, config)
                    .run(shutdown)
                    .await
            }
        }
    }

    /// Rebuilds this view from the first event and swaps it in.
    pub async fn rebuild(
        self,
        pool: &PgPool,
        js: &jetstream::Context,
        config: ProjectorConfig,
        progress: impl FnMut(Progress),
    ) -> Result<Rebuilt, ProjectorError> {
        match self {
            Self::Orders => rebuild::<OrdersView>(pool, js, config, progress).await,
            Self::Stock => rebuild::<StockView>(pool, js, config, progress).await,
        }
    }

    /// Creates the live view if it is missing.
    pub async fn ensure_live(self, pool: &PgPool) -> Result<(), sqlx::Error> {
        match self {
            Self::Orders => {
                schema::ensure_view::<OrdersView>(pool, &schema::live_schema::<OrdersView>()).await
            }
            Self::Stock => {
                schema::ensure_view::<StockView>(pool, &schema::live_schema::<StockView>()).await
            }
        }
    }
}

impl std::fmt::Display for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for View {
    type Err = UnknownView;

    fn from_str(name: &str) -> Result<Self, UnknownView> {
        Self::ALL
            .into_iter()
            .find(|view| view.name() == name)
            .ok_or_else(|| UnknownView {
                name: name.to_owned(),
                known: Self::ALL.map(View::name).join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_holds_every_view_in_projections_and_nothing_else() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../projections");
        let mut in_dir: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".sql").map(str::to_owned)
            })
            .collect();
        in_dir.sort();
        let mut catalogued: Vec<&str> = View::ALL.iter().map(|view| view.name()).collect();
        catalogued.sort();
        assert_eq!(in_dir, catalogued, "projections/*.sql and View::ALL");
    }

    /// The consumer catalogue lists a consumer for each view, and only those, on its stream.
    #[test]
    fn every_view_reads_through_its_catalogued_consumer() {
        use ordo_eventstore::ConsumerId;
        let of_views: Vec<ConsumerId> = View::ALL.iter().map(|view| view.info().consumer).collect();
        for consumer in ConsumerId::ALL {
            assert_eq!(
                of_views.contains(&consumer),
                consumer.is_projection(),
                "{consumer}"
            );
        }
        assert_eq!(of_views.len(), View::ALL.len(), "one consumer each");
        for view in View::ALL {
            let info = view.info();
            assert_eq!(info.consumer.stream().name(), info.stream, "{view}");
            assert_eq!(info.consumer.name(), format!("ordo-projection-{view}"));
        }
    }

    #[test]
    fn every_view_is_found_by_its_name_and_an_unknown_name_says_what_there_is() {
        for view in View::ALL {
            assert_eq!(view.name().parse::<View>(), Ok(view));
            assert_eq!(view.info().schema(), format!("view_{view}"));
        }
        let unknown = "payments".parse::<View>().unwrap_err();
        assert_eq!(
            unknown.to_string(),
            r#"no projection named "payments" (there are: orders, stock)"#
        );
    }
}
