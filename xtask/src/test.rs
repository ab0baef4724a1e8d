//! `cargo xtask test`: builds the release binaries, then runs the whole workspace's tests with
//! `TCPSHIFT_BIN_DIR` pointing at them, and ends with a summary of every test binary.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail};

use crate::{
    build::{Profile, build},
    cmd::{self, say},
};

/// Variable that makes the privileged integration tests return early (see `tests/src/lib.rs`).
const SKIP_VAR: &str = "TCPSHIFT_SKIP_PRIVILEGED";
/// File to which each skipped privileged test appends its name (see `tests/src/lib.rs`):
/// cargo counts them as passed, the summary reports them as skipped.
const SKIPPED_FILE_VAR: &str = "TCPSHIFT_SKIPPED_FILE";

/// The cargo feature that tcpshift-user's `commit` test needs (it is skipped without it).
const FAILPOINTS: &str = "tcpshift-user/failpoints";

/// One `test result:` line and the test binary it belongs to.
struct Outcome {
    binary: String,
    result: String,
}

/// Builds, runs `cargo test` (plus `extra` arguments) and prints a summary.
pub fn test(unprivileged: bool, extra: &[String]) -> Result<()> {
    let skip = unprivileged || std::env::var(SKIP_VAR).is_ok_and(|v| v == "1");
    let skip_note = announce_privileges(unprivileged, skip);
    let bin_dir = build(Profile::Release)?;
    let mut cargo = cmd::cargo();
    cargo.args(["test", "--release", "--no-fail-fast"]);
    if !selects_packages(extra) {
        // The commit path's failpoints, for tcpshift-user's tests/commit.rs (test-only: the
        // binaries under test were built above without them).
        cargo.args(["--workspace", "--features", FAILPOINTS]);
    }
    cargo.args(extra).env("TCPSHIFT_BIN_DIR", &bin_dir);
    // tests/tests/package.rs checks the package built from these binaries.
    let deb = crate::package::package(&bin_dir, &cmd::target_dir()?.join("debian"))?;
    cargo.env("TCPSHIFT_DEB", deb);
    if skip {
        cargo.env(SKIP_VAR, "1");
    }
    let skipped_file = cmd::target_dir()?.join("test-skipped.txt");
    if skipped_file.exists() {
        std::fs::remove_file(&skipped_file)
            .with_context(|| format!("cannot remove {}", skipped_file.display()))?;
    }
    cargo.env(SKIPPED_FILE_VAR, &skipped_file);
    let (status, outcomes) = run_collecting(cargo)?;
    let skipped: Vec<String> = std::fs::read_to_string(&skipped_file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    summarize(status, &outcomes, &skipped, &skip_note)
}

/// Says up front whether privileged tests run; returns the note for the final line.
fn announce_privileges(unprivileged: bool, skip: bool) -> String {
    if skip {
        let how = if unprivileged {
            "--unprivileged"
        } else {
            "TCPSHIFT_SKIP_PRIVILEGED=1 in the environment"
        };
        say(format_args!(
            "privileged tests will be skipped by request ({how})"
        ));
        return "; privileged tests skipped by request".into();
    }
    if !cmd::is_root() {
        say(
            "warning: not root, so the privileged tests will fail; pass --unprivileged to skip them",
        );
    }
    String::new()
}

/// Whether the extra cargo arguments choose packages themselves (then `--workspace` is left out).
fn selects_packages(extra: &[String]) -> bool {
    extra
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a.starts_with("-p") || a.starts_with("--package"))
}

/// Runs `cmd` with stdout and stderr merged into one pipe (keeping their order), passes every
/// line through and collects the `test result:` lines.
fn run_collecting(mut cmd: Command) -> Result<(ExitStatus, Vec<Outcome>)> {
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    cmd.stdout(writer.try_clone().context("cannot duplicate a pipe")?)
        .stderr(writer);
    cmd::echo(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", cmd::show(&cmd)))?;
    drop(cmd); // closes our copies of the pipe's write end, so reading ends with the child
    let mut binary = String::from("?");
    let mut outcomes = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.context("cannot read cargo test's output")?;
        println!("{line}");
        let text = line.trim();
        if let Some(running) = text.strip_prefix("Running ") {
            binary = describe(running);
        } else if let Some(doc) = text.strip_prefix("Doc-tests ") {
            binary = format!("doc-tests {doc}");
        } else if let Some(result) = text.strip_prefix("test result: ") {
            outcomes.push(Outcome {
                binary: binary.clone(),
                result: result.to_string(),
            });
        }
    }
    let status = child.wait().context("cannot wait for cargo test")?;
    Ok((status, outcomes))
}

/// `unittests src/lib.rs (target/release/deps/tcpshift-0123abcd)` -> `unittests src/lib.rs [tcpshift]`.
fn describe(running: &str) -> String {
    let Some((what, path)) = running.split_once(" (") else {
        return running.to_string();
    };
    let file = path
        .trim_end_matches(')')
        .rsplit('/')
        .next()
        .unwrap_or(path);
    let name = file.rsplit_once('-').map_or(file, |(name, _hash)| name);
    format!("{what} [{name}]")
}

/// Prints one line per test binary and a total, with the privileged tests that returned
/// early (`skipped`: cargo counted them as passed) as skipped; fails when cargo test failed.
fn summarize(
    status: ExitStatus,
    outcomes: &[Outcome],
    skipped: &[String],
    skip_note: &str,
) -> Result<()> {
    println!();
    say("test summary");
    let mut totals = [0u64; 3];
    for o in outcomes {
        println!("  {:<55} {}", o.binary, o.result);
        for (total, word) in totals.iter_mut().zip(["passed", "failed", "ignored"]) {
            *total += count(&o.result, word);
        }
    }
    let [passed, failed, ignored] = totals;
    let skipped_n = skipped.len() as u64;
    if !skipped.is_empty() {
        println!(
            "  skipped (privileged, counted as passed by cargo): {}",
            skipped.join(", ")
        );
    }
    let line = format!(
        "{} passed, {skipped_n} skipped, {failed} failed, {ignored} ignored in {} test \
         binaries{skip_note}",
        passed.saturating_sub(skipped_n),
        outcomes.len()
    );
    if !status.success() {
        bail!("tests FAILED (cargo test: {status}): {line}");
    }
    say(format_args!("tests ok: {line}"));
    Ok(())
}

/// The number before `word` in `ok. 3 passed; 0 failed; ...`.
fn count(result: &str, word: &str) -> u64 {
    result
        .split([';', '.'])
        .filter_map(|part| part.trim().strip_suffix(word))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
