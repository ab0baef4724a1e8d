//! Property tests ("fuzzing") of the configuration and manifest parsers: the loader's
//! configuration ([`Config::from_yaml_str`]), the `services:` documents of `tcpshiftctl apply`
//! ([`config::specs_from_yaml_str`]) and Istio manifests ([`Manifest::parse`] and
//! [`Manifest::resolve`]).
//!
//! - Arbitrary bytes, and soups of YAML and tcpshift tokens, never panic; every error has a
//!   non-empty message that names the source and a location (line and column, or the path of
//!   the offending field).
//! - Valid generated configurations (and the same services as a `services:` document plus an
//!   Istio VirtualService) parse to exactly the services, subsets and weights generated.
//! - Structure-aware mutations of valid configurations and Istio documents (lines deleted,
//!   duplicated, swapped or truncated; values replaced by junk of the wrong type, oversized
//!   numbers, aliases, deep nesting) never panic, and their errors name a location.
//!
//! The default is 256 cases per property (a few seconds, run in CI by `cargo xtask test`).
//! A long session, e.g. overnight:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test -p tcpshift-user --test fuzz_config --release
//! ```
//!
//! A failure prints the shrunk input and is saved in `fuzz_config.proptest-regressions` to be
//! replayed first on every later run.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use proptest::test_runner::Config as PtConfig;
use tcpshift::config::{self, Config, ConfigError};
use tcpshift::istio::{ApplyError, Manifest};
use tcpshift::model::{self, Listen};

const SOURCE: &str = "fuzz.yaml";

/// 256 cases unless `PROPTEST_CASES` says otherwise.
fn cases() -> PtConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    PtConfig {
        cases: n,
        // Failures found are saved in `fuzz_config.proptest-regressions` next to this file
        // and replayed first on every run (the default location needs a lib.rs).
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..PtConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// What every error must look like

/// A message a user can act on: not empty, one source named, no Rust debug formatting.
fn check_message(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.trim().is_empty(), "empty error message");
    prop_assert!(
        message.starts_with(SOURCE),
        "the message does not start with the source name: {message:?}"
    );
    prop_assert!(
        message.len() <= 4096,
        "a message of {} bytes: {:?}",
        message.len(),
        &message[..message.floor_char_boundary(300)]
    );
    prop_assert!(
        !message.contains("panicked"),
        "a panic in the message: {message:?}"
    );
    Ok(())
}

/// A configuration error names the source and where: line and column, or a field path.
fn check_config_error(e: &ConfigError) -> Result<(), TestCaseError> {
    let message = e.to_string();
    check_message(&message)?;
    // The location must be known and shown in the message, not only claimed.
    let located = match e {
        ConfigError::Invalid(l) => located_in(&message, l),
        // The whole (empty) text is the location.
        ConfigError::Empty { .. } => true,
        ConfigError::NotUtf8 { line, .. } => message.contains(&format!(":{line}: ")),
        ConfigError::Read { .. } => true,
    };
    prop_assert!(located, "no location in {message:?} ({e:?})");
    Ok(())
}

/// Whether a located error shows its location in the message: `FILE:LINE[:COLUMN]: ` at the
/// start when the line is known, else the object or the field path (its first characters).
fn located_in(message: &str, l: &tcpshift::yaml::Located) -> bool {
    match (l.line, l.column) {
        (Some(line), Some(c)) => message.starts_with(&format!("{}:{line}:{c}: ", l.file)),
        (Some(line), None) => message.starts_with(&format!("{}:{line}: ", l.file)),
        (None, _) => {
            let shown = |x: &Option<String>| {
                x.as_deref().is_some_and(|x| {
                    let head: String = x.chars().take(16).collect();
                    !x.is_empty() && message.contains(&head)
                })
            };
            shown(&l.field) || shown(&l.object)
        }
    }
}

