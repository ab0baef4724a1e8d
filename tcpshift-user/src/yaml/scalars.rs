//! The YAML scalars both parsers read: the one weight, the one port and the listen address.
//!
//! Every way a value can be wrong gets a message that says what was found and what is
//! expected; numbers too large for any integer type (`99999999999999999999`) are "too
//! large" like any other out-of-range value, never a parser-internal type error.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::model::Listen;
use crate::model::service::{LISTEN_FORMS, port_number};
use crate::weights::MAX_WEIGHT;

/// A weight: an integer in `0..=`[`MAX_WEIGHT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weight(pub u32);

fn weight_too_large(v: impl fmt::Display) -> String {
    format!(
        "weight {v} is too large; expected an integer in 0..={MAX_WEIGHT} (weights are relative)"
    )
}

fn weight_negative(v: impl fmt::Display) -> String {
    format!("weight {v} is negative; expected an integer in 0..={MAX_WEIGHT}")
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Weight;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer weight in 0..={MAX_WEIGHT}")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Weight, E> {
                match u32::try_from(v) {
                    Ok(w) if w <= MAX_WEIGHT => Ok(Weight(w)),
                    _ => Err(E::custom(weight_too_large(v))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Weight, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(weight_negative(v))),
                }
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Weight, E> {
                Err(E::custom(weight_too_large(v)))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Weight, E> {
                if v < 0 {
                    Err(E::custom(weight_negative(v)))
                } else {
                    Err(E::custom(weight_too_large(v)))
                }
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Weight, E> {
                // Integers beyond 128 bits arrive as floats.
                if v.is_finite() && v.fract() == 0.0 && v > f64::from(MAX_WEIGHT) {
                    Err(E::custom(weight_too_large(format!("{v:e}"))))
                } else if v.is_finite() && v.fract() == 0.0 && v < 0.0 {
                    Err(E::custom(weight_negative(format!("{v:e}"))))
                } else {
                    Err(E::custom(format!(
                        "weight {v} is not an integer; expected an integer in 0..={MAX_WEIGHT}"
                    )))
                }
            }

            fn visit_unit<E: de::Error>(self) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "missing weight; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v:?} is a string; expected an integer in 0..={MAX_WEIGHT} \
                     (without quotes)"
                )))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is a boolean; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

/// A TCP port number in `1..=65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u16);

fn port_out_of_range(v: impl fmt::Display) -> String {
    format!("port {v} is out of range; expected a port number in 1..=65535")
}

/// The integer forms of a port, shared by [`Port`] and [`Listen`].
fn port_from_u64<E: de::Error>(v: u64) -> Result<u16, E> {
    port_number(v).map_err(E::custom)
}

fn port_from_i64<E: de::Error>(v: i64) -> Result<u16, E> {
    match u64::try_from(v) {
        Ok(v) => port_from_u64(v),
        Err(_) => Err(E::custom(format!(
            "port {v} is negative; expected a port number in 1..=65535"
        ))),
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number in 1..=65535")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                port_from_u64(v).map(Port)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                port_from_i64(v).map(Port)
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Port, E> {
                Err(E::custom(port_out_of_range(v)))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Port, E> {
                Err(E::custom(port_out_of_range(v)))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v} is not an integer; expected a port number in 1..=65535"
                )))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v:?} is a string; expected a port number in 1..=65535 (without \
                     quotes)"
                )))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v} is a boolean; expected a port number in 1..=65535"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.0)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Listen, D::Error> {
        struct ListenVisitor;

        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = Listen;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(LISTEN_FORMS)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Listen, E> {
                port_from_u64(v).map(|port| Listen::Any { port })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Listen, E> {
                port_from_i64(v).map(|port| Listen::Any { port })
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Listen, E> {
                Err(E::custom(port_out_of_range(v)))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Listen, E> {
                Err(E::custom(port_out_of_range(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                Listen::parse(v).map_err(E::custom)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<Listen, A::Error> {
                Err(de::Error::custom(format!(
                    "got a YAML list; an IPv6 listen address must be quoted, e.g. \
                     listen: \"[::1]:31400\"; expected {LISTEN_FORMS}"
                )))
            }
        }

        deserializer.deserialize_any(ListenVisitor)
    }
}

impl<'de> Deserialize<'de> for crate::model::Protocol {
    fn deserialize<D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<crate::model::Protocol, D::Error> {
        struct ProtocolVisitor;

        impl<'de> Visitor<'de> for ProtocolVisitor {
            type Value = crate::model::Protocol;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a protocol: {}", crate::model::PROTOCOL_FORMS)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<crate::model::Protocol, E> {
                crate::model::Protocol::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(ProtocolVisitor)
    }
}
