//! Reading and writing the fleet's desired state in etcd.
//!
//! [`Store::load`] reads the whole desired state at one revision; [`Store::commit`] writes
//! a new one as **one** etcd transaction that only succeeds if nobody else committed since
//! the state was read (compare and swap on the `meta` key's mod revision, see
//! [`super::layout`]); [`Store::update`] does read-modify-write with retries, so concurrent
//! writers never lose an update.

use std::{collections::BTreeMap, future::Future, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};

use super::{
    DesiredState, FleetService, Result, StoreError, StoreOptions,
    layout::{DesiredKey, Layout, MetaRecord, SeedRecord, ServiceRecord},
};

/// How many times [`Store::update`] tries before giving up on a contended store.
pub const UPDATE_ATTEMPTS: u32 = 100;

/// A connection to the fleet store.
#[derive(Clone)]
pub struct Store {
    client: Client,
    layout: Layout,
    endpoints: String,
    timeout: Duration,
}

/// The desired state as read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The desired revision: the `meta` key's mod revision (0 before the first change).
    pub revision: i64,
    /// How many changes the desired state has had.
    pub generation: u64,
    /// Every service.
    pub state: DesiredState,
    /// The fleet's hash seed, once created ([`Store::ensure_seed`]).
    pub seed: Option<u32>,
    /// The etcd revision the snapshot was read at (at least `revision`).
    pub read_revision: i64,
}

/// What [`Store::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Written (or nothing to write): the desired revision and generation now.
    Committed {
        /// The new desired revision.
        revision: i64,
        /// The new generation.
        generation: u64,
    },
    /// Another writer committed since the snapshot was read; nothing was written.
    Conflict,
}

/// The raw keys under [`Layout::desired_prefix`] at one revision (the follower keeps one
/// up to date from watch events).
#[derive(Debug, Clone, Default)]
pub(crate) struct RawDesired {
    /// Key → (value, mod revision).
    pub kvs: BTreeMap<String, (Vec<u8>, i64)>,
    /// The etcd revision these keys are complete up to.
    pub read_revision: i64,
}

impl RawDesired {
    /// Decodes every record; the first unreadable one is an error.
    pub fn decode(&self, layout: &Layout) -> Result<Snapshot> {
        let corrupt = |key: &str, reason: String| StoreError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let mut snapshot = Snapshot {
            revision: 0,
            generation: 0,
            state: DesiredState::new(),
            seed: None,
            read_revision: self.read_revision,
        };
        let mut services = Vec::new();
        for (key, (value, mod_revision)) in &self.kvs {
            match layout.classify(key) {
                Some(DesiredKey::Meta) => {
                    let meta: MetaRecord =
                        serde_json::from_slice(value).map_err(|e| corrupt(key, e.to_string()))?;
                    snapshot.revision = *mod_revision;
                    snapshot.generation = meta.generation;
                }
                Some(DesiredKey::Seed) => {
                    let seed: SeedRecord =
                        serde_json::from_slice(value).map_err(|e| corrupt(key, e.to_string()))?;
                    snapshot.seed = Some(seed.seed);
                }
                Some(DesiredKey::Service(name)) => {
                    let record: ServiceRecord =
                        serde_json::from_slice(value).map_err(|e| corrupt(key, e.to_string()))?;
                    let (config, annotation) =
                        record.to_config(&name).map_err(|e| corrupt(key, e))?;
                    services.push(FleetService { config, annotation });
                }
                None => {}
            }
        }
        snapshot.state = DesiredState::from_services(services);
        Ok(snapshot)
    }
}

