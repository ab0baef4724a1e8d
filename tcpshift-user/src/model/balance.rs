//! How a service places new connections on its subsets: [`Balance`].

use std::fmt;

/// How a service chooses the subset of each new connection. Every mode follows the weights;
/// they differ in which connections go together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Balance {
    /// Each connection by a hash of its 4-tuple (the default): independent placements, the
    /// weights reached on average.
    #[default]
    Hash,
    /// By a hash of the client address only (`affinity: source-ip`, Istio
    /// `consistentHash.useSourceIp`): every connection of one client reaches one subset, and a
    /// weight change moves only as many clients as the weights move.
    SourceIp,
    /// Exact weighted round-robin (`balance: round-robin`, Istio `simple: ROUND_ROBIN`): a
    /// cursor shared by all CPUs walks a weighted sequence, so any run of connections is split
    /// as the weights say, within one connection per subset.
    RoundRobin,
}

impl Balance {
    /// The name used in the configuration, `status` and messages: `hash`, `source-ip` or
    /// `round-robin`.
    pub fn name(self) -> &'static str {
        match self {
            Balance::Hash => "hash",
            Balance::SourceIp => "source-ip",
            Balance::RoundRobin => "round-robin",
        }
    }

    /// The mode called `name` ([`Balance::name`]).
    pub fn from_name(name: &str) -> Option<Balance> {
        [Balance::Hash, Balance::SourceIp, Balance::RoundRobin]
            .into_iter()
            .find(|b| b.name() == name)
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
