//! The Debian package (`cargo xtask package`): its files, its systemd unit, and its maintainer
//! scripts through install, upgrade with an edited conffile, remove and purge — run by dpkg in
//! a scratch root (`dpkg --root DIR --force-script-chrootless`: the scripts run on this machine
//! with `DPKG_ROOT=DIR` and touch only files under it), so the machine is left as it was.
//!
//! The package comes from `$TCPSHIFT_DEB` (set by `cargo xtask test`, which builds it), else
//! from `target/debian/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};
use tcpshift_tests::privileged;

/// The `.deb` to test.
fn deb() -> PathBuf {
    if let Some(path) = std::env::var_os("TCPSHIFT_DEB") {
        return PathBuf::from(path);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let prefix = format!("tcpshift_{}_", env!("CARGO_PKG_VERSION"));
    let found = fs::read_dir(&dir).ok().and_then(|entries| {
        entries.flatten().map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {prefix}*.deb in {}: run `cargo xtask package` first (or `cargo xtask test`, \
             which builds it and sets TCPSHIFT_DEB)",
            dir.display()
        )
    })
}

/// Runs `cmd`; fails with its stderr unless it succeeds.
fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("tcpshift-package-{name}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A root directory dpkg can install into: an empty package database and the account files
/// `useradd --prefix` edits.
fn scratch_root(dir: &Path) -> Result<()> {
    let admin = dir.join("var/lib/dpkg");
    for sub in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(sub))?;
    }
    fs::write(admin.join("status"), "")?;
    fs::write(admin.join("available"), "")?;
    let etc = dir.join("etc");
    fs::create_dir_all(&etc)?;
    fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(etc.join("group"), "root:x:0:\n")?;
    fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n")?;
    fs::write(etc.join("gshadow"), "root:*::\n")?;
    Ok(())
}

/// `dpkg --root ROOT ARGS`, maintainer scripts run outside a chroot with `DPKG_ROOT=ROOT`;
/// dependencies (libc6, ...) are not in the scratch root, hence `--force-depends`.
fn dpkg(root: &Path, args: &[&str]) -> Result<Output> {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args))
}

/// The package's status line in the scratch root's database (e.g. "install ok installed").
fn status(root: &Path) -> Result<String> {
    let out = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Status} ${Version}", "tcpshift"])
        .output()?;
    Ok(stdout(&out))
}

/// The `tcpshift` line of `ROOT/etc/FILE` (passwd or group), if any.
fn account(root: &Path, file: &str) -> Result<Option<String>> {
    let text = fs::read_to_string(root.join("etc").join(file))?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("tcpshift:"))
        .map(str::to_owned))
}