impl Store {
    /// Connects to the store `options` name. The connection is made lazily: an
    /// unreachable store shows up in the first request.
    pub async fn connect(options: &StoreOptions) -> Result<Store> {
        options.check()?;
        let endpoints = options.url.endpoints.join(",");
        let timeout = options.request_timeout;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout)
            .with_keep_alive_while_idle(true);
        if options.url.tls {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "the store CA file")?));
            }
            if let (Some(cert), Some(key)) = (&options.cert, &options.key) {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "the store client certificate")?,
                    read(key, "the store client key")?,
                ));
            }
            connect = connect.with_tls(tls);
        }
        if let (Some(user), Some(password)) = (&options.user, options.password()?) {
            connect = connect.with_user(user.clone(), password);
        }
        let client = tokio::time::timeout(
            timeout,
            Client::connect(options.url.client_endpoints(), Some(connect)),
        )
        .await
        .map_err(|_| StoreError::Timeout {
            endpoints: endpoints.clone(),
            what: "connecting (and logging in)".into(),
            timeout,
        })?
        .map_err(|error| StoreError::Connect {
            endpoints: endpoints.clone(),
            error,
        })?;
        Ok(Store {
            client,
            layout: Layout::new(&options.url.prefix),
            endpoints,
            timeout,
        })
    }

    /// The key layout in use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The members, comma-separated (for messages).
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// A handle on the etcd client (cheap clone; shares the connection).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one request with the store's timeout, naming it in errors.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(StoreError::Etcd {
                endpoints: self.endpoints.clone(),
                what: what.to_string(),
                error,
            }),
            Err(_) => Err(StoreError::Timeout {
                endpoints: self.endpoints.clone(),
                what: what.to_string(),
                timeout: self.timeout,
            }),
        }
    }

    /// The raw desired-state keys at the newest revision.
    pub(crate) async fn load_raw(&self) -> Result<RawDesired> {
        let mut client = self.client();
        let prefix = self.layout.desired_prefix();
        let resp = self
            .call(
                "reading the desired state",
                client.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut raw = RawDesired {
            kvs: BTreeMap::new(),
            read_revision: resp.header().map_or(0, |h| h.revision()),
        };
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            raw.kvs
                .insert(key, (kv.value().to_vec(), kv.mod_revision()));
        }
        Ok(raw)
    }

    /// Reads the whole desired state at one revision.
    pub async fn load(&self) -> Result<Snapshot> {
        self.load_raw().await?.decode(&self.layout)
    }

    /// Writes `desired` as the state after `base`, in one transaction that succeeds only if
    /// the desired revision is still `base.revision`. `desired` is validated first (the
    /// rules and messages of a local apply); nothing is written when it is invalid or equal
    /// to `base.state`.
    pub async fn commit(&self, base: &Snapshot, desired: &DesiredState) -> Result<Commit> {
        desired.validate()?;
        if *desired == base.state && base.revision > 0 {
            return Ok(Commit::Committed {
                revision: base.revision,
                generation: base.generation,
            });
        }
        let generation = base.generation + 1;
        let meta = serde_json::to_vec(&MetaRecord { generation }).unwrap_or_default();
        let mut ops = vec![TxnOp::put(self.layout.meta_key(), meta, None)];
        for s in desired.services() {
            if base.state.get(&s.config.name) != Some(s) {
                let record = ServiceRecord::new(&s.config, s.annotation.as_deref());
                let value = serde_json::to_vec(&record).unwrap_or_default();
                ops.push(TxnOp::put(
                    self.layout.service_key(&s.config.name),
                    value,
                    None,
                ));
            }
        }
        for s in base.state.services() {
            if desired.get(&s.config.name).is_none() {
                ops.push(TxnOp::delete(self.layout.service_key(&s.config.name), None));
            }
        }
        let writes = ops.len();
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                self.layout.meta_key(),
                CompareOp::Equal,
                base.revision,
            )])
            .and_then(ops);
        let mut client = self.client();
        let resp = self
            .call("committing the desired state", client.txn(txn))
            .await
            .map_err(|e| explain_txn_limit(e, writes))?;
        if !resp.succeeded() {
            return Ok(Commit::Conflict);
        }
        Ok(Commit::Committed {
            revision: resp.header().map_or(0, |h| h.revision()),
            generation,
        })
    }

    /// Read-modify-write: loads the state, lets `change` compute the next one (and a value
    /// to return, e.g. the new weights), commits it, and starts again when another writer
    /// committed in between. Returns the state as committed and `change`'s value.
    ///
    /// `change` may fail with its own error type (a parser's, `anyhow`'s) as long as store
    /// errors convert into it; it runs again on every attempt, so it must not have side
    /// effects.
    pub async fn update<T, E, F>(&self, mut change: F) -> std::result::Result<(Snapshot, T), E>
    where
        E: From<StoreError>,
        F: FnMut(&DesiredState) -> std::result::Result<(DesiredState, T), E>,
    {
        for _ in 0..UPDATE_ATTEMPTS {
            let base = self.load().await?;
            let (next, value) = change(&base.state)?;
            match self.commit(&base, &next).await? {
                Commit::Committed {
                    revision,
                    generation,
                } => {
                    let committed = Snapshot {
                        revision,
                        generation,
                        state: next,
                        seed: base.seed,
                        read_revision: revision.max(base.read_revision),
                    };
                    return Ok((committed, value));
                }
                Commit::Conflict => continue,
            }
        }
        Err(StoreError::Contended {
            attempts: UPDATE_ATTEMPTS,
        }
        .into())
    }

    /// The fleet's hash seed: `candidate` if the store had none (written with a
    /// create-if-absent transaction, so the first writer wins), else the stored one.
    pub async fn ensure_seed(&self, candidate: u32) -> Result<u32> {
        let key = self.layout.seed_key();
        let value = serde_json::to_vec(&SeedRecord { seed: candidate }).unwrap_or_default();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.clone(), value, None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let mut client = self.client();
        let resp = self.call("creating the hash seed", client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(candidate);
        }
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op
                && let Some(kv) = get.kvs().first()
            {
                let seed: SeedRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                return Ok(seed.seed);
            }
        }
        Err(StoreError::Corrupt {
            key,
            reason: "exists but could not be read back".into(),
        })
    }
}

fn read(path: &std::path::Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| StoreError::File {
        what,
        path: path.to_path_buf(),
        error,
    })
}

/// etcd refuses transactions of more than `--max-txn-ops` operations (128 by default):
/// say what to do about it.
fn explain_txn_limit(e: StoreError, writes: usize) -> StoreError {
    match e {
        StoreError::Etcd {
            endpoints,
            what,
            error,
        } if error.to_string().contains("too many operations in txn") => StoreError::Etcd {
            endpoints,
            what: format!(
                "{what} ({writes} keys in one transaction, more than the etcd members' \
                 --max-txn-ops allows; start etcd with --max-txn-ops {} or more)",
                writes.next_power_of_two().max(1024)
            ),
            error,
        },
        other => other,
    }
}
