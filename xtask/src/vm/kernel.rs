//! Kernels for the test VM: Debian's `linux-image-*-amd64` packages (downloaded with
//! `apt-get download`, unpacked with `dpkg-deb -x`), a kernel `.deb` or unpacked tree the user
//! has, or a bare bzImage.
//!
//! Debian's kernels build virtio-9p (and on 6.1 virtio-pci) as modules; the modules the guest
//! needs are found with `modprobe --show-depends` (after `depmod`, since the package does not
//! ship `modules.dep`) and kept uncompressed, in load order, next to the kernel image. A Debian
//! kernel is cached in `target/vm/kernels/<package>_<version>/` (about 15 MB: the image, the
//! modules and `kernel.json`); the downloaded package and the unpacked tree are removed.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::cmd::{self, say};

/// Modules the guest needs to mount the host's root over virtio-9p (with their dependencies).
const WANTED_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// Modules a Debian system loads on demand that tcpshift uses: TCP/UDP socket diagnostics
/// (`tcpshiftctl status` reads open connections' bytes through them). The guest's root is the
/// host's, whose /lib/modules has no modules for the guest's kernel, so nothing can be loaded
/// on demand there: they are loaded at boot instead, when the kernel has them.
const PRELOADED_MODULES: &[&str] = &["tcp_diag", "udp_diag"];

/// Bumped when the cached module selection changes (older caches are rebuilt).
const CACHE_LAYOUT: u64 = 2;

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// What the user asked for (`6.1`, a package name, a path).
    pub label: String,
    /// Where it comes from, for the summary (`linux-image-6.1.0-56-amd64 6.1.192-2`).
    pub source: String,
    /// `uname -r` of the kernel, when known before booting it.
    pub release: Option<String>,
    /// The kernel image (bzImage).
    pub image: PathBuf,
    /// Uncompressed modules to insmod, in load order.
    pub modules: Vec<PathBuf>,
    /// Modules that are neither built in nor found (the guest will likely fail to mount 9p).
    pub missing: Vec<String>,
}

impl Kernel {
    /// What to call it on the console: the series or package asked for, else its release.
    pub fn short_name(&self) -> &str {
        if is_series(&self.label) || self.label.starts_with("linux-image-") {
            &self.label
        } else {
            self.release.as_deref().unwrap_or(&self.label)
        }
    }

