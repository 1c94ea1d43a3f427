//! One owner per partition: leases in the KV bucket `ordo_partitions`, spread over the live
//! instances of a group by rendezvous hashing, and moved when an instance joins, leaves or dies.
//!
//! Keys, per group (`commands`, …):
//! - `<group>.members.<instance>`: each instance's heartbeat, put four times per `renew_every`;
//!   its value is the number of partitions the instance runs with, so that an instance started
//!   with another count than the live ones is refused when it joins.
//! - `<group>.owners.<partition>`: the instance that holds the partition's lease, renewed by an
//!   update conditional on its revision every `renew_every`.
//!
//! A member that stops renewing is dead once a lease has passed, or sooner: once three
//! heartbeats are missed (or a request to it found no responders), a member that has no
//! subscriber on its liveness subject (`ordo.ownership.<group>.<instance>`, answered by every
//! live member) has lost its NATS connection, as a killed process does, and its partitions are
//! taken at once. A member whose connection only dropped for a moment is taken for dead too; it
//! may still finish what it was doing, and gets partitions back by the usual hand-over.
//!
//! Every duration is measured on one clock only. An observer counts a member or a lease as dead
//! once its revision has not changed for `lease` since the observer *saw* it change; a grant is
//! no longer valid once `lease - margin` has passed since its owner *sent* its last renewal that
//! succeeded, which is before anyone could see that renewal. A lease keeps owners from fighting
//! and makes the common case conflict-free; it does not keep a stale owner from writing (one
//! taken for dead, one finishing a batch as its grant runs out). What does is the conditional
//! append of every write (expected last subject sequence), which the lease does not replace.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    kv::{self, CreateErrorKind, Operation, UpdateErrorKind},
};
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

/// The KV bucket of partition leases and member heartbeats.
pub const BUCKET: &str = "ordo_partitions";

/// The subject a live member answers on.
pub fn liveness_subject(group: &str, instance: &str) -> String {
    format!("ordo.ownership.{group}.{instance}")
}

/// What the bucket says of a group's partitions and members, read without joining the group
/// (`ordo partitions status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub partitions: Vec<PartitionStatus>,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The instance whose lease the bucket holds, if any.
    pub owner: Option<String>,
    /// How long ago the lease was last renewed (this machine's clock against the server's, so
    /// only a guide).
    pub renewed_ms_ago: Option<u64>,
    /// Renewed within a lease: an owner is serving it.
    pub held: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberStatus {
    pub instance: String,
    pub heartbeat_ms_ago: u64,
    /// Its heartbeat is younger than a lease.
    pub alive: bool,
    /// Partitions whose lease it holds.
    pub owns: u32,
    /// The partition count it runs with (none from a build that did not say).
    pub partitions: Option<u32>,
    /// The revision of its heartbeat: a watcher that sees it change knows the member is alive
    /// without comparing its clock with the server's.
    pub heartbeat_revision: u64,
}

/// The most partitions a group may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition count a heartbeat carries, written as a plain number. Builds before the count
/// was carried put their instance id there (16 hex digits), which is never read as one.
fn partition_count(heartbeat: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(heartbeat).ok()?;
    if text.len() > 4 || text.starts_with('0') {
        return None;
    }
    text.parse()
        .ok()
        .filter(|count| (1..=MAX_PARTITIONS).contains(count))
}

/// Reads the group's leases and heartbeats from the bucket. A bucket that does not exist yet (no
/// instance of the group has run) reads as every partition unowned.
pub async fn status(
    js: &jetstream::Context,
    config: &OwnershipConfig,
) -> Result<GroupStatus, String> {
    let (owners, mut members) = match js.get_key_value(BUCKET).await {
        Ok(store) => read_leases(&store, config).await?,
        Err(err)
            if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket
                && err.to_string().contains("not found") =>
        {
            Default::default()
        }
        Err(err) => return Err(format!("reading the bucket {BUCKET}: {err}")),
    };
    let lease_ms = config.lease.as_millis() as u64;
    // The count of the newest heartbeat: the live members' (one that disagreed was refused), or
    // with none alive, the last ones'.
    let count = members
        .iter()
        .filter(|member| member.partitions.is_some())
        .min_by_key(|member| member.heartbeat_ms_ago)
        .and_then(|member| member.partitions)
        .unwrap_or(config.partitions);
    let partitions = (0..count)
        .map(|partition| {
            let lease = owners.get(&partition);
            PartitionStatus {
                partition,
                owner: lease.map(|(owner, _)| owner.clone()),
                renewed_ms_ago: lease.map(|(_, ago)| *ago),
                held: lease.is_some_and(|(_, ago)| *ago < lease_ms),
            }
        })
        .collect::<Vec<_>>();
    for member in &mut members {
        member.owns = partitions
            .iter()
            .filter(|p| p.held && p.owner.as_deref() == Some(member.instance.as_str()))
            .count() as u32;
    }
    members.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(GroupStatus {
        group: config.group.clone(),
        partitions,
        members,
    })
}

