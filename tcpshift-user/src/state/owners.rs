//! Whose sockets may serve a subset: the trust-on-first-registration record of `TS_OWNERS`,
//! the check made before a socket is registered, and the refusals counted when it fails.
//!
//! A backend is found by its address, and anyone who can bind that address once its server is
//! gone could otherwise receive the subset's traffic. So each subset's slot has a record in the
//! userspace-only pinned map `TS_OWNERS` (created on first use, like `TS_ROUTES`):
//!
//! - the first socket registered for the subset's backend address sets the **trusted uid**
//!   (the uid that created the socket, as `ss -e` and `/proc/net/tcp` show it);
//! - a later socket is registered only if it belongs to root (uid 0) or to that uid; any other
//!   socket is refused, counted (`refused`) and described (uid, pid, process) in the record;
//! - `tcpshiftctl accept-owner SERVICE SUBSET` forgets the trusted uid, so the next socket
//!   found is registered and its uid trusted; a subset whose backend address changes starts
//!   afresh the same way (the record names the address it is for).
//!
//! The record also describes who held the registered socket (uid, pid, process) for `status`.
//!
//! A subset with an explicit owner rule (a uid, a cgroup) has it in a second userspace-only
//! map, `TS_OWNER_RULES` (created on first use too), keyed by slot: an entry only for the
//! subsets that have a rule, so the common record stays small. A rule belongs with the owner
//! record of the same slot: it applies while that record is for the subset's backend, and goes
//! when the record starts afresh for another backend, when the rule is dropped, and with the
//! slot (a subset or service deleted).

use std::{net::SocketAddr, os::fd::BorrowedFd};

use aya::maps::{HashMap, MapData, MapError};
use tcpshift_common::{MAX_SLOTS, MAX_SUBSETS, map_names, slot};

use super::{State, encode::*, error::*, open_map, sockets::Missing};
use crate::model::{OwnerRule, ServiceView};

/// Name of the userspace-only map of subset owners.
pub(super) const OWNERS: &str = map_names::OWNERS;
/// Name of the userspace-only map of explicit owner rules.
pub(super) const OWNER_RULES: &str = map_names::OWNER_RULES;

/// Bits of [`OwnerRecord::flags`].
const TRUSTED: u8 = 1;
/// Bit of [`OwnerRecord::flags`]: a socket is registered and `holder_*` describe it.
const HELD: u8 = 2;

/// Length of the process names kept in a record (`/proc/PID/comm` is at most 15 bytes).
const COMM_LEN: usize = 16;

/// Value of `TS_OWNERS`, keyed by slot: who may serve the subset and who was refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OwnerRecord {
    /// The backend address the record is for (IPv4 as `::ffff:a.b.c.d`), network order.
    addr: [u8; 16],
    /// Its port, host order.
    port: u16,
    /// Its family (4 or 6), as in `SubsetMeta`.
    family: u8,
    /// [`TRUSTED`], [`HELD`].
    flags: u8,
    /// The trusted uid, when [`TRUSTED`].
    trusted_uid: u32,
    /// The registered socket's uid, when [`HELD`].
    holder_uid: u32,
    /// The pid that held it when it was registered.
    holder_pid: u32,
    /// That process' name, NUL-padded.
    holder_comm: [u8; COMM_LEN],
    /// Sockets refused so far (never reset: a Prometheus counter).
    refused: u64,
    /// The last refused socket's uid.
    refused_uid: u32,
    /// The pid that held it.
    refused_pid: u32,
    /// That process' name, NUL-padded.
    refused_comm: [u8; COMM_LEN],
    /// The last refused socket's inode: a socket is counted once, not at every scan.
    refused_inode: u64,
}
const _: () = assert!(std::mem::size_of::<OwnerRecord>() == 88);

/// Value of `TS_OWNER_RULES`, keyed by slot: the explicit owner rule of a subset that has one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RuleRecord {
    /// The rule's uid, when [`RULE_UID`] is in `flags`.
    uid: u32,
    /// [`RULE_UID`], [`RULE_CGROUP`].
    flags: u32,
    /// The rule's cgroup path, NUL-padded, when [`RULE_CGROUP`].
    cgroup: [u8; RULE_CGROUP_LEN],
}
const _: () = assert!(std::mem::size_of::<RuleRecord>() == 8 + RULE_CGROUP_LEN);

