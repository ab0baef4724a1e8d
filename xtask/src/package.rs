//! `cargo xtask package`: builds the release binaries and a Debian package of them with
//! `dpkg-deb` (no other tool needed): the three programs, the systemd unit, a commented
//! default configuration (a conffile), manual pages and bash/zsh/fish completions generated
//! by the binaries themselves from their clap definitions (`generate-docs`, see
//! `tcpshift::cli_docs`), and the maintainer scripts from `packaging/debian/`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    build::{BINARIES, Profile, build},
    cmd::{self, say},
};

/// The package's name.
pub const PACKAGE: &str = "tcpshift";

/// Where the packaging sources live, relative to the workspace root.
const SOURCES: &str = "packaging";

/// Files taken from `packaging/`: (source, path in the package, mode).
const FILES: &[(&str, &str, u32)] = &[
    ("tcpshift.yaml", "etc/tcpshift/tcpshift.yaml", 0o644),
    ("tcpshiftd.default", "etc/default/tcpshiftd", 0o644),
    (
        "tcpshiftd.service",
        "lib/systemd/system/tcpshiftd.service",
        0o644,
    ),
    (
        "debian/copyright",
        "usr/share/doc/tcpshift/copyright",
        0o644,
    ),
];

/// The configuration files dpkg keeps when the administrator edited them.
const CONFFILES: &[&str] = &["/etc/tcpshift/tcpshift.yaml", "/etc/default/tcpshiftd"];

/// Maintainer scripts, from `packaging/debian/`.
const SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

/// Builds the release binaries, then the package; returns the `.deb`'s path.
pub fn run() -> Result<PathBuf> {
    let bin_dir = build(Profile::Release)?;
    let deb = package(&bin_dir, &cmd::target_dir()?.join("debian"))?;
    say(format_args!(
        "built {} (install: apt install ./{})",
        cmd::short(&deb).display(),
        cmd::short(&deb).display()
    ));
    Ok(deb)
}

