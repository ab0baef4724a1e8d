//! Where the store is and how to reach it: `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` and
//! the TLS and authentication options.
//!
//! `etcd://` speaks plain gRPC, `etcds://` TLS, checking the members' certificates against
//! the CA file given with `--store-ca` (required: no system roots are trusted implicitly). The binaries take the URL from `--store` or `TCPSHIFT_STORE` and the options from
//! `--store-ca`, `--store-cert`, `--store-key`, `--store-user` and `--store-password-file`.

use std::path::PathBuf;

use super::{Result, StoreError, layout::DEFAULT_PREFIX};

/// The forms a store URL takes, for error messages.
pub const URL_FORMS: &str = "etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (plain) or \
     etcds://HOST:PORT[,HOST:PORT...][/PREFIX] (TLS), e.g. etcd://127.0.0.1:2379";

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `HOST:PORT` of each etcd member, in the order given (at least one).
    pub endpoints: Vec<String>,
    /// Whether to speak TLS (`etcds://`).
    pub tls: bool,
    /// Key prefix, starting and ending with `/` (default [`DEFAULT_PREFIX`]).
    pub prefix: String,
}

impl StoreUrl {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` or the same with `etcds://`. HOST is
    /// an IPv4 address, a bracketed IPv6 address or a DNS name; every member needs a port.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let invalid = |reason: String| StoreError::Invalid {
            what: format!("URL {url:?}"),
            reason,
        };
        let t = url.trim();
        let (tls, rest) = if let Some(rest) = t.strip_prefix("etcd://") {
            (false, rest)
        } else if let Some(rest) = t.strip_prefix("etcds://") {
            (true, rest)
        } else {
            let reason = match t.split_once("://") {
                Some((scheme, _)) => format!("unknown scheme {scheme:?}"),
                None => "no scheme".to_string(),
            };
            return Err(invalid(format!("{reason}; expected {URL_FORMS}")));
        };
        if rest.contains(['?', '#']) {
            return Err(invalid(format!(
                "query strings and fragments are not understood; give TLS and user options \
                 with --store-ca, --store-cert, --store-key, --store-user; expected {URL_FORMS}"
            )));
        }
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if hosts.contains('@') {
            return Err(invalid(
                "credentials do not belong in the URL (it shows up in process lists); use \
                 --store-user and --store-password-file"
                    .to_string(),
            ));
        }
        if hosts.is_empty() {
            return Err(invalid(format!(
                "no etcd member given; expected {URL_FORMS}"
            )));
        }
        let mut endpoints = Vec::new();
        for member in hosts.split(',') {
            let endpoint = parse_member(member).map_err(invalid)?;
            if endpoints.contains(&endpoint) {
                return Err(invalid(format!("member {endpoint} is named twice")));
            }
            endpoints.push(endpoint);
        }
        let prefix = if path.is_empty() || path == "/" {
            DEFAULT_PREFIX.to_string()
        } else {
            parse_prefix(path).map_err(invalid)?
        };
        Ok(StoreUrl {
            endpoints,
            tls,
            prefix,
        })
    }

    /// The members as etcd client endpoints (`http://HOST:PORT` or `https://HOST:PORT`).
    pub fn client_endpoints(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}", self.endpoints.join(","))?;
        if self.prefix != DEFAULT_PREFIX {
            write!(f, "{}", self.prefix.trim_end_matches('/'))?;
        }
        Ok(())
    }
}

