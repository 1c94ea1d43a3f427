//! The client conveniences: each builds the JSON body a `nats req` would send, sends it to the
//! same subject, prints the reply (alone on stdout; the equivalent `nats req` on stderr) and fails
//! when the reply is not ok.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use ordo_contract::{
    CancelOrder, CommandRequest, Line, PlaceOrder, Quantity, Reason, ReceiveStock, Reply,
    ShipOrder, headers,
};
use ordo_domain::{Currency, CustomerId, OrderId, Sku};
use serde_json::Value;

use ordo_app::connect;

#[derive(Subcommand)]
pub enum OrderAction {
    /// Place an order: `ordo order place --customer c1 --line A1:2:500`.
    Place {
        #[arg(long)]
        customer: String,
        /// SKU:QTY:UNIT_PRICE_CENTS, once per line.
        #[arg(long = "line", required = true)]
        lines: Vec<String>,
        /// Generated when absent (and returned in the reply).
        #[arg(long)]
        order_id: Option<String>,
        #[arg(long)]
        currency: Option<String>,
        /// Sent as Nats-Msg-Id: repeating it returns the first outcome.
        #[arg(long)]
        command_id: Option<String>,
    },
    /// Cancel a pending or confirmed order.
    Cancel {
        order_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Ship a confirmed order.
    Ship { order_id: String },
    /// Read an order from the read API at --http-addr (with --http-token when it asks for one):
    /// `GET /orders/{id}`, printed as it answers.
    Get {
        order_id: String,
        /// Wait (up to 5 s) until the view holds this stream sequence: a command's reply's `seq`.
        #[arg(long)]
        min_seq: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum StockAction {
    /// Add on-hand stock (creates the SKU): `ordo stock receive A1 5`.
    Receive {
        sku: String,
        qty: i64,
        /// Sent as Nats-Msg-Id: repeating it returns the first outcome.
        #[arg(long)]
        command_id: Option<String>,
    },
}

/// A typed command of the contract, and the command id to send it under.
pub struct Request {
    command: CommandRequest,
    command_id: Option<String>,
}

impl OrderAction {
    pub fn into_request(self) -> anyhow::Result<Request> {
        Ok(match self {
            Self::Place {
                customer,
                lines,
                order_id,
                currency,
                command_id,
            } => Request {
                command: CommandRequest::PlaceOrder(PlaceOrder {
                    order_id: order_id.map(OrderId::parse).transpose()?,
                    customer_id: CustomerId::parse(customer)?,
                    lines: lines
                        .iter()
                        .map(|line| parse_line(line))
                        .collect::<anyhow::Result<Vec<_>>>()?,
                    currency: currency.map(Currency::parse).transpose()?,
                }),
                command_id,
            },
            Self::Cancel { order_id, reason } => Request {
                command: CommandRequest::CancelOrder(CancelOrder {
                    order_id: OrderId::parse(order_id)?,
                    reason: reason.map(Reason::new).transpose()?,
                }),
                command_id: None,
            },
            Self::Ship { order_id } => Request {
                command: CommandRequest::ShipOrder(ShipOrder {
                    order_id: OrderId::parse(order_id)?,
                }),
                command_id: None,
            },
            Self::Get { .. } => unreachable!("a read, sent by get_order"),
        })
    }
}

/// `ordo order get`: the order as the read API answers it, alone on stdout; fails when the API
/// answers an error (printed too: it says why).
pub async fn get_order(
    settings: &ordo_app::Settings,
    order_id: &str,
    min_seq: Option<u64>,
) -> anyhow::Result<()> {
    let order_id = OrderId::parse(order_id)?;
    let mut url = format!("http://{}/orders/{}", settings.http_addr, order_id.as_str());
    if let Some(min_seq) = min_seq {
        url.push_str(&format!("?min_seq={min_seq}"));
    }
    let mut request = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10));
    if let Some(token) = &settings.http_access.http_token {
        request = request.bearer_auth(token.expose());
    }
    let response = request.send().await.with_context(|| {
        format!(
            "no answer from the read API at {} (is `ordo up` running? --http-addr names it)",
            settings.http_addr
        )
    })?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("the read API answered {status} without JSON"))?;
    println!("{body}");
    if !status.is_success() {
        std::process::exit(1);
    }
    Ok(())
}

impl StockAction {
    pub fn into_request(self) -> anyhow::Result<Request> {
        match self {
            Self::Receive {
                sku,
                qty,
                command_id,
            } => Ok(Request {
                command: CommandRequest::ReceiveStock(ReceiveStock {
                    sku: Sku::parse(sku)?,
                    qty: u64::try_from(qty)
                        .ok()
                        .and_then(Quantity::new)
                        .with_context(|| format!("qty must be greater than 0, got {qty}"))?,
                }),
                command_id,
            }),
        }
    }
}

/// `SKU:QTY:UNIT_PRICE_CENTS` → an order line.
fn parse_line(text: &str) -> anyhow::Result<Line> {
    let parts: Vec<&str> = text.split(':').collect();
    let [sku, qty, price] = parts[..] else {
        bail!("--line {text:?}: expected SKU:QTY:UNIT_PRICE_CENTS, e.g. A1:2:500");
    };
    let number = |what: &str, value: &str| {
        value
            .parse::<u64>()
            .with_context(|| format!("--line {text:?}: {what} {value:?} is not a whole number"))
    };
    Ok(Line {
        sku: Sku::parse(sku.to_owned())?,
        qty: u32::try_from(number("qty", qty)?)
            .ok()
            .and_then(Quantity::new)
            .with_context(|| format!("--line {text:?}: qty {qty} must be 1 to {}", u32::MAX))?,
        unit_price_cents: number("price", price)?,
    })
}

pub async fn send(settings: &ordo_app::Settings, request: Request) -> anyhow::Result<()> {
    let nats = connect::connect_once(&settings.nats_url(), &settings.nats_auth).await?;
    let mut request_headers = async_nats::HeaderMap::new();
    if let Some(command_id) = &request.command_id {
        request_headers.insert(headers::MSG_ID, command_id.as_str());
    }
    let subject = request.command.subject();
    let body = request.command.body();
    let header = match &request.command_id {
        Some(id) => format!("-H {}:{id} ", headers::MSG_ID),
        None => String::new(),
    };
    // The request on stderr, the reply alone on stdout (for `| jq`).
    eprintln!("> nats req {header}{subject} '{body}'");
    let reply = nats
        .send_request(
            subject,
            async_nats::Request::new()
                .headers(request_headers)
                .payload(request.command.body_bytes().into())
                .timeout(Some(Duration::from_secs(10))),
        )
        .await
        .with_context(|| format!("no answer on {subject} (is `ordo up` running?)"))?;
    let printed: Value = serde_json::from_slice(&reply.payload).context("the reply is not JSON")?;
    println!("{printed}");
    if !Reply::parse(&reply.payload)?.is_accepted() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_sku_qty_and_unit_price() {
        assert_eq!(
            parse_line("A1:2:500").unwrap(),
            Line {
                sku: Sku::parse("A1").unwrap(),
                qty: Quantity::new(2).unwrap(),
                unit_price_cents: 500
            }
        );
        assert!(parse_line("A.1:2:500").is_err());
        assert!(parse_line("A1:0:500").is_err());
        assert!(parse_line("A1:2").is_err());
        assert!(parse_line("A1:two:500").is_err());
    }
}
