//! The fleet store against real etcd processes (no BPF needed): commits are single
//! compare-and-swap transactions, followers see every revision in order and fail static,
//! node reports live under a lease.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tcpshift::{
    istio::Manifest,
    model::{Annotation, Desired, DesiredService, Listen, ServiceConfig, SubsetConfig},
    store::{
        Commit, DesiredState, FleetService, FollowOptions, FollowStatus, Follower, NodeReport,
        Reporter, Snapshot, Store, StoreError, StoreOptions,
    },
};
use tcpshift_tests::{etcd::EtcdCluster, poll_until};
use tokio::{runtime::Runtime, sync::watch};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn connect(rt: &Runtime, url: &str) -> Result<Store> {
    let mut options = StoreOptions::parse(url)?;
    options.request_timeout = Duration::from_secs(2);
    Ok(rt.block_on(Store::connect(&options))?)
}

fn service(name: &str, port: u16, weights: &[u32]) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        listen: Listen::Any { port },
        subsets: weights
            .iter()
            .enumerate()
            .map(|(i, w)| SubsetConfig {
                name: format!("v{}", i + 1),
                addr: format!("127.0.0.1:{}", 9001 + i).parse().expect("addr"),
                weight: *w,
                owner: Default::default(),
            })
            .collect(),
        take_over: false,
        fail_closed: false,
        balance: Default::default(),
        protocol: Default::default(),
    }
}

/// The state with service `name` (port 31400) at `weights`, other services kept.
fn with_service(state: &DesiredState, name: &str, weights: &[u32]) -> DesiredState {
    let mut services: Vec<FleetService> = state.services().cloned().collect();
    services.retain(|s| s.config.name != name);
    services.push(FleetService {
        config: service(name, 31400, weights),
        annotation: None,
    });
    DesiredState::from_services(services)
}

