//! The loader's YAML configuration, parsed and validated.
//!
//! ```yaml
//! services:
//!   tcp-echo:
//!     listen: 31400            # port on any local address; "ADDR:PORT" and "[v6]:PORT" also accepted
//!     subsets:
//!       v1: 127.0.0.1:9001     # address where that version's server listens
//!       v2: 127.0.0.1:9002
//!     weights: {v1: 100, v2: 0}   # relative integer weights; omitted subsets get 0
//! ```
//!
//! Parsing is strict: unknown keys, duplicate keys, host names instead of IP addresses,
//! negative or fractional weights and strings where numbers are expected are all rejected with
//! a [`ConfigError`] that names the file, the line and column when the YAML parser knows them,
//! the path of the offending field (`services.tcp-echo.weights.v3`) and what is expected.
//!
//! Syntax and per-value errors (a malformed address, a negative weight) are reported by the
//! YAML deserializer and carry a line and column; errors that involve several values (an
//! unknown subset in `weights`, two services on the same listen address) carry the field path.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use tcpshift_common::{MAX_SERVICES, MAX_SUBSETS};

use crate::model::service::{LISTEN_FORMS, SUBSET_FORMS, check_port, name_byte_ok};
use crate::model::{
    Listen, ListenClaims, ServiceConfig, SubsetConfig, parse_subset_addr, validate_service_name,
    validate_subset_name,
};
use crate::weights::MAX_WEIGHT;

/// Weight given to the only subset of a service whose `weights` key is absent.
pub const DEFAULT_SINGLE_WEIGHT: u32 = 100;

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The services, sorted by name (names are unique).
    pub services: Vec<ServiceConfig>,
}

/// Why a configuration was rejected. Every message names the source and says what is
/// expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    // The I/O error is in the message and not a `#[source]`: `{:#}` would repeat it.
    #[error("{}: cannot read the configuration file: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not UTF-8 text.
    #[error(
        "{}: line {line}: not valid UTF-8; the configuration must be YAML text",
        path.display()
    )]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line of the first invalid byte.
        line: usize,
    },
    /// The document is empty or holds only comments.
    #[error(
        "{file}: the configuration is empty; expected a mapping with a `services` key, e.g. \
         `services: {{tcp-echo: {{listen: 31400, subsets: {{v1: \"127.0.0.1:9001\"}}}}}}`"
    )]
    Empty {
        /// Name of the source (file name) used in messages.
        file: String,
    },
    /// Invalid YAML, or a value of the wrong type or format (reported while parsing).
    #[error("{file}{}: {message}", fmt_location(*.line, *.column))]
    Yaml {
        /// Name of the source (file name) used in messages.
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// What is wrong, starting with the field path when known.
        message: String,
    },
    /// A well-formed document that breaks a rule (names, counts, weights, conflicts).
    #[error("{file}: {path}: {message}")]
    Invalid {
        /// Name of the source (file name) used in messages.
        file: String,
        /// Path of the offending field, e.g. `services.tcp-echo.weights.v3`.
        path: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

fn fmt_location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// 1-based line and column of the error, when the YAML parser reported one.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Yaml {
                line: Some(l),
                column: Some(c),
                ..
            } => Some((*l, *c)),
            _ => None,
        }
    }

    fn invalid(file: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_owned(),
            path: clip(&path.into()),
            message: clip(&message.into()),
        }
    }

    /// Like [`ConfigError::from_yaml`], for an error parsing `text`: errors serde_yaml reports
    /// without a location get one (see [`yaml_error_with_location`]).
    fn from_yaml_text(file: &str, text: &str, err: serde_yaml::Error) -> Self {
        let err = yaml_error_with_location(text, err);
        if err.location().is_none()
            && let Some(line) = second_document_line(text)
        {
            return ConfigError::Yaml {
                file: file.to_owned(),
                line: Some(line),
                column: None,
                message: "a second YAML document starts here; the configuration is one \
                          document (remove this `---` line and what follows, or merge them)"
                    .to_owned(),
            };
        }
        ConfigError::from_yaml(file, &err)
    }

    fn nesting(file: &str, (line, column, message): (usize, usize, String)) -> Self {
        ConfigError::Yaml {
            file: file.to_owned(),
            line: Some(line),
            column: Some(column),
            message,
        }
    }

    fn from_yaml(file: &str, err: &serde_yaml::Error) -> Self {
        let mut message = err.to_string();
        let (line, column) = match err.location() {
            Some(loc) => {
                // serde_yaml appends " at line L column C"; the location goes in front instead.
                let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                message = message.replacen(&suffix, "", 1);
                (Some(loc.line()), Some(loc.column()))
            }
            None => (None, None),
        };
        ConfigError::Yaml {
            file: file.to_owned(),
            line,
            column,
            message: clip(&message),
        }
    }
}

impl Config {
    /// Parses and validates a configuration. `source` names the text in error messages
    /// (usually the file name).
    pub fn from_yaml_str(text: &str, source: &str) -> Result<Config, ConfigError> {
        check_flow_nesting(text).map_err(|e| ConfigError::nesting(source, e))?;
        match serde_yaml::from_str::<RawConfig>(text) {
            Ok(raw) => raw.validate(source),
            Err(_) if is_blank(text) => Err(ConfigError::Empty {
                file: source.to_owned(),
            }),
            Err(err) => Err(ConfigError::from_yaml_text(source, text, err)),
        }
    }

    /// Reads, parses and validates a configuration file. Messages name the file as given.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_file_limited(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let text = String::from_utf8(bytes).map_err(|err| {
            let valid = err.utf8_error().valid_up_to();
            let line = 1 + err
                .as_bytes()
                .iter()
                .take(valid)
                .filter(|&&b| b == b'\n')
                .count();
            ConfigError::NotUtf8 {
                path: path.to_owned(),
                line,
            }
        })?;
        Config::from_yaml_str(&text, &path.display().to_string())
    }

    /// The service called `name`, if any.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.services.get(i))
    }
}