/// Assembles the package from the binaries in `bin_dir` in `out_dir/tcpshift_VERSION_ARCH/`
/// and builds `out_dir/tcpshift_VERSION_ARCH.deb` from it.
pub fn package(bin_dir: &Path, out_dir: &Path) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = architecture()?;
    let name = format!("{PACKAGE}_{version}_{arch}");
    let stage = out_dir.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage)
            .with_context(|| format!("cannot remove the old {}", stage.display()))?;
    }
    let sources = cmd::root().join(SOURCES);

    for bin in BINARIES {
        copy(&bin_dir.join(bin), &stage.join("usr/bin").join(bin), 0o755)?;
    }
    for (from, to, mode) in FILES {
        copy(&sources.join(from), &stage.join(to), *mode)?;
    }
    gzip(
        &cmd::root().join("README.md"),
        &stage.join("usr/share/doc/tcpshift/README.md.gz"),
    )?;
    generated_docs(bin_dir, &out_dir.join(format!("{name}.docs")), &stage)?;

    let debian = stage.join("DEBIAN");
    for script in SCRIPTS {
        copy(
            &sources.join("debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    write(
        &debian.join("conffiles"),
        &(CONFFILES.join("\n") + "\n"),
        0o644,
    )?;
    write(&debian.join("md5sums"), &md5sums(&stage)?, 0o644)?;
    let control = control(version, &arch, bin_dir, installed_size_kib(&stage)?)?;
    write(&debian.join("control"), &control, 0o644)?;
    directories_0755(&stage)?;

    let deb = out_dir.join(format!("{name}.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )
    .context("dpkg-deb is part of dpkg (apt install dpkg)")?;
    Ok(deb)
}

/// Runs each binary's hidden `generate-docs` into `scratch` and puts the manual pages
/// (gzipped) and completions where Debian looks for them.
fn generated_docs(bin_dir: &Path, scratch: &Path, stage: &Path) -> Result<()> {
    if scratch.exists() {
        fs::remove_dir_all(scratch)
            .with_context(|| format!("cannot remove the old {}", scratch.display()))?;
    }
    for bin in BINARIES {
        // tcpshiftctl has subcommands, so it is a subcommand there, an option elsewhere.
        let option = if *bin == "tcpshiftctl" {
            "generate-docs"
        } else {
            "--generate-docs"
        };
        cmd::output(
            Command::new(bin_dir.join(bin))
                .arg(option)
                .arg(scratch)
                .env_remove("RUST_LOG"),
        )?;
        let completions = scratch.join("completions");
        let installed = [
            (
                format!("bash/{bin}.bash"),
                format!("usr/share/bash-completion/completions/{bin}"),
            ),
            (
                format!("zsh/_{bin}"),
                format!("usr/share/zsh/vendor-completions/_{bin}"),
            ),
            (
                format!("fish/{bin}.fish"),
                format!("usr/share/fish/vendor_completions.d/{bin}.fish"),
            ),
        ];
        for (from, to) in installed {
            copy(&completions.join(from), &stage.join(to), 0o644)?;
        }
    }
    let man = scratch.join("man1");
    let mut pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| format!("cannot read {}", man.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read {}", man.display()))?;
    pages.sort();
    if pages.len() < BINARIES.len() {
        bail!(
            "the binaries wrote only {} manual pages to {}",
            pages.len(),
            man.display()
        );
    }
    for page in pages {
        let file = page.file_name().context("manual page without a name")?;
        let mut gz = file.to_os_string();
        gz.push(".gz");
        gzip(&page, &stage.join("usr/share/man/man1").join(gz))?;
    }
    fs::remove_dir_all(scratch).with_context(|| format!("cannot remove {}", scratch.display()))
}

/// The `DEBIAN/control` file.
fn control(version: &str, arch: &str, bin_dir: &Path, installed_kib: u64) -> Result<String> {
    let glibc = glibc_needed(bin_dir)?;
    Ok(format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: tcpshift developers <tcpshift@example.invalid>\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6 (>= {glibc}), libgcc-s1, passwd\n\
         Recommends: bash-completion\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://example.invalid/tcpshift\n\
         Description: kernel-level TCP traffic shifting (eBPF sk_lookup)\n \
         tcpshift moves new TCP connections between versions of a service by weight\n \
         (100 % v1, then 80/20, then 0/100) with an eBPF sk_lookup program: no proxy\n \
         in the data path. tcpshiftd (systemd unit tcpshiftd.service) loads it and\n \
         applies /etc/tcpshift/tcpshift.yaml; tcpshiftctl shows the split and changes\n \
         weights live; tcp-echo is a line-echo test server.\n"
    ))
}

/// The newest `GLIBC_2.N` symbol version the binaries refer to (e.g. "2.34").
fn glibc_needed(bin_dir: &Path) -> Result<String> {
    let mut newest = 0u32;
    for bin in BINARIES {
        let path = bin_dir.join(bin);
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let tag = b"GLIBC_2.";
        for (i, w) in bytes.windows(tag.len()).enumerate() {
            if w != tag {
                continue;
            }
            let digits: String = bytes[i + tag.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .map(|&b| char::from(b))
                .collect();
            newest = newest.max(digits.parse().unwrap_or(0));
        }
    }
    if newest == 0 {
        bail!(
            "no GLIBC_2.N symbol version in the binaries of {}",
            bin_dir.display()
        );
    }
    Ok(format!("2.{newest}"))
}

/// `dpkg-architecture`'s name for this machine (e.g. amd64).
fn architecture() -> Result<String> {
    let out = cmd::output(Command::new("dpkg").arg("--print-architecture"))
        .context("cannot ask dpkg for the architecture (is this Debian?)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `DEBIAN/md5sums`: an md5sum line per file, paths relative to the package root.
fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut |p, is_dir| {
        if !is_dir {
            files.push(p.strip_prefix(stage).unwrap_or(p).to_path_buf());
        }
    })?;
    files.sort();
    let out = cmd::output(Command::new("md5sum").args(&files).current_dir(stage))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The size of the package's files in KiB (the `Installed-Size` field).
fn installed_size_kib(stage: &Path) -> Result<u64> {
    let mut total = 0;
    let mut err = None;
    walk(stage, &mut |p, is_dir| {
        if is_dir {
            total += 1;
        } else {
            match fs::metadata(p) {
                Ok(m) => total += m.len().div_ceil(1024),
                Err(e) => err = Some((p.to_path_buf(), e)),
            }
        }
    })?;
    if let Some((p, e)) = err {
        bail!("cannot read {}: {e}", p.display());
    }
    Ok(total)
}

/// Makes every directory of the package 0755 (whatever the umask was).
fn directories_0755(stage: &Path) -> Result<()> {
    let mut dirs = vec![stage.to_path_buf()];
    walk(stage, &mut |p, is_dir| {
        if is_dir {
            dirs.push(p.to_path_buf());
        }
    })?;
    for d in dirs {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set permissions of {}", d.display()))?;
    }
    Ok(())
}

/// Calls `f(path, is_dir)` for everything below `dir` except `DEBIAN/`.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, bool)) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path();
        if entry.file_name() == "DEBIAN" {
            continue;
        }
        let is_dir = entry
            .file_type()
            .with_context(|| format!("cannot read {}", path.display()))?
            .is_dir();
        f(&path, is_dir);
        if is_dir {
            walk(&path, f)?;
        }
    }
    Ok(())
}

/// Copies `from` to `to` (creating its directory) with `mode`.
fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    parent_dir(to)?;
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions of {}", to.display()))
}

/// Writes `text` to `to` (creating its directory) with `mode`.
fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    parent_dir(to)?;
    fs::write(to, text).with_context(|| format!("cannot write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions of {}", to.display()))
}

/// `gzip -9n` of `from` into `to` (0644), as Debian compresses manual pages and documents.
fn gzip(from: &Path, to: &Path) -> Result<()> {
    parent_dir(to)?;
    let out = cmd::output(Command::new("gzip").args(["-9nc"]).arg(from))?;
    fs::write(to, out.stdout).with_context(|| format!("cannot write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot set permissions of {}", to.display()))
}

fn parent_dir(path: &Path) -> Result<()> {
    let dir = path.parent().context("path without a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
