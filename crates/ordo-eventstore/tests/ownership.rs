//! One owner per partition: members of a group share the partitions, hand them on when another
//! joins or leaves, and take over a dead member's once its leases run out, never two holding one
//! partition at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use futures::TryStreamExt;
use ordo_eventstore::{
    Ownership, OwnershipConfig,
    ownership::{OwnershipError, rendezvous},
};
use ordo_testkit::NatsServer;

const PARTITIONS: u32 = 8;

/// Who holds which partition right now, across every member of the test, and whether two ever
/// held one at once.
#[derive(Default)]
struct Holdings {
    holders: BTreeMap<u32, String>,
    overlaps: Vec<String>,
}

type Shared = Arc<Mutex<Holdings>>;

/// A member that holds each grant until it is revoked, recording it in `holdings`.
async fn join(js: &jetstream::Context, holdings: &Shared) -> Ownership {
    let (ownership, mut grants) = Ownership::join(js, OwnershipConfig::new("test", PARTITIONS))
        .await
        .expect("join");
    let me = ownership.instance().to_owned();
    let holdings = holdings.clone();
    tokio::spawn(async move {
        while let Some(grant) = grants.recv().await {
            let (me, holdings) = (me.clone(), holdings.clone());
            tokio::spawn(async move {
                {
                    let mut held = holdings.lock().unwrap();
                    if let Some(other) = held.holders.insert(grant.partition, me.clone()) {
                        held.overlaps.push(format!(
                            "partition {} taken by {me} while {other} held it",
                            grant.partition
                        ));
                    }
                }
                grant.revoked().await;
                holdings.lock().unwrap().holders.remove(&grant.partition);
            });
        }
    });
    ownership
}

/// Partitions held by each member.
fn held_by(holdings: &Shared) -> BTreeMap<String, BTreeSet<u32>> {
    let mut by_member: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (partition, member) in &holdings.lock().unwrap().holders {
        by_member
            .entry(member.clone())
            .or_default()
            .insert(*partition);
    }
    by_member
}

