//! Load shedding: when the work that follows an order (its saga, the views) falls too far
//! behind, `order.place` says `unavailable` with a `retry_after_ms` instead of taking in orders
//! that would only queue inside ordo. Nothing is appended for a shed request.
//!
//! The backlogs are read every `check_every` by every command service instance: the saga's and
//! a view's are the events of its stream past the position its readers (the coordinators'
//! intakes, the view's projectors) report in the partition bucket (`ordo_eventstore::progress`);
//! a durable consumer's would be its pending events. No process needs to tell another, and a
//! worker that is down (its backlog grows) counts as one that is slow.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use ordo_eventstore::{ConsumerId, consume::backlog, progress::Progress};

/// How far behind each backlog may fall before `order.place` sheds load.
#[derive(Debug, Clone)]
pub struct BacklogLimits {
    /// Order events the saga coordinators have not taken in: about `saga / confirmed per
    /// second` seconds of waiting for an order placed now.
    pub saga: u64,
    /// Events a projector has not applied: how far a view may lag behind its stream.
    pub projection: u64,
    /// How often the backlogs are read.
    pub check_every: Duration,
}

impl Default for BacklogLimits {
    fn default() -> Self {
        Self {
            saga: 5_000,
            projection: 50_000,
            check_every: Duration::from_millis(250),
        }
    }
}

/// A backlog ordo watches: how far a reader of a stream is behind it.
#[derive(Debug, Clone, Copy)]
struct Watched {
    what: &'static str,
    consumer: ConsumerId,
    bound: Bound,
}

/// Which of [`BacklogLimits`] holds a backlog.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Saga,
    Projection,
}

impl Watched {
    /// What a consumer's backlog means and which bound holds it, if it sheds: every consumer of
    /// the catalogue is classified here, so that a new one (a new view) cannot go unwatched
    /// unnoticed.
    const fn of(consumer: ConsumerId) -> Option<Watched> {
        let (what, bound) = match consumer {
            ConsumerId::Saga => ("order events not yet taken in by the saga", Bound::Saga),
            ConsumerId::OrdersView => {
                ("order events not yet in the orders view", Bound::Projection)
            }
            ConsumerId::StockView => ("stock events not yet in the stock view", Bound::Projection),
            // Customers told late hold up no order.
            ConsumerId::Notifier => return None,
        };
        Some(Watched {
            what,
            consumer,
            bound,
        })
    }

    /// Every watched backlog, in the catalogue's order (the first over its bound is reported).
    fn all() -> Vec<Watched> {
        ConsumerId::ALL.into_iter().filter_map(Self::of).collect()
    }

    fn limit(&self, limits: &BacklogLimits) -> u64 {
        match self.bound {
            Bound::Saga => limits.saga,
            Bound::Projection => limits.projection,
        }
    }
}

/// A backlog over its bound: why `order.place` sheds, and when to come back.
#[derive(Debug, Clone, PartialEq)]
pub struct Overload {
    pub what: &'static str,
    pub backlog: u64,
    pub limit: u64,
    pub retry_after: Duration,
}

impl Overload {
    pub fn message(&self) -> String {
        format!(
            "ordo is behind: {} {} (the bound is {}); nothing was appended, send the same \
             command again later",
            self.backlog, self.what, self.limit
        )
    }
}

/// One reading of a backlog.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub pending: u64,
    pub limit: u64,
    /// Events acknowledged per second since the previous reading, if known.
    pub drained_per_second: Option<f64>,
}

/// A backlog sheds from its bound on, and until it is back under 90 % of it, so that the gate
/// does not flap around the bound. A bound of 0 sheds while anything is pending, and no longer.
pub fn overloaded(reading: Reading, shedding: bool) -> Option<Duration> {
    let resume_below = (reading.limit - reading.limit / 10).max(1);
    let over = if shedding {
        reading.pending >= resume_below
    } else {
        reading.pending > reading.limit
    };
    if !over {
        return None;
    }
    // The time the consumer needs to drain back under the resume mark, at its recent pace.
    let excess = (reading.pending - resume_below.min(reading.pending)) as f64;
    let retry_after = match reading.drained_per_second {
        Some(rate) if rate > 1.0 => Duration::from_secs_f64(excess / rate),
        // Not draining (its worker is down or stuck): come back in a while.
        _ => Duration::from_secs(5),
    };
    Some(retry_after.clamp(Duration::from_millis(100), Duration::from_secs(10)))
}

/// What the command service consults before taking in an order.
#[derive(Clone, Default)]
pub struct Gate(Arc<RwLock<Option<Overload>>>);

impl Gate {
    pub fn overload(&self) -> Option<Overload> {
        self.0.read().expect("never poisoned").clone()
    }

    fn set(&self, overload: Option<Overload>) {
        *self.0.write().expect("never poisoned") = overload;
    }

