//! Every command runs at the owner of its aggregate's partition.
//!
//! Any instance takes a request from the queue group (the intake). It reads the request, works
//! out the partition of its aggregate, and then:
//! - runs it itself when it owns that partition ([`Route::Here`]: the partition's [`own`] loop);
//! - forwards it to the owner's subject, `ordo.partition.<partition>.<owner>.<endpoint>`, and
//!   passes the owner's answer on to the requester;
//! - or answers `unavailable` with `retry_after_ms` while the partition has no owner (it is
//!   moving, or its owner died and its lease has not run out yet).
//!
//! One writer per partition keeps the instances from contending for an aggregate. It is not
//! what keeps a stale owner from writing: every append is still conditional on the aggregate's
//! last sequence.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use ordo_contract::{Endpoint, ErrorCode, Reply};
use ordo_eventstore::{EventMetadata, Grant, Owners, Partition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    handler::CommandHandler,
    intake::ParsedRequest,
    writer::{MAX_BATCH, Writer},
};

/// The subjects commands are forwarded on: `ordo.partition.<partition>.<owner>.<endpoint>`.
pub const FORWARD_PREFIX: &str = "ordo.partition";
/// How long an intake waits for the owner's answer to a command it forwarded.
pub const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an intake waits for a moving partition's next owner before it answers
/// `unavailable`.
pub const MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// The header of an owner's answer that its partition is moving (so the intake tries again).
pub const MOVING_HEADER: &str = "Ordo-Partition-Moving";

/// Whether an owner's answer says that the partition has moved on.
pub fn is_moving(answer: &async_nats::Message) -> bool {
    ordo_eventstore::header(answer, MOVING_HEADER).is_some()
}

/// How long a requester should wait before sending a command again whose partition is moving.
const MOVING_RETRY_MS: u64 = 250;
/// Commands queued for one partition before the intake waits.
const QUEUED_PER_PARTITION: usize = 1024;

/// The subject a command for `partition` is forwarded on to its owner `owner`.
pub fn forward_subject(partition: Partition, owner: &str, endpoint: Endpoint) -> String {
    format!("{FORWARD_PREFIX}.{partition}.{owner}.{}", endpoint.name())
}

/// What an owner subscribes to: every partition's commands forwarded to it.
pub fn forwarded_to(owner: &str) -> String {
    format!("{FORWARD_PREFIX}.*.{owner}.>")
}

/// The partition and endpoint of a forwarded command's subject.
pub fn parse_forward_subject(subject: &str) -> Option<(Partition, Endpoint)> {
    let rest = subject.strip_prefix(FORWARD_PREFIX)?.strip_prefix('.')?;
    let mut parts = rest.splitn(3, '.');
    let partition = parts.next()?.parse().ok()?;
    let _owner = parts.next()?;
    let name = parts.next()?;
    let endpoint = Endpoint::ALL.into_iter().find(|e| e.name() == name)?;
    Some((partition, endpoint))
}

/// The answer to a command whose partition this instance cannot serve right now.
pub fn moving(partition: Partition) -> Reply {
    Reply::Refused {
        code: ErrorCode::Unavailable,
        message: format!(
            "partition {partition} is moving to another instance; send the command again"
        ),
        retry_after_ms: Some(MOVING_RETRY_MS),
    }
}

/// A command handed to its partition's owner loop, with where its reply goes.
pub struct Job {
    pub request: ParsedRequest,
    pub metadata: EventMetadata,
    pub reply: oneshot::Sender<Reply>,
    /// The command's span: what the owner does for it is part of it.
    pub span: tracing::Span,
}

/// Where a command goes.
pub enum Route {
    Here(mpsc::Sender<Job>),
    There(String),
    Nobody,
}

/// The partitions this instance owns, and who owns the others.
pub struct Router {
    pub partitions: u32,
    owners: watch::Receiver<Owners>,
    suspects: mpsc::UnboundedSender<String>,
    here: RwLock<HashMap<Partition, mpsc::Sender<Job>>>,
}

