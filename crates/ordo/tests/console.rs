//! The console, driven in a real headless browser (Debian's chromium through chromedriver, which
//! `scripts/test` installs) against ordo deployed as docker/ deploys it: the shipped NATS
//! accounts, each component its own process and user, the read API behind a token. A person's
//! session: log in, find what needs them, read an order's whole story, see hostile text stay
//! text, and retry a saga that is stuck because the command service was stopped.
//!
//! Screenshots of each page are kept in `target/tmp/console/` (README's picture is one of them).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator};
use ordo_contract::Endpoint;
use ordo_testkit::NatsServer;
use serde_json::{Value, json};
use shipped::{Shipped, connect_as};

mod shipped;

const TOKEN: &str = "console-token-7c1e";
/// A cancel reason as a shop could send it: markup that must stay text.
const HOSTILE_REASON: &str =
    "<script>window.hacked=1</script><img src=x onerror=\"window.hacked=2\">";

/// A chromedriver of the test's own, on a free port, with a headless chromium session.
struct Browser {
    driver: Child,
    client: Client,
    shots: PathBuf,
}

impl Browser {
    async fn start() -> Self {
        let webdriver = shipped::free_address();
        let chromedriver =
            std::env::var("ORDO_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let driver = Command::new(&chromedriver)
            .arg(format!(
                "--port={}",
                webdriver.rsplit_once(':').expect("host:port").1
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("starting {chromedriver} (scripts/test installs chromium-driver): {err}")
            });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,1400"]}),
        );
        let webdriver = format!("http://{webdriver}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => break client,
                Err(err) => {
                    assert!(Instant::now() < deadline, "no browser session: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            driver,
            client,
            shots,
        }
    }

    /// Keeps a screenshot of the page as `<name>.png`.
    async fn shoot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// The text of the element `css` finds. Live pages replace their elements every 2 s: one
    /// replaced between the find and the read is found again.
    async fn text(&self, css: &str) -> String {
        for _ in 0..3 {
            // Waited for: after a click or a submit, the next page may still be on its way.
            let element = self
                .client
                .wait()
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|err| panic!("no {css}: {err}"));
            match element.text().await {
                Ok(text) => return text,
                Err(err) if err.to_string().contains("stale element") => continue,
                Err(err) => panic!("reading {css}: {err}"),
            }
        }
        panic!("{css} was replaced at every read")
    }

    /// Accepts the confirmation the console asked for, and reads what the action's answer says:
    /// its outcome (`done`, `refused`, `failed`) and its text.
    async fn confirm_and_read_outcome(&self) -> (String, String) {
        self.client.accept_alert().await.unwrap();
        let outcome = self
            .client
            .wait()
            .for_element(Locator::Css("p.outcome"))
            .await
            .unwrap();
        (
            outcome
                .attr("data-outcome")
                .await
                .unwrap()
                .unwrap_or_default(),
            outcome.text().await.unwrap(),
        )
    }

    /// The whole page's text, as a person reads it.
    async fn page_text(&self) -> String {
        self.text("body").await
    }

    /// No script the page was given ran: nothing set `window.hacked`, no dialog is open, and the
    /// only script element is the console's own.
    async fn ran_nothing_hostile(&self) {
        assert!(
            self.client.get_alert_text().await.is_err(),
            "a dialog opened"
        );
        let hacked = self
            .client
            .execute(
                "return window.hacked === undefined ? null : window.hacked;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(hacked, Value::Null, "a script from the page ran");
        let scripts = self
            .client
            .execute(
                "return Array.from(document.scripts, (script) => script.getAttribute('src'));",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(scripts, json!(["/ui/assets/console.js"]));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// The read API as a program reads it: with the bearer token.
async fn read(http: &str, path: &str) -> Option<Value> {
    let response = reqwest::Client::new()
        .get(format!("http://{http}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    response.status().is_success().then_some(())?;
    response.json().await.ok()
}

/// Waits until `check` holds of what `path` answers, and returns that answer.
async fn read_until(shipped: &Shipped, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(answer) = read(&shipped.http, path).await
            && check(&answer)
        {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never showed what was awaited; see the logs in {}",
            shipped.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(client: &async_nats::Client, endpoint: Endpoint, body: Value) -> Value {
    NatsServer::request_until_answered(
        client,
        endpoint.subject(),
        &body,
        None,
        Duration::from_secs(60),
    )
    .await
}

fn step_state<'a>(saga: &'a Value, kind: &str) -> Option<&'a str> {
    saga["steps"]
        .as_array()?
        .iter()
        .find(|step| step["kind"] == kind)?["state"]
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reads_an_orders_story_and_retries_a_stuck_saga_in_a_browser() {
    // Payments take a moment, so that the command service can be stopped while one is made.
    let mut shipped = Shipped::start(&[
        ("ORDO_HTTP_TOKEN", TOKEN),
        ("ORDO_PAYMENT_LATENCY_MS", "1500"),
        ("ORDO_TRACE_URL", "http://traces.example/trace/{trace_id}"),
    ])
    .await;
    let url = shipped.server.url();
    let (shop, warehouse) = (
        connect_as(&url, "shop").await,
        connect_as(&url, "warehouse").await,
    );
    let received = send(
        &warehouse,
        Endpoint::StockReceive,
        json!({"sku": "A1", "qty": 3}),
    )
    .await;
    assert_eq!(received["ok"], true, "{received}");
    let place = |order_id: &str, qty: u32| {
        json!({"order_id": order_id, "customer_id": "c1",
               "lines": [{"sku": "A1", "qty": qty, "unit_price_cents": 500}]})
    };
    // One order confirmed, then cancelled by the shop with a reason that is markup…
    assert_eq!(
        send(&shop, Endpoint::OrderPlace, place("o-ok", 2)).await["ok"],
        true
    );
    read_until(&shipped, "/sagas/o-ok", |saga| saga["state"] == "confirmed").await;
    let cancelled = send(
        &shop,
        Endpoint::OrderCancel,
        json!({"order_id": "o-ok", "reason": HOSTILE_REASON}),
    )
    .await;
    assert_eq!(cancelled["ok"], true, "{cancelled}");
    read_until(&shipped, "/sagas/o-ok", |saga| saga["state"] == "cancelled").await;
    // …one rejected for stock…
    assert_eq!(
        send(&shop, Endpoint::OrderPlace, place("o-short", 5)).await["ok"],
        true
    );
    read_until(&shipped, "/sagas/o-short", |saga| {
        saga["state"] == "rejected"
    })
    .await;
    // …and one whose confirm finds the command service stopped: its stock reserved, the command
    // service is killed while the payment is made, and the confirm goes unanswered until the
    // saga shows it stuck.
    assert_eq!(
        send(&shop, Endpoint::OrderPlace, place("o-stuck", 1)).await["ok"],
        true
    );
    read_until(&shipped, "/sagas/o-stuck", |saga| {
        step_state(saga, "reserve") == Some("succeeded")
    })
    .await;
    shipped.kill_component("commands");
    read_until(&shipped, "/sagas/o-stuck", |saga| {
        saga["state"] == "compensation_stuck"
    })
    .await;
    read_until(&shipped, "/orders/o-short", |order| {
        order["status"] == "rejected"
    })
    .await;
    read_until(&shipped, "/notifications?order_id=o-ok", |found| {
        found["notifications"]
            .as_array()
            .is_some_and(|all| all.len() == 2)
    })
    .await;

    let browser = Browser::start().await;
    let http_addr = shipped.http.clone();
    let ui = |path: &str| format!("http://{http_addr}{path}");

    // Without the session, a page sends the browser to the login form; a wrong token is refused.
    browser.client.goto(&ui("/ui/orders/o-ok")).await.unwrap();
    assert_eq!(
        browser.client.current_url().await.unwrap().path(),
        "/ui/login"
    );
    let login = browser
        .client
        .form(Locator::Css("form.login"))
        .await
        .unwrap();
    login.set_by_name("token", "not-the-token").await.unwrap();
    login.submit().await.unwrap();
    // The submit returns before the answer is shown: wait for it.
    let refused = browser
        .client
        .wait()
        .for_element(Locator::Css("p.error"))
        .await
        .unwrap();
    let refused = refused.text().await.unwrap();
    assert!(refused.contains("That is not the API token."), "{refused}");
    browser.shoot("login-refused").await;
    let login = browser
        .client
        .form(Locator::Css("form.login"))
        .await
        .unwrap();
    login.set_by_name("token", TOKEN).await.unwrap();
    login.submit().await.unwrap();
    // Back to the page asked for, and the token is in no URL.
    browser
        .client
        .wait()
        .for_element(Locator::Css("section#summary"))
        .await
        .unwrap_or_else(|err| panic!("not back at the order's page: {err}"));
    let at = browser.client.current_url().await.unwrap();
    assert_eq!(
        at.path(),
        "/ui/orders/o-ok",
        "{}",
        browser.page_text().await
    );
    assert!(!at.as_str().contains(TOKEN));
    let cookie = browser
        .client
        .get_named_cookie("ordo_console")
        .await
        .unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie
            .same_site()
            .map(|same_site| format!("{same_site:?}"))
            .as_deref(),
        Some("Strict")
    );
    assert!(!cookie.value().contains(TOKEN));

    // The cancelled order: its events as stored, the reason as text, the compensations.
    let page = browser.page_text().await;
    for expected in [
        "OrderPlaced",
        "OrderConfirmed",
        "OrderCancelled",
        "release",
        "refund",
        "compensation",
    ] {
        assert!(
            page.contains(expected),
            "no {expected:?} on the order page:\n{page}"
        );
    }
    assert_eq!(
        browser.text("#reason").await,
        format!("Reason: {HOSTILE_REASON}")
    );
    browser.ran_nothing_hostile().await;
    let trace = browser
        .client
        .find(Locator::Css("#trace a"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(
        trace.starts_with("http://traces.example/trace/") && trace.len() == 28 + 32,
        "{trace}"
    );
    // The notifications of its confirmation and of its cancellation, sent.
    let notifications = browser.text("table.notifications").await;
    assert!(
        notifications.contains("confirmed") && notifications.contains("cancelled"),
        "{notifications}"
    );
    // Time travel: the first event opened shows the order as it was right after it.
    let first = browser
        .client
        .find(Locator::Css("ol.timeline li:first-child summary"))
        .await
        .unwrap();
    first.click().await.unwrap();
    let state_then = browser.text("ol.timeline li:first-child pre.state").await;
    let state_then: Value = serde_json::from_str(&state_then).unwrap();
    assert_eq!(state_then["status"], "pending", "{state_then}");
    let last = browser
        .client
        .find(Locator::Css("ol.timeline li:last-child summary"))
        .await
        .unwrap();
    last.click().await.unwrap();
    let state_now: Value =
        serde_json::from_str(&browser.text("ol.timeline li:last-child pre.state").await).unwrap();
    assert_eq!(state_now["status"], "cancelled", "{state_now}");
    browser.shoot("order-cancelled").await;

    // The rejected order: the reason, and the reject step.
    browser
        .client
        .goto(&ui("/ui/orders/o-short"))
        .await
        .unwrap();
    assert!(
        browser
            .text("#reason")
            .await
            .contains("insufficient stock for A1"),
    );
    assert!(browser.page_text().await.contains("OrderRejected"));
    browser.shoot("order-rejected").await;

    // A hostile id in the URL renders as text in the error.
    browser
        .client
        .goto(&ui(
            "/ui/orders/%3Cimg%20src%3Dx%20onerror%3D%22window.hacked%3D3%22%3E",
        ))
        .await
        .unwrap();
    assert_eq!(
        browser.text("#asked").await,
        "<img src=x onerror=\"window.hacked=3\">"
    );
    browser.ran_nothing_hostile().await;
    browser.shoot("hostile-id").await;

    // The SKU: what is on hand and reserved, and the order holding it.
    browser.client.goto(&ui("/ui/stock/A1")).await.unwrap();
    assert_eq!(browser.text("#on-hand").await, "3");
    assert_eq!(browser.text("#reserved").await, "1");
    assert!(browser.text("table.holders").await.contains("o-stuck"));
    browser.shoot("stock").await;

    // Projections and partitions, live.
    browser.client.goto(&ui("/ui/projections")).await.unwrap();
    let projections = browser.text("table.projections").await;
    assert!(
        projections.contains("orders") && projections.contains("stock"),
        "{projections}"
    );
    browser.shoot("projections").await;
    browser.client.goto(&ui("/ui/partitions")).await.unwrap();
    for group in ["commands", "saga", "projection-orders", "projection-stock"] {
        browser
            .client
            .find(Locator::Css(&format!("section[data-group='{group}']")))
            .await
            .unwrap_or_else(|err| panic!("no partitions of {group}: {err}"));
    }
    browser.shoot("partitions").await;

    // What needs a person: the stuck saga, linked.
    browser.client.goto(&ui("/ui/")).await.unwrap();
    assert!(browser.text("table.stuck-sagas").await.contains("o-stuck"));
    assert_eq!(browser.text("dd[data-status='rejected']").await, "1");
    browser.shoot("home").await;
    browser
        .client
        .find(Locator::LinkText("o-stuck"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(
        browser
            .text("#saga-state")
            .await
            .contains("compensation_stuck")
    );
    browser.shoot("order-stuck").await;

    // The retry asks first: dismissed, nothing happens.
    let retry = browser
        .client
        .find(Locator::Css("#retry-saga"))
        .await
        .unwrap();
    retry.click().await.unwrap();
    assert!(
        browser
            .client
            .get_alert_text()
            .await
            .unwrap()
            .contains("o-stuck")
    );
    browser.client.dismiss_alert().await.unwrap();
    assert_eq!(
        read(&shipped.http, "/sagas/o-stuck").await.unwrap()["state"],
        "compensation_stuck"
    );
    // Accepted, it is asked of the saga coordinator, and the page says what happened.
    retry.click().await.unwrap();
    let (outcome, said) = browser.confirm_and_read_outcome().await;
    assert_eq!(outcome, "done", "{said}");
    assert!(said.contains("now running"), "{said}");
    browser.shoot("retried").await;
    // With the command service back, the saga confirms the order.
    shipped.start_component("commands");
    read_until(&shipped, "/sagas/o-stuck", |saga| {
        saga["state"] == "confirmed"
    })
    .await;
    browser
        .client
        .goto(&ui("/ui/orders/o-stuck"))
        .await
        .unwrap();
    assert!(browser.text("#saga-state").await.contains("confirmed"));
    browser.shoot("order-page").await;

    // Actions need the token, and come from the console's own pages only.
    let http = reqwest::Client::new();
    let retry_url = ui("/ui/sagas/o-stuck/retry");
    let anonymous = http.post(&retry_url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let session = format!("ordo_console={}", cookie.value());
    let forged = http
        .post(&retry_url)
        .header("Cookie", &session)
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    // Nor from another site's page that sends no Origin, or an opaque one.
    for (name, value) in [("Sec-Fetch-Site", "cross-site"), ("Origin", "null")] {
        let forged = http
            .post(&retry_url)
            .header("Cookie", &session)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 403, "{name}: {value}");
    }
    // Another site cannot log a browser in with a token of its choosing either.
    let forged_login = http
        .post(ui("/ui/login"))
        .header("Origin", "http://evil.example")
        .form(&[("token", TOKEN), ("next", "/ui/")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged_login.status(), 403);
    assert!(forged_login.headers().get("set-cookie").is_none());
    // A saga that is not stuck is refused, not touched; here asked through a TLS proxy that
    // names the public host in `X-Forwarded-Host`, which the console takes as its own.
    let before = read(&shipped.http, "/sagas/o-stuck").await.unwrap();
    let not_stuck = http
        .post(&retry_url)
        .header("Cookie", &session)
        .header("Origin", "https://ordo.example")
        .header("X-Forwarded-Host", "ordo.example")
        .header("Sec-Fetch-Site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(not_stuck.status(), 409);
    assert_eq!(read(&shipped.http, "/sagas/o-stuck").await.unwrap(), before);
    // Every answer of the console carries the policy.
    let page = http
        .get(ui("/ui/"))
        .header("Cookie", &session)
        .send()
        .await
        .unwrap();
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("default-src 'none'"));
    // …the way to the login form and a page that does not exist among them.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let to_login = no_redirects.get(ui("/ui/stock/A1")).send().await.unwrap();
    assert_eq!(to_login.status(), 303);
    let missing = http
        .get(ui("/ui/no-such-page"))
        .header("Cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    for answer in [&to_login, &missing] {
        assert!(
            answer.headers().contains_key("content-security-policy"),
            "{:?}",
            answer.url()
        );
    }

    browser.client.clone().close().await.unwrap();
    shipped.components_were_refused_nothing();
}

/// `ordo up` as a new user runs it: one process, no token, the database's owner. The console
/// opens without a login; a dead-lettered notification is delivered again and a view rebuilt,
/// each from its button.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ordo_up_a_person_delivers_a_dead_letter_again_and_rebuilds_a_view() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let database = ordo_testkit::TestDatabase::create().await;
    let http = shipped::free_address();
    let _up = ordo_testkit::OrdoProcess::start(
        Shipped::ORDO,
        &["up", "--notify-failure-rate", "1"],
        [
            ("ORDO_NATS_URL", server.url()),
            ("ORDO_DATABASE_URL", database.url().to_owned()),
            ("ORDO_HTTP_ADDR", http.clone()),
            ("ORDO_HOME", dir.path().display().to_string()),
        ],
        &dir.path().join("up.log"),
    );
    let client = server.client().await;
    let received = send(
        &client,
        Endpoint::StockReceive,
        json!({"sku": "B2", "qty": 5}),
    )
    .await;
    assert_eq!(received["ok"], true, "{received}");
    let placed = send(
        &client,
        Endpoint::OrderPlace,
        json!({"order_id": "o-1", "customer_id": "c1",
               "lines": [{"sku": "B2", "qty": 1, "unit_price_cents": 250}]}),
    )
    .await;
    assert_eq!(placed["ok"], true, "{placed}");
    // Every delivery fails on purpose: the confirmation ends dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: Option<Value> = async {
            reqwest::get(format!("http://{http}/notifications?order_id=o-1"))
                .await
                .ok()?
                .json()
                .await
                .ok()
        }
        .await;
        if found.is_some_and(|found| found["notifications"][0]["status"] == "dead_lettered") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter; see {}",
            dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let browser = Browser::start().await;
    let ui = |path: &str| format!("http://{http}{path}");
    // No token: no login, no logout.
    browser.client.goto(&ui("/ui/")).await.unwrap();
    assert_eq!(browser.client.current_url().await.unwrap().path(), "/ui/");
    assert!(
        browser
            .client
            .find(Locator::Css("form.logout"))
            .await
            .is_err()
    );
    assert!(browser.text("table.dead-letters").await.contains("o-1"));
    browser.client.goto(&ui("/ui/orders/o-1")).await.unwrap();
    browser
        .client
        .find(Locator::Css("table.notifications button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(
        browser
            .client
            .get_alert_text()
            .await
            .unwrap()
            .contains("confirmed notification of o-1")
    );
    // Asked of the notifier, which delivered it once more (and failed, as it is told to).
    let (outcome, said) = browser.confirm_and_read_outcome().await;
    assert_eq!(outcome, "done", "{said}");
    assert!(
        said.starts_with("Delivery of the confirmed notification of o-1 again: now "),
        "{said}"
    );
    // Delivered again, failed again: still dead-lettered, after the notifier's whole count of
    // attempts (5 by default) once more.
    let after: Value = reqwest::get(ui("/notifications?order_id=o-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        after["notifications"][0]["status"], "dead_lettered",
        "{after}"
    );
    assert_eq!(after["notifications"][0]["attempts"], 5, "{after}");
    browser.shoot("redelivered").await;

    // A rebuild from the projections page, followed there until it is swapped in.
    browser.client.goto(&ui("/ui/projections")).await.unwrap();
    browser
        .client
        .find(Locator::Css(
            "form[action='/ui/projections/orders/rebuild'] button",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let (outcome, said) = browser.confirm_and_read_outcome().await;
    assert_eq!(outcome, "done", "{said}");
    browser.client.goto(&ui("/ui/projections")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The page reads itself again every 2 s.
        if let Ok(rebuild) = browser
            .client
            .find(Locator::Css("p.rebuild[data-view='orders']"))
            .await
            && rebuild.attr("data-state").await.ok().flatten().as_deref() == Some("done")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuild did not finish: {}\n{}",
            browser.client.source().await.unwrap(),
            std::fs::read_to_string(dir.path().join("up.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        browser
            .text("p.rebuild[data-view='orders']")
            .await
            .contains("swapped in")
    );
    browser.shoot("rebuilt").await;
    // The view still serves the order.
    let order: Value = reqwest::get(ui("/orders/o-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(order["order_id"], "o-1", "{order}");

    // Without a token there is no cookie to forge, and another site's page still cannot press
    // the buttons.
    let forged = reqwest::Client::new()
        .post(ui("/ui/projections/orders/rebuild"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    // Nor a page of another site whose name was pointed at this address (DNS rebinding): to the
    // browser it is same-origin, so without a token the console answers only when reached by
    // address: it neither acts nor shows a page.
    let port = http.rsplit_once(':').unwrap().1;
    let rebound = reqwest::Client::new()
        .post(ui("/ui/projections/orders/rebuild"))
        .header("Host", format!("evil.example:{port}"))
        .header("Origin", format!("http://evil.example:{port}"))
        .header("Sec-Fetch-Site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    let rebound_read = reqwest::Client::new()
        .get(ui("/ui/orders/o-1"))
        .header("Host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound_read.status(), 403);
    // Behind a proxy that sends its upstream's address as `Host`, the name is in
    // `X-Forwarded-Host`: refused too, and with it the POST whose Origin matches that name.
    let behind_proxy = reqwest::Client::new()
        .post(ui("/ui/projections/orders/rebuild"))
        .header("X-Forwarded-Host", format!("evil.example:{port}"))
        .header("Origin", format!("http://evil.example:{port}"))
        .header("Sec-Fetch-Site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(behind_proxy.status(), 403);
    let by_localhost = reqwest::get(format!("http://localhost:{port}/ui/orders/o-1"))
        .await
        .unwrap();
    assert_eq!(by_localhost.status(), 200);
    browser.client.clone().close().await.unwrap();
}