/// Largest configuration or manifest file tcpshift reads: far above any real one (10 000
/// services with 16 subsets each take a few MiB), and low enough that `/dev/zero`, a
/// runaway pipe or a huge file is refused instead of exhausting memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

fn too_large() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::FileTooLarge,
        format!(
            "larger than {} MiB, the most tcpshift reads; expected a YAML file",
            MAX_FILE_BYTES >> 20
        ),
    )
}

/// Reads `reader` to its end, refusing more than [`MAX_FILE_BYTES`] bytes.
pub fn read_limited(reader: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut reader.take(MAX_FILE_BYTES + 1), &mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads the file at `path`, refusing more than [`MAX_FILE_BYTES`] bytes (a regular file
/// that large without reading it; devices and pipes after that many bytes).
pub fn read_file_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    read_limited(file)
}

/// Longest quoted value and whole message in an error: values come from files and command
/// lines, and a message must not repeat megabytes of them.
const MAX_QUOTED: usize = 80;
const MAX_MESSAGE: usize = 2000;

/// `message` with every double-quoted value longer than [`MAX_QUOTED`] characters cut in the
/// middle (`"aaaa…aaaa" (N bytes)`), and the whole cut at [`MAX_MESSAGE`] characters.
pub fn clip(message: &str) -> String {
    if message.len() <= MAX_QUOTED {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE + 16));
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        // The closing quote: the next one not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let inner = &rest[..end.unwrap_or(rest.len())];
        let count = inner.chars().count();
        if count > MAX_QUOTED {
            let head: String = inner.chars().take(MAX_QUOTED / 2).collect();
            let tail: String = inner.chars().skip(count - MAX_QUOTED / 4).collect();
            out.push_str(&format!("{head}…{tail}"));
            if end.is_some() {
                out.push_str(&format!("\" ({} bytes)", inner.len()));
            }
        } else {
            out.push_str(inner);
            if end.is_some() {
                out.push('"');
            }
        }
        rest = match end {
            Some(i) => &rest[i + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    if out.chars().count() > MAX_MESSAGE {
        let total = out.len();
        out = out.chars().take(MAX_MESSAGE).collect();
        out.push_str(&format!("… (message cut, {total} bytes)"));
    }
    out
}

/// Deepest nesting of flow collections (`[...]`, `{...}`) handed to the YAML parser. serde_yaml
/// refuses more than 128 levels anyway, but only after libyaml has scanned the whole text, in
/// time quadratic in the depth: 100 000 `{a: ` (400 KB) take over a minute.
pub(crate) const MAX_FLOW_NESTING: usize = 512;

/// Refuses text whose flow collections nest deeper than [`MAX_FLOW_NESTING`], before the YAML
/// parser sees it; returns the 1-based line and column of the first bracket too deep. The
/// count is approximate but never refuses what the parser would accept: brackets in comments
/// and quoted strings are skipped, and one counts only where a collection can start (after a
/// line's indentation, `[`, `{`, `,`, `:`, `-` or `?`).
pub(crate) fn check_flow_nesting(text: &str) -> Result<(), (usize, usize, String)> {
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    let mut prev = '\n'; // the last character that is not a space or tab
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut spaced = true; // the last character was a space, a tab or a line break
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
            comment = false;
            prev = '\n';
            spaced = true;
            continue;
        }
        if comment {
            continue;
        }
        if let Some(q) = quote {
            if q == '"' && c == '\\' {
                chars.next();
                column += 1;
            } else if c == q {
                quote = None;
                prev = c;
            }
            continue;
        }
        match c {
            ' ' | '\t' => {
                spaced = true;
                continue;
            }
            '#' if spaced => comment = true,
            '\'' | '"' if matches!(prev, '\n' | '[' | '{' | ',' | ':' | '-' | '?') => {
                quote = Some(c)
            }
            '[' | '{' if matches!(prev, '\n' | '[' | '{' | ',' | ':' | '-' | '?') => {
                depth += 1;
                if depth > MAX_FLOW_NESTING {
                    return Err((
                        line,
                        column,
                        format!(
                            "collections nested deeper than {MAX_FLOW_NESTING} levels; \
                             expected a tcpshift configuration or Istio objects"
                        ),
                    ));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
        spaced = false;
    }
    Ok(())
}

/// `err`, or, when it has no location, the first located error of the documents of `text`
/// read one by one. serde_yaml reports text after the end of a document (`'a' b`, `{a: 1} x`)
/// as "more than one document" without a location; libyaml's own syntax error for the second
/// document has one.
pub(crate) fn yaml_error_with_location(text: &str, err: serde_yaml::Error) -> serde_yaml::Error {
    if err.location().is_some() {
        return err;
    }
    serde_yaml::Deserializer::from_str(text)
        .take(64)
        .find_map(|doc| {
            serde_yaml::Value::deserialize(doc)
                .err()
                .filter(|e| e.location().is_some())
        })
        .unwrap_or(err)
}

/// 1-based line of the `---` marker that starts a second document in `text`, if any.
pub(crate) fn second_document_line(text: &str) -> Option<usize> {
    let mut content = false;
    for (i, line) in text.lines().enumerate() {
        let bare = line.trim_end();
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && content {
            return Some(i + 1);
        }
        let t = bare.trim_start();
        content |= !(t.is_empty() || t.starts_with('#') || t.starts_with('%') || marker);
        content |= marker && !bare[3..].trim().is_empty() && !bare[3..].trim().starts_with('#');
    }
    None
}

/// True when `text` holds no YAML content: only blank lines, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    })
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
                let port = u16::try_from(v).map_err(|_| {
                    E::custom(format!("port {v} is out of range; expected 1..=65535"))
                })?;
                check_port(port, &v.to_string()).map_err(E::custom)?;
                Ok(Listen::Any { port })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Listen, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "port {v} is negative; expected a port in 1..=65535"
                    ))),
                }
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

