//! Bad input, systematically: malformed command-line values, configuration files, Istio
//! documents, oversized values and binary garbage given to `tcpshiftctl` and `tcpshiftd`
//! against a running seed (80/20). Each must fail with a non-zero exit and a short message
//! that is not a panic, and leave the kernel's state byte-identical. Also: a backend whose
//! socket lives in another network namespace is never registered, and setting a subset's
//! weight to 0 drains it (new connections avoid it, open ones keep working).
//!
//! Each test runs in its own network namespace (see `tcpshift_tests::TestNs`). Run with
//! `--nocapture` to see the table of cases.

use std::{
    ffi::OsString,
    io::Write as _,
    os::unix::{ffi::OsStringExt, process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tcpshift_tests::{
    Conn, TestNs, bin_dir, count_prefixes, poll_until, privileged, scaled, seed, seed_addr, subset,
};

/// Which program a case runs.
enum Program {
    Ctl,
    Daemon,
}

/// One malformed input: a program, its arguments and (optionally) its standard input.
struct Case {
    name: &'static str,
    program: Program,
    args: Vec<OsString>,
    stdin: Option<Vec<u8>>,
}

fn ctl(name: &'static str, args: &[&str]) -> Case {
    Case {
        name,
        program: Program::Ctl,
        args: args.iter().map(OsString::from).collect(),
        stdin: None,
    }
}

fn ctl_os(name: &'static str, args: Vec<OsString>) -> Case {
    Case {
        name,
        program: Program::Ctl,
        args,
        stdin: None,
    }
}

fn daemon(name: &'static str, args: &[&str]) -> Case {
    Case {
        name,
        program: Program::Daemon,
        args: args.iter().map(OsString::from).collect(),
        stdin: None,
    }
}

fn apply(name: &'static str, file: &Path) -> Case {
    ctl_os(
        name,
        vec!["apply".into(), "-f".into(), file.as_os_str().to_owned()],
    )
}

fn daemon_config(name: &'static str, file: &Path) -> Case {
    Case {
        name,
        program: Program::Daemon,
        args: vec!["--config".into(), file.as_os_str().to_owned()],
        stdin: None,
    }
}

/// What a case did.
struct Outcome {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

/// Largest error output accepted for one bad input: a message, not a dump of the input.
const MAX_STDERR_BYTES: usize = 4096;
/// Most lines accepted (clap's usage errors take five).
const MAX_STDERR_LINES: usize = 6;

/// Runs a case with a time limit (a hang is a failure) and a 4 GiB address-space limit (so a
/// parser that reads without bound fails fast instead of exhausting the machine's memory).
fn run(ns: &TestNs, case: &Case) -> Result<Outcome> {
    let program = match case.program {
        Program::Ctl => "tcpshiftctl",
        Program::Daemon => "tcpshiftd",
    };
    let err_path = ns.file("case.stderr");
    let mut cmd = Command::new(bin_dir().join(program));
    cmd.args(&case.args)
        .stdin(if case.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path)?)
        // No colours in tcpshiftd's log: the message is compared as text.
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child: Child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    if let Some(input) = &case.stdin {
        let mut stdin = child.stdin.take().context("stdin")?;
        // The program may refuse before reading everything: a broken pipe is fine.
        let _ = stdin.write_all(input);
    }
    let timeout = scaled(Duration::from_secs(30));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{}: still running after {timeout:?} (hung)", case.name);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&std::fs::read(&err_path)?).into_owned();
    Ok(Outcome {
        code: status.code(),
        stderr,
        took,
    })
}

/// `tcpshiftctl status --json`, raw.
fn raw_status(ns: &TestNs) -> Result<Vec<u8>> {
    let out = ns.ctl(&["status", "--json"])?;
    ensure!(
        out.status.success(),
        "status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// A deterministic stream of pseudo-random bytes (xorshift64*).
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tcpshift-user/tests/fixtures/istio")
        .join(name)
}

/// A valid VirtualService routing tcp-echo on 31400 (the seed's service), with these
/// `tcp:` routes' destinations spliced in.
fn virtual_service(route: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: tcp-echo\n\
         spec:\n  hosts:\n  - \"*\"\n{route}"
    )
}

/// The cases, with the files they need written into the test's directory.
fn cases(ns: &TestNs) -> Result<Vec<Case>> {
    let write = |name: &str, content: &[u8]| -> Result<std::path::PathBuf> {
        let p = ns.file(name);
        std::fs::write(&p, content)?;
        Ok(p)
    };
    let tcp_route = |weights: (&str, &str)| {
        format!(
            "  tcp:\n  - match:\n    - port: 31400\n    route:\n    - destination:\n        \
             host: tcp-echo\n        subset: v1\n      weight: {}\n    - destination:\n        \
             host: tcp-echo\n        subset: v2\n      weight: {}\n",
            weights.0, weights.1
        )
    };
    let garbage_file = write("garbage.bin", &garbage(64 * 1024, 0x5eed))?;
    let nul_file = write("nul.yaml", &[0u8; 4096])?;
    let empty = write("empty.yaml", b"")?;
    let comments = write("comments.yaml", b"# nothing here\n---\n# nor here\n")?;
    let big_name = {
        let mut s = b"services:\n  ".to_vec();
        s.extend(std::iter::repeat_n(b'a', 10 << 20));
        s.extend(b": {listen: 31401, subsets: {v1: 127.0.0.1:9001}}\n");
        write("10mb-name.yaml", &s)?
    };
    let huge_sparse = {
        let p = ns.file("100mb-sparse.yaml");
        std::fs::File::create(&p)?.set_len(100 << 20)?;
        p
    };
    let bomb = {
        let mut s = String::from("services: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let prev = if i == 0 {
                "a".into()
            } else {
                format!("b{}", i - 1)
            };
            s += &format!(
                "b{i}: &b{i} [{}]\n",
                vec![format!("*{prev}"); 10].join(", ")
            );
        }
        write("alias-bomb.yaml", s.as_bytes())?
    };
    let nested = write("nested.yaml", "[".repeat(200_000).as_bytes())?;
    let nested_block = {
        let mut s = String::from("services:\n");
        for i in 1..3000 {
            s += &format!("{}k{i}:\n", " ".repeat(i));
        }
        write("nested-block.yaml", s.as_bytes())?
    };
    let unknown_kind = write(
        "deployment.yaml",
        b"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: tcp-echo\nspec: {}\n",
    )?;
    let http_route = write(
        "http-route.yaml",
        virtual_service(
            "  http:\n  - route:\n    - destination:\n        host: tcp-echo\n        subset: v2\n",
        )
        .as_bytes(),
    )?;
    let all_zero = write(
        "all-zero.yaml",
        virtual_service(&tcp_route(("0", "0"))).as_bytes(),
    )?;
    let too_heavy = write(
        "weight-too-large.yaml",
        virtual_service(&tcp_route(("1", "1000001"))).as_bytes(),
    )?;
    let port_mismatch = write(
        "port-mismatch.yaml",
        virtual_service(&tcp_route(("80", "20")).replacen(
            "        subset: v1\n",
            "        subset: v1\n        port: {number: 9999}\n",
            1,
        ))
        .as_bytes(),
    )?;
    let float_weight = write(
        "float-weight.yaml",
        virtual_service(&tcp_route(("79.5", "20.5"))).as_bytes(),
    )?;
    let dup_service = write(
        "duplicate-service.yaml",
        b"services:\n  tcp-echo:\n    subsets: {v1: 127.0.0.1:9001}\n  tcp-echo:\n    subsets: {v1: 127.0.0.1:9002}\n",
    )?;
    let dup_key = write(
        "duplicate-key.yaml",
        virtual_service(&tcp_route(("80", "20")))
            .replace(
                "kind: VirtualService\n",
                "kind: VirtualService\nkind: Gateway\n",
            )
            .as_bytes(),
    )?;
    let listen_conflict = write(
        "listen-conflict.yaml",
        b"services:\n  other:\n    listen: 31400\n    subsets: {v1: 127.0.0.1:9001}\n",
    )?;
    let host_name = write(
        "host-name.yaml",
        b"services:\n  other:\n    listen: 31401\n    subsets: {v1: localhost:9001}\n",
    )?;
    let both_weights = write(
        "weights-twice.yaml",
        format!(
            "services:\n  tcp-echo:\n    subsets: {{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}}\n    \
             weights: {{v1: 50, v2: 50}}\n---\n{}",
            virtual_service(&tcp_route(("80", "20")))
        )
        .as_bytes(),
    )?;
    let seventeen = {
        let mut s = String::from("services:\n  many:\n    listen: 31401\n    subsets:\n");
        for i in 0..17 {
            s += &format!("      v{i}: 127.0.0.1:{}\n", 10_000 + i);
        }
        s += "    weights: {v0: 1}\n";
        write("17-subsets.yaml", s.as_bytes())?
    };
    let tab_indent = write(
        "tab-indent.yaml",
        b"services:\n\ttcp-echo:\n\t\tsubsets: {v1: 127.0.0.1:9001}\n",
    )?;
    let utf16 = {
        let text = "services: {}\n";
        let mut b = vec![0xff, 0xfe];
        b.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        write("utf16.yaml", &b)?
    };
    // A valid change (50/50) in the first file, garbage in the second: all or nothing.
    let good = fixture("tcp-echo-50-50.yaml");
    // The loader's configuration with a new service: were it applied, status would change.
    let more = format!(
        "{}  other:\n    listen: 31401\n    subsets: {{v1: 127.0.0.1:9001}}\n",
        tcpshift_tests::seed_config(80, 20)
    );
    let valid_more = write("valid-more.yaml", more.as_bytes())?;
    let cfg_all_zero = write(
        "cfg-all-zero.yaml",
        tcpshift_tests::seed_config(0, 0).as_bytes(),
    )?;
    let cfg_unknown_field = write(
        "cfg-unknown-field.yaml",
        tcpshift_tests::seed_config(80, 20)
            .replace("    weights:", "    wieghts:")
            .as_bytes(),
    )?;
    let cfg_negative = write(
        "cfg-negative.yaml",
        more.replace("v2: 20", "v2: -20").as_bytes(),
    )?;
    let fifo = ns.file("fifo");
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo with a NUL-terminated path.
    ensure!(
        unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) } == 0,
        "mkfifo"
    );
    let dir = ns.file("");
    let non_utf8_arg = OsString::from_vec(b"v2=\xff\xfe20".to_vec());
    let non_utf8_path = OsString::from_vec(b"/tmp/\xff\xfe.yaml".to_vec());
    let long_subset = format!("{}=1", "v".repeat(100_000));
    let s = |p: &Path| p.display().to_string();

    Ok(vec![
        // tcpshiftctl set-weight
        ctl("sw: not a number", &["set-weight", "v2=abc"]),
        ctl("sw: negative", &["set-weight", "v2=-1"]),
        ctl("sw: exponent", &["set-weight", "v2=1e9"]),
        ctl("sw: fraction", &["set-weight", "v2=20.5"]),
        ctl("sw: full-width digits", &["set-weight", "v2=２０"]),
        ctl("sw: unknown subset", &["set-weight", "v3=10"]),
        ctl("sw: empty argument", &["set-weight", ""]),
        ctl("sw: no assignment", &["set-weight"]),
        ctl(
            "sw: unknown service",
            &["set-weight", "--service", "nope", "v2=20"],
        ),
        ctl(
            "sw: above u64",
            &["set-weight", "v2=99999999999999999999999"],
        ),
        ctl(
            "sw: above max weight",
            &["set-weight", "v1=1", "v2=1000001"],
        ),
        ctl("sw: percent above 100", &["set-weight", "v2=101"]),
        ctl("sw: all zero", &["set-weight", "v1=0", "v2=0"]),
        ctl("sw: subset twice", &["set-weight", "v2=20", "v2=30"]),
        ctl_os(
            "sw: non-UTF-8 bytes",
            vec!["set-weight".into(), non_utf8_arg],
        ),
        ctl(
            "sw: 100 000-byte subset name",
            &["set-weight", &long_subset],
        ),
        // tcpshiftctl apply -f
        apply("apply: truncated YAML", &fixture("truncated.yaml")),
        apply("apply: 64 KiB binary garbage", &garbage_file),
        apply("apply: NUL bytes", &nul_file),
        apply("apply: UTF-16 file", &utf16),
        apply("apply: 10 MB service name", &big_name),
        apply("apply: 100 MB sparse file", &huge_sparse),
        apply("apply: /dev/zero", Path::new("/dev/zero")),
        apply("apply: alias bomb", &bomb),
        apply("apply: 200 000 nested [", &nested),
        apply("apply: 3000 nested mappings", &nested_block),
        apply("apply: unknown field", &fixture("unknown-field.yaml")),
        apply("apply: weight as string", &fixture("wrong-types.yaml")),
        apply("apply: negative weight", &fixture("bad-weight.yaml")),
        apply("apply: unknown subset", &fixture("unknown-subset.yaml")),
        apply("apply: port mismatch", &port_mismatch),
        apply("apply: HTTP route", &http_route),
        apply("apply: all weights 0", &all_zero),
        apply("apply: weight above max", &too_heavy),
        apply("apply: fractional weights", &float_weight),
        apply("apply: unknown kind", &unknown_kind),
        apply("apply: duplicate service", &dup_service),
        apply("apply: duplicate key", &dup_key),
        apply("apply: listen conflict", &listen_conflict),
        apply("apply: host name address", &host_name),
        apply("apply: weights given twice", &both_weights),
        apply("apply: 17 subsets", &seventeen),
        apply("apply: tab indentation", &tab_indent),
        apply("apply: empty file", &empty),
        apply("apply: only comments", &comments),
        apply("apply: a directory", &dir),
        apply(
            "apply: nonexistent path",
            Path::new("/nonexistent/tcpshift.yaml"),
        ),
        ctl_os(
            "apply: non-UTF-8 path",
            vec!["apply".into(), "-f".into(), non_utf8_path.clone()],
        ),
        ctl(
            "apply: good file then garbage",
            &["apply", "-f", &s(&good), "-f", &s(&garbage_file)],
        ),
        ctl(
            "apply --dry-run: garbage",
            &["apply", "--dry-run", "-f", &s(&garbage_file)],
        ),
        Case {
            stdin: Some(garbage(4096, 7)),
            ..ctl("apply: garbage on stdin", &["apply", "-f", "-"])
        },
        // tcpshiftctl delete / get / top
        ctl("delete: unknown service", &["delete", "service", "nope"]),
        ctl(
            "delete: known and unknown",
            &["delete", "service", "tcp-echo", "nope"],
        ),
        ctl(
            "delete: unknown VirtualService",
            &["delete", "virtualservice", "nope"],
        ),
        ctl("delete: unknown kind", &["delete", "pod", "tcp-echo"]),
        ctl("delete: nothing named", &["delete"]),
        ctl("delete -f: garbage", &["delete", "-f", &s(&garbage_file)]),
        ctl("get: unknown service", &["get", "services", "nope"]),
        ctl("get: unknown format", &["get", "services", "-o", "xml"]),
        ctl("top: interval 0", &["top", "--interval", "0"]),
        ctl("top: interval NaN", &["top", "--interval", "NaN"]),
        ctl("ctl: unknown command", &["frobnicate"]),
        // --netns
        ctl(
            "netns: nonexistent",
            &["--netns", "/run/netns/nonexistent", "set-weight", "v2=50"],
        ),
        ctl(
            "netns: a mount namespace",
            &["--netns", "/proc/self/ns/mnt", "set-weight", "v2=50"],
        ),
        ctl(
            "netns: a regular file",
            &["--netns", &s(&empty), "set-weight", "v2=50"],
        ),
        ctl(
            "netns: a FIFO",
            &["--netns", &s(&fifo), "set-weight", "v2=50"],
        ),
        // tcpshiftd against the running state
        daemon_config("d: truncated YAML", &fixture("truncated.yaml")),
        daemon_config("d: binary garbage", &garbage_file),
        daemon_config("d: 10 MB service name", &big_name),
        daemon_config("d: 100 MB sparse file", &huge_sparse),
        daemon_config("d: /dev/zero", Path::new("/dev/zero")),
        daemon_config("d: alias bomb", &bomb),
        daemon_config("d: all weights 0", &cfg_all_zero),
        daemon_config("d: unknown field", &cfg_unknown_field),
        daemon_config("d: negative weight", &cfg_negative),
        daemon_config("d: Istio manifest", &fixture("tcp-echo-20-v2.yaml")),
        daemon_config("d: empty file", &empty),
        daemon_config("d: a directory", &dir),
        daemon_config("d: nonexistent", Path::new("/nonexistent/tcpshift.yaml")),
        Case {
            name: "d: non-UTF-8 path",
            program: Program::Daemon,
            args: vec!["--config".into(), non_utf8_path],
            stdin: None,
        },
        daemon(
            "d: valid config, bad netns",
            &[
                "--config",
                &s(&valid_more),
                "--netns",
                "/run/netns/nonexistent",
            ],
        ),
        daemon(
            "d: valid config, mnt namespace",
            &["--config", &s(&valid_more), "--netns", "/proc/self/ns/mnt"],
        ),
        daemon("d: bad log level", &["--log-level", "loud"]),
        daemon("d: bad metrics address", &["--metrics", "localhost"]),
        // A valid config that adds a service, with a metrics address nothing here can bind
        // (TEST-NET-1): nothing may be applied before the address is taken.
        daemon(
            "d: valid config, unbindable metrics address",
            &["--config", &s(&valid_more), "--metrics", "192.0.2.1:9464"],
        ),
        daemon(
            "d: valid config, debug, unbindable metrics address",
            &[
                "--config",
                &s(&valid_more),
                "--log-level",
                "debug",
                "--metrics",
                "192.0.2.1:9464",
            ],
        ),
        daemon("d: negative scan interval", &["--scan-interval-ms", "-5"]),
    ])
}