/// Each partition's lease (owner, ms since renewed) and each member's heartbeat, as the bucket
/// holds them now.
async fn read_leases(
    store: &kv::Store,
    config: &OwnershipConfig,
) -> Result<(BTreeMap<u32, (String, u64)>, Vec<MemberStatus>), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i128);
    let ms_ago = |created: &kv::Entry| {
        u64::try_from((now - created.created.unix_timestamp_nanos()).max(0) / 1_000_000)
            .unwrap_or(u64::MAX)
    };
    let lease_ms = config.lease.as_millis() as u64;
    let mut owners: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    let mut members: Vec<MemberStatus> = Vec::new();
    // The group's keys from the stream's subjects (a stream info request), not from a consumer
    // (what `Store::keys` creates): a reader such as the read API needs no right to create
    // consumers, which would let it deliver a stream's messages to any subject.
    let prefix = format!("$KV.{BUCKET}.");
    let subjects: Vec<(String, usize)> = store
        .stream
        .info_with_subjects(format!("{prefix}{}.>", config.group))
        .await
        .map_err(|err| format!("listing {BUCKET}: {err}"))?
        .try_collect()
        .await
        .map_err(|err| format!("listing {BUCKET}: {err}"))?;
    let keys = subjects
        .into_iter()
        .filter_map(|(subject, _)| subject.strip_prefix(&prefix).map(str::to_owned));
    for key in keys {
        let member = config.member_of_key(&key);
        let partition = config.partition_of_key(&key);
        if member.is_none() && partition.is_none() {
            continue;
        }
        let Some(entry) = store
            .entry(&key)
            .await
            .map_err(|err| format!("reading {key}: {err}"))?
            .filter(|entry| entry.operation == Operation::Put)
        else {
            continue;
        };
        let ago = ms_ago(&entry);
        if let Some(instance) = member {
            members.push(MemberStatus {
                instance: instance.to_owned(),
                heartbeat_ms_ago: ago,
                alive: ago < lease_ms,
                owns: 0,
                partitions: partition_count(&entry.value),
                heartbeat_revision: entry.revision,
            });
        } else if let Some(partition) = partition {
            let owner = String::from_utf8_lossy(&entry.value).into_owned();
            owners.insert(partition, (owner, ago));
        }
    }
    Ok((owners, members))
}

#[derive(Debug, Clone)]
pub struct OwnershipConfig {
    /// Which work the partitions are of (`commands`): a key token.
    pub group: String,
    pub partitions: u32,
    /// How long a lease or heartbeat lasts without a renewal.
    pub lease: Duration,
    pub renew_every: Duration,
    /// Replicas of the bucket, when this instance creates it.
    pub replicas: usize,
}

impl OwnershipConfig {
    pub fn new(group: &str, partitions: u32) -> Self {
        Self {
            group: group.to_owned(),
            partitions,
            lease: Duration::from_secs(3),
            renew_every: Duration::from_secs(1),
            replicas: 1,
        }
    }

    /// The key of `instance`'s heartbeat.
    fn member_key(&self, instance: &str) -> String {
        format!("{}.members.{instance}", self.group)
    }

    /// The key of `partition`'s lease.
    fn owner_key(&self, partition: u32) -> String {
        format!("{}.owners.{partition}", self.group)
    }

    /// The member whose heartbeat `key` is, if it is one of this group's.
    fn member_of_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.group)?.strip_prefix(".members.")
    }

    /// The partition whose lease `key` is, if it is one of this group's.
    fn partition_of_key(&self, key: &str) -> Option<u32> {
        key.strip_prefix(&self.group)?
            .strip_prefix(".owners.")?
            .parse()
            .ok()
    }

    /// How long before its lease ends, as others count it, an owner stops acting.
    fn margin(&self) -> Duration {
        self.lease / 3
    }

    /// How often a member says it is alive; three missed heartbeats, and it is probed.
    fn heartbeat_every(&self) -> Duration {
        self.renew_every / 4
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// The bucket could not be read or written (JetStream not answering yet, a leader being
    /// elected): trying again later may work.
    #[error("partition leases ({BUCKET}): {0}")]
    Bucket(String),
    /// Live members of the group run with another partition count: this instance may not join
    /// until they stop, or it is started with their count.
    #[error("partition leases ({BUCKET}): {0}")]
    PartitionCountDiffers(String),
}

