//! The client conveniences: each builds the JSON body a `nats req` would send, sends it to the
//! same subject, prints the reply and fails when the reply is not ok.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::connect;

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

pub struct Request {
    subject: &'static str,
    body: Value,
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
            } => {
                let lines = lines
                    .iter()
                    .map(|line| parse_line(line))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let mut body = json!({"customer_id": customer, "lines": lines});
                if let Some(order_id) = order_id {
                    body["order_id"] = json!(order_id);
                }
                if let Some(currency) = currency {
                    body["currency"] = json!(currency);
                }
                Request {
                    subject: "ordo.cmd.order.place",
                    body,
                    command_id,
                }
            }
            Self::Cancel { order_id, reason } => {
                let mut body = json!({"order_id": order_id});
                if let Some(reason) = reason {
                    body["reason"] = json!(reason);
                }
                Request {
                    subject: "ordo.cmd.order.cancel",
                    body,
                    command_id: None,
                }
            }
            Self::Ship { order_id } => Request {
                subject: "ordo.cmd.order.ship",
                body: json!({"order_id": order_id}),
                command_id: None,
            },
        })
    }
}

impl StockAction {
    pub fn into_request(self) -> Request {
        match self {
            Self::Receive {
                sku,
                qty,
                command_id,
            } => Request {
                subject: "ordo.cmd.stock.receive",
                body: json!({"sku": sku, "qty": qty}),
                command_id,
            },
        }
    }
}

/// `SKU:QTY:UNIT_PRICE_CENTS` → a line object; the service validates the values.
fn parse_line(text: &str) -> anyhow::Result<Value> {
    let parts: Vec<&str> = text.split(':').collect();
    let [sku, qty, price] = parts[..] else {
        bail!("--line {text:?}: expected SKU:QTY:UNIT_PRICE_CENTS, e.g. A1:2:500");
    };
    let number = |what: &str, value: &str| {
        value
            .parse::<i64>()
            .with_context(|| format!("--line {text:?}: {what} {value:?} is not a whole number"))
    };
    Ok(json!({"sku": sku, "qty": number("qty", qty)?, "unit_price_cents": number("price", price)?}))
}

pub async fn send(url: &str, request: Request) -> anyhow::Result<()> {
    let nats = connect::connect_once(url).await?;
    let mut headers = async_nats::HeaderMap::new();
    if let Some(command_id) = &request.command_id {
        headers.insert("Nats-Msg-Id", command_id.as_str());
    }
    let body = serde_json::to_vec(&request.body)?;
    let header = match &request.command_id {
        Some(id) => format!("-H Nats-Msg-Id:{id} "),
        None => String::new(),
    };
    println!("> nats req {header}{} '{}'", request.subject, request.body);
    let reply = nats
        .send_request(
            request.subject,
            async_nats::Request::new()
                .headers(headers)
                .payload(body.into())
                .timeout(Some(Duration::from_secs(10))),
        )
        .await
        .with_context(|| format!("no answer on {} (is `ordo up` running?)", request.subject))?;
    let reply: Value = serde_json::from_slice(&reply.payload).context("the reply is not JSON")?;
    println!("{reply}");
    if reply["ok"] != json!(true) {
        std::process::exit(1);
    }
    Ok(())
}

/// The projection status as a table for a terminal.
pub fn status_table(status: &[Value]) -> String {
    let mut out = format!(
        "{:<12} {:<14} {:>10} {:>10} {:>8} {:>7}\n",
        "projection", "stream", "checkpoint", "head", "lag", "parked"
    );
    let show = |value: &Value| match value {
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    for projection in status {
        out.push_str(&format!(
            "{:<12} {:<14} {:>10} {:>10} {:>8} {:>7}\n",
            projection["name"].as_str().unwrap_or_default(),
            projection["stream"].as_str().unwrap_or_default(),
            show(&projection["checkpoint"]),
            show(&projection["stream_head"]),
            show(&projection["lag"]),
            show(&projection["parked"]),
        ));
        for parked in projection["parked_events"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  parked: seq {} on {}: {}\n",
                parked["seq"],
                parked["subject"].as_str().unwrap_or_default(),
                parked["reason"].as_str().unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_sku_qty_and_unit_price() {
        assert_eq!(
            parse_line("A1:2:500").unwrap(),
            json!({"sku": "A1", "qty": 2, "unit_price_cents": 500})
        );
        assert!(parse_line("A1:2").is_err());
        assert!(parse_line("A1:two:500").is_err());
    }
}