/// Sets service `name`'s weights, retrying through errors (a member being killed) until
/// `deadline`. Returns the committed revision.
async fn set_retrying(store: &Store, name: &str, weights: &[u32], deadline: Duration) -> i64 {
    let start = Instant::now();
    loop {
        match store
            .update(|s| Ok::<_, StoreError>((with_service(s, name, weights), ())))
            .await
        {
            Ok((snap, ())) => return snap.revision,
            Err(e) if start.elapsed() < deadline => {
                eprintln!("retrying set {weights:?}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("could not set {weights:?} within {deadline:?}: {e}"),
        }
    }
}

/// A follower running on `rt`, recording every snapshot it is given.
struct Following {
    status: watch::Receiver<FollowStatus>,
    applied: Arc<Mutex<Vec<Snapshot>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Following {
    fn start(rt: &Runtime, store: Store, progress: Duration) -> Self {
        let follower = Follower::new(
            store,
            FollowOptions {
                progress_interval: progress,
                retry_interval: Duration::from_millis(50),
                max_retry_interval: Duration::from_millis(500),
            },
        );
        let status = follower.status();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let sink = applied.clone();
        let task = rt.spawn(async move {
            follower
                .run(move |snap: &Snapshot| {
                    sink.lock().expect("lock").push(snap.clone());
                    Ok::<(), String>(())
                })
                .await;
        });
        Self {
            status,
            applied,
            task,
        }
    }

    fn status(&self) -> FollowStatus {
        self.status.borrow().clone()
    }

    fn applied(&self) -> Vec<Snapshot> {
        self.applied.lock().expect("lock").clone()
    }

    /// Waits until the follower has applied `revision`.
    fn wait_applied(&self, revision: i64, timeout: Duration) -> Result<FollowStatus> {
        poll_until(
            timeout,
            &format!("follower applied revision {revision}"),
            || {
                let s = self.status();
                Ok((s.applied_revision == revision).then_some(s))
            },
        )
        .with_context(|| format!("follower status: {:?}", self.status()))
    }

    /// The revisions handed to the apply step are strictly increasing.
    fn assert_in_order(&self) {
        let revisions: Vec<i64> = self.applied().iter().map(|s| s.revision).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "revisions applied out of order or twice: {revisions:?}"
        );
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn weights_of(snap: &Snapshot, name: &str) -> Vec<u32> {
    snap.state
        .get(name)
        .map(|s| s.config.weights())
        .unwrap_or_default()
}

#[test]
fn commit_and_load_round_trip() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let rt = runtime();
    let store = connect(&rt, &etcd.url())?;
    rt.block_on(async {
        let empty = store.load().await?;
        assert_eq!((empty.revision, empty.generation), (0, 0));
        assert!(empty.state.is_empty() && empty.seed.is_none());

        let mut routed = service("routed", 31401, &[70, 30]);
        routed.listen = Listen::parse("127.0.0.1:31401").map_err(anyhow::Error::msg)?;
        let change = Desired {
            services: vec![
                DesiredService {
                    config: service("echo", 31400, &[100, 0]),
                    annotation: Annotation::Keep,
                },
                DesiredService {
                    config: routed.clone(),
                    annotation: Annotation::Set(r#"{"virtual_service":"vs"}"#.into()),
                },
            ],
            clear_annotations: vec![],
        };
        let (committed, ()) = store
            .update(|s| Ok::<_, StoreError>((s.applied(&change)?, ())))
            .await?;
        assert_eq!(committed.generation, 1);
        let loaded = store.load().await?;
        assert_eq!(loaded.revision, committed.revision);
        assert_eq!(loaded.generation, 1);
        assert_eq!(loaded.state, committed.state);
        assert_eq!(loaded.state.get("routed").map(|s| &s.config), Some(&routed));
        assert_eq!(
            loaded
                .state
                .get("routed")
                .and_then(|s| s.annotation.as_deref()),
            Some(r#"{"virtual_service":"vs"}"#)
        );

        // A commit from a stale read is refused and writes nothing.
        let next = with_service(&empty.state, "echo", &[1, 1]);
        assert_eq!(store.commit(&empty, &next).await?, Commit::Conflict);
        let after = store.load().await?;
        assert_eq!(after.state, loaded.state);
        assert_eq!(
            after.read_revision, loaded.read_revision,
            "nothing was written"
        );

        // set-weight, then delete, as the CLI will do them.
        let (snap, (name, ws)) = store
            .update(|s| {
                let r = s.with_weights(Some("echo"), &[("v2".into(), 20)])?;
                Ok::<_, StoreError>((r.state, (r.service, r.weights)))
            })
            .await?;
        assert_eq!(name, "echo");
        assert_eq!(ws, [("v1".to_string(), 80), ("v2".to_string(), 20)]);
        assert_eq!(weights_of(&store.load().await?, "echo"), [80, 20]);
        assert_eq!(snap.generation, 2);
        let (_, removed) = store
            .update(|s| Ok::<_, StoreError>(s.without(&["routed".into()])))
            .await?;
        assert_eq!(removed, ["routed"]);
        let last = store.load().await?;
        assert_eq!(last.state.len(), 1);
        assert_eq!(last.generation, 3);
        let keys = etcd.etcdctl_ok(0, &["get", "--prefix", "--keys-only", "/tcpshift/v1/"])?;
        let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            keys,
            [
                "/tcpshift/v1/desired/meta",
                "/tcpshift/v1/desired/services/echo"
            ]
        );

        // The seed: the first writer wins.
        assert_eq!(store.ensure_seed(0x1234_5678).await?, 0x1234_5678);
        assert_eq!(store.ensure_seed(42).await?, 0x1234_5678);
        assert_eq!(store.load().await?.seed, Some(0x1234_5678));
        Ok(())
    })
}

#[test]
fn eight_concurrent_writers_lose_no_update() -> Result<()> {
    const WRITERS: usize = 8;
    const INCREMENTS: u32 = 25;
    let etcd = EtcdCluster::start(1)?;
    let rt = runtime();
    let store = connect(&rt, &etcd.url())?;
    rt.block_on(async {
        store
            .update(|s| Ok::<_, StoreError>((with_service(s, "echo", &[1; WRITERS]), ())))
            .await?;
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    store
                        .update(|s| {
                            let mut ws = s
                                .get("echo")
                                .map(|x| x.config.weights())
                                .unwrap_or_default();
                            ws[w] += 1;
                            Ok::<_, StoreError>((with_service(s, "echo", &ws), ()))
                        })
                        .await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let last = store.load().await?;
        assert_eq!(weights_of(&last, "echo"), [1 + INCREMENTS; WRITERS]);
        assert_eq!(last.generation, 1 + WRITERS as u64 * u64::from(INCREMENTS));
        Ok(())
    })
}

#[test]
fn follower_sees_every_revision_in_order() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let rt = runtime();
    let store = connect(&rt, &etcd.url())?;
    let following = Following::start(&rt, store.clone(), Duration::from_secs(5));
    following.wait_applied(0, Duration::from_secs(10))?;
    let mut committed = vec![(0, vec![])];
    for i in 0..50u32 {
        let ws = vec![100 - 2 * i, 2 * i];
        let (snap, ()) =
            rt.block_on(store.update(|s| Ok::<_, StoreError>((with_service(s, "echo", &ws), ()))))?;
        committed.push((snap.revision, ws));
    }
    let last = committed.last().map_or(0, |c| c.0);
    let status = following.wait_applied(last, Duration::from_secs(10))?;
    assert!(status.connected && status.in_sync(), "{status:?}");
    let seen: Vec<(i64, Vec<u32>)> = following
        .applied()
        .iter()
        .map(|s| (s.revision, weights_of(s, "echo")))
        .collect();
    assert_eq!(seen, committed, "every revision, whole, in order");
    Ok(())
}

#[test]
fn leader_killed_during_writes_follower_ends_on_last_revision() -> Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let rt = runtime();
    let writer = connect(&rt, &etcd.url())?;
    let following = Following::start(&rt, connect(&rt, &etcd.url())?, Duration::from_millis(500));
    following.wait_applied(0, Duration::from_secs(10))?;
    let mut last = 0;
    let deadline = Duration::from_secs(30);
    for i in 0..100u32 {
        if i == 30 {
            let leader = etcd.leader()?;
            eprintln!("killing the leader, member {leader}");
            etcd.kill(leader)?;
        }
        if i == 70 {
            for m in 0..etcd.len() {
                etcd.restart(m)?;
            }
        }
        last = rt.block_on(set_retrying(&writer, "echo", &[100 - i, i], deadline));
    }
    etcd.wait_healthy()?;
    following.wait_applied(last, Duration::from_secs(30))?;
    following.assert_in_order();
    let applied = following.applied();
    assert_eq!(
        applied.last().map(|s| weights_of(s, "echo")),
        Some(vec![1, 99])
    );
    Ok(())
}

#[test]
fn all_members_stopped_follower_keeps_state_then_catches_up() -> Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let rt = runtime();
    let writer = connect(&rt, &etcd.url())?;
    let following = Following::start(&rt, connect(&rt, &etcd.url())?, Duration::from_millis(300));
    let first = rt.block_on(set_retrying(
        &writer,
        "echo",
        &[80, 20],
        Duration::from_secs(10),
    ));
    following.wait_applied(first, Duration::from_secs(10))?;
    let applies_before = following.applied().len();
    let contact_before = following.status().last_contact;

    for m in 0..etcd.len() {
        etcd.kill(m)?;
    }
    let down = poll_until(
        Duration::from_secs(15),
        "follower reports disconnected",
        || {
            let s = following.status();
            Ok((!s.connected).then_some(s))
        },
    )?;
    assert_eq!(
        down.applied_revision, first,
        "the last applied state is kept"
    );
    assert!(down.last_error.is_some(), "{down:?}");
    assert!(down.last_contact.is_some() && down.last_contact >= contact_before);
    assert_eq!(
        following.applied().len(),
        applies_before,
        "nothing applied while down"
    );

    for m in 0..etcd.len() {
        etcd.restart(m)?;
    }
    etcd.wait_healthy()?;
    let second = rt.block_on(set_retrying(
        &writer,
        "echo",
        &[50, 50],
        Duration::from_secs(30),
    ));
    let up = following.wait_applied(second, Duration::from_secs(30))?;
    assert!(up.connected && up.last_error.is_none(), "{up:?}");
    assert_eq!(
        following.applied().last().map(|s| weights_of(s, "echo")),
        Some(vec![50, 50])
    );
    following.assert_in_order();
    Ok(())
}

#[test]
fn compacted_revision_means_full_resync() -> Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let rt = runtime();
    let writer = connect(&rt, &etcd.url_of(&[1, 2]))?;
    // This follower only knows member 0.
    let following = Following::start(
        &rt,
        connect(&rt, &etcd.url_of(&[0]))?,
        Duration::from_millis(300),
    );
    let first = rt.block_on(set_retrying(
        &writer,
        "echo",
        &[90, 10],
        Duration::from_secs(10),
    ));
    following.wait_applied(first, Duration::from_secs(10))?;

    etcd.kill(0)?;
    poll_until(
        Duration::from_secs(15),
        "follower reports disconnected",
        || Ok((!following.status().connected).then_some(())),
    )?;
    let mut last = first;
    for i in 0..10u32 {
        last = rt.block_on(set_retrying(
            &writer,
            "echo",
            &[100 - i, i],
            Duration::from_secs(10),
        ));
    }
    etcd.etcdctl_ok(1, &["compact", &last.to_string()])?;
    etcd.restart(0)?;
    etcd.wait_healthy()?;

    let status = following.wait_applied(last, Duration::from_secs(30))?;
    assert_eq!(status.resyncs, 1, "{status:?}");
    let revisions: Vec<i64> = following.applied().iter().map(|s| s.revision).collect();
    let after_first: Vec<i64> = revisions
        .iter()
        .copied()
        .skip_while(|&r| r != first)
        .skip(1)
        .collect();
    assert_eq!(
        after_first,
        [last],
        "the compacted revisions cannot be replayed: the resync applies the last state at once \
         (applied: {revisions:?})"
    );
    assert_eq!(
        following.applied().last().map(|s| weights_of(s, "echo")),
        Some(vec![91, 9])
    );
    following.assert_in_order();
    Ok(())
}

