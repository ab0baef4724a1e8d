//! The programs tcpshift is compared with (nftables, HAProxy, nginx), their Debian packages
//! and configurations, and the machine description.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cmd::{self, say};

/// Debian packages the benchmark needs: the peers, `conntrack` (to empty the connection
/// tracking table after the nftables runs), `iproute2` (`ip`, `ss`) and the chart's font.
pub const PACKAGES: &[&str] = &[
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "nftables",
    "conntrack",
    "iproute2",
    "fonts-dejavu-core",
];

/// nginx's stream module as Debian installs it.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Installs the missing packages: `apt-get update` once, then one `apt-get install`.
pub fn ensure_packages() -> Result<()> {
    if Command::new("dpkg").arg("--version").output().is_err() {
        say(
            "Debian packages ... no dpkg here; haproxy, nginx (stream module) and nft must be installed",
        );
        return Ok(());
    }
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        say(format_args!(
            "Debian packages {} ... ok",
            PACKAGES.join(" ")
        ));
        return Ok(());
    }
    say(format_args!(
        "Debian packages ... installing {}",
        missing.join(" ")
    ));
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).ends_with("install ok installed")
        })
}

/// Checks that the peers' programs are there.
pub fn check_programs() -> Result<()> {
    for (program, arg) in [("haproxy", "-v"), ("nginx", "-v"), ("nft", "--version")] {
        if Command::new(program).arg(arg).output().is_err() {
            bail!("{program} is not installed (Debian package {program})");
        }
    }
    if !Path::new(NGINX_STREAM_MODULE).exists() {
        bail!("{NGINX_STREAM_MODULE} is missing (Debian package libnginx-mod-stream)");
    }
    Ok(())
}

/// The backend addresses every target splits between.
pub const V1: &str = "127.0.0.1:9001";
/// See [`V1`].
pub const V2: &str = "127.0.0.1:9002";

/// nftables the way kube-proxy's nftables mode splits a service: a per-service chain jumps
/// to one endpoint chain per backend with `numgen random mod N` and a verdict map; each
/// endpoint chain DNATs. Locally generated traffic is NATed in the `output` hook.
pub fn nftables_conf(port: u16) -> String {
    format!(
        "table ip tcpshift_bench {{
  chain endpoint-v1 {{
    meta l4proto tcp dnat to {V1}
  }}
  chain endpoint-v2 {{
    meta l4proto tcp dnat to {V2}
  }}
  chain service-tcp-echo {{
    numgen random mod 100 vmap {{ 0-79 : goto endpoint-v1, 80-99 : goto endpoint-v2 }}
  }}
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ 127.0.0.1 . tcp . {port} : goto service-tcp-echo }}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
}}
"
    )
}

/// HAProxy in `mode tcp`, weights 80/20, no logging, in the foreground.
pub fn haproxy_cfg(port: u16) -> String {
    format!(
        "global
  # The file descriptor limit here allows about 2 x 8000 connections.
  maxconn 8000
  nbthread 2

defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s

frontend tcp-echo
  bind 127.0.0.1:{port}
  default_backend tcp-echo

backend tcp-echo
  balance roundrobin
  server v1 {V1} weight 80
  server v2 {V2} weight 20
"
    )
}

/// nginx with the stream module: a weighted upstream, in the foreground, everything under
/// `dir`.
pub fn nginx_conf(port: u16, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/logs/nginx-error.log warn;
load_module {NGINX_STREAM_MODULE};
worker_rlimit_nofile 16384;

events {{
  worker_connections 8000;
}}

stream {{
  upstream tcp-echo {{
    server {V1} weight=80;
    server {V2} weight=20;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    proxy_pass tcp-echo;
  }}
}}
"
    )
}

/// tcpshift's configuration for the comparison: 80/20 on `port`.
pub fn tcpshift_yaml(port: u16, v1: u32, v2: u32) -> String {
    format!(
        "services:
  tcp-echo:
    listen: {port}
    subsets:
      v1: {V1}
      v2: {V2}
    weights: {{v1: {v1}, v2: {v2}}}
"
    )
}

/// The settings of the 80/20 service whose BPF time per connection the benchmark compares
/// (`cargo xtask bench`'s mode-cost step), with the lines each adds to the service.
pub const MODE_SETTINGS: [(&str, &str); 4] = [
    ("hash", ""),
    ("source-ip", "    affinity: source-ip\n"),
    ("round-robin", "    balance: round-robin\n"),
    // Far above the load (a few connections open at a time): LIMITS is set and sk_lookup
    // reads every candidate's limit, but nothing is diverted.
    ("limits", "    maxConnections: 1000000\n"),
];