    /// Reads the backlogs every `check_every` and keeps the gate up to date, until dropped. A
    /// backlog that cannot be read (a consumer not created yet, NATS unreachable) does not
    /// shed: the append would say what is wrong.
    /// `partitions`: the readers' count, as the command service's.
    pub async fn watch(self, js: jetstream::Context, limits: BacklogLimits, partitions: u32) {
        let watched_backlogs = Watched::all();
        let progress: Vec<Option<Progress>> = watched_backlogs
            .iter()
            .map(|watched| {
                watched
                    .consumer
                    .partition_group()
                    .map(|group| Progress::watch(js.clone(), group))
            })
            .collect();
        let mut previous: Vec<Option<(Instant, u64)>> = vec![None; watched_backlogs.len()];
        loop {
            let shedding = self.overload();
            let mut overload = None;
            for (index, watched) in watched_backlogs.iter().enumerate() {
                let read = match &progress[index] {
                    Some(progress) => {
                        reported_backlog(&js, watched.consumer, progress, partitions).await
                    }
                    None => backlog(&js, watched.consumer).await,
                };
                let Some((pending, ack_floor)) = read else {
                    previous[index] = None;
                    continue;
                };
                let now = Instant::now();
                let drained_per_second = previous[index].map(|(at, floor): (Instant, u64)| {
                    ack_floor.saturating_sub(floor) as f64
                        / now.duration_since(at).as_secs_f64().max(1e-3)
                });
                previous[index] = Some((now, ack_floor));
                let reading = Reading {
                    pending,
                    limit: watched.limit(&limits),
                    drained_per_second,
                };
                metrics::gauge!("ordo_backlog_events", "consumer" => watched.consumer.name())
                    .set(pending as f64);
                let was_shedding = shedding.as_ref().is_some_and(|o| o.what == watched.what);
                if overload.is_none()
                    && let Some(retry_after) = overloaded(reading, was_shedding)
                {
                    overload = Some(Overload {
                        what: watched.what,
                        backlog: pending,
                        limit: reading.limit,
                        retry_after,
                    });
                }
            }
            if overload.is_some() != shedding.is_some() {
                match &overload {
                    Some(overload) => tracing::warn!(
                        backlog = overload.backlog,
                        limit = overload.limit,
                        what = overload.what,
                        "shedding order.place: a backlog is over its bound"
                    ),
                    None => tracing::info!("backlogs back under their bounds; taking orders again"),
                }
            }
            self.set(overload);
            tokio::time::sleep(limits.check_every).await;
        }
    }
}

/// The events of a stream past the position its partitioned readers reported, and that
/// position.
async fn reported_backlog(
    js: &jetstream::Context,
    consumer: ConsumerId,
    progress: &Progress,
    partitions: u32,
) -> Option<(u64, u64)> {
    let position = progress.position(partitions)?;
    let head = js
        .get_stream_no_info(consumer.stream().name())
        .await
        .ok()?
        .get_info()
        .await
        .ok()?
        .state
        .last_sequence;
    Some((head.saturating_sub(position), position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_of_zero_sheds_while_anything_is_pending_and_stops_when_nothing_is() {
        let at = |pending| Reading {
            pending,
            limit: 0,
            drained_per_second: None,
        };
        assert!(overloaded(at(0), false).is_none());
        assert!(overloaded(at(1), false).is_some());
        assert!(overloaded(at(1), true).is_some());
        assert!(
            overloaded(at(0), true).is_none(),
            "an empty backlog ends the shedding"
        );
    }

    fn reading(pending: u64, drained_per_second: Option<f64>) -> Reading {
        Reading {
            pending,
            limit: 1_000,
            drained_per_second,
        }
    }

    #[test]
    fn sheds_above_the_bound_and_resumes_below_ninety_percent_of_it() {
        assert_eq!(overloaded(reading(1_000, Some(500.0)), false), None);
        assert!(overloaded(reading(1_001, Some(500.0)), false).is_some());
        assert!(overloaded(reading(950, Some(500.0)), true).is_some());
        assert_eq!(overloaded(reading(899, Some(500.0)), true), None);
    }

    #[test]
    fn retry_after_is_the_time_to_drain_back_under_the_resume_mark() {
        // 1,400 pending, resume at 900: 500 events at 1,000/s.
        assert_eq!(
            overloaded(reading(1_400, Some(1_000.0)), false),
            Some(Duration::from_millis(500))
        );
        // Not draining at all: a while.
        assert_eq!(
            overloaded(reading(1_400, Some(0.0)), false),
            Some(Duration::from_secs(5))
        );
        // Bounded both ways.
        assert_eq!(
            overloaded(reading(1_001_000, Some(2.0)), false),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            overloaded(reading(1_001, Some(1e9)), false),
            Some(Duration::from_millis(100))
        );
    }
}