    /// A short name for directories and messages.
    pub fn id(&self) -> String {
        let raw = self.release.as_deref().unwrap_or(&self.label);
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// Whether `spec` names a kernel series (`6.1`, `6.12`).
pub fn is_series(spec: &str) -> bool {
    let mut parts = spec.split('.');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Finds, downloads or unpacks the kernel `spec` names (see `cargo xtask vm-test --help`).
pub fn prepare(spec: &str, vm_dir: &Path) -> Result<Kernel> {
    if is_series(spec) || spec.starts_with("linux-image-") {
        return debian(spec, vm_dir);
    }
    let path = Path::new(spec);
    if !path.exists() {
        bail!(
            "--kernel {spec}: no such file or directory (expected a series such as 6.1 or 6.12, \
             a linux-image-* package name, a bzImage, a kernel .deb or a directory unpacked from one)"
        );
    }
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {spec}"))?;
    let custom = vm_dir.join("custom").join(format!(
        "{}-{:016x}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        hash(&path)
    ));
    if path.is_dir() {
        let tree = Tree::find(&path)?;
        return tree.install(&custom, spec, &path.display().to_string());
    }
    if path.extension().is_some_and(|e| e == "deb") {
        let unpacked = vm_dir.join("tmp").join("custom-deb");
        unpack(&path, &unpacked)?;
        let kernel = Tree::find(&unpacked)?.install(&custom, spec, &path.display().to_string());
        let _ = std::fs::remove_dir_all(&unpacked);
        return kernel;
    }
    let release = bzimage_release(&path)?;
    say(format_args!(
        "{spec}: a bare kernel image ({}); it needs virtio-pci and virtio-9p built in \
         (CONFIG_VIRTIO_PCI=y, CONFIG_NET_9P_VIRTIO=y, CONFIG_9P_FS=y), plus BPF and BTF",
        release.as_deref().unwrap_or("version unknown")
    ));
    Ok(Kernel {
        label: spec.to_string(),
        source: path.display().to_string(),
        release,
        image: path,
        modules: Vec::new(),
        missing: Vec::new(),
    })
}

fn hash(path: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    h.finish()
}

/// A Debian binary package and the version apt would install.
#[derive(Debug, Clone)]
struct Package {
    name: String,
    version: String,
}

impl Package {
    fn cache_dir(&self, vm_dir: &Path) -> PathBuf {
        let version: String = self
            .version
            .chars()
            .map(|c| if c == ':' { '%' } else { c })
            .collect();
        vm_dir
            .join("kernels")
            .join(format!("{}_{version}", self.name))
    }
}

/// A Debian kernel: from the cache, or downloaded and unpacked into it.
fn debian(spec: &str, vm_dir: &Path) -> Result<Kernel> {
    let package = match resolve_package(spec) {
        Ok(p) => p,
        Err(e) => {
            return cached(spec, vm_dir)
                .inspect(|k| {
                    say(format_args!(
                        "{spec}: {e:#}; using the cached {} instead",
                        k.source
                    ))
                })
                .ok_or(e);
        }
    };
    let dir = package.cache_dir(vm_dir);
    if let Some(kernel) = load(&dir, spec)? {
        say(format_args!("{spec}: {} (cached)", kernel.source));
        return Ok(kernel);
    }
    let downloads = vm_dir.join("downloads");
    let deb = match download(&package, &downloads) {
        Ok(deb) => deb,
        Err(e) => {
            return cached(spec, vm_dir)
                .inspect(|k| {
                    say(format_args!(
                        "{spec}: {e:#}; using the cached {} instead",
                        k.source
                    ))
                })
                .ok_or(e);
        }
    };
    let unpacked = vm_dir.join("tmp").join(&package.name);
    unpack(&deb, &unpacked)?;
    let source = format!("{} {}", package.name, package.version);
    let kernel = Tree::find(&unpacked)?.install(&dir, spec, &source)?;
    std::fs::remove_dir_all(&unpacked)
        .with_context(|| format!("cannot remove {}", unpacked.display()))?;
    std::fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
    Ok(kernel)
}

/// The newest cached kernel for `spec` (when apt cannot help: offline, or lists too old).
fn cached(spec: &str, vm_dir: &Path) -> Option<Kernel> {
    let prefix = if is_series(spec) {
        format!("linux-image-{spec}.")
    } else {
        format!("{spec}_")
    };
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(vm_dir.join("kernels"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(&prefix) && name.contains("-amd64_")).then(|| (name, e.path()))
        })
        .collect();
    found.sort_by(|a, b| compare_versions(version_of(&a.0), version_of(&b.0)));
    found
        .into_iter()
        .rev()
        .find_map(|(_, dir)| load(&dir, spec).ok().flatten())
}

fn version_of(cache_name: &str) -> &str {
    cache_name.rsplit_once('_').map_or(cache_name, |(_, v)| v)
}

/// Debian version order (`dpkg --compare-versions`), falling back to string order.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let gt = |x: &str, y: &str| {
        Command::new("dpkg")
            .args(["--compare-versions", x, "gt", y])
            .status()
            .is_ok_and(|s| s.success())
    };
    if a == b {
        std::cmp::Ordering::Equal
    } else if gt(a, b) {
        std::cmp::Ordering::Greater
    } else if gt(b, a) {
        std::cmp::Ordering::Less
    } else {
        a.cmp(b)
    }
}

/// The package for `spec`: the newest `linux-image-<series>.*-amd64` apt knows (generic
/// flavour: not cloud, rt or dbg), or the package named.
fn resolve_package(spec: &str) -> Result<Package> {
    let mut updated = false;
    loop {
        let names = if is_series(spec) {
            series_packages(spec)?
        } else {
            vec![spec.to_string()]
        };
        let mut found = candidates(&names)?;
        if found.is_empty() {
            if !updated && cmd::is_root() {
                say(format_args!(
                    "{spec}: apt knows no matching kernel package; running apt-get update"
                ));
                apt_update()?;
                updated = true;
                continue;
            }
            bail!("{}", no_package_hint(spec));
        }
        found.sort_by(|a, b| compare_versions(&a.version, &b.version));
        return found.pop().context("no package left");
    }
}