/// The right to act for one partition, until it is revoked or its lease runs out. Dropping it
/// tells the ownership that the holder has stopped, so that the lease can be handed on.
#[derive(Debug)]
pub struct Grant {
    pub partition: u32,
    revoked: watch::Receiver<bool>,
    deadline: watch::Receiver<Instant>,
    /// Which taking of the partition this is.
    epoch: u64,
    released: mpsc::UnboundedSender<(u32, u64)>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        let _ = self.released.send((self.partition, self.epoch));
    }
}

impl Grant {
    /// Whether the holder may still act for the partition.
    pub fn is_valid(&self) -> bool {
        !*self.revoked.borrow() && Instant::now() < *self.deadline.borrow()
    }

    /// Completes once the holder must stop: the lease is being handed on, was lost, or has not
    /// been renewed in time.
    pub async fn revoked(&self) {
        let mut revoked = self.revoked.clone();
        let mut deadline = self.deadline.clone();
        loop {
            if *revoked.borrow_and_update() {
                return;
            }
            let until = *deadline.borrow_and_update();
            if Instant::now() >= until {
                return;
            }
            tokio::select! {
                changed = revoked.changed() => if changed.is_err() { return },
                changed = deadline.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

/// Who holds each partition, as this instance last saw the bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owners {
    /// This instance.
    pub me: String,
    /// The live holder of each partition's lease, if it has one.
    pub of_partition: Vec<Option<String>>,
    /// The live members of the group, sorted.
    pub members: Vec<String>,
}

impl Owners {
    pub fn owner(&self, partition: u32) -> Option<&str> {
        self.of_partition
            .get(partition as usize)
            .and_then(|owner| owner.as_deref())
    }
}

/// The grants of an instance's partitions, as it takes them.
pub type Grants = mpsc::UnboundedReceiver<Grant>;

/// This instance's membership of a group.
pub struct Ownership {
    instance: String,
    owners: watch::Receiver<Owners>,
    suspects: mpsc::UnboundedSender<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Ownership {
    /// Joins the group as a new instance: its heartbeat starts, and it takes the partitions that
    /// rendezvous hashing gives it as their leases become free, handing out a [`Grant`] for each.
    pub async fn join(
        js: &jetstream::Context,
        config: OwnershipConfig,
    ) -> Result<(Self, Grants), OwnershipError> {
        let store = open_bucket(js, config.replicas).await?;
        let client = js.client();
        agree_on_partitions(&store, &client, &config).await?;
        let instance = format!("{:016x}", rand::random::<u64>());
        let liveness = client
            .subscribe(liveness_subject(&config.group, &instance))
            .await
            .map_err(|err| OwnershipError::Bucket(err.to_string()))?;
        let (grants_tx, grants) = mpsc::unbounded_channel();
        let (owners_tx, owners) = watch::channel(Owners {
            me: instance.clone(),
            of_partition: vec![None; config.partitions as usize],
            members: vec![instance.clone()],
        });
        let (stop, stopped) = oneshot::channel();
        let (released_tx, released_rx) = mpsc::unbounded_channel();
        let (suspects, suspected) = mpsc::unbounded_channel();
        let mut leases = Leases {
            config,
            store,
            client,
            liveness,
            dead: HashSet::new(),
            probed: HashMap::new(),
            me: instance.clone(),
            view: HashMap::new(),
            held: BTreeMap::new(),
            grants: grants_tx,
            owners: owners_tx,
            heartbeat_sent: None,
            released_tx,
            released_rx,
            suspected,
            heartbeat_unseen: None,
            epochs: 0,
            other_counts_reported: HashSet::new(),
        };
        leases.heartbeat().await?;
        let task = tokio::spawn(leases.run(stopped));
        let ownership = Self {
            instance,
            owners,
            suspects,
            stop: Some(stop),
            task: Some(task),
        };
        Ok((ownership, grants))
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Who holds what, kept current.
    pub fn owners(&self) -> watch::Receiver<Owners> {
        self.owners.clone()
    }

    /// Where to say that a member seems gone (a request to it found no responders): it is
    /// asked at once, and if it is, its partitions are taken without waiting for its heartbeat.
    pub fn suspects(&self) -> mpsc::UnboundedSender<String> {
        self.suspects.clone()
    }

    /// Leaves the group: every grant is revoked, and once its holder has dropped it (or its lease
    /// has run out) the lease is deleted, so that the next owner need not wait for it to expire.
    pub async fn leave(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Refuses to join a group whose live members run with another partition count: each would map
/// an aggregate to a partition its own way, and two instances would write for one aggregate (the
/// conditional appends would keep that correct, and slow). A member counts as live when it
/// answers on its liveness subject (or does not say "no responders" in time): a heartbeat left
/// by a killed instance, however young, does not stop the group from starting again with
/// another count, and no clock is compared.
async fn agree_on_partitions(
    store: &kv::Store,
    client: &async_nats::Client,
    config: &OwnershipConfig,
) -> Result<(), OwnershipError> {
    let (_, members) = read_leases(store, config)
        .await
        .map_err(OwnershipError::Bucket)?;
    let mut others = Vec::new();
    for member in members {
        let Some(count) = member
            .partitions
            .filter(|count| *count != config.partitions)
        else {
            continue;
        };
        match ask_liveness(
            client,
            config,
            &member.instance,
            config.heartbeat_every() * 2,
        )
        .await
        {
            Ok(_) => others.push(format!("{} ({count})", member.instance)),
            Err(err) if err.kind() == async_nats::RequestErrorKind::NoResponders => {}
            // No answer in time, or the connection dropped: nothing is known yet, so this is
            // tried again later rather than taken for a misconfiguration.
            Err(err) => {
                return Err(OwnershipError::Bucket(format!(
                    "asking member {} whether it is alive: {err}",
                    member.instance
                )));
            }
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    Err(OwnershipError::PartitionCountDiffers(format!(
        "this instance was started with {} partitions, but live instances of the group {} run \
         with another count: {}. Every instance of a group must use the same count; to change it, \
         stop them all, then start them with the new one",
        config.partitions,
        config.group,
        others.join(", ")
    )))
}

/// How long one of a member's writes to the bucket (a heartbeat, a renewal, a claim, a hand-back)
/// may take. The member makes them one after the other, and one in flight when the connection
/// drops, or while the bucket has no leader, is answered by nobody and waits out JetStream's
/// whole timeout (5 s): meanwhile the member neither beats, renews nor claims. In a cluster drill
/// a projector held its partitions unserved for 5 s that way, and another claimed a dead
/// member's partitions only after a stretch of such waits. Given up after a renewal period, a
/// write is made again on the next tick, on the new connection. (The watch keeps JetStream's
/// timeout: opening one while a leader is elected takes longer than a second.)
const BUCKET_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks `member` on its liveness subject whether it is still connected: "no responders" means
/// its connection is gone; an answer, that it is there.
async fn ask_liveness(
    client: &async_nats::Client,
    config: &OwnershipConfig,
    member: &str,
    timeout: Duration,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let probe = async_nats::Request::new()
        .payload(Bytes::new())
        .timeout(Some(timeout));
    client
        .send_request(liveness_subject(&config.group, member), probe)
        .await
}

async fn open_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, OwnershipError> {
    let config = kv::Config {
        bucket: BUCKET.into(),
        description: "ordo: who owns each partition, and who is alive".into(),
        history: 1,
        // Keys of instances gone for a minute are dropped; live ones are renewed each second.
        max_age: Duration::from_secs(60),
        max_bytes: 16 * 1024 * 1024,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    crate::key_value(js, config)
        .await
        .map_err(OwnershipError::Bucket)
}

/// A key as this instance last saw it, and when it saw it change.
struct Seen {
    value: Bytes,
    revision: u64,
    changed_at: Instant,
    /// Read from the bucket itself, past where the watch had brought it.
    refreshed: bool,
}

/// A lease this instance holds.
struct Held {
    revision: u64,
    revoke: watch::Sender<bool>,
    deadline: watch::Sender<Instant>,
    epoch: u64,
    /// Its holder has dropped the grant.
    released: bool,
    renew_sent: Instant,
}

struct Leases {
    config: OwnershipConfig,
    store: kv::Store,
    client: async_nats::Client,
    /// Where this member answers that it is alive.
    liveness: async_nats::Subscriber,
    /// Members that missed a heartbeat and have no liveness subscriber.
    dead: HashSet<String>,
    /// When each member was last probed.
    probed: HashMap<String, Instant>,
    me: String,
    view: HashMap<String, Seen>,
    held: BTreeMap<u32, Held>,
    grants: mpsc::UnboundedSender<Grant>,
    owners: watch::Sender<Owners>,
    heartbeat_sent: Option<Instant>,
    /// Grants dropped by their holders: `(partition, epoch)`.
    released_tx: mpsc::UnboundedSender<(u32, u64)>,
    released_rx: mpsc::UnboundedReceiver<(u32, u64)>,
    /// Members some request found gone.
    suspected: mpsc::UnboundedReceiver<String>,
    /// The oldest heartbeat the bucket acknowledged that has not yet come back through the
    /// watch: its revision, and when it was acknowledged.
    heartbeat_unseen: Option<(u64, Instant)>,
    epochs: u64,
    /// Members already logged for running with another partition count.
    other_counts_reported: HashSet<String>,
}

impl Leases {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(self.config.heartbeat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch: Option<kv::Watch> = None;
        loop {
            if watch.is_none() {
                // The current value of every key first, then each change.
                match self
                    .store
                    .watch_with_history(format!("{}.>", self.config.group))
                    .await
                {
                    Ok(opened) => {
                        // It starts from the bucket as it is: none of the view is ahead of it.
                        for seen in self.view.values_mut() {
                            seen.refreshed = false;
                        }
                        watch = Some(opened);
                    }
                    Err(err) => tracing::warn!(%err, "cannot watch the partition leases"),
                }
            }
            let next_entry = async {
                match watch.as_mut() {
                    Some(watch) => watch.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    self.tick().await;
                    // This member's own heartbeats come back through the watch within
                    // milliseconds; one acknowledged a renewal period ago and not yet seen says
                    // the watch has gone quiet (its consumer was on a server that died, or a
                    // reconnect it did not survive). Its client would notice only after two
                    // missed idle heartbeats (10 s), while this member's view of the leases
                    // stood still and it could take no partition of a dead member.
                    let silent = |leases: &Self| leases.heartbeat_unseen.is_some_and(|(_, acked)| acked.elapsed() > leases.config.renew_every);
                    if silent(&self) {
                        // A slow tick kept this loop from reading: what arrived meanwhile first.
                        while let Some(ready) = watch.as_mut().and_then(|watch| watch.next().now_or_never()) {
                            match ready {
                                Some(Ok(entry)) => self.observe(entry, false),
                                // Failed or ended: opened again.
                                Some(Err(_)) | None => {
                                    watch = None;
                                    break;
                                }
                            }
                        }
                    }
                    if silent(&self) {
                        tracing::warn!("the watch of the partition leases went quiet; opening it again");
                        self.heartbeat_unseen = None;
                        watch = None;
                    }
                }
                Some(ping) = self.liveness.next() => {
                    if let Some(reply) = ping.reply {
                        let _ = self.client.publish(reply, Bytes::new()).await;
                    }
                }
                Some(member) = self.suspected.recv() => {
                    let recently = self.probed.get(&member).is_some_and(|at| at.elapsed() < self.config.heartbeat_every());
                    if member != self.me && !self.dead.contains(&member) && !recently && self.probe(&member).await {
                        self.tick().await;
                    }
                }
                Some((partition, epoch)) = self.released_rx.recv() => {
                    self.released(partition, epoch);
                    self.hand_back_released().await;
                }
                entry = next_entry => match entry {
                    Some(Ok(entry)) => {
                        // A lease handed back: its next owner takes it now, not at the next tick.
                        let deleted = entry.operation != Operation::Put;
                        self.observe(entry, false);
                        if deleted {
                            self.tick().await;
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(%err, "the watch of the partition leases failed; opening it again");
                        watch = None;
                    }
                    None => watch = None,
                },
            }
        }
        self.leave().await;
    }

    /// Takes a key's entry into the view: from the watch, or `refreshed` from the bucket itself.
    fn observe(&mut self, entry: kv::Entry, refreshed: bool) {
        // A watch that fell behind may bring back what a refresh already read past.
        if self
            .view
            .get(&entry.key)
            .is_some_and(|seen| seen.refreshed && seen.revision > entry.revision)
        {
            return;
        }
        if entry.operation == Operation::Put {
            let unchanged = self
                .view
                .get(&entry.key)
                .is_some_and(|seen| seen.revision == entry.revision);
            if !unchanged {
                if let Some(member) = self.config.member_of_key(&entry.key) {
                    if member == self.me
                        && self
                            .heartbeat_unseen
                            .is_some_and(|(revision, _)| entry.revision >= revision)
                    {
                        self.heartbeat_unseen = None;
                    }
                    self.dead.remove(member);
                    // Two instances that started at the same moment with different counts both
                    // joined: say so (once each), since the check at joining could not. Only a
                    // heartbeat seen to change is a live member's: the watch replays those of
                    // instances killed in the last minute too.
                    if let Some(count) = partition_count(&entry.value)
                        && count != self.config.partitions
                        && self.view.contains_key(&entry.key)
                        && self.other_counts_reported.insert(member.to_owned())
                    {
                        tracing::error!(
                            group = %self.config.group,
                            member,
                            its_count = count,
                            our_count = self.config.partitions,
                            "a live member runs with another partition count: every instance of \
                             a group must use the same one"
                        );
                    }
                }
                self.view.insert(
                    entry.key,
                    Seen {
                        value: entry.value,
                        revision: entry.revision,
                        changed_at: Instant::now(),
                        refreshed,
                    },
                );
            }
        } else {
            self.view.remove(&entry.key);
        }
        self.publish_owners();
    }

    fn fresh(&self, seen: &Seen) -> bool {
        seen.changed_at.elapsed() < self.config.lease
    }

    /// The live members: those whose heartbeat changed within a lease and that are not known to
    /// be dead, and this instance.
    fn members(&self) -> Vec<String> {
        let mut members: Vec<String> = self
            .view
            .iter()
            .filter(|(_, seen)| self.fresh(seen))
            .filter_map(|(key, _)| self.config.member_of_key(key))
            .filter(|member| !self.dead.contains(*member))
            .map(str::to_owned)
            .chain(std::iter::once(self.me.clone()))
            .collect();
        members.sort();
        members.dedup();
        members
    }

    fn publish_owners(&self) {
        let of_partition = (0..self.config.partitions)
            .map(|partition| {
                if self.held.contains_key(&partition) {
                    return Some(self.me.clone());
                }
                self.view
                    .get(&self.config.owner_key(partition))
                    .filter(|seen| self.fresh(seen))
                    .map(|seen| String::from_utf8_lossy(&seen.value).into_owned())
                    .filter(|owner| *owner != self.me)
            })
            .collect();
        let owners = Owners {
            me: self.me.clone(),
            of_partition,
            members: self.members(),
        };
        self.owners.send_if_modified(|current| {
            let modified = *current != owners;
            *current = owners;
            modified
        });
    }

    async fn heartbeat(&mut self) -> Result<(), OwnershipError> {
        let key = self.config.member_key(&self.me);
        let put = self
            .store
            .put(key, Bytes::from(self.config.partitions.to_string()));
        let revision = tokio::time::timeout(BUCKET_WRITE_TIMEOUT, put)
            .await
            .map_err(|_| OwnershipError::Bucket("timed out".into()))?
            .map_err(|err| OwnershipError::Bucket(err.to_string()))?;
        let acked = Instant::now();
        self.heartbeat_sent = Some(acked);
        self.heartbeat_unseen.get_or_insert((revision, acked));
        Ok(())
    }

    fn released(&mut self, partition: u32, epoch: u64) {
        if let Some(held) = self.held.get_mut(&partition)
            && held.epoch == epoch
        {
            held.released = true;
        }
    }

    async fn tick(&mut self) {
        let due = |sent: Option<Instant>| {
            sent.is_none_or(|sent| sent.elapsed() >= self.config.heartbeat_every())
        };
        if due(self.heartbeat_sent)
            && let Err(err) = self.heartbeat().await
        {
            tracing::warn!(%err, "heartbeat not sent");
        }
        self.renew().await;
        self.hand_back_released().await;
        self.probe_silent_members().await;
        let members = self.members();
        for partition in 0..self.config.partitions {
            let mine = rendezvous(partition, &members) == self.me;
            match (self.held.get(&partition), mine) {
                (Some(held), false) if !*held.revoke.borrow() => {
                    tracing::info!(group = %self.config.group, partition, "handing the partition on");
                    held.revoke.send_replace(true);
                }
                (None, true) => self.try_acquire(partition).await,
                _ => {}
            }
        }
        metrics::gauge!("ordo_partitions_owned", "group" => self.config.group.clone())
            .set(self.held.len() as f64);
        self.publish_owners();
    }

    /// Asks each member that missed a heartbeat whether it is still connected: one with no
    /// subscriber on its liveness subject is dead, without waiting for its leases to run out.
    async fn probe_silent_members(&mut self) {
        let silent: Vec<String> = self
            .view
            .iter()
            .filter(|(_, seen)| seen.changed_at.elapsed() >= self.config.heartbeat_every() * 3)
            .filter_map(|(key, _)| self.config.member_of_key(key))
            .filter(|member| *member != self.me && !self.dead.contains(*member))
            .filter(|member| {
                self.probed
                    .get(*member)
                    .is_none_or(|at| at.elapsed() >= self.config.renew_every)
            })
            .map(str::to_owned)
            .collect();
        for member in silent {
            self.probe(&member).await;
        }
        self.probed
            .retain(|_, at| at.elapsed() < self.config.lease * 20);
    }

    /// Asks `member` whether it is connected; true (and it is counted dead) when nobody listens
    /// on its liveness subject.
    async fn probe(&mut self, member: &str) -> bool {
        self.probed.insert(member.to_owned(), Instant::now());
        let answer = ask_liveness(
            &self.client,
            &self.config,
            member,
            self.config.heartbeat_every(),
        )
        .await;
        let gone =
            matches!(&answer, Err(err) if err.kind() == async_nats::RequestErrorKind::NoResponders);
        if gone {
            tracing::info!(group = %self.config.group, member, "member is gone: taking its partitions");
            self.dead.insert(member.to_owned());
        }
        gone
    }

    /// Renews every lease that is due, and drops those lost to another instance or run out.
    async fn renew(&mut self) {
        let due: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, held)| held.renew_sent.elapsed() >= self.config.renew_every)
            .map(|(partition, _)| *partition)
            .collect();
        for partition in due {
            let key = self.config.owner_key(partition);
            let revision = self.held[&partition].revision;
            let sent = Instant::now();
            let update = self
                .store
                .update(&key, Bytes::from(self.me.clone()), revision);
            match tokio::time::timeout(BUCKET_WRITE_TIMEOUT, update)
                .await
                .unwrap_or_else(|_| Err(kv::UpdateError::new(UpdateErrorKind::TimedOut)))
            {
                Ok(revision) => {
                    let held = self.held.get_mut(&partition).expect("held");
                    held.revision = revision;
                    held.renew_sent = sent;
                    held.deadline
                        .send_replace(sent + self.config.lease - self.config.margin());
                }
                Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(group = %self.config.group, partition, "lease lost to another instance");
                    metrics::counter!("ordo_partition_leases_lost_total", "group" => self.config.group.clone())
                        .increment(1);
                    if let Some(held) = self.held.remove(&partition) {
                        held.revoke.send_replace(true);
                    }
                }
                Err(err) => {
                    tracing::warn!(group = %self.config.group, partition, %err, "lease not renewed");
                    let held = &self.held[&partition];
                    if Instant::now() >= *held.deadline.borrow() {
                        tracing::warn!(group = %self.config.group, partition, "lease ran out");
                        held.revoke.send_replace(true);
                    }
                    // No answer: the next would wait as long (a lost connection, a bucket without
                    // a leader). The others are tried on the next tick rather than a second each
                    // now, while heartbeats and claims wait. A grant runs out by its own deadline.
                    if err.kind() == UpdateErrorKind::TimedOut {
                        break;
                    }
                }
            }
        }
    }

    /// Deletes the leases whose holders have stopped, so that the next owner takes them at once.
    async fn hand_back_released(&mut self) {
        while let Ok((partition, epoch)) = self.released_rx.try_recv() {
            self.released(partition, epoch);
        }
        let released: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, held)| held.released)
            .map(|(partition, _)| *partition)
            .collect();
        for partition in released {
            let held = self.held.remove(&partition).expect("held");
            let key = self.config.owner_key(partition);
            let delete = self.store.delete_expect_revision(&key, Some(held.revision));
            match tokio::time::timeout(BUCKET_WRITE_TIMEOUT, delete).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(partition, %err, "lease not deleted; it runs out instead")
                }
                Err(_) => {
                    tracing::debug!(partition, "lease not deleted in time; it runs out instead")
                }
            }
            tracing::info!(group = %self.config.group, partition, "partition handed back");
        }
    }

    /// Takes the partition's lease if it is free, run out, or this instance's own.
    async fn try_acquire(&mut self, partition: u32) {
        let key = self.config.owner_key(partition);
        let value = Bytes::from(self.me.clone());
        let sent = Instant::now();
        let taken = match self.view.get(&key) {
            None => {
                match tokio::time::timeout(BUCKET_WRITE_TIMEOUT, self.store.create(&key, value))
                    .await
                {
                    Ok(Ok(revision)) => Some(revision),
                    Ok(Err(err)) if err.kind() == CreateErrorKind::AlreadyExists => {
                        // The watch has not brought it yet.
                        self.refresh(&key).await;
                        None
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(partition, %err, "lease not created");
                        None
                    }
                    // Made or not, the watch brings the lease as it is.
                    Err(_) => {
                        tracing::debug!(partition, "lease not created in time");
                        None
                    }
                }
            }
            Some(seen)
                if seen.value == self.me.as_bytes()
                    || !self.fresh(seen)
                    || self
                        .dead
                        .contains(String::from_utf8_lossy(&seen.value).as_ref()) =>
            {
                let revision = seen.revision;
                let update = self.store.update(&key, value, revision);
                match tokio::time::timeout(BUCKET_WRITE_TIMEOUT, update)
                    .await
                    .unwrap_or_else(|_| Err(kv::UpdateError::new(UpdateErrorKind::TimedOut)))
                {
                    Ok(revision) => Some(revision),
                    Err(err) => {
                        tracing::debug!(partition, %err, "lease not taken over");
                        if err.kind() == UpdateErrorKind::WrongLastRevision {
                            // The watch is behind the bucket: read the lease as it is, so that the
                            // next tick tries with its current revision.
                            self.refresh(&key).await;
                        }
                        None
                    }
                }
            }
            Some(_) => None, // Its owner is alive; it hands the partition on when it sees us.
        };
        let Some(revision) = taken else { return };
        let (revoke, revoked) = watch::channel(false);
        let (deadline_tx, deadline) =
            watch::channel(sent + self.config.lease - self.config.margin());
        self.epochs += 1;
        let grant = Grant {
            partition,
            revoked,
            deadline,
            epoch: self.epochs,
            released: self.released_tx.clone(),
        };
        tracing::info!(group = %self.config.group, partition, "partition taken");
        metrics::counter!("ordo_partition_leases_taken_total", "group" => self.config.group.clone())
            .increment(1);
        self.held.insert(
            partition,
            Held {
                revision,
                revoke,
                deadline: deadline_tx,
                epoch: self.epochs,
                released: false,
                renew_sent: sent,
            },
        );
        if self.grants.send(grant).is_err() {
            // Nobody takes grants any more: the held entry sees its grant dropped and hands the
            // lease back on the next tick.
        }
    }

    /// Reads `key` from the bucket itself, for when the watch has fallen behind it.
    async fn refresh(&mut self, key: &str) {
        match self.store.entry(key).await {
            Ok(Some(entry)) => self.observe(entry, true),
            Ok(None) => {
                self.view.remove(key);
            }
            Err(err) => tracing::debug!(key, %err, "lease not read"),
        }
    }

    /// Revokes every grant, waits (at most a lease) for the holders to stop, deletes the leases
    /// and the heartbeat.
    async fn leave(mut self) {
        for held in self.held.values() {
            held.revoke.send_replace(true);
        }
        let until = Instant::now() + self.config.lease;
        self.hand_back_released().await;
        while !self.held.is_empty() {
            match tokio::time::timeout_at(until, self.released_rx.recv()).await {
                Ok(Some((partition, epoch))) => {
                    self.released(partition, epoch);
                    self.hand_back_released().await;
                }
                Ok(None) | Err(_) => break,
            }
        }
        let key = self.config.member_key(&self.me);
        if let Err(err) = self.store.delete(&key).await {
            tracing::debug!(%err, "heartbeat not deleted");
        }
    }
}

/// The member that owns `partition` among `members`: the one with the highest weight, so that a
/// member joining or leaving moves only the partitions it gains or held.
pub fn rendezvous(partition: u32, members: &[String]) -> &str {
    members
        .iter()
        .max_by_key(|member| (fnv1a64(format!("{partition}/{member}").as_bytes()), *member))
        .map(String::as_str)
        .unwrap_or_default()
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_reads_as_a_partition_count_only_when_it_is_one() {
        assert_eq!(partition_count(b"16"), Some(16));
        assert_eq!(partition_count(b"1024"), Some(1024));
        for not_a_count in [
            &b"0"[..],
            b"1025",
            b"-3",
            b"",
            // An older build's heartbeat: its instance id, even one of decimal digits.
            b"00000000000000a7",
            b"0000000000000042",
            b"4821739021837465",
        ] {
            assert_eq!(partition_count(not_a_count), None, "{not_a_count:?}");
        }
    }

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn a_member_joining_takes_only_partitions_from_the_others() {
        let before = members(&["a", "b", "c"]);
        let after = members(&["a", "b", "c", "d"]);
        for partition in 0..256 {
            let was = rendezvous(partition, &before);
            let is = rendezvous(partition, &after);
            assert!(
                is == was || is == "d",
                "partition {partition}: {was} -> {is}"
            );
        }
    }

    #[test]
    fn partitions_spread_over_the_members() {
        let all = members(&["1f3a", "77b0", "c001", "e9e9"]);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for partition in 0..64 {
            *counts.entry(rendezvous(partition, &all)).or_default() += 1;
        }
        assert_eq!(counts.len(), 4, "{counts:?}");
        assert!(counts.values().all(|count| *count >= 8), "{counts:?}");
    }
}