/// Waits until `done` holds of the holdings; panics after `limit`. Returns how long it took.
async fn until(
    holdings: &Shared,
    limit: Duration,
    done: impl Fn(&BTreeMap<String, BTreeSet<u32>>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if done(&held_by(holdings)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not within {limit:?}: {:?}",
            held_by(holdings)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The partitions each of `members` holds when every partition is held by the member that
/// rendezvous hashing deals it to. With random instance ids one member may be dealt none (with
/// two members and 8 partitions, one time in 128), so a test must not expect each to hold some.
fn dealt(members: &[&str]) -> BTreeMap<String, BTreeSet<u32>> {
    let mut members: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
    members.sort();
    let mut dealt: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for partition in 0..PARTITIONS {
        dealt
            .entry(rendezvous(partition, &members).to_owned())
            .or_default()
            .insert(partition);
    }
    dealt
}

/// Joins as a member such that rendezvous hashing deals every member, `others` and itself, at
/// least one partition, so that what a test checks of each cannot hold vacuously (with random
/// ids, one of two members is dealt nothing 1 time in 128 with 8 partitions).
async fn join_dealt_some(js: &jetstream::Context, holdings: &Shared, others: &[&str]) -> Ownership {
    loop {
        let member = join(js, holdings).await;
        let mut all = others.to_vec();
        all.push(member.instance());
        if dealt(&all).len() == all.len() {
            return member;
        }
        member.leave().await;
    }
}

/// Two members, each dealt some partitions, once every partition is held by the one it is dealt
/// to.
async fn two_members_holding_their_share(
    js: &jetstream::Context,
    holdings: &Shared,
) -> (Ownership, Ownership) {
    let first = join(js, holdings).await;
    let second = join_dealt_some(js, holdings, &[first.instance()]).await;
    let both = [first.instance(), second.instance()];
    until(holdings, Duration::from_secs(5), all_held_by(&both)).await;
    (first, second)
}

/// Every partition held, each by the member it is dealt to among `members`.
fn all_held_by(members: &[&str]) -> impl Fn(&BTreeMap<String, BTreeSet<u32>>) -> bool {
    let expected = dealt(members);
    move |held| *held == expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_the_partitions_and_hand_them_on_when_one_joins_or_leaves() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let holdings = Shared::default();

    let first = join(&js, &holdings).await;
    let a = first.instance().to_owned();
    until(&holdings, Duration::from_secs(3), all_held_by(&[&a])).await;

    let second = join_dealt_some(&js, &holdings, &[&a]).await;
    let b = second.instance().to_owned();
    let both = [a.as_str(), b.as_str()];
    until(&holdings, Duration::from_secs(3), all_held_by(&both)).await;

    // A member that leaves deletes its leases: the other takes them without waiting them out.
    second.leave().await;
    let took = until(&holdings, Duration::from_secs(3), all_held_by(&[&a])).await;
    assert!(took < Duration::from_secs(2), "took {took:?}");

    assert_eq!(holdings.lock().unwrap().overlaps, Vec::<String>::new());
    first.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_connection_is_taken_over_after_one_missed_heartbeat() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let holdings = Shared::default();
    let (first, second) = two_members_holding_their_share(&js, &holdings).await;
    let a = first.instance().to_owned();

    // Dropped without leaving: it stops renewing and its liveness subscription is gone, as
    // when a process is killed. Its holders stop at once; the survivor takes its partitions
    // once a heartbeat is 1.5 s late, rather than after the whole lease.
    drop(second);
    let took = until(&holdings, Duration::from_secs(8), all_held_by(&[&a])).await;
    assert!(took < Duration::from_secs(3), "taken over after {took:?}");
    assert_eq!(holdings.lock().unwrap().overlaps, Vec::<String>::new());
    first.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_starts_after_the_owner_died_takes_its_partitions_soon() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let holdings = Shared::default();
    let first = join(&js, &holdings).await;
    let a = first.instance().to_owned();
    until(&holdings, Duration::from_secs(3), all_held_by(&[&a])).await;
    drop(first);
    until(&holdings, Duration::from_secs(1), |held| held.is_empty()).await;

    // Another process, started while the dead owner's leases still look fresh.
    let other = jetstream::new(server.client().await);
    let second = join(&other, &holdings).await;
    let b = second.instance().to_owned();
    // It probes the dead owner once its heartbeat is 750 ms old, rather than wait out the
    // lease (3 s).
    let took = until(&holdings, Duration::from_secs(8), all_held_by(&[&b])).await;
    assert!(
        took < Duration::from_millis(2500),
        "taken over after {took:?}"
    );
    second.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_watch_fell_silent_still_takes_a_dead_members_partitions_soon() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let holdings = Shared::default();
    let (first, second) = two_members_holding_their_share(&js, &holdings).await;
    let a = first.instance().to_owned();

    // The members' watches are ordered consumers of the bucket's stream: deleted, they fall
    // silent without an error, as when the server holding them dies in a cluster (the client
    // would notice after two missed idle heartbeats, 10 s). The second member's leases move on
    // meanwhile (a renewal a second), past the revisions the first member's view holds.
    let bucket = js
        .get_stream(format!("KV_{}", ordo_eventstore::ownership::BUCKET))
        .await
        .unwrap();
    let watches: Vec<String> = bucket.consumer_names().try_collect().await.unwrap();
    assert!(!watches.is_empty());
    for watch in watches {
        bucket.delete_consumer(&watch).await.unwrap();
    }
    // The second member renews its leases meanwhile: the first member's view of them is stale.
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // Killed now, it is found dead within a second, and its partitions are taken at their
    // current revisions: the first member has opened its watch again, its own heartbeat not
    // back for a second (it used to wait 3 s), and reads from the bucket itself a lease it
    // failed to take.
    drop(second);
    let took = until(&holdings, Duration::from_secs(8), all_held_by(&[&a])).await;
    // A member killed on its own is taken over within about 1.5 s; with the watch standing
    // still until 3 s after it fell silent, this took 2.8 s.
    assert!(
        took < Duration::from_millis(2400),
        "taken over after {took:?}"
    );
    assert_eq!(holdings.lock().unwrap().overlaps, Vec::<String>::new());
    first.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_every_partition_held_by_a_live_member_and_what_each_member_holds() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let config = OwnershipConfig::new("test", PARTITIONS);

    // Before anyone joined: every partition unowned, no member.
    let before = ordo_eventstore::ownership::status(&js, &config)
        .await
        .unwrap();
    assert!(
        before
            .partitions
            .iter()
            .all(|p| p.owner.is_none() && !p.held)
    );
    assert!(before.members.is_empty());

    let holdings = Shared::default();
    let first = join(&js, &holdings).await;
    let second = join(&js, &holdings).await;
    let mut both = [first.instance().to_owned(), second.instance().to_owned()];
    both.sort();
    until(
        &holdings,
        Duration::from_secs(5),
        all_held_by(&[both[0].as_str(), both[1].as_str()]),
    )
    .await;

    let status = ordo_eventstore::ownership::status(&js, &config)
        .await
        .unwrap();
    assert_eq!(status.partitions.len(), PARTITIONS as usize);
    for partition in &status.partitions {
        let owner = partition.owner.clone().expect("an owner");
        assert!(both.contains(&owner), "{partition:?}");
        assert!(partition.held, "{partition:?}");
    }
    let members: Vec<&str> = status.members.iter().map(|m| m.instance.as_str()).collect();
    assert_eq!(members, [both[0].as_str(), both[1].as_str()]);
    let dealt = dealt(&[both[0].as_str(), both[1].as_str()]);
    for member in &status.members {
        assert!(member.alive, "{member:?}");
        let expected = dealt.get(&member.instance).map_or(0, BTreeSet::len);
        assert_eq!(member.owns as usize, expected, "{member:?}");
    }
    first.leave().await;
    second.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_partition_count_than_the_live_ones_is_refused_until_they_are_gone()
 {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let holdings = Shared::default();
    let first = join(&js, &holdings).await;
    until(&holdings, Duration::from_secs(5), |held| {
        held.values().map(BTreeSet::len).sum::<usize>() == PARTITIONS as usize
    })
    .await;

    let doubled = OwnershipConfig::new("test", PARTITIONS * 2);
    let refused = match Ownership::join(&js, doubled.clone()).await {
        Ok(_) => panic!("joined a group that runs with another partition count"),
        Err(err) => err,
    };
    assert!(
        matches!(refused, OwnershipError::PartitionCountDiffers(_)),
        "{refused}"
    );
    assert!(
        refused.to_string().contains(first.instance()),
        "names the instance it differs from: {refused}"
    );
    // The status shows the partitions the live members run with, whatever it was asked with.
    let status = ordo_eventstore::ownership::status(&js, &doubled)
        .await
        .unwrap();
    assert_eq!(status.partitions.len(), PARTITIONS as usize);
    assert_eq!(status.members[0].partitions, Some(PARTITIONS));

    // Once every member has gone, the group may start again with the new count, even though
    // the killed member's heartbeat is still young (its liveness subject has no responders).
    drop(first);
    let (second, _grants) = Ownership::join(&js, doubled.clone())
        .await
        .expect("joined once the others were gone");
    let status = ordo_eventstore::ownership::status(&js, &OwnershipConfig::new("test", 1))
        .await
        .unwrap();
    assert_eq!(status.partitions.len(), 2 * PARTITIONS as usize);
    second.leave().await;
}