fn no_package_hint(spec: &str) -> String {
    let what = if is_series(spec) {
        format!("no linux-image-{spec}.*-amd64 package")
    } else {
        format!("no package {spec}")
    };
    let mut hint = format!("apt knows {what}");
    if !cmd::is_root() {
        hint.push_str("; run `sudo apt-get update` (or run as root)");
    }
    if spec.starts_with("6.12") {
        hint.push_str(
            "; on Debian 12, Linux 6.12 comes from bookworm-security (linux-image-6.12.*+deb12-amd64) \
             or bookworm-backports: add one of them to apt's sources",
        );
    }
    hint
}

fn apt_update() -> Result<()> {
    cmd::run(Command::new("apt-get").args(["update", "-q"]))
}

/// Generic-flavour kernel image packages of a series, by name.
fn series_packages(series: &str) -> Result<Vec<String>> {
    let pattern = format!("^linux-image-{}\\.", series.replace('.', "\\."));
    let out = cmd::output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let prefix = format!("linux-image-{series}.");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| {
            let Some(abi) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix("-amd64"))
            else {
                return false;
            };
            // 6.1: "0-56"; 6.12: "117+deb12". Not -cloud-amd64, -rt-amd64, unsigned, dbg.
            abi.starts_with(|c: char| c.is_ascii_digit())
                && !["cloud", "rt", "unsigned", "dbg"]
                    .iter()
                    .any(|flavour| abi.split('-').any(|part| part == *flavour))
        })
        .map(str::to_string)
        .collect())
}

/// Candidate versions of `names` (those apt has a candidate for).
fn candidates(names: &[String]) -> Result<Vec<Package>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .args(names)
        .output()
        .context("cannot run apt-cache (this needs Debian's apt)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    for para in text.split("\n\n") {
        let field = |key: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        if let (Some(name), Some(version)) = (field("Package:"), field("Version:")) {
            found.push(Package { name, version });
        }
    }
    Ok(found)
}

/// `apt-get download`s the package into `dir`; returns the .deb.
fn download(package: &Package, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stale = |entry: &std::fs::DirEntry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.starts_with(&format!("{}_", package.name)) && name.ends_with(".deb")
    };
    for entry in std::fs::read_dir(dir)?.flatten().filter(stale) {
        let _ = std::fs::remove_file(entry.path());
    }
    say(format_args!(
        "downloading {} {} (about 100 MB)",
        package.name, package.version
    ));
    let mut get = Command::new("apt-get");
    if cmd::is_root() {
        // apt's _apt user may not be able to write here; download as root, without the warning.
        get.args(["-o", "APT::Sandbox::User=root"]);
    }
    get.args(["download", "-q"])
        .arg(format!("{}={}", package.name, package.version))
        .current_dir(dir);
    if let Err(e) = cmd::run(&mut get) {
        if !cmd::is_root() {
            return Err(e.context("apt-get download failed; `sudo apt-get update` may help"));
        }
        say("apt-get download failed; running apt-get update and trying once more");
        apt_update()?;
        cmd::run(&mut get)?;
    }
    std::fs::read_dir(dir)?
        .flatten()
        .find(stale)
        .map(|e| e.path())
        .with_context(|| {
            format!(
                "apt-get download succeeded but no {}_*.deb is in {}",
                package.name,
                dir.display()
            )
        })
}

/// `dpkg-deb -x DEB DIR` into a fresh `dir`.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    say(format_args!("unpacking {}", cmd::short(deb).display()));
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    Ok(())
}

/// A kernel tree laid out as a package installs it: `boot/vmlinuz-RELEASE` and
/// `lib/modules/RELEASE` (or `usr/lib/modules/RELEASE`).
struct Tree {
    root: PathBuf,
    release: String,
    image: PathBuf,
}

