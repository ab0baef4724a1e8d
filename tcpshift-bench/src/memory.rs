//! Kernel memory of tcpshift's maps, by the kernel's own accounting: the `memlock:` line of
//! each pinned map's `/proc/self/fdinfo/<fd>` (what `bpftool map show` prints as
//! `bytes_memlock`).
//!
//! On 6.18 a hash map without preallocation counts the elements it holds (about 48 B of
//! header + key and value rounded to 8 + 8 each; a per-CPU value once per possible CPU) on top
//! of its bucket array (16 B × `max_entries` rounded to a power of two), while an array or a
//! preallocated map counts its `max_entries` from the start. The maps are found by listing the
//! namespace's state directory (every pinned object that is a map), never by name, so that a
//! map added, split or removed by a layout change is counted as it is.

use std::{
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tcpshift::{netns::Netns, state::state_dir};

/// One pinned map and the memory the kernel charges for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMemory {
    /// File name under the state directory (the map's name).
    pub name: String,
    /// `BPF_MAP_TYPE_*` number.
    pub map_type: u32,
    /// `map_flags` (1: `BPF_F_NO_PREALLOC`).
    pub map_flags: u64,
    /// `max_entries`.
    pub max_entries: u64,
    /// Bytes the kernel accounts for the map (`memlock:`).
    pub memlock: u64,
}

impl MapMemory {
    /// The map's kind as the report names it, e.g. `hash (no prealloc)`.
    pub fn kind(&self) -> String {
        let name = match self.map_type {
            1 => "hash",
            2 => "array",
            5 => "per-CPU hash",
            6 => "per-CPU array",
            9 => "LRU hash",
            10 => "LRU per-CPU hash",
            15 => "sockmap",
            18 => "sockhash",
            24 => "sk_storage",
            27 => "ring buffer",
            t => return format!("type {t}"),
        };
        if self.map_flags & NO_PREALLOC != 0 && matches!(self.map_type, 1 | 5) {
            format!("{name} (no prealloc)")
        } else {
            name.to_string()
        }
    }
}

/// `BPF_F_NO_PREALLOC`.
const NO_PREALLOC: u64 = 1;

/// Every pinned map of one namespace's state, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelMemory {
    /// The maps.
    pub maps: Vec<MapMemory>,
}

impl KernelMemory {
    /// Bytes of all maps.
    pub fn total(&self) -> u64 {
        self.maps.iter().map(|m| m.memlock).sum()
    }

    /// Bytes of the map called `name`, if pinned.
    pub fn of(&self, name: &str) -> Option<u64> {
        self.maps.iter().find(|m| m.name == name).map(|m| m.memlock)
    }
}

/// What [`parse_fdinfo`] finds in a BPF object's fdinfo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// `map_type:`; `None` for a program or a link.
    pub map_type: Option<u32>,
    /// `map_flags:` (hexadecimal in fdinfo).
    pub map_flags: u64,
    /// `max_entries:`.
    pub max_entries: u64,
    /// `memlock:`; `None` when absent (a link).
    pub memlock: Option<u64>,
}

/// Parses the text of `/proc/<pid>/fdinfo/<fd>` of a BPF object.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo> {
    let mut info = FdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let dec = || {
            value
                .parse::<u64>()
                .with_context(|| format!("fdinfo field {key}: {value:?} is not a number"))
        };
        match key.trim() {
            "map_type" => info.map_type = Some(u32::try_from(dec()?).context("map_type")?),
            "max_entries" => info.max_entries = dec()?,
            "memlock" => info.memlock = Some(dec()?),
            "map_flags" => {
                let hex = value.trim_start_matches("0x");
                info.map_flags = u64::from_str_radix(hex, 16)
                    .with_context(|| format!("fdinfo field map_flags: {value:?} is not hex"))?;
            }
            _ => {}
        }
    }
    if info.map_type.is_some() && info.memlock.is_none() {
        bail!("fdinfo of a map without a memlock: line (kernel too old?)");
    }
    Ok(info)
}

/// Opens a pinned BPF object read-only (`BPF_OBJ_GET`).
fn obj_get(path: &Path) -> Result<OwnedFd> {
    tcpshift::state::open_pinned_read_only(path)
        .with_context(|| format!("cannot open the pinned BPF object {}", path.display()))
}