/// A name as a path segment: as is when it is a valid name, quoted and escaped otherwise.
fn seg(name: &str) -> String {
    if !name.is_empty() && name.len() <= MAX_QUOTED && name.bytes().all(name_byte_ok) {
        name.to_owned()
    } else {
        clip(&format!("{name:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Raw document

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with a `services` key at the top level"
)]
struct RawConfig {
    services: Entries<RawService>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with the keys `listen`, `subsets` and `weights`"
)]
struct RawService {
    listen: Listen,
    subsets: Entries<SubsetAddr>,
    #[serde(default)]
    weights: Option<Entries<Weight>>,
}

/// A YAML mapping read as a list of (key, value) pairs in document order; duplicate keys are
/// rejected.
struct Entries<V>(Vec<(String, V)>);

/// What the values of an [`Entries`] mapping are, for messages.
trait EntryKind {
    const MAPPING: &'static str;
}

impl EntryKind for RawService {
    const MAPPING: &'static str =
        "a mapping of service names to services, e.g. `tcp-echo: {listen: 31400, subsets: ...}`";
}

impl EntryKind for SubsetAddr {
    const MAPPING: &'static str =
        "a mapping of subset names to addresses, e.g. `{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}`";
}

impl EntryKind for Weight {
    const MAPPING: &'static str =
        "a mapping of subset names to integer weights, e.g. `{v1: 100, v2: 0}`";
}

impl<'de, V: Deserialize<'de> + EntryKind> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de> + EntryKind> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(V::MAPPING)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!(
                            "duplicate key {key:?}; each name may appear only once"
                        )));
                    }
                    let value = map.next_value::<V>()?;
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// A subset's address.
struct SubsetAddr(SocketAddr);

impl<'de> Deserialize<'de> for SubsetAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AddrVisitor;

        impl<'de> Visitor<'de> for AddrVisitor {
            type Value = SubsetAddr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a subset address: {SUBSET_FORMS}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SubsetAddr, E> {
                parse_subset_addr(v).map(SubsetAddr).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SubsetAddr, E> {
                Err(E::custom(format!(
                    "{v} is only a port; a subset needs the address its server listens on: \
                     {SUBSET_FORMS}"
                )))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SubsetAddr, E> {
                Err(E::custom(format!(
                    "{v} is not an address; expected {SUBSET_FORMS}"
                )))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<SubsetAddr, A::Error> {
                Err(de::Error::custom(format!(
                    "got a YAML list; an IPv6 address must be quoted, e.g. \"[::1]:9001\"; \
                     expected {SUBSET_FORMS}"
                )))
            }
        }

        deserializer.deserialize_any(AddrVisitor)
    }
}

/// A weight: an integer in `0..=MAX_WEIGHT`.
struct Weight(u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WeightVisitor;

        impl Visitor<'_> for WeightVisitor {
            type Value = Weight;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer weight in 0..={MAX_WEIGHT}")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Weight, E> {
                match u32::try_from(v) {
                    Ok(w) if w <= MAX_WEIGHT => Ok(Weight(w)),
                    _ => Err(E::custom(format!(
                        "weight {v} is too large; expected an integer in 0..={MAX_WEIGHT}"
                    ))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Weight, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "weight {v} is negative; weights cannot be negative, expected an \
                         integer in 0..={MAX_WEIGHT}"
                    ))),
                }
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is too large; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is out of range; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is not an integer; expected an integer in 0..={MAX_WEIGHT}"
                )))
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
        }

        deserializer.deserialize_any(WeightVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

impl RawConfig {
    fn validate(self, file: &str) -> Result<Config, ConfigError> {
        let raw_services = self.services.0;
        if raw_services.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "services",
                "no services defined; add at least one, e.g. \
                 `tcp-echo: {listen: 31400, subsets: {v1: 127.0.0.1:9001}}`",
            ));
        }
        if raw_services.len() > MAX_SERVICES as usize {
            return Err(ConfigError::invalid(
                file,
                "services",
                format!(
                    "{} services defined; at most {MAX_SERVICES} are supported",
                    raw_services.len()
                ),
            ));
        }

        let mut services = Vec::with_capacity(raw_services.len());
        let mut listens = ListenClaims::new();
        for (name, raw) in raw_services {
            let path = format!("services.{}", seg(&name));
            validate_service_name(&name).map_err(|m| ConfigError::invalid(file, &path, m))?;
            listens
                .claim(&raw.listen, &name)
                .map_err(|e| ConfigError::invalid(file, format!("{path}.listen"), e.to_string()))?;
            let subsets = validate_subsets(file, &path, raw.subsets.0, raw.weights, true)?;
            services.push(ServiceConfig {
                name,
                listen: raw.listen,
                subsets,
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Config { services })
    }
}