#[test]
fn bad_documents_are_refused_before_anything_is_written() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let rt = runtime();
    let store = connect(&rt, &etcd.url())?;
    rt.block_on(async {
        let good = "services:\n  echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: 127.0.0.1:9002\n    weights: {v1: 100, v2: 0}\n";
        let apply = |text: &'static str| {
            let store = store.clone();
            async move {
                store
                    .update(|s| {
                        let manifest = Manifest::parse(text, "fleet.yaml")
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        let plan = manifest
                            .resolve(&s.views())
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        Ok::<_, anyhow::Error>((s.applied(&plan.desired())?, ()))
                    })
                    .await
            }
        };
        apply(good).await?;
        let before = store.load().await?;

        // A parse error: the parser's message, file:line:field.
        let e = apply("services:\n  echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n    weights: {v1: -1}\n")
            .await
            .expect_err("negative weight refused");
        let local = Manifest::parse(
            "services:\n  echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n    weights: {v1: -1}\n",
            "fleet.yaml",
        )
        .expect_err("the local parser refuses it too");
        assert_eq!(e.to_string(), local.to_string());
        assert!(e.to_string().starts_with("fleet.yaml:"), "{e}");

        // A rule across services, checked against the fleet's services as a local apply
        // checks it against the kernel's: the same message, with file:line:field.
        let e = apply("services:\n  other:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9003\n")
            .await
            .expect_err("listen conflict refused");
        assert_eq!(
            e.to_string(),
            "fleet.yaml:3:13: services.other.listen: service \"other\" would listen on *:31400, \
             which service \"echo\" already uses; each service needs its own port or address"
        );

        // A state that breaks a rule, committed directly: refused by commit itself.
        let twice = DesiredState::from_services([
            FleetService { config: service("a", 31500, &[1]), annotation: None },
            FleetService { config: service("b", 31500, &[1]), annotation: None },
        ]);
        let e = store.commit(&before, &twice).await.expect_err("refused");
        assert!(matches!(e, StoreError::Rejected(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "service \"b\" wants to listen on *:31500, which service \"a\" already uses"
        );

        let after = store.load().await?;
        assert_eq!(after.read_revision, before.read_revision, "nothing was written");
        assert_eq!(after.state, before.state);
        Ok(())
    })
}

