//! A service's `affinity` and `balance` keys (loader configuration and `services:` documents):
//! how its new connections are placed ([`Balance`]).

use serde::Deserialize;

use super::fields::invalid;
use crate::model::Balance;
use crate::yaml::Error;

/// `affinity:` of a service.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Affinity {
    /// No affinity: each connection on its own (the default).
    None,
    /// Every connection of one client address to one subset.
    SourceIp,
}

/// `balance:` of a service.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(super) enum BalanceKey {
    /// By a hash of each connection (the default).
    Hash,
    /// Exact weighted round-robin.
    RoundRobin,
}

/// The placement of the service at `path` of `file` from its `affinity` and `balance` keys;
/// `None` when neither is given. The two exclude each other except with their defaults.
pub(super) fn balance_of(
    file: &str,
    path: &str,
    affinity: Option<Affinity>,
    balance: Option<BalanceKey>,
) -> Result<Option<Balance>, Error> {
    Ok(match (affinity, balance) {
        (None, None) => None,
        (Some(Affinity::SourceIp), Some(BalanceKey::RoundRobin)) => {
            return Err(invalid(
                file,
                format!("{path}.balance"),
                "`balance: round-robin` and `affinity: source-ip` exclude each other: \
                 round-robin places each new connection on the next subset in turn, affinity \
                 keeps every connection of a client on one subset; keep one of them",
            ));
        }
        (Some(Affinity::SourceIp), _) => Some(Balance::SourceIp),
        (_, Some(BalanceKey::RoundRobin)) => Some(Balance::RoundRobin),
        _ => Some(Balance::Hash),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, specs_from_yaml_str};
    use crate::model::Balance;

    fn doc(extra: &str) -> String {
        format!("services:\n  s:\n    listen: 31400\n    subsets: {{v1: 127.0.0.1:9001}}\n{extra}")
    }

    #[test]
    fn affinity_and_balance() {
        let mode = |extra: &str| {
            Config::from_yaml_str(&doc(extra), "c.yaml").map(|c| c.services[0].balance)
        };
        assert_eq!(mode("").unwrap(), Balance::Hash);
        assert_eq!(
            mode("    affinity: source-ip\n").unwrap(),
            Balance::SourceIp
        );
        assert_eq!(
            mode("    balance: round-robin\n").unwrap(),
            Balance::RoundRobin
        );
        assert_eq!(
            mode("    affinity: none\n    balance: hash\n").unwrap(),
            Balance::Hash
        );
        let e = mode("    affinity: source-ip\n    balance: round-robin\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.yaml")
                && e.contains("services.s.balance")
                && e.contains("exclude each other"),
            "{e}"
        );
        let e = mode("    balance: random\n").unwrap_err().to_string();
        assert!(
            e.contains("unknown variant `random`") && e.contains("round-robin"),
            "{e}"
        );
        // `services:` documents: absent means "not given" (kept from the kernel by apply).
        let specs = specs_from_yaml_str(&doc(""), "s.yaml").unwrap();
        assert_eq!(specs[0].balance, None);
        let specs = specs_from_yaml_str(&doc("    affinity: source-ip\n"), "s.yaml").unwrap();
        assert_eq!(specs[0].balance, Some(Balance::SourceIp));
    }
}
