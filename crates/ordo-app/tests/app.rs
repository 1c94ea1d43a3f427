//! ordo as a library: built from `Settings` and run in the test's own process, as a program that
//! embeds ordo would run it.

use std::time::Duration;

use ordo_app::{App, Role, Settings, Shutdown};
use ordo_contract::{CommandRequest, Line, PlaceOrder, Quantity, ReceiveStock, Reply, headers};
use ordo_domain::{CustomerId, OrderId, Sku};
use ordo_testkit::{NatsServer, TestDatabase};

/// Sends `request` under `command_id` until the command service answers (it starts with the app).
async fn send(nats: &async_nats::Client, request: &CommandRequest, command_id: &str) -> Reply {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut sent = async_nats::HeaderMap::new();
        sent.insert(headers::MSG_ID, command_id);
        let answer = nats
            .send_request(
                request.subject(),
                async_nats::Request::new()
                    .headers(sent)
                    .payload(request.body_bytes().into())
                    .timeout(Some(Duration::from_secs(2))),
            )
            .await;
        match answer {
            Ok(answer) => return Reply::parse(&answer.payload).expect("a reply of the contract"),
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "{} not answered: {err}",
                request.subject()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_built_in_process_confirms_an_order_shows_it_and_stops_when_told() {
    let nats = NatsServer::start();
    let database = TestDatabase::create().await;
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let settings = Settings::from_args([
        "--nats-url",
        &nats.url(),
        "--database-url",
        database.url(),
        "--http-addr",
        &http.to_string(),
    ])
    .unwrap();
    let shutdown = Shutdown::new();
    let app = App::build(settings, Role::Everything, &shutdown)
        .await
        .unwrap()
        .expect("built: nothing stopped it");
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let client = nats.client().await;
    let sku = Sku::parse("A1").unwrap();
    let receive = CommandRequest::ReceiveStock(ReceiveStock {
        sku: sku.clone(),
        qty: Quantity::new(5).unwrap(),
    });
    assert!(send(&client, &receive, "receive-1").await.is_accepted());
    let place = CommandRequest::PlaceOrder(PlaceOrder {
        order_id: Some(OrderId::parse("o-1").unwrap()),
        customer_id: CustomerId::parse("c1").unwrap(),
        lines: vec![Line {
            sku,
            qty: Quantity::new(2).unwrap(),
            unit_price_cents: 500,
        }],
        currency: None,
    });
    let placed = send(&client, &place, "place-1").await;
    assert!(placed.is_accepted(), "{placed:?}");

    // The saga confirms it and the view shows it, through the app's own HTTP API.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let order: serde_json::Value = match reqwest::get(format!("http://{http}/orders/o-1")).await
        {
            Ok(response) if response.status() == 200 => response.json().await.unwrap(),
            _ => serde_json::Value::Null,
        };
        if order["status"] == "confirmed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "o-1 was not shown confirmed: {order}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("every component stops when told")
        .unwrap()
        .expect("and none failed");
    assert!(
        reqwest::get(format!("http://{http}/healthz"))
            .await
            .is_err(),
        "the API stopped listening"
    );
}