#[test]
fn node_reports_vanish_after_the_lease_ttl() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let rt = runtime();
    let store = connect(&rt, &etcd.url())?;
    let ttl = Duration::from_secs(2);
    rt.block_on(async {
        let (snap, ()) = store
            .update(|s| Ok::<_, StoreError>((with_service(s, "echo", &[80, 20]), ())))
            .await?;
        let reporter = Reporter::start(&store, "node-a", ttl).await?;
        let leaving = Reporter::start(&store, "node-b", ttl).await?;
        let synced = FollowStatus {
            connected: true,
            applied_revision: snap.revision,
            applied_generation: snap.generation,
            store_revision: snap.revision,
            store_generation: snap.generation,
            ..FollowStatus::default()
        };
        reporter
            .publish(&NodeReport::new("node-a", &synced, None))
            .await?;
        let lagging = FollowStatus {
            applied_revision: 0,
            applied_generation: 0,
            ..synced.clone()
        };
        leaving
            .publish(&NodeReport::new("node-b", &lagging, None))
            .await?;
        let views = store.node_reports().await?;
        let names: Vec<&str> = views.iter().map(|v| v.report.node.as_str()).collect();
        assert_eq!(names, ["node-a", "node-b"]);
        assert!(views[0].in_sync && views[0].behind == 0);
        assert!(!views[1].in_sync && views[1].behind == 1);

        // A clean shutdown removes the report at once.
        leaving.close().await?;
        assert_eq!(store.node_reports().await?.len(), 1);

        // A live node's report outlasts several TTLs (the lease is kept alive)...
        let start = Instant::now();
        while start.elapsed() < ttl * 3 {
            assert_eq!(
                store.node_reports().await?.len(),
                1,
                "report lost while alive"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // ...and a dead node's report goes after the TTL.
        drop(reporter);
        let dead = Instant::now();
        loop {
            if store.node_reports().await?.is_empty() {
                break;
            }
            if dead.elapsed() > ttl * 5 {
                bail!(
                    "report still there {:?} after its node stopped",
                    dead.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            dead.elapsed() >= ttl / 2,
            "gone before its lease could expire"
        );
        Ok(())
    })
}