fn parse_member(member: &str) -> std::result::Result<String, String> {
    let m = member.trim();
    if m.is_empty() {
        return Err(format!("empty member in the list; expected {URL_FORMS}"));
    }
    let (host, port) = if let Some(rest) = m.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return Err(format!(
                "member {m:?}: no closing ']' after the IPv6 address"
            ));
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("member {m:?}: {v6:?} is not an IPv6 address"));
        }
        match after.strip_prefix(':') {
            Some(port) => (&m[..v6.len() + 2], port),
            None => return Err(format!("member {m:?} has no port; expected [IPv6]:PORT")),
        }
    } else {
        match m.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(format!(
                    "member {m:?}: an IPv6 address must be written in brackets, e.g. \
                     [::1]:2379"
                ));
            }
            Some((host, port)) => (host, port),
            None => {
                return Err(format!(
                    "member {m:?} has no port; expected HOST:PORT, e.g. 127.0.0.1:2379 (etcd's \
                     client port is usually 2379)"
                ));
            }
        }
    };
    if host.is_empty() {
        return Err(format!("member {m:?} has no host"));
    }
    let host_ok = host.starts_with('[')
        || host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if !host_ok {
        return Err(format!(
            "member {m:?}: {host:?} is neither an IP address nor a host name"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("{host}:{p}")),
        _ => Err(format!(
            "member {m:?}: port {port:?} is not a number in 1..=65535"
        )),
    }
}

fn parse_prefix(path: &str) -> std::result::Result<String, String> {
    let ok = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    if !ok || path.contains("//") {
        return Err(format!(
            "prefix {path:?}: use path segments of A-Z a-z 0-9 . _ - separated by single '/', \
             e.g. /tcpshift/v1"
        ));
    }
    let trimmed = path.trim_end_matches('/');
    Ok(format!("{trimmed}/"))
}

/// Everything needed to reach the store: the URL and the TLS and authentication options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Where the store is.
    pub url: StoreUrl,
    /// CA certificate (PEM) that signed the members' certificates (`--store-ca`; required
    /// with `etcds://`).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (`--store-cert`; needs `key`).
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate (`--store-key`; needs `cert`).
    pub key: Option<PathBuf>,
    /// etcd user name (`--store-user`; needs `password_file`).
    pub user: Option<String>,
    /// File holding the etcd user's password on its first line (`--store-password-file`).
    pub password_file: Option<PathBuf>,
    /// How long one request may take before it counts as failed.
    pub request_timeout: std::time::Duration,
}

