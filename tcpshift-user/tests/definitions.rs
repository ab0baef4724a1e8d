//! Where a service's definition lives in the kernel (privileged): one `TS_META` record per
//! service, one `TS_SUBSET_META` record per subset in use, and a `TS_OWNER_RULES` record only
//! for a subset with an explicit owner rule — read back from the pinned maps after applying,
//! redefining and deleting services, and through [`State::services`].
//!
//! The test installs tcpshift in a network namespace of its own (the test thread unshares one)
//! and removes it at the end.

use std::{collections::BTreeSet, path::Path, process::Command};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData},
};
use tcpshift::{
    EBPF_OBJECT,
    model::{
        Annotation, Desired, DesiredService, Listen, OwnerRule, ServiceConfig, ServiceView,
        SubsetConfig,
    },
    netns::Netns,
    state::State,
};
use tcpshift_common::{ServiceMeta, SubsetMeta, map_names, slot};

const SKIP_VAR: &str = "TCPSHIFT_SKIP_PRIVILEGED";

/// tcpshift installed in a fresh network namespace; uninstalled when dropped.
struct Setup {
    netns: Netns,
    state: State,
}

impl Setup {
    /// `None` when privileged tests are skipped on request.
    fn new() -> Option<Self> {
        if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
            eprintln!("skipped: {SKIP_VAR}=1 (privileged tests explicitly disabled)");
            return None;
        }
        // SAFETY: unshare affects only this (test) thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (run as root)",
            std::io::Error::last_os_error()
        );
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(up.success(), "ip link set lo up failed");
        let netns = Netns::current().expect("open the test namespace");
        let (state, _) = State::install(&netns, EBPF_OBJECT).expect("install tcpshift");
        Some(Self { netns, state })
    }

    /// The keys of the pinned map `name` (empty when the map was never created).
    fn keys<V: Pod>(&self, name: &str) -> BTreeSet<u32> {
        let path = self.state.dir().join(name);
        if !path.exists() {
            return BTreeSet::new();
        }
        let map = pinned::<V>(&path);
        map.keys().collect::<Result<_, _>>().expect("list keys")
    }

    fn meta(&self) -> BTreeSet<u32> {
        self.keys::<ServiceMeta>(map_names::META)
    }

    fn subset_meta(&self) -> BTreeSet<u32> {
        self.keys::<SubsetMeta>(map_names::SUBSET_META)
    }

    fn owner_rules(&self) -> BTreeSet<u32> {
        self.keys::<[u8; 264]>(map_names::OWNER_RULES)
    }

    fn view(&self, name: &str) -> Option<ServiceView> {
        self.state
            .services()
            .expect("read services")
            .into_iter()
            .find(|v| v.config.name == name)
    }

    fn apply(&mut self, services: Vec<ServiceConfig>) {
        let desired = Desired {
            services: services
                .into_iter()
                .map(|config| DesiredService {
                    config,
                    annotation: Annotation::Keep,
                })
                .collect(),
            clear_annotations: Vec::new(),
        };
        self.state
            .apply_with(|_| Ok::<_, tcpshift::state::StateError>(desired))
            .expect("apply");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = State::uninstall(&self.netns);
    }
}

fn pinned<V: Pod>(path: &Path) -> HashMap<MapData, u32, V> {
    let data = MapData::from_pin(path).expect("open a pinned map");
    let map = Map::from_map_data(data).expect("a map");
    HashMap::try_from(map).expect("a hash map keyed by u32")
}

fn service(name: &str, port: u16, subsets: &[(&str, u16, Option<u32>)]) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        listen: Listen::Addr(([127, 0, 0, 1], port).into()),
        subsets: subsets
            .iter()
            .map(|&(name, backend, uid)| SubsetConfig {
                name: name.into(),
                addr: ([127, 0, 0, 1], backend).into(),
                weight: 1,
                owner: OwnerRule { uid, cgroup: None },
            })
            .collect(),
        take_over: false,
        fail_closed: false,
        balance: Default::default(),
        protocol: Default::default(),
    }
}

fn slots(id: u32, n: u32) -> BTreeSet<u32> {
    (0..n).map(|i| slot(id, i)).collect()
}

#[test]
fn a_definition_has_one_record_per_service_and_per_subset_and_rules_only_where_set() {
    let Some(mut s) = Setup::new() else { return };
    let echo = service(
        "echo",
        31400,
        &[("v1", 19001, Some(4242)), ("v2", 19002, None)],
    );
    let other = service(
        "other",
        31401,
        &[("a", 19011, None), ("b", 19012, None), ("c", 19013, None)],
    );
    s.apply(vec![echo.clone(), other.clone()]);

    let echo_id = s.view("echo").expect("echo").id;
    let other_id = s.view("other").expect("other").id;
    assert_eq!(s.meta(), BTreeSet::from([echo_id, other_id]));
    let both: BTreeSet<u32> = slots(echo_id, 2)
        .union(&slots(other_id, 3))
        .copied()
        .collect();
    assert_eq!(s.subset_meta(), both);
    assert_eq!(s.owner_rules(), BTreeSet::from([slot(echo_id, 0)]));
    // Read back as applied: names, backends, the rule.
    let view = s.view("echo").expect("echo");
    let subsets: Vec<_> = view
        .config
        .subsets
        .iter()
        .map(|x| (x.name.as_str(), x.addr, x.owner.uid))
        .collect();
    assert_eq!(
        subsets,
        vec![
            ("v1", ([127, 0, 0, 1], 19001).into(), Some(4242)),
            ("v2", ([127, 0, 0, 1], 19002).into(), None),
        ]
    );

    // A subset removed loses its record; a rule dropped loses its entry.
    let mut fewer = other.clone();
    fewer.subsets.truncate(2);
    let mut no_rule = echo.clone();
    no_rule.subsets[0].owner = OwnerRule::default();
    s.apply(vec![no_rule, fewer]);
    let both: BTreeSet<u32> = slots(echo_id, 2)
        .union(&slots(other_id, 2))
        .copied()
        .collect();
    assert_eq!(s.subset_meta(), both);
    assert_eq!(s.owner_rules(), BTreeSet::new());
    let view = s.view("other").expect("other");
    let names: Vec<_> = view
        .config
        .subsets
        .iter()
        .map(|x| x.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        s.view("echo").expect("echo").config.subsets[0].owner.uid,
        None
    );

    // A deleted service leaves no record behind, nor a rule.
    s.apply(vec![echo]);
    assert_eq!(s.owner_rules(), BTreeSet::from([slot(echo_id, 0)]));
    assert!(s.state.delete_service("echo").expect("delete echo"));
    assert_eq!(s.meta(), BTreeSet::from([other_id]));
    assert_eq!(s.subset_meta(), slots(other_id, 2));
    assert_eq!(s.owner_rules(), BTreeSet::new());
    assert!(s.state.delete_service("other").expect("delete other"));
    assert_eq!(s.meta(), BTreeSet::new());
    assert_eq!(s.subset_meta(), BTreeSet::new());
}