/// What each case's error must say: a fragment of its reason (any non-zero exit with any
/// message is not enough: the right check must have refused the input).
const REASONS: &[(&str, &str)] = &[
    ("sw: not a number", "is not a non-negative integer"),
    ("sw: negative", "cannot be negative"),
    ("sw: exponent", "is not a non-negative integer"),
    ("sw: fraction", "is not a non-negative integer"),
    ("sw: full-width digits", "is not a non-negative integer"),
    ("sw: unknown subset", "unknown subset \"v3\""),
    ("sw: empty argument", "missing '='"),
    ("sw: no assignment", "required arguments were not provided"),
    ("sw: unknown service", "no service named \"nope\""),
    ("sw: above u64", "too large"),
    ("sw: above max weight", "too large"),
    ("sw: percent above 100", "percentages from 0 to 100"),
    ("sw: all zero", "all weights are 0"),
    ("sw: subset twice", "named twice"),
    ("sw: non-UTF-8 bytes", "invalid UTF-8"),
    ("sw: 100 000-byte subset name", "unknown subset"),
    ("apply: truncated YAML", "truncated.yaml:"),
    ("apply: 64 KiB binary garbage", "not valid UTF-8"),
    ("apply: NUL bytes", "control characters"),
    ("apply: UTF-16 file", "not valid UTF-8"),
    ("apply: 10 MB service name", "10mb-name.yaml:"),
    ("apply: 100 MB sparse file", "larger than 64 MiB"),
    ("apply: /dev/zero", "larger than 64 MiB"),
    // The typed parse refuses the bomb at its first value, before any alias is expanded.
    (
        "apply: alias bomb",
        "alias-bomb.yaml:1:11: services: invalid type: sequence",
    ),
    ("apply: 200 000 nested [", "nested deeper than"),
    (
        "apply: 3000 nested mappings",
        "services.k1: unknown field `k2`",
    ),
    ("apply: unknown field", "unknown-field.yaml:"),
    ("apply: weight as string", "wrong-types.yaml:"),
    ("apply: negative weight", "bad-weight.yaml:"),
    ("apply: unknown subset", "unknown-subset.yaml:"),
    ("apply: port mismatch", "port"),
    ("apply: HTTP route", "HTTP routes are not supported"),
    ("apply: all weights 0", "all weights are 0"),
    ("apply: weight above max", "too large"),
    ("apply: fractional weights", "79.5"),
    ("apply: unknown kind", "Deployment"),
    ("apply: duplicate service", "duplicate key \"tcp-echo\""),
    ("apply: duplicate key", "duplicate entry"),
    ("apply: listen conflict", "31400"),
    ("apply: host name address", "localhost"),
    ("apply: weights given twice", "weights both here and"),
    ("apply: 17 subsets", "at most 16"),
    ("apply: tab indentation", "tab-indent.yaml:2"),
    ("apply: empty file", "no YAML documents"),
    ("apply: only comments", "no YAML documents"),
    ("apply: a directory", "Is a directory"),
    ("apply: nonexistent path", "No such file or directory"),
    ("apply: non-UTF-8 path", "invalid UTF-8"),
    (
        "apply: good file then garbage",
        "garbage.bin:1: not valid UTF-8",
    ),
    ("apply --dry-run: garbage", "not valid UTF-8"),
    ("apply: garbage on stdin", "<stdin>:1: not valid UTF-8"),
    ("delete: unknown service", "not found: service/nope"),
    ("delete: known and unknown", "not found: service/nope"),
    (
        "delete: unknown VirtualService",
        "not found: virtualservice/nope",
    ),
    ("delete: unknown kind", "cannot delete \"pod\""),
    ("delete: nothing named", "nothing to delete"),
    ("delete -f: garbage", "not valid UTF-8"),
    ("get: unknown service", "no service named \"nope\""),
    ("get: unknown format", "'xml'"),
    ("top: interval 0", "--interval 0"),
    ("top: interval NaN", "--interval NaN"),
    ("ctl: unknown command", "frobnicate"),
    ("netns: nonexistent", "/run/netns/nonexistent"),
    ("netns: a mount namespace", "is not a network namespace"),
    ("netns: a regular file", "is not a network namespace"),
    ("netns: a FIFO", "is not a network namespace"),
    ("d: truncated YAML", "truncated.yaml:"),
    ("d: binary garbage", "not valid UTF-8"),
    ("d: 10 MB service name", "10mb-name.yaml:"),
    ("d: 100 MB sparse file", "larger than 64 MiB"),
    ("d: /dev/zero", "larger than 64 MiB"),
    ("d: alias bomb", "alias-bomb.yaml:"),
    ("d: all weights 0", "all weights are 0"),
    ("d: unknown field", "unknown field `wieghts`"),
    ("d: negative weight", "is negative"),
    ("d: Istio manifest", "unknown field `apiVersion`"),
    ("d: empty file", "the configuration is empty"),
    ("d: a directory", "Is a directory"),
    ("d: nonexistent", "No such file or directory"),
    ("d: non-UTF-8 path", "No such file or directory"),
    ("d: valid config, bad netns", "/run/netns/nonexistent"),
    (
        "d: valid config, mnt namespace",
        "is not a network namespace",
    ),
    ("d: bad log level", "'loud'"),
    ("d: bad metrics address", "'localhost'"),
    // These run beside the seed's tcpshiftd, so the one-daemon-per-namespace check refuses
    // them first; the unbindable address alone is `an_unbindable_metrics_address_installs_nothing`
    // in daemon.rs.
    (
        "d: valid config, unbindable metrics address",
        "another tcpshiftd runs in this network namespace",
    ),
    (
        "d: valid config, debug, unbindable metrics address",
        "another tcpshiftd runs in this network namespace",
    ),
    ("d: negative scan interval", "'-5'"),
];