fn validate_subsets(
    file: &str,
    path: &str,
    raw: Vec<(String, SubsetAddr)>,
    weights: Option<Entries<Weight>>,
    require_weights: bool,
) -> Result<Vec<SubsetConfig>, ConfigError> {
    let subsets_path = format!("{path}.subsets");
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            file,
            subsets_path,
            format!(
                "no subsets; a service needs 1 to {MAX_SUBSETS} subsets, \
                 e.g. `subsets: {{v1: 127.0.0.1:9001}}`"
            ),
        ));
    }
    if raw.len() > MAX_SUBSETS {
        return Err(ConfigError::invalid(
            file,
            subsets_path,
            format!(
                "{} subsets; a service can have at most {MAX_SUBSETS}",
                raw.len()
            ),
        ));
    }

    let mut subsets: Vec<SubsetConfig> = Vec::with_capacity(raw.len());
    for (name, SubsetAddr(addr)) in raw {
        let sub_path = format!("{subsets_path}.{}", seg(&name));
        validate_subset_name(&name).map_err(|m| ConfigError::invalid(file, &sub_path, m))?;
        let key = (addr.ip().to_canonical(), addr.port());
        if let Some(other) = subsets
            .iter()
            .find(|s| (s.addr.ip().to_canonical(), s.addr.port()) == key)
        {
            return Err(ConfigError::invalid(
                file,
                sub_path,
                format!(
                    "address {addr} is already used by subset {}; each subset needs its own \
                     server address",
                    other.name
                ),
            ));
        }
        subsets.push(SubsetConfig {
            name,
            addr,
            weight: 0,
        });
    }

    let weights_path = format!("{path}.weights");
    match weights {
        // `tcpshiftctl apply`: the weights come from elsewhere (see `ServiceSpec`).
        None if !require_weights => {}
        None if subsets.len() == 1 => {
            if let Some(only) = subsets.first_mut() {
                only.weight = DEFAULT_SINGLE_WEIGHT;
            }
        }
        None => {
            let example = subsets
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{}: {}", s.name, if i == 0 { 100 } else { 0 }))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ConfigError::invalid(
                file,
                path,
                format!(
                    "`weights` is missing; a service with several subsets needs explicit \
                     weights (traffic is never split implicitly), add e.g. \
                     `weights: {{{example}}}`"
                ),
            ));
        }
        Some(Entries(entries)) => {
            for (name, Weight(w)) in entries {
                match subsets.iter_mut().find(|s| s.name == name) {
                    Some(subset) => subset.weight = w,
                    None => {
                        let declared = subsets
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(ConfigError::invalid(
                            file,
                            format!("{weights_path}.{}", seg(&name)),
                            format!("unknown subset {name:?} (declared: {declared})"),
                        ));
                    }
                }
            }
            if subsets.iter().all(|s| s.weight == 0) {
                return Err(ConfigError::invalid(
                    file,
                    weights_path,
                    format!(
                        "all weights are 0; at least one subset needs a weight above 0, \
                         e.g. `{}: 100`",
                        subsets.first().map_or("v1", |s| s.name.as_str())
                    ),
                ));
            }
        }
    }
    Ok(subsets)
}

// ---------------------------------------------------------------------------------------------
// `services:` documents given to `tcpshiftctl apply`

/// One service of a `services:` document given to `tcpshiftctl apply`.
///
/// The document has the loader's format, with two keys that may be left out because
/// `tcpshiftctl apply` can take them from elsewhere: `listen` (from a VirtualService's
/// `match.port` or a Gateway's server port in the same apply, or the service already in the
/// kernel) and `weights` (from a VirtualService, or the kernel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name: 1 to [`MAX_SERVICE_NAME`] bytes of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Where the service listens, when the document says.
    pub listen: Option<Listen>,
    /// The subsets in YAML order (1 to [`MAX_SUBSETS`]). Their weights are those of the
    /// document when [`ServiceSpec::weights_given`], else 0.
    pub subsets: Vec<SubsetConfig>,
    /// Whether the document has a `weights` key for this service.
    pub weights_given: bool,
}

impl ServiceSpec {
    /// The path of the service in its document, for messages: `services.NAME`.
    pub fn path(&self) -> String {
        format!("services.{}", seg(&self.name))
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with a `services` key at the top level"
)]
struct RawSpecs {
    services: Entries<RawSpec>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with the keys `listen`, `subsets` and `weights`"
)]
struct RawSpec {
    #[serde(default)]
    listen: Option<Listen>,
    subsets: Entries<SubsetAddr>,
    #[serde(default)]
    weights: Option<Entries<Weight>>,
}

impl EntryKind for RawSpec {
    const MAPPING: &'static str = RawService::MAPPING;
}