/// A line an error points at must be in the input (or just past its end).
fn check_line_in(text: &str, line: Option<usize>, message: &str) -> Result<(), TestCaseError> {
    if let Some(l) = line {
        // YAML breaks lines at CR, LF, NEL, LS and PS (a CRLF pair is one break).
        let lines = text
            .replace("\r\n", "\n")
            .split(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
            .count();
        prop_assert!(
            (1..=lines + 1).contains(&l),
            "line {l} of a {lines}-line input in {message:?}"
        );
    }
    Ok(())
}

/// An apply error names the source and where: line (and column), or the object and field.
fn check_apply_error(e: &ApplyError) -> Result<(), TestCaseError> {
    let message = e.to_string();
    check_message(&message)?;
    let located = match e {
        ApplyError::Invalid(l) => located_in(&message, l),
        ApplyError::NotUtf8 { line, .. } => message.contains(&format!(":{line}: ")),
        ApplyError::Empty { .. } | ApplyError::Read { .. } => true,
    };
    prop_assert!(located, "no location in {message:?} ({e:?})");
    Ok(())
}

/// Runs every parser on `text`: none may panic, every error must be well formed. Returns the
/// loader's result.
fn parse_all(text: &str) -> Result<Result<Config, ConfigError>, TestCaseError> {
    parse_all_inner(text).map_err(|e| {
        let shown: String = text.chars().take(2000).collect();
        TestCaseError::fail(format!("{e}\n--- input ---\n{shown}\n--- end ---"))
    })
}

fn parse_all_inner(text: &str) -> Result<Result<Config, ConfigError>, TestCaseError> {
    let loader = Config::from_yaml_str(text, SOURCE);
    match &loader {
        Ok(c) => check_config_invariants(c)?,
        Err(e) => {
            check_config_error(e)?;
            check_line_in(text, e.location().map(|l| l.0), &e.to_string())?;
        }
    }
    if let Err(e) = config::specs_from_yaml_str(text, SOURCE) {
        check_config_error(&e)?;
        check_line_in(text, e.location().map(|l| l.0), &e.to_string())?;
    }
    let applied = match Manifest::parse(text, SOURCE) {
        Ok(m) if !m.is_empty() => m.resolve(&[]).err(),
        Ok(_) => None,
        Err(e) => Some(e),
    };
    if let Some(e) = applied {
        check_apply_error(&e)?;
        check_line_in(text, e.location().map(|l| l.0), &e.to_string())?;
    }
    Ok(loader)
}

/// What a configuration that parsed must satisfy.
fn check_config_invariants(c: &Config) -> Result<(), TestCaseError> {
    prop_assert!(!c.services.is_empty());
    prop_assert!(c.services.windows(2).all(|w| w[0].name < w[1].name));
    for s in &c.services {
        prop_assert!((1..=model::MAX_SERVICE_NAME).contains(&s.name.len()));
        prop_assert!((1..=tcpshift_common::MAX_SUBSETS).contains(&s.subsets.len()));
        prop_assert!(
            s.subsets.iter().any(|x| x.weight > 0),
            "all weights 0: {s:?}"
        );
        prop_assert!(s.listen.port() != 0);
        for x in &s.subsets {
            prop_assert!((1..=model::MAX_SUBSET_NAME).contains(&x.name.len()));
            prop_assert!(x.addr.port() != 0);
            prop_assert!(x.weight <= tcpshift::weights::MAX_WEIGHT);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A model of valid configurations, and its YAML

/// A subset: name, address, weight.
type SubsetModel = (String, SocketAddr, u32);
/// A service: name, listen address, subsets.
type ServiceModel = (String, Listen, Vec<SubsetModel>);

#[derive(Clone, Debug)]
struct Model {
    /// (name, listen, subsets as (name, address, weight)), names unique, listens unique.
    services: Vec<ServiceModel>,
}

fn name_strategy(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9][A-Za-z0-9._-]{{0,{}}}", max - 1))
        .expect("regex")
}

fn addr_strategy() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        4 => any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        1 => any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
    ];
    (ip, 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn subsets_strategy() -> impl Strategy<Value = Vec<SubsetModel>> {
    proptest::collection::vec(
        (
            name_strategy(model::MAX_SUBSET_NAME),
            addr_strategy(),
            prop_oneof![Just(0u32), 0..=100u32, 0..=tcpshift::weights::MAX_WEIGHT],
        ),
        1..=tcpshift_common::MAX_SUBSETS,
    )
    .prop_map(|mut v| {
        // Unique names and addresses (v4-mapped v6 addresses count as their v4 form).
        let mut names = std::collections::HashSet::new();
        let mut addrs = std::collections::HashSet::new();
        v.retain(|(n, a, _)| {
            names.insert(n.clone()) && addrs.insert((a.ip().to_canonical(), a.port()))
        });
        if v.iter().all(|(_, _, w)| *w == 0) {
            v[0].2 = 1;
        }
        v
    })
}

fn listen_strategy() -> impl Strategy<Value = Listen> {
    prop_oneof![
        (1..=u16::MAX).prop_map(|port| Listen::Any { port }),
        addr_strategy()
            .prop_filter("specified address", |a| !a
                .ip()
                .to_canonical()
                .is_unspecified())
            .prop_map(Listen::Addr),
    ]
}

fn model_strategy() -> impl Strategy<Value = Model> {
    proptest::collection::vec(
        (
            name_strategy(model::MAX_SERVICE_NAME),
            listen_strategy(),
            subsets_strategy(),
        ),
        1..=4,
    )
    .prop_map(|mut v| {
        let mut names = std::collections::HashSet::new();
        let mut listens = std::collections::HashSet::new();
        v.retain(|(n, l, _)| {
            let key = match l {
                Listen::Any { port } => (None, *port),
                Listen::Addr(a) => (Some(a.ip().to_canonical()), a.port()),
            };
            names.insert(n.clone()) && listens.insert(key)
        });
        Model { services: v }
    })
}

/// How the YAML of a model is written: block or flow mappings, quoting, listen spelling.
#[derive(Clone, Copy, Debug)]
struct Style {
    flow_subsets: bool,
    flow_weights: bool,
    quote_names: bool,
    any_as_star: bool,
    comments: bool,
}

fn style_strategy() -> impl Strategy<Value = Style> {
    any::<[bool; 5]>().prop_map(|b| Style {
        flow_subsets: b[0],
        flow_weights: b[1],
        quote_names: b[2],
        any_as_star: b[3],
        comments: b[4],
    })
}

fn key(name: &str, style: Style) -> String {
    // Names that YAML would read as something else than a string (`1`, `1.5`, `.inf`,
    // `1e3`, `0x1`, `-1`, `.nan`...) are always quoted.
    let needs_quotes = serde_yaml::from_str::<serde_yaml::Value>(name)
        .map(|v| !matches!(v, serde_yaml::Value::String(_)))
        .unwrap_or(true);
    if style.quote_names || needs_quotes {
        format!("\"{name}\"")
    } else {
        name.to_owned()
    }
}

fn render(model: &Model, style: Style) -> String {
    let mut y = String::new();
    if style.comments {
        y.push_str("# generated\n---\n");
    }
    y.push_str("services:\n");
    for (name, listen, subsets) in &model.services {
        let _ = writeln!(y, "  {}:", key(name, style));
        let listen = match listen {
            Listen::Any { port } if style.any_as_star => format!("\"*:{port}\""),
            Listen::Any { port } => port.to_string(),
            Listen::Addr(a) => format!("\"{a}\""),
        };
        let _ = writeln!(y, "    listen: {listen}");
        if style.flow_subsets {
            let items: Vec<String> = subsets
                .iter()
                .map(|(n, a, _)| format!("{}: \"{a}\"", key(n, style)))
                .collect();
            let _ = writeln!(y, "    subsets: {{{}}}", items.join(", "));
        } else {
            y.push_str("    subsets:\n");
            for (n, a, _) in subsets {
                let _ = writeln!(y, "      {}: \"{a}\"", key(n, style));
                if style.comments {
                    y.push_str("      # a comment\n");
                }
            }
        }
        if style.flow_weights {
            let items: Vec<String> = subsets
                .iter()
                .map(|(n, _, w)| format!("{}: {w}", key(n, style)))
                .collect();
            let _ = writeln!(y, "    weights: {{{}}}", items.join(", "));
        } else {
            y.push_str("    weights:\n");
            for (n, _, w) in subsets {
                let _ = writeln!(y, "      {}: {w}", key(n, style));
            }
        }
    }
    y
}

/// The model as parsed configurations look: sorted by name.
fn expected(model: &Model) -> Vec<ServiceModel> {
    let mut v = model.services.clone();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn parsed(c: &Config) -> Vec<ServiceModel> {
    c.services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.listen,
                s.subsets
                    .iter()
                    .map(|x| (x.name.clone(), x.addr, x.weight))
                    .collect(),
            )
        })
        .collect()
}

/// The model's first service as a tcpshift `services:` document without weights plus an Istio
/// Gateway and VirtualService that give its listen port and weights.
fn render_istio(model: &Model) -> (String, String, Vec<(String, u32)>) {
    let (name, listen, subsets) = &model.services[0];
    let port = listen.port();
    let mut y = String::new();
    let _ = writeln!(y, "services:\n  \"{name}\":\n    subsets:");
    for (n, a, _) in subsets {
        let _ = writeln!(y, "      \"{n}\": \"{a}\"");
    }
    let _ = write!(
        y,
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  \
         selector:\n    istio: ingressgateway\n  servers:\n  - port:\n      number: {port}\n      \
         name: tcp\n      protocol: TCP\n    hosts:\n    - \"*\"\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: vs\n\
         spec:\n  hosts:\n  - \"*\"\n  gateways:\n  - gw\n  tcp:\n  - match:\n    - port: {port}\n    \
         route:\n"
    );
    let mut weights = Vec::new();
    for (n, a, w) in subsets {
        let _ = write!(
            y,
            "    - destination:\n        host: \"{name}\"\n        port:\n          number: {}\n        \
             subset: \"{n}\"\n      weight: {w}\n",
            a.port()
        );
        weights.push((n.clone(), *w));
    }
    (name.clone(), y, weights)
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// Junk to put where a value or a line was.
fn junk_strategy() -> impl Strategy<Value = String> {
    let fixed: Vec<String> = [
        "-1",
        "1e9",
        "0.5",
        "99999999999999999999999999",
        "~",
        "null",
        "true",
        "[]",
        "{}",
        "[1, 2]",
        "\"\"",
        "'unterminated",
        "\"unterminated",
        "&a x",
        "*a",
        "*undefined",
        "!!binary aGVsbG8=",
        "!custom x",
        "<<: {a: 1}",
        "? complex\n: key",
        "localhost:9001",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "[::1]:9001",
        "0.0.0.0:31400",
        "\t",
        "---",
        "...",
        "%YAML 1.2",
        "\u{feff}",
        "\u{0}",
        "apiVersion: networking.istio.io/v1",
        "kind: VirtualService",
        "kind: DestinationRule",
        "http: [{route: [{destination: {host: x}}]}]",
        "weight: -5",
        "subset: v9",
        "number: 70000",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        String::new(),
        "é".repeat(40),
        "x".repeat(300),
        "[".repeat(200),
        "{a: ".repeat(200),
        "- ".repeat(200),
    ])
    .collect();
    prop_oneof![
        3 => proptest::sample::select(fixed),
        1 => "[ -~]{0,20}",
        1 => "\\PC{0,12}",
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Truncate(usize),
    ReplaceValue(usize, String),
    InsertLine(usize, String),
    Reindent(usize, usize),
    DeleteBytes(usize, usize),
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    let i = any::<usize>();
    prop_oneof![
        i.prop_map(Mutation::DeleteLine),
        i.prop_map(Mutation::DuplicateLine),
        (i, any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        i.prop_map(Mutation::Truncate),
        (i, junk_strategy()).prop_map(|(a, j)| Mutation::ReplaceValue(a, j)),
        (i, junk_strategy()).prop_map(|(a, j)| Mutation::InsertLine(a, j)),
        (i, 0..8usize).prop_map(|(a, n)| Mutation::Reindent(a, n)),
        (i, 1..16usize).prop_map(|(a, n)| Mutation::DeleteBytes(a, n)),
    ]
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    match m {
        Mutation::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::Truncate(i) => {
            let at = floor_char_boundary(text, i % (text.len() + 1));
            return text[..at].to_owned();
        }
        Mutation::ReplaceValue(i, junk) => {
            let l = &mut lines[i % n];
            match l.find(": ") {
                Some(p) => {
                    l.truncate(p + 2);
                    l.push_str(junk);
                }
                None => {
                    let indent = l.len() - l.trim_start().len();
                    l.truncate(indent);
                    l.push_str(junk);
                }
            }
        }
        Mutation::InsertLine(i, junk) => {
            let indent = " ".repeat(lines[i % n].len() - lines[i % n].trim_start().len());
            lines.insert(i % n, format!("{indent}{junk}"));
        }
        Mutation::Reindent(i, by) => {
            let l = &mut lines[i % n];
            let t = l.trim_start().to_owned();
            *l = format!("{}{t}", " ".repeat(*by));
        }
        Mutation::DeleteBytes(i, len) => {
            let start = floor_char_boundary(text, i % (text.len() + 1));
            let end = floor_char_boundary(text, start + len);
            return format!("{}{}", &text[..start], &text[end..]);
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Tokens for soups that look like configurations and manifests.
fn token_strategy() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "services",
        "listen",
        "subsets",
        "weights",
        "tcp-echo",
        "v1",
        "v2",
        ":",
        ": ",
        " ",
        "  ",
        "\n",
        "\n  ",
        "\n    ",
        "\n      ",
        "- ",
        "-",
        "{",
        "}",
        "[",
        "]",
        ",",
        "'",
        "\"",
        "#",
        "&a ",
        "*a",
        "!!str ",
        "!!int ",
        "---\n",
        "...\n",
        "31400",
        "127.0.0.1:9001",
        "[::1]:9002",
        "*:31400",
        "0",
        "100",
        "-1",
        "1e9",
        "0x10",
        "1.5",
        "~",
        "null",
        "true",
        "apiVersion",
        "networking.istio.io/v1",
        "kind",
        "VirtualService",
        "DestinationRule",
        "Gateway",
        "metadata",
        "name",
        "spec",
        "tcp",
        "route",
        "destination",
        "host",
        "subset",
        "weight",
        "match",
        "port",
        "number",
        "servers",
        "protocol",
        "TCP",
        "hosts",
        "gateways",
        "http",
        "\t",
        "?",
        "|",
        ">",
        "%YAML 1.2\n",
        "<<",
        "é",
        "\u{0}",
        "\u{feff}",
    ])
}

proptest! {
    #![proptest_config(cases())]

    /// Arbitrary bytes (as the lossy UTF-8 text a file of them would give) never panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        let loader = parse_all(&text)?;
        prop_assert!(loader.is_err(), "random bytes parsed as a configuration: {text:?}");
    }

    /// Arbitrary printable text never panics.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = parse_all(&text)?;
    }

    /// Soups of YAML punctuation and the parsers' own keywords never panic.
    #[test]
    fn token_soups_never_panic(tokens in proptest::collection::vec(token_strategy(), 0..120)) {
        let _ = parse_all(&tokens.concat())?;
    }

    /// Valid configurations, written in any style, parse to exactly what was written.
    #[test]
    fn valid_configs_round_trip(model in model_strategy(), style in style_strategy()) {
        let text = render(&model, style);
        let config = Config::from_yaml_str(&text, SOURCE)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(parsed(&config), expected(&model), "{}", text);
        // The same text is a valid `services:` document of an apply, to the same services.
        let specs = config::specs_from_yaml_str(&text, SOURCE)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(specs.len(), model.services.len());
        let plan = Manifest::parse(&text, SOURCE)
            .and_then(|m| m.resolve(&[]))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let planned: Vec<_> = plan
            .services
            .iter()
            .map(|s| {
                (
                    s.config.name.clone(),
                    s.config.listen,
                    s.config
                        .subsets
                        .iter()
                        .map(|x| (x.name.clone(), x.addr, x.weight))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        prop_assert_eq!(planned, expected(&model), "{}", text);
    }

    /// A `services:` document without weights, a Gateway and a VirtualService: the plan has
    /// the route's weights and the Gateway's port.
    #[test]
    fn istio_documents_round_trip(model in model_strategy()) {
        let (name, text, weights) = render_istio(&model);
        let plan = Manifest::parse(&text, SOURCE)
            .and_then(|m| m.resolve(&[]))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(plan.services.len(), 1);
        let s = &plan.services[0].config;
        prop_assert_eq!(&s.name, &name);
        prop_assert_eq!(s.listen, Listen::Any { port: model.services[0].1.port() });
        let got: Vec<(String, u32)> =
            s.subsets.iter().map(|x| (x.name.clone(), x.weight)).collect();
        prop_assert_eq!(got, weights, "{}", text);
    }

    /// Mutated valid configurations never panic; their errors name a location.
    #[test]
    fn mutated_configs_never_panic(
        model in model_strategy(),
        style in style_strategy(),
        mutations in proptest::collection::vec(mutation_strategy(), 1..5),
    ) {
        let mut text = render(&model, style);
        for m in &mutations {
            text = mutate(&text, m);
        }
        let _ = parse_all(&text)?;
    }

    /// Mutated Istio documents never panic, in parsing or in resolving; errors name a
    /// location.
    #[test]
    fn mutated_istio_documents_never_panic(
        model in model_strategy(),
        mutations in proptest::collection::vec(mutation_strategy(), 1..5),
    ) {
        let (_, mut text, _) = render_istio(&model);
        for m in &mutations {
            text = mutate(&text, m);
        }
        let _ = parse_all(&text)?;
    }
}

/// Inputs that once were (or easily could be) trouble: alias bombs, deep nesting, huge
/// scalars, many documents. Each must be refused quickly with a located message.
#[test]
fn hostile_inputs_are_refused_with_a_location() {
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..9u8 {
        let prev = if i == 0 {
            "a".to_owned()
        } else {
            format!("b{}", i - 1)
        };
        let _ = writeln!(
            bomb,
            "b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]"
        );
    }
    let inputs = [
        ("alias bomb", bomb.clone()),
        (
            "alias bomb under services",
            format!("services:\n  {}", bomb.replace('\n', "\n  ")),
        ),
        ("deep sequence", "[".repeat(100_000)),
        ("deep mapping", "{a: ".repeat(100_000)),
        ("deep block", {
            let mut s = String::new();
            for i in 0..5000 {
                let _ = writeln!(s, "{}k:", " ".repeat(i));
            }
            s
        }),
        ("huge scalar", format!("services: {}", "x".repeat(4 << 20))),
        ("huge key", format!("{}: 1", "k".repeat(1 << 20))),
        ("many documents", "---\n".repeat(100_000) + "x: 1\n"),
        ("many services", {
            let mut s = String::from("services:\n");
            // One more than the maps hold.
            for i in 0..=tcpshift_common::MAX_SERVICES {
                let _ = writeln!(
                    s,
                    "  s{i}: {{listen: {}, subsets: {{v1: 127.0.0.1:9001}}}}",
                    1 + i
                );
            }
            s
        }),
    ];
    for (name, text) in inputs {
        let started = std::time::Instant::now();
        let result = std::panic::catch_unwind(|| {
            let c = Config::from_yaml_str(&text, SOURCE);
            let m = Manifest::parse(&text, SOURCE).and_then(|m| m.resolve(&[]).map(|_| m));
            (
                c.err().map(|e| e.to_string()),
                m.err().map(|e| e.to_string()),
            )
        });
        let (c, m) = result.unwrap_or_else(|_| panic!("{name}: panicked"));
        let took = started.elapsed();
        eprintln!(
            "{name}: {took:?}\n  config: {}\n  apply:  {}",
            c.as_deref().map_or("ok", |s| &s[..s.len().min(200)]),
            m.as_deref().map_or("ok", |s| &s[..s.len().min(200)])
        );
        let c = c.unwrap_or_else(|| panic!("{name}: accepted as a configuration"));
        assert!(c.starts_with(SOURCE), "{name}: {c}");
        assert!(c.len() <= 4096, "{name}: a message of {} bytes", c.len());
        if let Some(m) = m {
            assert!(m.starts_with(SOURCE), "{name}: {m}");
            assert!(m.len() <= 4096, "{name}: a message of {} bytes", m.len());
        }
        assert!(
            took < std::time::Duration::from_secs(20),
            "{name}: took {took:?}"
        );
    }
}