/// The fragment of the reason `case` must give.
fn expected_reason(case: &str) -> Option<&'static str> {
    REASONS.iter().find(|(n, _)| *n == case).map(|(_, r)| *r)
}

#[test]
fn malformed_inputs_fail_clearly_and_change_nothing() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 80, 20)?;
    // `status --json` holds no clock-dependent field except the observed share of new
    // connections over the last 10 s, which is constant while no connection is made: with
    // no traffic before the cases, the raw output is compared byte for byte. (Checked here.)
    let before = raw_status(&ns)?;
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        raw_status(&ns)? == before,
        "status --json changes with nothing happening; cannot compare it"
    );

    let cases = cases(&ns)?;
    assert!(cases.len() >= 35, "{} cases", cases.len());
    let mut failures = Vec::new();
    eprintln!(
        "\n{:<34} {:>4} {:>7}  first line of stderr",
        "CASE", "EXIT", "MS"
    );
    for case in &cases {
        let outcome = match run(&ns, case) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("{:<34} HUNG", case.name);
                failures.push(format!("{e:#}"));
                continue;
            }
        };
        let first = outcome.stderr.lines().next().unwrap_or("").to_string();
        let shown: String = first.chars().take(150).collect();
        eprintln!(
            "{:<34} {:>4} {:>7}  {shown}{}",
            case.name,
            outcome
                .code
                .map_or_else(|| "sig".to_string(), |c| c.to_string()),
            outcome.took.as_millis(),
            if first.len() > shown.len() { "…" } else { "" }
        );
        let mut problems = Vec::new();
        match outcome.code {
            Some(0) => problems.push("exit 0".to_string()),
            None => problems.push("killed by a signal".to_string()),
            Some(_) => {}
        }
        if outcome.stderr.trim().is_empty() {
            problems.push("no message".into());
        }
        match expected_reason(case.name) {
            Some(reason) if !outcome.stderr.contains(reason) => {
                problems.push(format!("the message does not say {reason:?}"));
            }
            Some(_) => {}
            None => problems.push("no expected reason for this case in REASONS".into()),
        }
        if outcome.stderr.contains("panicked at") || outcome.stderr.contains("RUST_BACKTRACE") {
            problems.push("panic".into());
        }
        let lines = outcome.stderr.lines().count();
        if lines > MAX_STDERR_LINES {
            problems.push(format!("{lines} lines on stderr"));
        }
        if outcome.stderr.len() > MAX_STDERR_BYTES {
            problems.push(format!("{} bytes on stderr", outcome.stderr.len()));
        }
        if raw_status(&ns)? != before {
            problems.push("status --json changed".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                case.name,
                problems.join(", "),
                outcome.stderr.chars().take(600).collect::<String>()
            ));
        }
    }
    eprintln!("{} cases, {} failed", cases.len(), failures.len());
    // Steering still works as before, and the split is still 80/20.
    let counts = count_prefixes(seed_addr(), 200)?;
    let two = counts.get("two").copied().unwrap_or(0);
    assert!((20..=60).contains(&two), "{counts:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// A `tcp-echo` started in a network namespace of its own (`unshare -n`), killed on drop.
struct Elsewhere(Child);

impl Elsewhere {
    fn start(bind: &str, port: u16, prefix: &str) -> Result<Self> {
        let echo = bin_dir().join("tcp-echo");
        let mut child = Command::new("unshare")
            .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
            .arg(&echo)
            .args(["--bind", bind, &port.to_string(), prefix])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run unshare (util-linux)")?;
        let stdout = child.stdout.take().context("stdout")?;
        let guard = Elsewhere(child);
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(_)) => {}
                other => bail!("tcp-echo in another namespace did not start: {other:?}"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(guard)
    }
}

impl Drop for Elsewhere {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_backend_listening_in_another_namespace_is_not_registered() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    // v2's address is served by a tcp-echo in another network namespace: a process tcpshiftd
    // can see in /proc, on the very address and port the service declares.
    let _other = Elsewhere::start("127.0.0.1", 9002, "two")?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.bare_loader()?;
    let services = ns.file("services.yaml");
    std::fs::write(&services, tcpshift_tests::seed_config(50, 50))?;
    let out = ns.ctl(&["apply", "-f", &services.display().to_string()])?;
    ensure!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warnings = String::from_utf8_lossy(&out.stderr);
    eprintln!("apply warned: {}", warnings.trim());
    assert!(warnings.contains("v2"), "apply warns about v2: {warnings}");
    poll_until(Duration::from_secs(10), "v1 live", || {
        Ok((subset(&ns.status()?, "v1").context("v1")?["live"] == true).then_some(()))
    })?;
    // Several scans of tcpshiftd later, v2 is still not registered. A scan is observed by
    // what it does: a backend started after the apply (of a marker service) can only be
    // registered by tcpshiftd's scan, and that scan looked at v2 too. Two markers, one after
    // the other: at least two scans.
    for (k, port) in [(1u16, 9011u16), (2, 9012)] {
        let marker = ns.file(&format!("marker-{k}.yaml"));
        std::fs::write(
            &marker,
            format!(
                "services:\n  marker-{k}:\n    listen: {}\n    subsets: {{marker{k}: \
                 127.0.0.1:{port}}}\n",
                31410 + k
            ),
        )?;
        let out = ns.ctl(&["apply", "-f", &marker.display().to_string()])?;
        ensure!(
            out.status.success(),
            "apply marker {k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns.echo("127.0.0.1", port, &format!("marker{k}"))?;
        poll_until(
            scaled(Duration::from_secs(10)),
            &format!("tcpshiftd's scan registered marker{k}"),
            || {
                Ok(
                    (subset(&ns.status()?, &format!("marker{k}")).context("marker")?["live"]
                        == true)
                        .then_some(()),
                )
            },
        )?;
    }
    let status = ns.status()?;
    assert_eq!(
        subset(&status, "v2").context("v2")?["live"],
        false,
        "{status}"
    );
    // Every connection falls back to v1; none is refused.
    let counts = count_prefixes(seed_addr(), 200)?;
    eprintln!("v2 in another namespace: {counts:?}");
    assert_eq!(counts.get("one"), Some(&200), "{counts:?}");
    let status = ns.status()?;
    let fallbacks = subset(&status, "v2").context("v2")?["counters"]["fallback_out"]
        .as_u64()
        .unwrap_or(0);
    assert!(fallbacks > 50, "v2's fallbacks: {fallbacks}");
    Ok(())
}

#[test]
fn weight_zero_drains_new_connections_and_keeps_open_ones() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 50, 50)?;
    // Long-lived connections, until at least five of them are on v2.
    let mut on_v2 = Vec::new();
    let mut on_v1 = Vec::new();
    for i in 0..200 {
        let mut c = Conn::open(seed_addr())?;
        match c.exchange(&format!("open {i}"))?.as_str() {
            "two" => on_v2.push(c),
            _ => on_v1.push(c),
        }
        if on_v2.len() >= 5 && on_v1.len() >= 2 {
            break;
        }
    }
    ensure!(on_v2.len() >= 5, "only {} connections on v2", on_v2.len());
    ns.ctl_ok(&["set-weight", "v2=0"])?;
    // New connections: all v1.
    let counts = count_prefixes(seed_addr(), 200)?;
    eprintln!("after set-weight v2=0: {counts:?}");
    assert_eq!(counts.get("one"), Some(&200), "{counts:?}");
    // The open ones stay where they are, and keep echoing, to the end.
    for round in 0..3 {
        for (i, c) in on_v2.iter_mut().enumerate() {
            assert_eq!(c.exchange(&format!("still {round} {i}"))?, "two");
        }
        for (i, c) in on_v1.iter_mut().enumerate() {
            assert_eq!(c.exchange(&format!("still {round} {i}"))?, "one");
        }
    }
    let active = subset(&ns.status()?, "v2").context("v2")?["counters"]["active"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(active, on_v2.len() as u64, "v2's open connections");
    drop(on_v2);
    poll_until(Duration::from_secs(10), "v2 drained", || {
        let status = ns.status()?;
        let active = subset(&status, "v2").context("v2")?["counters"]["active"].as_u64();
        Ok((active == Some(0)).then_some(()))
    })?;
    Ok(())
}