/// Bit of [`RuleRecord::flags`]: the subset names a uid.
const RULE_UID: u32 = 1;
/// Bit of [`RuleRecord::flags`]: the subset names a cgroup.
const RULE_CGROUP: u32 = 2;
/// Longest cgroup path of a rule, in bytes.
pub const RULE_CGROUP_LEN: usize = 256;

impl Default for OwnerRecord {
    fn default() -> Self {
        Self {
            addr: [0; 16],
            port: 0,
            family: 0,
            flags: 0,
            trusted_uid: 0,
            holder_uid: 0,
            holder_pid: 0,
            holder_comm: [0; COMM_LEN],
            refused: 0,
            refused_uid: 0,
            refused_pid: 0,
            refused_comm: [0; COMM_LEN],
            refused_inode: 0,
        }
    }
}

// SAFETY: OwnerRecord is #[repr(C)], made of integers and byte arrays only, without padding
// (the size assertion above), so every bit pattern is a valid value.
unsafe impl aya::Pod for OwnerRecord {}
// SAFETY: as for OwnerRecord: #[repr(C)], two u32 and a byte array, no padding (asserted).
unsafe impl aya::Pod for RuleRecord {}

pub(super) type OwnersMap = HashMap<MapData, u32, OwnerRecord>;
pub(super) type RulesMap = HashMap<MapData, u32, RuleRecord>;

/// Who holds a socket offered for registration (from the `/proc` walker and `fstat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketHolder {
    /// The uid that created the socket (the socket inode's owner).
    pub uid: u32,
    /// The process holding it.
    pub pid: i32,
    /// Its command name.
    pub comm: String,
    /// The socket's inode.
    pub inode: u64,
    /// The holding process' cgroup v2 path, if known.
    pub cgroup: Option<String>,
}

/// What [`State::register_owned_socket`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerCheck {
    /// Registered. `first` when its uid became the subset's trusted uid.
    Registered {
        /// Whether this registration set the trusted uid.
        first: bool,
    },
    /// Refused: the socket belongs to neither root nor the trusted uid, or does not match
    /// the subset's explicit rule.
    Refused {
        /// The subset's trusted uid (the rule's uid with an explicit rule; `u32::MAX` for a
        /// rule naming only a cgroup).
        trusted_uid: u32,
        /// Refusals counted for the subset so far, this one included.
        refused_total: u64,
        /// Whether this socket was refused for the first time (and counted now).
        new: bool,
    },
    /// The subset changed or was deleted meanwhile: nothing done.
    Stale,
}

/// What `status` shows about a subset's owners.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OwnerStatus {
    /// The uid whose sockets (besides root's) are registered; `None` until the first
    /// registration (or after `tcpshiftctl accept-owner`).
    pub trusted_uid: Option<u32>,
    /// Who held the registered socket when it was registered (only while it is live).
    pub holder: Option<HolderStatus>,
    /// Sockets refused for the subset so far.
    pub refused: u64,
    /// The last refused socket's holder, if any was refused.
    pub last_refused: Option<HolderStatus>,
}

/// A socket's holder as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HolderStatus {
    /// The socket's uid.
    pub uid: u32,
    /// The user name of that uid, if `/etc/passwd` has one.
    pub user: Option<String>,
    /// The holding process' pid (at registration).
    pub pid: u32,
    /// Its command name.
    pub process: String,
    /// Its cgroup v2 path, read now (`None` when the process is gone).
    pub cgroup: Option<String>,
}