/// Parses and validates a `services:` document given to `tcpshiftctl apply` (one YAML
/// document; `source` names it in messages). The rules are those of [`Config::from_yaml_str`]
/// except that `listen` and `weights` may be left out (see [`ServiceSpec`]); weights that are
/// given must still be valid (integers in `0..=1000000`, not all 0, known subsets). Services
/// are returned sorted by name.
pub fn specs_from_yaml_str(text: &str, source: &str) -> Result<Vec<ServiceSpec>, ConfigError> {
    check_flow_nesting(text).map_err(|e| ConfigError::nesting(source, e))?;
    let raw = match serde_yaml::from_str::<RawSpecs>(text) {
        Ok(raw) => raw,
        Err(_) if is_blank(text) => {
            return Err(ConfigError::Empty {
                file: source.to_owned(),
            });
        }
        Err(err) => return Err(ConfigError::from_yaml_text(source, text, err)),
    };
    let raw_services = raw.services.0;
    if raw_services.is_empty() {
        return Err(ConfigError::invalid(
            source,
            "services",
            "no services defined; add at least one, e.g. \
             `tcp-echo: {subsets: {v1: 127.0.0.2:9000}}`",
        ));
    }
    if raw_services.len() > MAX_SERVICES as usize {
        return Err(ConfigError::invalid(
            source,
            "services",
            format!(
                "{} services defined; at most {MAX_SERVICES} are supported",
                raw_services.len()
            ),
        ));
    }
    let mut specs = Vec::with_capacity(raw_services.len());
    let mut listens = ListenClaims::new();
    for (name, raw) in raw_services {
        let path = format!("services.{}", seg(&name));
        validate_service_name(&name).map_err(|m| ConfigError::invalid(source, &path, m))?;
        if let Some(listen) = &raw.listen {
            listens.claim(listen, &name).map_err(|e| {
                ConfigError::invalid(source, format!("{path}.listen"), e.to_string())
            })?;
        }
        let weights_given = raw.weights.is_some();
        let subsets = validate_subsets(source, &path, raw.subsets.0, raw.weights, false)?;
        specs.push(ServiceSpec {
            name,
            listen: raw.listen,
            subsets,
            weights_given,
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

impl ConfigError {
    /// Moves the line of a parser error by `lines` (for a document that starts on line
    /// `lines + 1` of a multi-document file).
    pub fn shift_lines(self, lines: usize) -> ConfigError {
        match self {
            ConfigError::Yaml {
                file,
                line,
                column,
                message,
            } => ConfigError::Yaml {
                file,
                line: line.map(|l| l + lines),
                column,
                message: shift_line_mentions(&message, lines),
            },
            other => other,
        }
    }
}

/// Adds `lines` to every "at line N" in a YAML parser message (which counts lines from the
/// start of one document of a multi-document file).
pub(crate) fn shift_line_mentions(message: &str, lines: usize) -> String {
    const NEEDLE: &str = "at line ";
    if lines == 0 {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(NEEDLE) {
        let (before, after) = rest.split_at(i + NEEDLE.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + lines).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MAX_SERVICE_NAME, MAX_SUBSET_NAME};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    const SAMPLE: &str = r#"services:
  tcp-echo:
    listen: 31400            # port on any local address; "ADDR:PORT" and "[v6]:PORT" also accepted
    subsets:
      v1: 127.0.0.1:9001     # address where that version's server listens
      v2: 127.0.0.1:9002
    weights: {v1: 100, v2: 0}   # relative integer weights; omitted subsets get 0
"#;

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    fn err(doc: &str) -> String {
        match Config::from_yaml_str(doc, "tcpshift.yaml") {
            Ok(c) => panic!("expected an error for {doc:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ok(doc: &str) -> Config {
        match Config::from_yaml_str(doc, "tcpshift.yaml") {
            Ok(c) => c,
            Err(e) => panic!("expected {doc:?} to parse, got: {e}"),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{msg:?} does not contain {part:?}");
        }
    }

    /// One service `s` listening on 31400 with the given `subsets:` and `weights:` bodies
    /// (flow-style YAML, `None` leaves the key out).
    fn service(subsets: &str, weights: Option<&str>) -> String {
        let mut doc = format!("services:\n  s:\n    listen: 31400\n    subsets: {subsets}\n");
        if let Some(w) = weights {
            doc.push_str(&format!("    weights: {w}\n"));
        }
        doc
    }

    #[test]
    fn sample_document() {
        let config = ok(SAMPLE);
        assert_eq!(
            config,
            Config {
                services: vec![ServiceConfig {
                    name: "tcp-echo".into(),
                    listen: Listen::Any { port: 31400 },
                    subsets: vec![
                        SubsetConfig {
                            name: "v1".into(),
                            addr: v4([127, 0, 0, 1], 9001),
                            weight: 100,
                        },
                        SubsetConfig {
                            name: "v2".into(),
                            addr: v4([127, 0, 0, 1], 9002),
                            weight: 0,
                        },
                    ],
                }],
            }
        );
        let service = config.service("tcp-echo").map(ServiceConfig::weights);
        assert_eq!(service, Some(vec![100, 0]));
        assert!(config.service("nope").is_none());
    }

    #[test]
    fn services_sorted_subsets_in_yaml_order() {
        let doc = "services:
  zeta:
    listen: 1
    subsets: {b: 127.0.0.1:1, a: 127.0.0.1:2, c: 127.0.0.1:3}
    weights: {c: 1, a: 2, b: 3}
  alpha:
    listen: 2
    subsets: {only: \"[::1]:9001\"}
";
        let config = ok(doc);
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        let zeta = &config.services[1];
        let subsets: Vec<(&str, u32)> = zeta
            .subsets
            .iter()
            .map(|s| (s.name.as_str(), s.weight))
            .collect();
        assert_eq!(subsets, [("b", 3), ("a", 2), ("c", 1)]);
        let alpha = &config.services[0];
        assert_eq!(alpha.subsets[0].weight, DEFAULT_SINGLE_WEIGHT);
        assert_eq!(alpha.subsets[0].addr, "[::1]:9001".parse().unwrap());
    }

    #[test]
    fn listen_parse_forms() {
        let any = Listen::Any { port: 31400 };
        for s in ["31400", " 31400 ", "*:31400", "0.0.0.0:31400", "[::]:31400"] {
            assert_eq!(Listen::parse(s), Ok(any), "{s}");
        }
        assert_eq!(
            Listen::parse("127.0.0.1:31400"),
            Ok(Listen::Addr(v4([127, 0, 0, 1], 31400)))
        );
        let v6 = Listen::parse("[::1]:31400");
        assert_eq!(
            v6,
            Ok(Listen::Addr(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::LOCALHOST,
                31400,
                0,
                0
            ))))
        );
        assert_eq!(any.port(), 31400);
        assert_eq!(v6.map(|l| l.port()), Ok(31400));
        assert_eq!(any.ip(), None);
    }

    #[test]
    fn listen_display_round_trips() {
        for (s, shown) in [
            ("31400", "*:31400"),
            ("127.0.0.1:31400", "127.0.0.1:31400"),
            ("[::1]:31400", "[::1]:31400"),
        ] {
            let listen = Listen::parse(s).unwrap();
            assert_eq!(listen.to_string(), shown);
            assert_eq!(Listen::parse(shown), Ok(listen));
            assert_eq!(shown.parse::<Listen>(), Ok(listen));
        }
    }

    #[test]
    fn listen_parse_errors() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty listen address", "expected a port (31400)"]),
            ("0", &["port 0", "1..=65535"]),
            ("70000", &["port 70000 is out of range", "1..=65535"]),
            ("99999999999999999999", &["out of range"]),
            ("127.0.0.1:0", &["port 0", "1..=65535"]),
            ("127.0.0.1:70000", &["port 70000", "out of range"]),
            ("*:", &["invalid port", "expected a port"]),
            ("*:abc", &["invalid port"]),
            ("localhost:31400", &["host name", "IP address is needed"]),
            ("::1:31400", &["brackets", "[::1]:31400"]),
            ("127.0.0.1", &["has no port"]),
            ("[::1]", &["has no port"]),
            ("127.0.0.1:http", &["invalid port \"http\""]),
            ("what?", &["invalid listen address", "IPv4:PORT"]),
        ];
        for (s, parts) in cases {
            match Listen::parse(s) {
                Ok(l) => panic!("{s:?} parsed as {l}"),
                Err(e) => assert_contains(&e, parts),
            }
        }
    }

    #[test]
    fn listen_in_yaml() {
        let doc = |listen: &str| {
            format!("services:\n  s:\n    listen: {listen}\n    subsets: {{v1: 127.0.0.1:1}}\n")
        };
        for (listen, expected) in [
            ("31400", Listen::Any { port: 31400 }),
            ("\"31400\"", Listen::Any { port: 31400 }),
            ("0.0.0.0:31400", Listen::Any { port: 31400 }),
            ("\"[::]:31400\"", Listen::Any { port: 31400 }),
            ("127.0.0.1:31400", Listen::Addr(v4([127, 0, 0, 1], 31400))),
            ("\"[::1]:31400\"", Listen::parse("[::1]:31400").unwrap()),
        ] {
            assert_eq!(ok(&doc(listen)).services[0].listen, expected, "{listen}");
        }
        let cases: &[(&str, &[&str])] = &[
            (
                "0",
                &["tcpshift.yaml:3:13: services.s.listen: port 0", "1..=65535"],
            ),
            ("70000", &["services.s.listen: port 70000 is out of range"]),
            ("-1", &["services.s.listen: port -1 is negative"]),
            (
                "1.5",
                &["services.s.listen: invalid type", "expected a port (31400)"],
            ),
            ("true", &["invalid type: boolean", "expected a port"]),
            ("[::1]:31400", &["must be quoted", "\"[::1]:31400\""]),
            ("localhost:31400", &["IP address is needed"]),
            ("127.0.0.1:0", &["port 0"]),
        ];
        for (listen, parts) in cases {
            assert_contains(&err(&doc(listen)), parts);
        }
    }

    #[test]
    fn subset_addresses() {
        let config = ok(&service(
            "{v1: \"[::1]:9001\", v2: 10.0.0.1:80}",
            Some("{v1: 1}"),
        ));
        assert_eq!(config.services[0].subsets[0].addr.port(), 9001);
        assert!(config.services[0].subsets[0].addr.is_ipv6());
        let cases: &[(&str, &[&str])] = &[
            (
                "{v1: localhost:9001}",
                &[
                    "tcpshift.yaml:4:19: services.s.subsets.v1:",
                    "\"localhost\" is a host name but an IP address is needed",
                ],
            ),
            ("{v1: backend}", &["host name", "IP address is needed"]),
            ("{v1: 127.0.0.1:0}", &["services.s.subsets.v1", "port 0"]),
            ("{v1: 127.0.0.1}", &["has no port", "IPv4:PORT"]),
            ("{v1: 9001}", &["9001 is only a port", "IPv4:PORT"]),
            ("{v1: -1}", &["-1 is not an address"]),
            ("{v1: [::1]:9001}", &["must be quoted"]),
            ("{v1: \"::1:9001\"}", &["brackets"]),
            ("{v1: ~}", &["invalid type: unit value", "subset address"]),
            ("{v1: {addr: 1}}", &["invalid type: map", "subset address"]),
            (
                "[127.0.0.1:1]",
                &["services.s.subsets", "mapping of subset names"],
            ),
        ];
        for (subsets, parts) in cases {
            assert_contains(&err(&service(subsets, Some("{v1: 1}"))), parts);
        }
    }

    #[test]
    fn names() {
        let long_service = "s".repeat(MAX_SERVICE_NAME);
        let doc = format!(
            "services:\n  {long_service}:\n    listen: 1\n    subsets: {{{}: 127.0.0.1:1}}\n",
            "v".repeat(MAX_SUBSET_NAME)
        );
        assert_eq!(ok(&doc).services[0].name, long_service);

        let doc = format!(
            "services:\n  {long_service}x:\n    listen: 1\n    subsets: {{v1: 127.0.0.1:1}}\n"
        );
        assert_contains(&err(&doc), &["is 64 bytes long", "at most 63"]);
        let doc = service(&format!("{{{}: 127.0.0.1:1}}", "v".repeat(32)), None);
        assert_contains(
            &err(&doc),
            &["services.s.subsets.vvv", "is 32 bytes long", "at most 31"],
        );

        let doc = "services:\n  \"tcp echo\":\n    listen: 1\n    subsets: {v1: 127.0.0.1:1}\n";
        assert_contains(
            &err(doc),
            &[
                "services.\"tcp echo\":",
                "contains ' '",
                "A-Z a-z 0-9 . _ -",
            ],
        );
        let doc = "services:\n  \"\":\n    listen: 1\n    subsets: {v1: 127.0.0.1:1}\n";
        assert_contains(&err(doc), &["empty service name"]);
        assert_contains(
            &err(&service("{v/1: 127.0.0.1:1}", None)),
            &["subset name", "'/'"],
        );
        assert_contains(&err(&service("{é: 127.0.0.1:1}", None)), &["'é'"]);
        assert_eq!(validate_subset_name("v1.2_rc-3"), Ok(()));
        assert!(validate_service_name("").is_err());
    }

    #[test]
    fn subset_counts() {
        assert_contains(
            &err(&service("{}", None)),
            &["services.s.subsets: no subsets", "1 to 16"],
        );
        let many = |n: usize| {
            let body: Vec<String> = (0..n)
                .map(|i| format!("v{i}: 127.0.0.1:{}", i + 1))
                .collect();
            format!("{{{}}}", body.join(", "))
        };
        let config = ok(&service(&many(MAX_SUBSETS), Some("{v0: 1}")));
        assert_eq!(config.services[0].subsets.len(), MAX_SUBSETS);
        assert_contains(
            &err(&service(&many(MAX_SUBSETS + 1), Some("{v0: 1}"))),
            &["services.s.subsets: 17 subsets", "at most 16"],
        );
    }

    #[test]
    fn service_counts() {
        assert_contains(&err("services: {}\n"), &["services: no services defined"]);
        assert_contains(&err("services:\n"), &["no services defined"]);
        let n = MAX_SERVICES as usize + 1;
        let mut doc = String::from("services:\n");
        for i in 0..n {
            doc.push_str(&format!(
                "  s{i}: {{listen: {}, subsets: {{v: 127.0.0.1:1}}}}\n",
                i + 1
            ));
        }
        assert_contains(
            &err(&doc),
            &["services: 16385 services defined", "at most 16384"],
        );
    }

    #[test]
    fn weights() {
        let subsets = "{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002, v3: 127.0.0.1:9003}";
        let config = ok(&service(subsets, Some("{v2: 7}")));
        assert_eq!(config.services[0].weights(), [0, 7, 0]);
        let config = ok(&service(subsets, Some("{v1: 1000000, v3: 1}")));
        assert_eq!(config.services[0].weights(), [1_000_000, 0, 1]);

        let doc = SAMPLE.replace("{v1: 100, v2: 0}", "{v1: 100, v3: 5}");
        assert_eq!(
            err(&doc),
            "tcpshift.yaml: services.tcp-echo.weights.v3: unknown subset \"v3\" (declared: v1, v2)"
        );
        let cases: &[(&str, &[&str])] = &[
            (
                "{v1: 0, v2: 0}",
                &[
                    "services.s.weights: all weights are 0",
                    "at least one subset needs a weight above 0",
                ],
            ),
            ("{}", &["all weights are 0"]),
            (
                "{v1: -5}",
                &[
                    "tcpshift.yaml:5:19: services.s.weights.v1: weight -5 is negative",
                    "cannot be negative",
                ],
            ),
            (
                "{v1: 1.5}",
                &["weight 1.5 is not an integer", "0..=1000000"],
            ),
            ("{v1: .inf}", &["not an integer"]),
            (
                "{v1: \"5\"}",
                &["weight \"5\" is a string", "expected an integer"],
            ),
            ("{v1: abc}", &["weight \"abc\" is a string"]),
            (
                "{v1: 1000001}",
                &["weight 1000001 is too large", "0..=1000000"],
            ),
            ("{v1: 99999999999999999999999}", &["too large"]),
            ("{v1: }", &["missing weight"]),
            ("{v1: [1]}", &["invalid type: sequence", "integer weight"]),
            (
                "{v1: 1, v1: 2}",
                &["services.s.weights", "duplicate key \"v1\""],
            ),
            (
                "[1, 2]",
                &[
                    "services.s.weights",
                    "mapping of subset names to integer weights",
                ],
            ),
        ];
        for (weights, parts) in cases {
            assert_contains(&err(&service(subsets, Some(weights))), parts);
        }
    }

    #[test]
    fn weights_absent() {
        let config = ok(&service("{v1: 127.0.0.1:9001}", None));
        assert_eq!(config.services[0].weights(), [100]);
        let message = err(&service("{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}", None));
        assert_contains(
            &message,
            &[
                "services.s:",
                "`weights` is missing",
                "`weights: {v1: 100, v2: 0}`",
            ],
        );
    }

    #[test]
    fn listen_conflicts() {
        let doc = |a: &str, b: &str| {
            format!(
                "services:\n  a: {{listen: {a}, subsets: {{v1: 127.0.0.1:1}}}}\n  \
                 b: {{listen: {b}, subsets: {{v1: 127.0.0.1:2}}}}\n"
            )
        };
        assert_contains(
            &err(&doc("31400", "\"0.0.0.0:31400\"")),
            &["services.b.listen: *:31400 is already the listen address of service a"],
        );
        assert_contains(
            &err(&doc("\"127.0.0.1:5\"", "\"127.0.0.1:5\"")),
            &["services.b.listen: 127.0.0.1:5 is already"],
        );
        assert_contains(
            &err(&doc("\"127.0.0.1:5\"", "\"[::ffff:127.0.0.1]:5\"")),
            &["already the listen address of service a"],
        );
        // Any and a specific address on the same port are fine; so are different ports.
        assert_eq!(ok(&doc("5", "\"127.0.0.1:5\"")).services.len(), 2);
        assert_eq!(ok(&doc("\"[::1]:5\"", "\"127.0.0.1:5\"")).services.len(), 2);
        assert_eq!(ok(&doc("5", "6")).services.len(), 2);
    }

    #[test]
    fn duplicate_subset_addresses() {
        let message = err(&service(
            "{v1: 127.0.0.1:9001, v2: 127.0.0.1:9001}",
            Some("{v1: 1}"),
        ));
        assert_contains(
            &message,
            &["services.s.subsets.v2: address 127.0.0.1:9001 is already used by subset v1"],
        );
        let message = err(&service(
            "{v1: 127.0.0.1:9001, v2: \"[::ffff:127.0.0.1]:9001\"}",
            Some("{v1: 1}"),
        ));
        assert_contains(&message, &["already used by subset v1"]);
    }

    #[test]
    fn structure_errors() {
        let cases: &[(&str, &[&str])] = &[
            (
                "",
                &["tcpshift.yaml: the configuration is empty", "`services`"],
            ),
            ("# nothing\n\n", &["the configuration is empty"]),
            ("---\n# nothing\n...\n", &["the configuration is empty"]),
            (
                "~\n",
                &[
                    "invalid type: unit value",
                    "a mapping with a `services` key",
                ],
            ),
            (
                "[1, 2]\n",
                &[
                    "tcpshift.yaml:1:1: invalid type: sequence",
                    "a mapping with a `services` key",
                ],
            ),
            (
                "hello\n",
                &[
                    "invalid type: string \"hello\"",
                    "a mapping with a `services` key",
                ],
            ),
            ("42\n", &["invalid type: integer", "a mapping"]),
            (
                "servics: {}\n",
                &["unknown field `servics`, expected `services`"],
            ),
            ("services: {}\nextra: 1\n", &["unknown field `extra`"]),
            (
                "services: [a]\n",
                &["invalid type: sequence", "mapping of service names"],
            ),
            (
                "services:\n  s: 5\n",
                &["services.s: invalid type: integer", "a service"],
            ),
            (
                "services:\n  s:\n    subsets: {v1: 127.0.0.1:1}\n",
                &["services.s: missing field `listen`"],
            ),
            (
                "services:\n  s:\n    listen: 1\n",
                &["services.s: missing field `subsets`"],
            ),
            (
                "services:\n  s:\n    listen: 1\n    subsets: {v1: 127.0.0.1:1}\n    wieghts: {}\n",
                &["tcpshift.yaml:", "unknown field `wieghts`", "`weights`"],
            ),
            (
                "services:\n  s:\n    listen: 1\n    listen: 2\n    subsets: {v1: 127.0.0.1:1}\n",
                &["duplicate field `listen`"],
            ),
            (
                "services:\n  s: {listen: 1, subsets: {v1: 127.0.0.1:1}}\n  s: {listen: 2, subsets: {v1: 127.0.0.1:1}}\n",
                &["services: duplicate key \"s\""],
            ),
            (
                "services: {s: {listen: 1, subsets: {v: 127.0.0.1:1}}}\n---\nservices: {}\n",
                &["tcpshift.yaml:2: a second YAML document starts here"],
            ),
            (
                "\u{0}\u{1}\u{2}\u{7f}",
                &["tcpshift.yaml:", "control characters"],
            ),
            (
                "services: {s: {listen: 1",
                &["tcpshift.yaml:", "did not find expected"],
            ),
            ("services:\n  s:\n\tlisten: 1\n", &["tcpshift.yaml:3:"]),
            ("services: *nope\n", &["unknown anchor"]),
            ("services: !!binary AAAA\n", &["tcpshift.yaml:"]),
        ];
        for (doc, parts) in cases {
            assert_contains(&err(doc), parts);
        }
    }

    #[test]
    fn yaml_errors_carry_locations() {
        let doc = SAMPLE.replace("v2: 127.0.0.1:9002", "v2: localhost:9002");
        let e = Config::from_yaml_str(&doc, "x.yaml").unwrap_err();
        assert_eq!(e.location(), Some((6, 11)));
        let message = e.to_string();
        assert!(
            message.starts_with("x.yaml:6:11: services.tcp-echo.subsets.v2: "),
            "{message}"
        );
        assert!(!message.contains(" at line "), "{message}");
    }

    #[test]
    fn truncated_sample_never_panics() {
        for (i, _) in SAMPLE.char_indices() {
            let _ = Config::from_yaml_str(&SAMPLE[..i], "t.yaml");
        }
        assert_contains(
            &err(&SAMPLE[..SAMPLE.len() - 70]),
            &["tcpshift.yaml:", "weights"],
        );
        assert_contains(&err(&SAMPLE[..40]), &["tcpshift.yaml:"]);
    }

    #[test]
    fn deep_nesting_is_an_error() {
        // (libyaml is quadratic in the flow nesting depth: keep these moderate.)
        for doc in [
            "[".repeat(10_000),
            "{a: ".repeat(5_000),
            "- ".repeat(10_000),
        ] {
            assert!(Config::from_yaml_str(&doc, "t.yaml").is_err());
        }
        let doc = format!("services: {}", "[".repeat(1000));
        assert_contains(&err(&doc), &["tcpshift.yaml:"]);
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "tcpshift-config-test-{}-{name}",
            std::process::id()
        ))
    }

    #[test]
    fn from_file() {
        let path = temp_path("ok.yaml");
        std::fs::write(&path, SAMPLE).unwrap();
        let config = Config::from_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(config.unwrap().services[0].name, "tcp-echo");

        let path = temp_path("bad.yaml");
        std::fs::write(&path, SAMPLE.replace("v1: 100", "v1: -100")).unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert_contains(
            &message,
            &[&format!("{}:7:", path.display()), "cannot be negative"],
        );

        let path = temp_path("missing.yaml");
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert_contains(
            &message,
            &[
                &path.display().to_string(),
                "cannot read the configuration file",
            ],
        );

        let path = temp_path("binary.yaml");
        std::fs::write(&path, b"services:\n  a\xff\xfe: 1\n").unwrap();
        let e = Config::from_file(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(e, ConfigError::NotUtf8 { line: 2, .. }), "{e:?}");
        assert_contains(
            &e.to_string(),
            &[&path.display().to_string(), "line 2", "UTF-8"],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let _ = Config::from_yaml_str(&text, "fuzz.yaml");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Config::from_yaml_str(&String::from_utf8_lossy(&bytes), "fuzz.yaml");
        }

        #[test]
        fn yaml_like_text_never_panics(
            text in "[a-z0-9:{}\\[\\], \\n\"'&*!#.-]{0,200}"
        ) {
            let _ = Config::from_yaml_str(&text, "fuzz.yaml");
        }

        #[test]
        fn mutated_sample_never_panics(
            at in 0..SAMPLE.len(),
            len in 0..20usize,
            insert in "[ -~\\n]{0,10}",
        ) {
            let mut doc = SAMPLE.to_owned();
            let end = (at + len).min(doc.len());
            doc.replace_range(at..end, &insert);
            let _ = Config::from_yaml_str(&doc, "fuzz.yaml");
        }

        #[test]
        fn any_port_listen_round_trips(port in 1u16..) {
            let listen = Listen::parse(&port.to_string());
            prop_assert_eq!(listen, Ok(Listen::Any { port }));
            let shown = Listen::Any { port }.to_string();
            prop_assert_eq!(Listen::parse(&shown), Ok(Listen::Any { port }));
        }
    }
}