#[test]
fn package_holds_the_programs_unit_configuration_man_pages_and_completions() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let deb = deb();
    let listing = stdout(&run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?);
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.'))
        .collect();
    for want in [
        "/usr/bin/tcpshiftd",
        "/usr/bin/tcpshiftctl",
        "/usr/bin/tcp-echo",
        "/etc/tcpshift/tcpshift.yaml",
        "/etc/default/tcpshiftd",
        "/lib/systemd/system/tcpshiftd.service",
        "/usr/share/man/man1/tcpshiftd.1.gz",
        "/usr/share/man/man1/tcpshiftctl.1.gz",
        "/usr/share/man/man1/tcpshiftctl-set-weight.1.gz",
        "/usr/share/man/man1/tcpshiftctl-completion.1.gz",
        "/usr/share/man/man1/tcp-echo.1.gz",
        "/usr/share/bash-completion/completions/tcpshiftctl",
        "/usr/share/zsh/vendor-completions/_tcpshiftctl",
        "/usr/share/fish/vendor_completions.d/tcpshiftctl.fish",
        "/usr/share/bash-completion/completions/tcpshiftd",
        "/usr/share/doc/tcpshift/copyright",
    ] {
        assert!(
            files.contains(&want),
            "{want} missing from the package:\n{listing}"
        );
    }
    // No hidden documentation command leaks into the pages, and no `help` page.
    assert!(
        !files
            .iter()
            .any(|f| f.contains("generate-docs") || f.ends_with("-help.1.gz")),
        "{listing}"
    );
    let conffiles = stdout(&run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"))?);
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/tcpshift/tcpshift.yaml", "/etc/default/tcpshiftd"]
    );

    let tree = Scratch::new("contents")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree.0))?;
    let bin = tree.0.join("usr/bin");

    // The installed tcpshiftctl prints completions for its own subcommands.
    let bash = stdout(&run(
        Command::new(bin.join("tcpshiftctl")).args(["completion", "bash"])
    )?);
    assert!(
        bash.contains("set-weight") && bash.contains("complete -F"),
        "{bash}"
    );
    // A man page is roff with the options of the binary.
    let page = stdout(&run(Command::new("gzip").arg("-dc").arg(
        tree.0
            .join("usr/share/man/man1/tcpshiftctl-set-weight.1.gz"),
    ))?);
    assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
    assert!(page.contains("\\-\\-service"), "{page}");

    // The default configuration steers nothing: tcpshiftd refuses it before touching the
    // kernel (run in a fresh network namespace all the same).
    let out = Command::new("unshare")
        .arg("--net")
        .arg(bin.join("tcpshiftd"))
        .arg("--config")
        .arg(tree.0.join("etc/tcpshift/tcpshift.yaml"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the configuration is empty"), "{err}");

    // The unit passes systemd-analyze verify (ExecStart pointed at the extracted binary,
    // which verify wants to exist): no error, no warning.
    let unit = fs::read_to_string(tree.0.join("lib/systemd/system/tcpshiftd.service"))?;
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let checked = tree.0.join("tcpshiftd.service");
    fs::write(
        &checked,
        unit.replace(
            "/usr/bin/tcpshiftd",
            &bin.join("tcpshiftd").display().to_string(),
        ),
    )?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&checked)
        .output()
        .context("cannot run systemd-analyze (apt install systemd)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
    Ok(())
}

#[test]
fn install_upgrade_with_an_edited_conffile_remove_and_purge() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let deb = deb();
    let host_passwd = fs::read("/etc/passwd")?;
    let scratch = Scratch::new("scripts")?;
    let root = scratch.0.join("root");
    scratch_root(&root)?;
    let conffile = root.join("etc/tcpshift/tcpshift.yaml");

    // Install: files in place, the system user and its group created.
    dpkg(&root, &["--install", &deb.display().to_string()])?;
    assert!(status(&root)?.starts_with("install ok installed"));
    assert!(root.join("usr/bin/tcpshiftd").is_file());
    let user = account(&root, "passwd")?.context("no tcpshift user after install")?;
    let fields: Vec<&str> = user.split(':').collect();
    let uid: u32 = fields[2].parse()?;
    assert!(uid > 0 && uid < 1000, "not a system uid: {user}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{user}");
    assert!(account(&root, "group")?.is_some(), "no tcpshift group");

    // Upgrade to a newer version while the administrator's edit is in the conffile: kept.
    let shipped = fs::read_to_string(&conffile)?;
    let edited = format!(
        "{shipped}services:\n  s:\n    listen: 31400\n    subsets: {{v1: 127.0.0.1:9001}}\n"
    );
    fs::write(&conffile, &edited)?;
    let unpacked = scratch.0.join("newer");
    run(Command::new("dpkg-deb").arg("-R").arg(&deb).arg(&unpacked))?;
    let control = unpacked.join("DEBIAN/control");
    let text = fs::read_to_string(&control)?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .context("no Version in control")?
        .to_owned();
    fs::write(
        &control,
        text.replace(
            &format!("Version: {version}"),
            &format!("Version: {version}+1"),
        ),
    )?;
    let newer = scratch.0.join("newer.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&unpacked)
        .arg(&newer))?;
    dpkg(&root, &["--install", &newer.display().to_string()])?;
    assert_eq!(status(&root)?, format!("install ok installed {version}+1"));
    assert_eq!(
        fs::read_to_string(&conffile)?,
        edited,
        "edited conffile not kept"
    );
    assert!(!root.join("etc/tcpshift/tcpshift.yaml.dpkg-new").exists());
    assert_eq!(account(&root, "passwd")?.as_deref(), Some(user.as_str()));

    // Remove: programs gone, configuration and user kept.
    dpkg(&root, &["--remove", "tcpshift"])?;
    assert!(status(&root)?.starts_with("deinstall ok config-files"));
    assert!(!root.join("usr/bin/tcpshiftd").exists());
    assert!(!root.join("lib/systemd/system/tcpshiftd.service").exists());
    assert_eq!(fs::read_to_string(&conffile)?, edited);
    assert!(account(&root, "passwd")?.is_some());

    // Purge: configuration, user and group gone.
    dpkg(&root, &["--purge", "tcpshift"])?;
    assert_eq!(status(&root)?, "", "still known to dpkg after purge");
    assert!(!conffile.exists() && !root.join("etc/tcpshift").exists());
    assert!(!root.join("etc/default/tcpshiftd").exists());
    assert_eq!(account(&root, "passwd")?, None);
    assert_eq!(account(&root, "group")?, None);

    assert_eq!(
        fs::read("/etc/passwd")?,
        host_passwd,
        "the machine's accounts changed"
    );
    Ok(())
}