/// Default for [`StoreOptions::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl StoreOptions {
    /// Options for `url` without TLS files or user.
    pub fn new(url: StoreUrl) -> Self {
        Self {
            url,
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Parses `url` ([`StoreUrl::parse`]) into options without TLS files or user.
    pub fn parse(url: &str) -> Result<Self> {
        Ok(Self::new(StoreUrl::parse(url)?))
    }

    /// Checks that the options fit together: TLS files only with `etcds://`, a certificate
    /// with its key, a user with a password file.
    pub fn check(&self) -> Result<()> {
        let invalid = |what: &str, reason: &str| StoreError::Invalid {
            what: format!("option {what}"),
            reason: reason.to_string(),
        };
        if !self.url.tls {
            for (set, flag) in [
                (self.ca.is_some(), "--store-ca"),
                (self.cert.is_some(), "--store-cert"),
                (self.key.is_some(), "--store-key"),
            ] {
                if set {
                    return Err(invalid(
                        flag,
                        &format!(
                            "TLS files need a TLS store URL: write etcds:// instead of etcd:// \
                             ({})",
                            self.url
                        ),
                    ));
                }
            }
        }
        if self.url.tls && self.ca.is_none() {
            return Err(invalid(
                "--store-ca",
                &format!(
                    "a TLS store URL ({}) needs the CA certificate that signed the etcd members' \
                     certificates: add --store-ca FILE",
                    self.url
                ),
            ));
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => {
                return Err(invalid(
                    "--store-cert",
                    "a client certificate needs its private key: add --store-key FILE",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "--store-key",
                    "a private key needs its client certificate: add --store-cert FILE",
                ));
            }
            _ => {}
        }
        match (&self.user, &self.password_file) {
            (Some(_), None) => Err(invalid(
                "--store-user",
                "a user needs a password: add --store-password-file FILE",
            )),
            (None, Some(_)) => Err(invalid(
                "--store-password-file",
                "a password needs a user: add --store-user NAME",
            )),
            _ => Ok(()),
        }
    }

    /// Reads the password file: its first line, without the line end.
    pub fn password(&self) -> Result<Option<String>> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| StoreError::File {
            what: "the store password file",
            path: path.clone(),
            error,
        })?;
        let line = text.lines().next().unwrap_or_default();
        if line.is_empty() {
            return Err(StoreError::Invalid {
                what: format!("password file {}", path.display()),
                reason: "its first line is empty; write the password there".to_string(),
            });
        }
        Ok(Some(line.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        StoreUrl::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn parses_members_and_prefix() {
        let u = StoreUrl::parse("etcd://127.0.0.1:2379,[::1]:2380,etcd-0.example:2379").unwrap();
        assert_eq!(
            u.endpoints,
            ["127.0.0.1:2379", "[::1]:2380", "etcd-0.example:2379"]
        );
        assert!(!u.tls);
        assert_eq!(u.prefix, "/tcpshift/v1/");
        assert_eq!(
            u.client_endpoints()[1],
            "http://[::1]:2380",
            "IPv6 members keep their brackets"
        );
        let u = StoreUrl::parse("etcds://10.0.0.1:2379/prod/tcpshift/").unwrap();
        assert!(u.tls);
        assert_eq!(u.prefix, "/prod/tcpshift/");
        assert_eq!(u.client_endpoints(), ["https://10.0.0.1:2379"]);
        assert_eq!(u.to_string(), "etcds://10.0.0.1:2379/prod/tcpshift");
    }

    #[test]
    fn says_what_is_wrong() {
        assert!(err("http://127.0.0.1:2379").contains("unknown scheme \"http\""));
        assert!(err("127.0.0.1:2379").contains("no scheme"));
        assert!(err("etcd://").contains("no etcd member given"));
        assert!(err("etcd://127.0.0.1").contains("has no port"));
        assert!(err("etcd://127.0.0.1:0").contains("not a number in 1..=65535"));
        assert!(err("etcd://127.0.0.1:99999").contains("not a number in 1..=65535"));
        assert!(err("etcd://::1:2379").contains("must be written in brackets"));
        assert!(err("etcd://a:1,,b:2").contains("empty member"));
        assert!(err("etcd://a:1,a:1").contains("named twice"));
        assert!(err("etcd://root:pw@a:1").contains("--store-password-file"));
        assert!(err("etcd://a:1?tls=1").contains("--store-ca"));
        assert!(err("etcd://a:1/x//y").contains("prefix"));
        assert_eq!(
            err("etcd://127.0.0.1"),
            "invalid store URL \"etcd://127.0.0.1\": member \"127.0.0.1\" has no port; \
             expected HOST:PORT, e.g. 127.0.0.1:2379 (etcd's client port is usually 2379)"
        );
    }

    #[test]
    fn options_fit_together() {
        let mut o = StoreOptions::parse("etcd://127.0.0.1:2379").unwrap();
        o.check().unwrap();
        o.ca = Some("/ca.pem".into());
        assert!(
            o.check()
                .unwrap_err()
                .to_string()
                .contains("write etcds://")
        );
        o.url.tls = true;
        o.check().unwrap();
        o.ca = None;
        assert!(
            o.check()
                .unwrap_err()
                .to_string()
                .contains("add --store-ca FILE")
        );
        o.ca = Some("/ca.pem".into());
        o.cert = Some("/c.pem".into());
        assert!(o.check().unwrap_err().to_string().contains("--store-key"));
        o.key = Some("/k.pem".into());
        o.check().unwrap();
        o.user = Some("root".into());
        assert!(
            o.check()
                .unwrap_err()
                .to_string()
                .contains("--store-password-file")
        );
    }

    #[test]
    fn password_is_the_first_line() {
        let dir = std::env::temp_dir().join(format!("tcpshift-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut o = StoreOptions::parse("etcd://127.0.0.1:2379").unwrap();
        o.user = Some("root".into());
        o.password_file = Some(file.clone());
        assert_eq!(o.password().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(
            o.password()
                .unwrap_err()
                .to_string()
                .contains("first line is empty")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