fn comm_bytes(s: &str) -> [u8; COMM_LEN] {
    let mut out = [0; COMM_LEN];
    let b = s.as_bytes();
    let n = b.len().min(COMM_LEN - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

fn comm_str(b: &[u8; COMM_LEN]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The user name of `uid` from `/etc/passwd`, if any.
pub fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

fn holder_status(uid: u32, pid: u32, comm: &[u8; COMM_LEN]) -> HolderStatus {
    let process = comm_str(comm);
    let proc = crate::procfs::Process::new(pid as i32);
    // The cgroup only if the pid still names the same program.
    let cgroup = if proc.comm() == process {
        proc.cgroup().ok().flatten()
    } else {
        None
    };
    HolderStatus {
        uid,
        user: user_name(uid),
        pid,
        process,
        cgroup,
    }
}

impl OwnerRecord {
    /// Whether the record is for `backend` (else it is from an earlier definition).
    fn is_for(&self, backend: SocketAddr) -> bool {
        let (addr, port, family) = backend_bytes(backend);
        self.addr == addr && self.port == port && self.family == family
    }

    /// A fresh record for `backend`, keeping the refusal count of `old`.
    fn fresh(backend: SocketAddr, old: Option<&OwnerRecord>) -> Self {
        let (addr, port, family) = backend_bytes(backend);
        let mut r = OwnerRecord {
            addr,
            port,
            family,
            ..Default::default()
        };
        if let Some(old) = old {
            r.refused = old.refused;
            r.refused_uid = old.refused_uid;
            r.refused_pid = old.refused_pid;
            r.refused_comm = old.refused_comm;
            r.refused_inode = old.refused_inode;
        }
        r
    }
}

impl RuleRecord {
    /// The rule recorded.
    fn rule(&self) -> OwnerRule {
        OwnerRule {
            uid: (self.flags & RULE_UID != 0).then_some(self.uid),
            cgroup: (self.flags & RULE_CGROUP != 0).then(|| {
                let end = self
                    .cgroup
                    .iter()
                    .position(|c| *c == 0)
                    .unwrap_or(RULE_CGROUP_LEN);
                String::from_utf8_lossy(&self.cgroup[..end]).into_owned()
            }),
        }
    }

    /// The record of `rule` (`None` for an empty rule: it has no entry).
    fn of(rule: &OwnerRule) -> Option<Self> {
        if rule.is_empty() {
            return None;
        }
        let mut r = RuleRecord {
            uid: 0,
            flags: 0,
            cgroup: [0; RULE_CGROUP_LEN],
        };
        if let Some(uid) = rule.uid {
            r.flags |= RULE_UID;
            r.uid = uid;
        }
        if let Some(c) = &rule.cgroup {
            r.flags |= RULE_CGROUP;
            let b = c.as_bytes();
            let n = b.len().min(RULE_CGROUP_LEN - 1);
            r.cgroup[..n].copy_from_slice(&b[..n]);
        }
        Some(r)
    }
}

fn backend_bytes(backend: SocketAddr) -> ([u8; 16], u16, u8) {
    let family = if backend.is_ipv4() { 4 } else { 6 };
    (ip_bytes(backend.ip()), backend.port(), family)
}

impl State {
    /// `TS_OWNERS`, if it was created.
    pub(super) fn open_owners(&self) -> Result<Option<OwnersMap>> {
        if !self.dir.join(OWNERS).exists() {
            return Ok(None);
        }
        self.open_pinned(OWNERS).map(Some)
    }

    /// `TS_OWNERS`, created and pinned if absent.
    fn owners_or_create(&mut self) -> Result<OwnersMap> {
        if let Some(m) = self.open_owners()? {
            return Ok(m);
        }
        let map: OwnersMap = HashMap::create(MAX_SLOTS, BPF_F_NO_PREALLOC)
            .map_err(map_err("cannot create the subset owner map"))?;
        let path = self.dir.join(OWNERS);
        map.pin(&path).map_err(|e| StateError::Program {
            what: format!("cannot pin {}", path.display()),
            error: Box::new(e),
        })?;
        self.share_new_pin(&path)?;
        open_map(&self.dir, OWNERS)
    }

    /// `TS_OWNER_RULES`, if it was created.
    fn open_rules(&self) -> Result<Option<RulesMap>> {
        if !self.dir.join(OWNER_RULES).exists() {
            return Ok(None);
        }
        self.open_pinned(OWNER_RULES).map(Some)
    }

    /// `TS_OWNER_RULES`, created and pinned if absent.
    fn rules_or_create(&mut self) -> Result<RulesMap> {
        if let Some(m) = self.open_rules()? {
            return Ok(m);
        }
        let map: RulesMap = HashMap::create(MAX_SLOTS, BPF_F_NO_PREALLOC)
            .map_err(map_err("cannot create the subset owner rule map"))?;
        let path = self.dir.join(OWNER_RULES);
        map.pin(&path).map_err(|e| StateError::Program {
            what: format!("cannot pin {}", path.display()),
            error: Box::new(e),
        })?;
        self.share_new_pin(&path)?;
        open_map(&self.dir, OWNER_RULES)
    }

    /// Removes the owner rules of slots `from..to` of service `id` (subsets or a service
    /// removed; the caller holds the lock).
    pub(super) fn remove_owner_rules(&self, id: u32, from: u32, to: u32) -> Result<()> {
        let Some(mut rules) = self.open_rules()? else {
            return Ok(());
        };
        for i in from..to.min(MAX_SUBSETS as u32) {
            remove_rule(&mut rules, slot(id, i))?;
        }
        Ok(())
    }

    /// Registers `socket` for the subset `m` if its holder may serve it (root, or the uid
    /// trusted at the subset's first registration), else counts and records the refusal.
    pub fn register_owned_socket(
        &mut self,
        m: &Missing,
        socket: BorrowedFd<'_>,
        holder: &SocketHolder,
    ) -> Result<OwnerCheck> {
        let _lock = self.lock()?;
        let mut owners = self.owners_or_create()?;
        if self
            .subset_definition(m.service_id, m.index)?
            .is_none_or(|sub| subset_addr(&sub) != m.backend)
        {
            return Ok(OwnerCheck::Stale);
        }
        let s = slot(m.service_id, m.index);
        let old = read_record(&owners, s)?;
        let mut rules = self.open_rules()?;
        let kept = old.is_some_and(|r| r.is_for(m.backend));
        let mut record = match old {
            Some(r) if r.is_for(m.backend) => r,
            other => OwnerRecord::fresh(m.backend, other.as_ref()),
        };
        // The rule goes with the record: a record started afresh (for another backend) has
        // none, and its slot's rule is removed when the fresh record is written.
        let rule = match (&rules, kept) {
            (Some(rules), true) => read_rule(rules, s)?.map(|r| r.rule()),
            _ => None,
        }
        .unwrap_or_default();
        let drop_stale_rule = |rules: &mut Option<RulesMap>| match rules {
            Some(rules) if !kept => remove_rule(rules, s),
            _ => Ok(()),
        };
        let trusted = (record.flags & TRUSTED != 0).then_some(record.trusted_uid);
        let refused_as = if !rule.is_empty() {
            (!rule.allows(holder.uid, holder.cgroup.as_deref()))
                .then(|| rule.uid.unwrap_or(u32::MAX))
        } else {
            trusted.filter(|t| holder.uid != 0 && holder.uid != *t)
        };
        if let Some(trusted_uid) = refused_as {
            let new = record.refused == 0 || record.refused_inode != holder.inode;
            if new {
                record.refused += 1;
                record.refused_uid = holder.uid;
                record.refused_pid = holder.pid as u32;
                record.refused_comm = comm_bytes(&holder.comm);
                record.refused_inode = holder.inode;
                drop_stale_rule(&mut rules)?;
                owners
                    .insert(s, record, 0)
                    .map_err(map_err("cannot count a refused socket"))?;
            }
            return Ok(OwnerCheck::Refused {
                trusted_uid,
                refused_total: record.refused,
                new,
            });
        }
        if trusted.is_none() {
            record.trusted_uid = holder.uid;
        }
        record.flags |= TRUSTED | HELD;
        record.holder_uid = holder.uid;
        record.holder_pid = holder.pid as u32;
        record.holder_comm = comm_bytes(&holder.comm);
        drop_stale_rule(&mut rules)?;
        // The record first: a socket is never live without a record naming its holder.
        owners
            .insert(s, record, 0)
            .map_err(map_err("cannot record a subset's owner"))?;
        self.insert_socket(s, socket, m.udp)?;
        Ok(OwnerCheck::Registered {
            first: trusted.is_none(),
        })
    }

    /// Forgets the trusted uid of subset `subset` of service `service` (`tcpshiftctl
    /// accept-owner`): the next socket found on its address is registered and its uid trusted.
    /// Returns the uid that was trusted, if any.
    pub fn accept_owner(&mut self, service: &str, subset: &str) -> Result<Option<u32>> {
        let (id, index) = self.find_subset(service, subset)?;
        let Some(mut owners) = self.open_owners()? else {
            return Ok(None);
        };
        let _lock = self.lock()?;
        let s = slot(id, index);
        let Some(mut record) = read_record(&owners, s)? else {
            return Ok(None);
        };
        let was = (record.flags & TRUSTED != 0).then_some(record.trusted_uid);
        record.flags &= !TRUSTED;
        owners
            .insert(s, record, 0)
            .map_err(map_err("cannot write a subset's owner"))?;
        Ok(was)
    }

    /// Records the explicit owner rules of the services named in `names` as the maps now hold
    /// them (after a commit; the caller holds the lock). A registered socket that breaks its
    /// subset's new rule is unregistered, so that the next scan registers the right one.
    pub(super) fn write_owner_rules(
        &mut self,
        wanted: &[(String, Vec<(String, OwnerRule)>)],
    ) -> Result<()> {
        if wanted
            .iter()
            .all(|(_, rules)| rules.iter().all(|(_, r)| r.is_empty()))
            && self.open_owners()?.is_none()
        {
            return Ok(());
        }
        let mut owners = self.owners_or_create()?;
        let mut rules_map = self.open_rules()?;
        // The subsets' records of the services named only.
        let mut named = Vec::new();
        for item in self.maps.meta.iter() {
            let (id, service) = item.map_err(map_err("cannot read service definitions"))?;
            let name = name_str(&service.name);
            if let Some((_, rules)) = wanted.iter().find(|(n, _)| *n == name) {
                named.push((id, service, rules));
            }
        }
        for (id, service, rules) in named {
            let meta = self.with_subsets(id, service)?;
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            for (i, sub) in meta.subsets[..n].iter().enumerate() {
                let sub_name = name_str(&sub.name);
                let rule = rules
                    .iter()
                    .find(|(n, _)| *n == sub_name)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default();
                let s = slot(id, i as u32);
                let backend = subset_addr(sub);
                let old = read_record(&owners, s)?;
                let kept = old.is_some_and(|r| r.is_for(backend));
                let mut record = match old {
                    Some(r) if r.is_for(backend) => r,
                    other => OwnerRecord::fresh(backend, other.as_ref()),
                };
                // The rule recorded: only while the record is for this backend.
                let recorded = match (&rules_map, kept) {
                    (Some(m), true) => read_rule(m, s)?.map(|r| r.rule()),
                    _ => None,
                }
                .unwrap_or_default();
                if recorded == rule && old.is_some() {
                    if let (Some(m), false) = (rules_map.as_mut(), kept) {
                        // A rule of an earlier backend never applies again.
                        remove_rule(m, s)?;
                    }
                    continue;
                }
                let breaks = !rule.is_empty()
                    && record.flags & HELD != 0
                    && !rule.allows(
                        record.holder_uid,
                        crate::procfs::Process::new(record.holder_pid as i32)
                            .cgroup()
                            .ok()
                            .flatten()
                            .as_deref(),
                    );
                if breaks {
                    record.flags &= !HELD;
                }
                match RuleRecord::of(&rule) {
                    Some(r) => {
                        let m = match rules_map.as_mut() {
                            Some(m) => m,
                            None => rules_map.insert(self.rules_or_create()?),
                        };
                        m.insert(s, r, 0)
                            .map_err(map_err("cannot record a subset's owner rule"))?;
                    }
                    None => {
                        if let Some(m) = rules_map.as_mut() {
                            remove_rule(m, s)?;
                        }
                    }
                }
                owners
                    .insert(s, record, 0)
                    .map_err(map_err("cannot record a subset's owner rule"))?;
                if breaks {
                    match self.maps.sockets.remove(&s) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_err("cannot unregister a socket")(e)),
                    }
                    // A `tcp+udp` subset's UDP socket has the same owner rule.
                    match self.maps.udp_sockets.remove(&s) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_err("cannot unregister a UDP socket")(e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Fills the owner rules of `views` from `TS_OWNER_RULES` (a rule counts while its
    /// slot's `TS_OWNERS` record is for the subset's backend).
    pub(super) fn fill_owner_rules(&self, views: &mut [ServiceView]) -> Result<()> {
        let (Some(owners), Some(rules)) = (self.open_owners()?, self.open_rules()?) else {
            return Ok(());
        };
        for v in views {
            for (i, sub) in v.config.subsets.iter_mut().enumerate() {
                let s = slot(v.id, i as u32);
                if let Some(rule) = read_rule(&rules, s)?
                    && let Some(r) = read_record(&owners, s)?
                    && r.is_for(sub.addr)
                {
                    sub.owner = rule.rule();
                }
            }
        }
        Ok(())
    }

    fn find_subset(&self, service: &str, subset: &str) -> Result<(u32, u32)> {
        for (id, meta) in self.all_meta()? {
            if name_str(&meta.name) != service {
                continue;
            }
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            return match meta.subsets[..n]
                .iter()
                .position(|s| name_str(&s.name) == subset)
            {
                Some(i) => Ok((id, i as u32)),
                None => Err(StateError::UnknownSubset {
                    service: service.to_owned(),
                    subset: subset.to_owned(),
                    known: meta.subsets[..n]
                        .iter()
                        .map(|s| name_str(&s.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            };
        }
        Err(StateError::UnknownService {
            name: service.to_owned(),
            known: self
                .all_meta()?
                .iter()
                .map(|(_, m)| name_str(&m.name))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// What `status` shows about the owners of slot `slot` (backend `backend`, `live` when a
    /// socket is registered).
    pub(super) fn owner_status(
        owners: Option<&OwnersMap>,
        slot: u32,
        backend: SocketAddr,
        live: bool,
    ) -> Result<OwnerStatus> {
        let Some(owners) = owners else {
            return Ok(OwnerStatus::default());
        };
        let Some(r) = read_record(owners, slot)? else {
            return Ok(OwnerStatus::default());
        };
        let current = r.is_for(backend);
        Ok(OwnerStatus {
            trusted_uid: (current && r.flags & TRUSTED != 0).then_some(r.trusted_uid),
            holder: (current && live && r.flags & HELD != 0)
                .then(|| holder_status(r.holder_uid, r.holder_pid, &r.holder_comm)),
            refused: r.refused,
            last_refused: (r.refused > 0)
                .then(|| holder_status(r.refused_uid, r.refused_pid, &r.refused_comm)),
        })
    }
}

fn read_rule(rules: &RulesMap, slot: u32) -> Result<Option<RuleRecord>> {
    match rules.get(&slot, 0) {
        Ok(r) => Ok(Some(r)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err("cannot read a subset's owner rule")(e)),
    }
}

fn remove_rule(rules: &mut RulesMap, slot: u32) -> Result<()> {
    ignore_missing(rules.remove(&slot), "cannot remove a subset's owner rule")
}

fn read_record(owners: &OwnersMap, slot: u32) -> Result<Option<OwnerRecord>> {
    match owners.get(&slot, 0) {
        Ok(r) => Ok(Some(r)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err("cannot read a subset's owner")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_for_one_backend_and_a_fresh_one_keeps_the_refusals() {
        let a: SocketAddr = "127.0.0.1:9002".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:9003".parse().expect("addr");
        let mut r = OwnerRecord::fresh(a, None);
        assert!(r.is_for(a));
        assert!(!r.is_for(b));
        r.flags = TRUSTED;
        r.refused = 3;
        let f = OwnerRecord::fresh(b, Some(&r));
        assert!(f.is_for(b));
        assert_eq!(f.flags & TRUSTED, 0);
        assert_eq!(f.refused, 3);
    }

    #[test]
    fn a_rule_round_trips_and_an_empty_one_has_no_record() {
        assert_eq!(RuleRecord::of(&OwnerRule::default()), None);
        for rule in [
            OwnerRule {
                uid: Some(1000),
                cgroup: None,
            },
            OwnerRule {
                uid: None,
                cgroup: Some("/system.slice/echo.service".into()),
            },
            OwnerRule {
                uid: Some(0),
                cgroup: Some("/a".into()),
            },
        ] {
            let r = RuleRecord::of(&rule).expect("a rule has a record");
            assert_eq!(r.rule(), rule);
        }
        let long = "x".repeat(300);
        let r = RuleRecord::of(&OwnerRule {
            uid: None,
            cgroup: Some(long),
        })
        .expect("record");
        assert_eq!(r.rule().cgroup.map(|c| c.len()), Some(RULE_CGROUP_LEN - 1));
    }

    #[test]
    fn process_names_round_trip_and_are_cut() {
        assert_eq!(comm_str(&comm_bytes("tcp-echo")), "tcp-echo");
        assert_eq!(comm_str(&comm_bytes("a-very-long-process-name")).len(), 15);
    }
}
