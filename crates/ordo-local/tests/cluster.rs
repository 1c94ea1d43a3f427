//! The 3-node cluster of the test kit: an R3 stream keeps its acknowledged messages when the
//! node leading it is killed, and takes writes again under a new leader.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use ordo_local::{NatsCluster, NatsServer};

#[tokio::test]
async fn an_r3_stream_survives_the_loss_of_its_leader() {
    let cluster = NatsCluster::start(3);
    let client = cluster.client().await;
    NatsServer::wait_for_jetstream(&client).await;
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut created = js
        .create_stream(stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await;
    while created.is_err() {
        // The cluster may still be electing its meta leader.
        assert!(Instant::now() < deadline, "{created:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        created = js
            .create_stream(stream::Config {
                name: "R3".into(),
                subjects: vec!["r3.>".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await;
    }
    for i in 0..10 {
        js.publish(format!("r3.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut r3 = js.get_stream("R3").await.unwrap();
    let leader = r3
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .unwrap()
        .leader
        .unwrap();
    cluster.node(&leader).expect("the leader is a node").kill();

    // A new leader takes writes, and every acknowledged message is still there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let published = async {
            js.publish("r3.after", "y".into()).await?.await?;
            Ok::<_, async_nats::Error>(())
        };
        if tokio::time::timeout(Duration::from_secs(2), published)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            break;
        }
        assert!(Instant::now() < deadline, "no new leader took writes");
    }
    let info = r3.info().await.unwrap();
    assert!(info.state.messages >= 11, "{:?}", info.state);
    assert_ne!(
        info.cluster.as_ref().unwrap().leader.as_deref(),
        Some(leader.as_str())
    );
    cluster.node(&leader).unwrap().restart();
}
