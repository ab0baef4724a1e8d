//! The guest's initramfs: busybox-static, the kernel modules that virtio-9p needs, and an
//! `/init` that mounts the host's root read-only (and the work tree read-write) over virtio-9p,
//! mounts the kernel filesystems and chroots into the host's root to run the guest script.
//!
//! The archive is an uncompressed `newc` cpio written here (no `cpio` tool needed); device
//! nodes are described in the archive, so building it needs no privileges.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where the guest mounts the host's root before it chroots into it.
const NEWROOT: &str = "/newroot";

/// A directory of the host shared with the guest over virtio-9p, mounted at the same path.
pub struct Share {
    /// virtio-9p mount tag.
    pub tag: &'static str,
    /// Host directory (mounted at the same path in the guest).
    pub path: PathBuf,
    /// Whether the guest may write to it.
    pub writable: bool,
}

/// What `/init` does once the host's root is mounted.
pub enum Payload<'a> {
    /// Mount everything, chroot and run `/bin/sh SCRIPT` (a host path), then power off.
    Script {
        /// Extra shares (the work tree, the run directory), mounted over the read-only root.
        shares: &'a [Share],
        /// The guest script (a host path inside one of the shares).
        script: &'a Path,
    },
    /// Print [`KVM_PROBE_MARKER`] and power off at once (to check that a boot works at all).
    Probe,
}

/// The line the probe initramfs prints when the guest reached userspace.
pub const KVM_PROBE_MARKER: &str = "tcpshift-vm: userspace reached";

/// The virtio-9p tag of the host's root.
pub const ROOT_TAG: &str = "tcpshift_root";

/// Builds the initramfs: busybox at `/bin/busybox`, `modules` (uncompressed `.ko` files, in
/// load order) under `/modules`, and `/init`.
pub fn build(busybox: &Path, modules: &[PathBuf], payload: &Payload<'_>) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules", &NEWROOT[1..]] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdin/stdout/stderr before /init runs.
    cpio.char_dev("dev/console", 5, 1);
    let bb =
        std::fs::read(busybox).with_context(|| format!("cannot read {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &bb);
    for (i, module) in modules.iter().enumerate() {
        let data =
            std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("module path {} has no file name", module.display()))?;
        cpio.file(&format!("modules/{:02}-{name}", i + 1), 0o644, &data);
    }
    cpio.file("init", 0o755, init_script(payload)?.as_bytes());
    Ok(cpio.finish())
}

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A host path as a shell word (paths must be UTF-8 to be written into a script).
pub fn quote_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))?;
    Ok(quote(s))
}

fn init_script(payload: &Payload<'_>) -> Result<String> {
    let mut s = String::from(INIT_HEAD);
    match payload {
        Payload::Probe => {
            s.push_str(&format!("echo {}\npoweroff -f\n", quote(KVM_PROBE_MARKER)));
        }
        Payload::Script { shares, script } => {
            s.push_str(INIT_MODULES);
            s.push_str(&format!(
                "mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose {ROOT_TAG} {NEWROOT} \\\n  \
                 || fail \"cannot mount the host's root over virtio-9p (the kernel needs 9P_FS, NET_9P_VIRTIO and VIRTIO_PCI, built in or as modules)\"\n"
            ));
            // Kernel filesystems and tmpfs first: a share below /tmp must not be hidden.
            s.push_str(INIT_KERNEL_FS);
            for share in *shares {
                if !share.path.is_absolute() {
                    bail!("shared path {} is not absolute", share.path.display());
                }
                let mode = if share.writable { "rw" } else { "ro" };
                let target = quote_path(
                    &Path::new(NEWROOT).join(share.path.strip_prefix("/").unwrap_or(&share.path)),
                )?;
                s.push_str(&format!(
                    "mkdir -p {target} 2>/dev/null\n\
                     mount -t 9p -o trans=virtio,version=9p2000.L,{mode},msize=512000 {tag} {target} \\\n  \
                     || fail \"cannot mount {tag} at {shown}\"\n",
                    tag = share.tag,
                    shown = share.path.display(),
                ));
            }
            s.push_str(&format!(
                "chroot {NEWROOT} /bin/sh {} </dev/console >/dev/console 2>&1\n",
                quote_path(script)?
            ));
            s.push_str("sync\npoweroff -f\n");
        }
    }
    Ok(s)
}

const INIT_HEAD: &str = r#"#!/bin/busybox sh
# /init of tcpshift's test VM (generated by `cargo xtask vm-test`).
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
    echo "tcpshift-vm: error: $*"
    sync
    poweroff -f
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"#;

const INIT_MODULES: &str = r#"for m in /modules/*.ko; do
    [ -e "$m" ] || continue
    insmod "$m" || fail "insmod $m failed"
done
"#;

/// Kernel filesystems in the new root; bpffs, cgroup2 and debugfs for BPF, tmpfs where
/// programs write (the host's root is read-only).
const INIT_KERNEL_FS: &str = r#"R=/newroot
mount -t proc proc $R/proc || fail "cannot mount proc"
mount -t sysfs sysfs $R/sys || fail "cannot mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "cannot mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "cannot mount /tmp"
mount -t tmpfs -o mode=755 tmpfs $R/run || fail "cannot mount /run"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "cannot mount cgroup2"
mount -t bpf -o mode=700 bpf $R/sys/fs/bpf || fail "cannot mount bpffs"
mount -t debugfs debugfs $R/sys/kernel/debug || echo "tcpshift-vm: note: no debugfs"
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
hostname tcpshift-vm
ip link set lo up
"#;

/// An uncompressed `newc` cpio archive, as the kernel reads an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data, (0, 0));
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, &[], (major, minor));
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/x", 0o755, b"hello");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert!(out.len().is_multiple_of(4));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!"));
        // Second header starts at a multiple of 4: 110 + "bin\0" (4) = 114 -> 116.
        assert_eq!(&out[116..122], b"070701");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