impl Tree {
    fn find(root: &Path) -> Result<Self> {
        let images: Vec<PathBuf> = std::fs::read_dir(root.join("boot"))
            .with_context(|| format!("{} has no boot/ directory with a vmlinuz-*", root.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        let [image] = images.as_slice() else {
            bail!(
                "expected exactly one boot/vmlinuz-* in {}, found {}",
                root.display(),
                images.len()
            );
        };
        let release = image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .context("kernel image name is not UTF-8")?
            .to_string();
        Ok(Self {
            root: root.to_path_buf(),
            release,
            image: image.clone(),
        })
    }

    /// Copies the image and the needed modules (uncompressed, in load order) into `dest`,
    /// writes `kernel.json` there and returns the kernel.
    fn install(&self, dest: &Path, label: &str, source: &str) -> Result<Kernel> {
        let (modules, missing) = self.modules()?;
        let tmp = dest.with_extension("partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        std::fs::create_dir_all(tmp.join("modules"))
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        std::fs::copy(&self.image, tmp.join("vmlinuz"))
            .with_context(|| format!("cannot copy {}", self.image.display()))?;
        let mut names = Vec::new();
        for (i, module) in modules.iter().enumerate() {
            let name = format!("{:02}-{}.ko", i + 1, module_name(module));
            uncompress(module, &tmp.join("modules").join(&name))?;
            names.push(format!("modules/{name}"));
        }
        let meta = json!({
            "source": source,
            "release": self.release,
            "modules": names,
            "missing": missing,
            "layout": CACHE_LAYOUT,
        });
        std::fs::write(
            tmp.join("kernel.json"),
            serde_json::to_vec_pretty(&meta).context("cannot encode kernel.json")?,
        )
        .with_context(|| format!("cannot write {}", tmp.join("kernel.json").display()))?;
        if dest.exists() {
            std::fs::remove_dir_all(dest)
                .with_context(|| format!("cannot remove {}", dest.display()))?;
        }
        std::fs::rename(&tmp, dest).with_context(|| format!("cannot create {}", dest.display()))?;
        let kernel = load(dest, label)?.context("kernel.json just written is unreadable")?;
        say(format_args!(
            "{label}: {source}: kernel {}, modules {}",
            self.release,
            if modules.is_empty() {
                "none needed".to_string()
            } else {
                modules
                    .iter()
                    .map(|m| module_name(m))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        ));
        Ok(kernel)
    }

    /// The module files (as shipped) to load for virtio-9p, in order, and the wanted modules
    /// that are neither built in nor present.
    fn modules(&self) -> Result<(Vec<PathBuf>, Vec<String>)> {
        let lib = self.root.join("lib/modules").join(&self.release);
        let usr = self.root.join("usr/lib/modules").join(&self.release);
        if !lib.is_dir() && usr.is_dir() {
            // kmod looks in DIR/lib/modules: make the merged-/usr layout visible there.
            let link_dir = self.root.join("lib");
            std::fs::create_dir_all(&link_dir)
                .with_context(|| format!("cannot create {}", link_dir.display()))?;
            std::os::unix::fs::symlink("../usr/lib/modules", link_dir.join("modules"))
                .with_context(|| format!("cannot link {}", link_dir.display()))?;
        }
        if !lib.is_dir() {
            say(format_args!(
                "no lib/modules/{} in {}: virtio-9p must be built into the kernel",
                self.release,
                self.root.display()
            ));
            return Ok((Vec::new(), Vec::new()));
        }
        if !lib.join("modules.dep").is_file() {
            cmd::output(
                Command::new(sbin("depmod")?)
                    .arg("-b")
                    .arg(&self.root)
                    .arg(&self.release),
            )?;
        }
        let modprobe = sbin("modprobe")?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut missing = Vec::new();
        for wanted in WANTED_MODULES.iter().chain(PRELOADED_MODULES) {
            let out = Command::new(&modprobe)
                .arg("-d")
                .arg(&self.root)
                .args(["-S", &self.release, "--show-depends", wanted])
                .output()
                .with_context(|| format!("cannot run {}", modprobe.display()))?;
            if !out.status.success() {
                if WANTED_MODULES.contains(wanted) {
                    missing.push((*wanted).to_string());
                } else {
                    say(format_args!(
                        "note: kernel {} has no {wanted}; the guest runs without it",
                        self.release
                    ));
                }
                continue;
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut words = line.split_whitespace();
                if words.next() == Some("insmod")
                    && let Some(path) = words.next()
                {
                    let path = PathBuf::from(path);
                    if !files.contains(&path) {
                        files.push(path);
                    }
                }
            }
        }
        if !missing.is_empty() {
            say(format_args!(
                "warning: kernel {} has neither built-in nor loadable {}; the guest may not \
                 mount the host's root",
                self.release,
                missing.join(", ")
            ));
        }
        Ok((files, missing))
    }
}

/// Reads a kernel installed by [`Tree::install`]; `None` when `dir` holds none.
fn load(dir: &Path, label: &str) -> Result<Option<Kernel>> {
    let meta_path = dir.join("kernel.json");
    let Ok(text) = std::fs::read(&meta_path) else {
        return Ok(None);
    };
    let meta: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("cannot parse {}", meta_path.display()))?;
    if meta["layout"].as_u64() != Some(CACHE_LAYOUT) {
        return Ok(None); // cached by an older vm-test: prepare it again
    }
    let strings = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let modules: Vec<PathBuf> = strings("modules").iter().map(|m| dir.join(m)).collect();
    if let Some(absent) = modules.iter().find(|m| !m.is_file()) {
        bail!(
            "{} is missing from the kernel cache; remove {} to rebuild it",
            absent.display(),
            dir.display()
        );
    }
    Ok(Some(Kernel {
        label: label.to_string(),
        source: meta["source"].as_str().unwrap_or("?").to_string(),
        release: meta["release"].as_str().map(str::to_string),
        image: dir.join("vmlinuz"),
        modules,
        missing: strings("missing"),
    }))
}

/// `virtio_pci` from `.../virtio_pci.ko.xz`.
fn module_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.split(".ko").next().unwrap_or(&name).to_string()
}

/// Copies a module, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
fn uncompress(src: &Path, dest: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        std::fs::copy(src, dest).with_context(|| format!("cannot copy {}", src.display()))?;
        return Ok(());
    };
    let out = cmd::output(Command::new(tool).arg("-dc").arg(src))
        .with_context(|| format!("cannot decompress {} (install {tool})", src.display()))?;
    std::fs::write(dest, out.stdout).with_context(|| format!("cannot write {}", dest.display()))
}

/// Finds `name` in PATH or the sbin directories (kmod's tools live in /usr/sbin).
pub fn sbin(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (install Debian's kmod package)"))
}

/// The release (`uname -r`) recorded in a bzImage's setup header; fails if `path` is no bzImage.
fn bzimage_release(path: &Path) -> Result<Option<String>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if data.get(0x202..0x206) != Some(b"HdrS") {
        bail!(
            "{} is not a bzImage (no \"HdrS\" setup header), a kernel .deb or a directory",
            path.display()
        );
    }
    let offset = data
        .get(0x20e..0x210)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])) + 0x200);
    let release = offset
        .and_then(|o| data.get(o..))
        .and_then(|s| s.split(|&b| b == 0 || b == b' ').next())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .filter(|s| !s.is_empty());
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_two_numbers() {
        assert!(is_series("6.1"));
        assert!(is_series("6.12"));
        assert!(!is_series("6"));
        assert!(!is_series("6.1.0"));
        assert!(!is_series("./6.1"));
        assert!(!is_series("6.x"));
    }

    #[test]
    fn module_names_drop_the_compression_suffix() {
        assert_eq!(
            module_name(Path::new("/a/9pnet_virtio.ko.xz")),
            "9pnet_virtio"
        );
        assert_eq!(module_name(Path::new("/a/virtio.ko")), "virtio");
    }
}
