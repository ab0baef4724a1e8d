//! The command-line options both binaries use to reach the store: `--store URL` (or
//! `TCPSHIFT_STORE`) and the TLS and authentication options.

use std::path::PathBuf;

use super::{Result, StoreOptions, StoreUrl};

/// `--store` and its TLS and user options (flattened into tcpshiftd's and tcpshiftctl's
/// arguments).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// The fleet store: etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// for TLS). Also
    /// TCPSHIFT_STORE.
    #[arg(long, env = "TCPSHIFT_STORE", value_name = "URL", global = true)]
    pub store: Option<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates (etcds:// only).
    #[arg(long, value_name = "FILE", global = true)]
    pub store_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with etcd (with --store-key).
    #[arg(long, value_name = "FILE", global = true)]
    pub store_cert: Option<PathBuf>,
    /// Private key (PEM) of --store-cert.
    #[arg(long, value_name = "FILE", global = true)]
    pub store_key: Option<PathBuf>,
    /// etcd user name (with --store-password-file).
    #[arg(long, value_name = "NAME", global = true)]
    pub store_user: Option<String>,
    /// File whose first line is the etcd user's password.
    #[arg(long, value_name = "FILE", global = true)]
    pub store_password_file: Option<PathBuf>,
}

impl StoreArgs {
    /// The options, checked, when `--store` is given; `None` without it (the TLS and user
    /// options are then refused: they would be silently ignored).
    pub fn options(&self) -> Result<Option<StoreOptions>> {
        let Some(url) = &self.store else {
            let given = [
                (self.store_ca.is_some(), "--store-ca"),
                (self.store_cert.is_some(), "--store-cert"),
                (self.store_key.is_some(), "--store-key"),
                (self.store_user.is_some(), "--store-user"),
                (self.store_password_file.is_some(), "--store-password-file"),
            ];
            if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
                return Err(super::StoreError::Invalid {
                    what: format!("option {flag}"),
                    reason: "it belongs to a store: add --store URL (or set TCPSHIFT_STORE)".into(),
                });
            }
            return Ok(None);
        };
        let mut options = StoreOptions::new(StoreUrl::parse(url)?);
        options.ca = self.store_ca.clone();
        options.cert = self.store_cert.clone();
        options.key = self.store_key.clone();
        options.user = self.store_user.clone();
        options.password_file = self.store_password_file.clone();
        options.check()?;
        Ok(Some(options))
    }
}

/// This host's name (the default node name), or `None` when it cannot be read.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`, which lives across the
    // call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}