/// Reads every pinned map of the state directory `dir` (programs and links are skipped).
pub fn read_state(dir: &Path) -> Result<KernelMemory> {
    let mut maps = Vec::new();
    let entries = fs::read_dir(dir)
        .with_context(|| format!("cannot list {} (is tcpshift installed?)", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        // A pinned link or program refuses the read-only flag (EINVAL): not a map, skip it.
        let fd = match obj_get(&path) {
            Ok(fd) => fd,
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::EINVAL) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        let fdinfo = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
        let text = fs::read_to_string(&fdinfo).with_context(|| format!("cannot read {fdinfo}"))?;
        let info = parse_fdinfo(&text).with_context(|| format!("fdinfo of {}", path.display()))?;
        if let (Some(map_type), Some(memlock)) = (info.map_type, info.memlock) {
            maps.push(MapMemory {
                name: entry.file_name().to_string_lossy().into_owned(),
                map_type,
                map_flags: info.map_flags,
                max_entries: info.max_entries,
                memlock,
            });
        }
    }
    if maps.is_empty() {
        bail!("{} holds no pinned map", dir.display());
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(KernelMemory { maps })
}

/// Reads every pinned map of the current network namespace's tcpshift state.
pub fn read_current() -> Result<KernelMemory> {
    read_state(&state_dir(&Netns::current()?))
}

/// The kernel memory of one map size: `base` right after install (no service), `populated`
/// after every service was applied and every socket registered, `changed` after one weight
/// change of every service and the traffic runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    /// Services configured.
    pub services: u32,
    /// (a) bytes right after install.
    pub base: u64,
    /// (b) bytes after populate.
    pub populated: u64,
    /// (c) bytes after the weight change and the traffic.
    pub changed: u64,
}

impl Stages {
    /// The marginal cost of a service: (c − a) ÷ n bytes (`None` without services).
    pub fn per_service(&self) -> Option<f64> {
        (self.services > 0)
            .then(|| self.changed.saturating_sub(self.base) as f64 / self.services as f64)
    }

    /// Everything, fixed base included, ÷ n bytes (`None` without services).
    pub fn total_per_service(&self) -> Option<f64> {
        (self.services > 0).then(|| self.changed as f64 / self.services as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t27\nino:\t1063\n\
        map_type:\t1\nkey_size:\t4\nvalue_size:\t984\nmax_entries:\t16384\n\
        map_flags:\t0x1\nmap_extra:\t0x0\nmemlock:\t2762752\nmap_id:\t412\nfrozen:\t0\n";
    const LINK: &str = "pos:\t0\nflags:\t02000000\nmnt_id:\t27\nino:\t1063\n\
        link_type:\tnetns\nlink_id:\t9\nprog_tag:\tabcdef\nprog_id:\t77\n";

    #[test]
    fn fdinfo_of_a_map() {
        let i = parse_fdinfo(MAP).expect("parses");
        assert_eq!(i.map_type, Some(1));
        assert_eq!(i.map_flags, 1);
        assert_eq!(i.max_entries, 16_384);
        assert_eq!(i.memlock, Some(2_762_752));
        let m = MapMemory {
            name: "TS_META".into(),
            map_type: 1,
            map_flags: i.map_flags,
            max_entries: i.max_entries,
            memlock: 2_762_752,
        };
        assert_eq!(m.kind(), "hash (no prealloc)");
    }

    #[test]
    fn fdinfo_of_a_link_is_no_map() {
        let i = parse_fdinfo(LINK).expect("parses");
        assert_eq!((i.map_type, i.memlock), (None, None));
    }

    #[test]
    fn bad_fdinfo_says_which_field() {
        let e = parse_fdinfo("map_type:\t1\nmemlock:\tlots\n").unwrap_err();
        assert!(format!("{e:#}").contains("memlock"), "{e:#}");
        let e = parse_fdinfo("map_type:\t1\nmax_entries:\t4\n").unwrap_err();
        assert!(format!("{e:#}").contains("memlock"), "{e:#}");
    }

    #[test]
    fn per_service_is_the_marginal_cost() {
        let s = Stages {
            services: 10_000,
            base: 3_000_000,
            populated: 15_000_000,
            changed: 23_480_000,
        };
        assert_eq!(s.per_service(), Some(2_048.0));
        assert_eq!(s.total_per_service(), Some(2_348.0));
        let none = Stages { services: 0, ..s };
        assert_eq!((none.per_service(), none.total_per_service()), (None, None));
        // Memory that went down (a map shrank) does not wrap around.
        let shrunk = Stages {
            services: 1,
            base: 10,
            populated: 9,
            changed: 8,
        };
        assert_eq!(shrunk.per_service(), Some(0.0));
    }

    #[test]
    fn totals_and_lookup() {
        let m = |name: &str, memlock| MapMemory {
            name: name.into(),
            map_type: 2,
            map_flags: 0,
            max_entries: 1,
            memlock,
        };
        let k = KernelMemory {
            maps: vec![m("TS_GLOBAL", 100), m("TS_SERVICES", 900)],
        };
        assert_eq!(k.total(), 1_000);
        assert_eq!(k.of("TS_SERVICES"), Some(900));
        assert_eq!(k.of("TS_BUCKETS"), None);
        assert_eq!(m("X", 0).kind(), "array");
    }
}
