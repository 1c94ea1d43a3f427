//! Validated identifiers. Ids become NATS subject tokens (`ordo.order.events.<order_id>`), so an id
//! is 1 to 64 characters of `[A-Za-z0-9_-]`; anything else cannot be constructed.

use serde::{Deserialize, Serialize};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// The longest command id (`Nats-Msg-Id`) the command service takes, in bytes: room for a
/// caller's scope and the saga's step ids.
pub const MAX_COMMAND_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not a valid id: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
}

/// True when `value` can be used as an id (and so as one subject token).
pub fn is_valid_id(value: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                if is_valid_id(&value) {
                    Ok(Self(value))
                } else {
                    Err(IdError { what: $what, value })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// Identifies an order; also the token of its event subject.
    OrderId,
    "order_id"
);
id_type!(
    /// Identifies a customer; also the token of their notification subject.
    CustomerId,
    "customer_id"
);
id_type!(
    /// A stock-keeping unit; also the token of its stock event subject.
    Sku,
    "sku"
);

/// An ISO 4217 currency code: three upper-case letters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl Currency {
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(value))
        } else {
            Err(IdError {
                what: "currency",
                value,
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Currency {
    fn default() -> Self {
        Self("USD".to_owned())
    }
}

impl TryFrom<String> for Currency {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::parse(value)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_subject_tokens_of_1_to_64_safe_characters() {
        for ok in ["o-1", "A1", "a_b-C9", &"x".repeat(64)] {
            assert!(OrderId::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["", "o.1", "o*", "o>", "o 1", "é", &"x".repeat(65), "a\n"] {
            assert!(OrderId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn an_invalid_id_cannot_be_deserialized() {
        assert!(serde_json::from_str::<Sku>("\"A.1\"").is_err());
        assert_eq!(
            serde_json::from_str::<Sku>("\"A1\"").unwrap(),
            Sku::parse("A1").unwrap()
        );
    }

    #[test]
    fn currency_is_three_upper_case_letters_and_defaults_to_usd() {
        assert_eq!(Currency::default().as_str(), "USD");
        assert!(Currency::parse("EUR").is_ok());
        for bad in ["usd", "US", "USDT", "U$D"] {
            assert!(Currency::parse(bad).is_err());
        }
    }
}