impl Router {
    pub fn new(
        partitions: u32,
        owners: watch::Receiver<Owners>,
        suspects: mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            partitions,
            owners,
            suspects,
            here: RwLock::new(HashMap::new()),
        }
    }

    pub fn route(&self, partition: Partition) -> Route {
        if let Some(jobs) = self.here.read().expect("not poisoned").get(&partition) {
            return Route::Here(jobs.clone());
        }
        let owners = self.owners.borrow();
        match owners.owner(partition) {
            Some(owner) if owner != owners.me => Route::There(owner.to_owned()),
            _ => Route::Nobody,
        }
    }

    /// Says that `owner` did not take a command forwarded to it: the ownership asks it whether
    /// it is alive, and takes its partitions if not.
    pub fn suspect(&self, owner: &str) {
        let _ = self.suspects.send(owner.to_owned());
    }

    /// Partitions served here.
    pub fn owned(&self) -> usize {
        self.here.read().expect("not poisoned").len()
    }

    /// Whether every partition has an owner, here or elsewhere.
    pub fn all_owned(&self) -> bool {
        let here = self.here.read().expect("not poisoned");
        let owners = self.owners.borrow();
        (0..self.partitions).all(|partition| {
            here.contains_key(&partition)
                || owners
                    .owner(partition)
                    .is_some_and(|owner| owner != owners.me)
        })
    }

    /// Serves `grant`'s partition until the grant is revoked: takes the commands queued for it
    /// a batch at a time (group commit: what queued while the last batch was written is the
    /// next), then stops taking them, answers those still queued with [`moving`], and drops the
    /// grant (so that the lease can be handed on).
    pub async fn own(self: Arc<Self>, grant: Grant, handler: Arc<CommandHandler>) {
        let partition = grant.partition;
        let (sender, mut jobs) = mpsc::channel::<Job>(QUEUED_PER_PARTITION);
        let mine = sender.clone();
        self.here
            .write()
            .expect("not poisoned")
            .insert(partition, sender);
        let mut writer = Writer::new(handler);
        // Looked up once: the label is the partition's, for as long as this loop serves it.
        let commands = metrics::counter!("ordo_partition_commands_total", "partition" => partition.to_string());
        let queued = metrics::gauge!("ordo_partition_queued", "partition" => partition.to_string());
        let batch_size = metrics::histogram!("ordo_partition_batch_size");
        loop {
            let first = tokio::select! {
                () = grant.revoked() => break,
                job = jobs.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if !grant.is_valid() {
                for job in batch {
                    let _ = job.reply.send(moving(partition));
                }
                break;
            }
            commands.increment(batch.len() as u64);
            queued.set(jobs.len() as f64);
            batch_size.record(batch.len() as f64);
            writer.commit(batch).await;
        }
        {
            // Unless the partition was granted again meanwhile, and a newer loop serves it.
            let mut here = self.here.write().expect("not poisoned");
            if here
                .get(&partition)
                .is_some_and(|sender| sender.same_channel(&mine))
            {
                here.remove(&partition);
            }
        }
        queued.set(0.0);
        drop(mine);
        jobs.close();
        while let Ok(job) = jobs.try_recv() {
            let _ = job.reply.send(moving(partition));
        }
        drop(grant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_subject_names_its_partition_and_endpoint() {
        for endpoint in Endpoint::ALL {
            let subject = forward_subject(7, "00ab", endpoint);
            assert_eq!(parse_forward_subject(&subject), Some((7, endpoint)));
        }
        assert_eq!(
            parse_forward_subject("ordo.partition.x.00ab.order.place"),
            None
        );
        assert_eq!(
            parse_forward_subject("ordo.partition.1.00ab.order.burn"),
            None
        );
        assert_eq!(parse_forward_subject("ordo.cmd.order.place"), None);
    }
}