/// [`tcpshift_yaml`] at 80/20 with a setting's `extra` lines ([`MODE_SETTINGS`]).
pub fn tcpshift_mode_yaml(port: u16, extra: &str) -> String {
    format!("{}{extra}", tcpshift_yaml(port, 80, 20))
}

/// A configuration with `services` services on ports `first_port..`, each with `subsets`
/// subsets on `backend_port..` (shared by all services); two subsets split 80/20, more
/// split evenly. `changed`: the same services after one weight change each (70/30; with more
/// subsets the first one's weight doubled).
pub fn scale_yaml(
    services: u32,
    subsets: u32,
    first_port: u16,
    backend_port: u16,
    changed: bool,
) -> String {
    let mut y = String::with_capacity(services as usize * (60 + 30 * subsets as usize));
    y.push_str("services:\n");
    let weights: Vec<String> = (0..subsets)
        .map(|j| {
            let w = match (subsets, j, changed) {
                (2, 0, false) => 80,
                (2, _, false) => 20,
                (2, 0, true) => 70,
                (2, _, true) => 30,
                (_, 0, true) => 2,
                _ => 1,
            };
            format!("v{j}: {w}")
        })
        .collect();
    let weights = weights.join(", ");
    for i in 0..services {
        y.push_str(&format!(
            "  s{i}:\n    listen: {}\n    subsets:\n",
            u32::from(first_port) + i
        ));
        for j in 0..subsets {
            y.push_str(&format!(
                "      v{j}: 127.0.0.1:{}\n",
                u32::from(backend_port) + j
            ));
        }
        y.push_str(&format!("    weights: {{{weights}}}\n"));
    }
    y
}

/// CPU model, cores, memory, kernel, OS, peers' versions and the load average.
pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let cpu = field(&cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = field(&read("/proc/meminfo"), "MemTotal")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    let hypervisor = if cpuinfo.contains(" hypervisor") {
        "virtual machine"
    } else {
        "bare metal"
    };
    let first_line = |program: &str, arg: &str| {
        Command::new(program).arg(arg).output().ok().map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
    };
    let version = |line: Option<String>, marker: &str| {
        line.and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(marker).map(str::to_string))
                .or(Some(l))
        })
    };
    let haproxy = first_line("haproxy", "-v").and_then(|l| {
        l.split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .map(str::to_string)
    });
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0).round() as u64,
        "kernel": kernel,
        "os": os,
        "virtualization": hypervisor,
        "loadavg": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "peers": {
            "haproxy": haproxy,
            "nginx": version(first_line("nginx", "-v"), "nginx/"),
            "nftables": version(first_line("nft", "--version"), "v"),
        },
    })
}

/// Writes `text` to `path`.
pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_config_shape() {
        let y = scale_yaml(2, 2, 20000, 9101, false);
        assert!(y.contains("  s1:\n    listen: 20001\n"));
        assert!(y.contains("      v1: 127.0.0.1:9102\n"));
        assert!(y.contains("weights: {v0: 80, v1: 20}"));
        let changed = scale_yaml(2, 2, 20000, 9101, true);
        assert!(changed.contains("weights: {v0: 70, v1: 30}"));
        assert_eq!(changed.replace("70, v1: 30", "80, v1: 20"), y);
        let y = scale_yaml(1, 16, 20000, 9101, false);
        assert!(y.contains("v15: 127.0.0.1:9116"));
        assert!(y.contains("{v0: 1, v1: 1,"));
        assert!(y.contains("v15: 1}"));
        let changed = scale_yaml(1, 16, 20000, 9101, true);
        assert!(changed.contains("{v0: 2, v1: 1,"));
        assert!(changed.contains("v15: 1}"));
    }

    #[test]
    fn peer_configs_name_the_ports() {
        assert!(nftables_conf(31401).contains("127.0.0.1 . tcp . 31401"));
        assert!(haproxy_cfg(31402).contains("bind 127.0.0.1:31402"));
        assert!(nginx_conf(31403, Path::new("/x")).contains("listen 127.0.0.1:31403"));
        assert!(tcpshift_yaml(31400, 80, 20).contains("weights: {v1: 80, v2: 20}"));
        for (name, extra) in MODE_SETTINGS {
            let y = tcpshift_mode_yaml(31400, extra);
            assert!(
                y.ends_with(&format!("weights: {{v1: 80, v2: 20}}\n{extra}")),
                "{name}: {y}"
            );
        }
    }
}
