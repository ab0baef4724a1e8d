//! Prometheus metrics: the [`Status`] read from the kernel maps, in the Prometheus text format
//! (0.0.4), encoded by `prometheus-client`.
//!
//! Used by `tcpshiftd --metrics ADDR` (for every scrape of `/metrics`) and by
//! `tcpshiftctl metrics`. Nothing is cached: each rendering is built from a [`Status`] read just
//! before, so the values are the kernel's at scrape time.
//!
//! Every series has the labels `service` and `subset` (but `tcpshift_shadowed_listeners`, the
//! listeners a service shadows, which has only `service`); names follow Istio's
//! (`istio_tcp_connections_opened_total` → `tcpshift_tcp_connections_opened_total`).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use tcpshift_common::{SRTT_BUCKETS, srtt_bucket_floor_us};

use crate::state::{ServiceStatus, Status, SubsetStatus};

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Renders `status` as Prometheus text.
pub fn render(status: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(status.clone())));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// One status, encoded on demand.
#[derive(Debug)]
struct Snapshot(Status);

type Value = fn(&ServiceStatus, &SubsetStatus) -> u64;

/// (name without `_total`, help, unit, type, value).
const FAMILIES: &[(&str, &str, Option<Unit>, MetricType, Value)] = &[
    (
        "tcpshift_tcp_connections_opened",
        "TCP connections established on the subset through the service address.",
        None,
        MetricType::Counter,
        |_, s| s.counters.opened,
    ),
    (
        "tcpshift_tcp_connections_closed",
        "TCP connections of the subset that are closed.",
        None,
        MetricType::Counter,
        |_, s| s.counters.closed,
    ),
    (
        "tcpshift_tcp_connections_active",
        "TCP connections of the subset open now.",
        None,
        MetricType::Gauge,
        |_, s| s.counters.active,
    ),
    (
        "tcpshift_tcp_received",
        "Payload bytes received from clients (closed and open connections).",
        Some(Unit::Bytes),
        MetricType::Counter,
        |_, s| s.counters.bytes_received,
    ),
    (
        "tcpshift_tcp_sent",
        "Payload bytes sent to clients and acknowledged (closed and open connections).",
        Some(Unit::Bytes),
        MetricType::Counter,
        |_, s| s.counters.bytes_sent,
    ),
    (
        "tcpshift_lookups",
        "New connections whose hash chose the subset (sk_lookup).",
        None,
        MetricType::Counter,
        |_, s| s.counters.chosen,
    ),
    (
        "tcpshift_steered",
        "New connections assigned to the subset's socket, chosen or by fallback (sk_lookup).",
        None,
        MetricType::Counter,
        |_, s| s.counters.steered,
    ),
    (
        "tcpshift_misses",
        "New connections that chose the subset while no subset of the service had a socket.",
        None,
        MetricType::Counter,
        |_, s| s.counters.misses,
    ),
    (
        "tcpshift_subset_weight",
        "Relative weight of the subset.",
        None,
        MetricType::Gauge,
        |_, s| u64::from(s.weight),
    ),
    (
        "tcpshift_subset_socket_live",
        "1 when a live listening socket is registered for the subset, else 0.",
        None,
        MetricType::Gauge,
        |_, s| u64::from(s.live),
    ),
    (
        "tcpshift_tcp_connections_reset_by_backend",
        "Closed connections of the subset reset by the backend (a RST from the client is not counted).",
        None,
        MetricType::Counter,
        |_, s| s.counters.reset_by_backend,
    ),
    (
        "tcpshift_tcp_connections_closed_without_reply",
        "Closed connections the backend closed first without a payload byte acknowledged by the client.",
        None,
        MetricType::Counter,
        |_, s| s.counters.closed_without_reply,
    ),
    (
        "tcpshift_tcp_retransmit_timeouts",
        "Retransmission timeouts on the subset's connections (one per expiry of the timer).",
        None,
        MetricType::Counter,
        |_, s| s.counters.retransmit_timeouts,
    ),
    (
        "tcpshift_socket_registrations_refused",
        "Listening sockets on the subset's backend address not registered because their owner may not serve it.",
        None,
        MetricType::Counter,
        |_, s| s.owner.refused,
    ),
    (
        "tcpshift_subset_open_connections",
        "Open connections of the subset, counted exactly by the kernel (compared with its connection limit).",
        None,
        MetricType::Gauge,
        |_, s| s.limits.open,
    ),
    (
        "tcpshift_subset_max_connections",
        "The subset's connection limit (connectionPool.tcp.maxConnections); 0: no limit.",
        None,
        MetricType::Gauge,
        |_, s| u64::from(s.limits.max_connections.unwrap_or(0)),
    ),
    (
        "tcpshift_refused_at_limit",
        "New connections that chose the subset and were refused because every subset was full or ejected.",
        None,
        MetricType::Counter,
        |_, s| s.limits.refused_at_limit,
    ),
    (
        "tcpshift_diverted_at_limit",
        "New connections that chose the subset and went to another because it was full or ejected.",
        None,
        MetricType::Counter,
        |_, s| s.limits.diverted,
    ),
    (
        "tcpshift_subset_times_ejected",
        "Times the subset was ejected by outlier detection (one is taken off per interval it does well).",
        None,
        MetricType::Gauge,
        |_, s| {
            s.limits
                .outlier
                .as_ref()
                .map_or(0, |o| u64::from(o.times_ejected))
        },
    ),
    (
        "tcpshift_subset_ejected_since_seconds",
        "When the subset's current ejection began, seconds since the Unix epoch; 0 when it is not ejected.",
        None,
        MetricType::Gauge,
        |_, s| match &s.limits.outlier {
            Some(o) if o.ejected => o.ejected_since_ms / 1000,
            _ => 0,
        },
    ),
];

/// `(upper bound in seconds, count)` of each bucket of a subset's smoothed-RTT histogram, not
/// cumulative (the encoder sums them); the last bound is `+Inf`.
fn srtt_buckets(histogram: &[u64; SRTT_BUCKETS]) -> Vec<(f64, u64)> {
    histogram
        .iter()
        .enumerate()
        .map(|(b, &n)| {
            let upper = if b + 1 < SRTT_BUCKETS {
                f64::from(srtt_bucket_floor_us(b + 1)) / 1e6
            } else {
                f64::INFINITY
            };
            (upper, n)
        })
        .collect()
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let subsets = || {
            self.0
                .services
                .iter()
                .flat_map(|svc| svc.subsets.iter().map(move |s| (svc, s)))
        };
        for (name, help, unit, kind, value) in FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), *kind)?;
            for (svc, s) in subsets() {
                let labels = [("service", svc.name.as_str()), ("subset", s.name.as_str())];
                let v = value(svc, s);
                let metric = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(v).encode(metric)?,
                    _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(metric)?,
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "tcpshift_fallbacks",
            "New connections whose chosen subset had no live socket: direction=\"out\" on the subset chosen, \"in\" on the subset that took them.",
            None,
            MetricType::Counter,
        )?;
        for (svc, s) in subsets() {
            for (direction, v) in [
                ("out", s.counters.fallback_out),
                ("in", s.counters.fallback_in),
            ] {
                let labels = [
                    ("service", svc.name.as_str()),
                    ("subset", s.name.as_str()),
                    ("direction", direction),
                ];
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tcpshift_shadowed_listeners",
            "Sockets listening on the service's address that are not its subsets: their new connections go to the subsets.",
            None,
            MetricType::Gauge,
        )?;
        for svc in &self.0.services {
            let n = i64::try_from(svc.shadows.len()).unwrap_or(i64::MAX);
            ConstGauge::new(n).encode(family.encode_family(&[("service", svc.name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcpshift_subset_ejected",
            "1 while outlier detection has ejected the subset (it gets no new connection), else 0; `reason` names the threshold that ejected it last.",
            None,
            MetricType::Gauge,
        )?;
        for (svc, s) in subsets() {
            let Some(o) = &s.limits.outlier else { continue };
            let labels = [
                ("service", svc.name.as_str()),
                ("subset", s.name.as_str()),
                ("reason", o.reason.as_deref().unwrap_or("")),
            ];
            ConstGauge::new(i64::from(o.ejected)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcpshift_tcp_srtt_at_close",
            "Smoothed RTT of the subset's closed connections at close (log2 buckets; the sum is not tracked and is always 0).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (svc, s) in subsets() {
            let labels = [("service", svc.name.as_str()), ("subset", s.name.as_str())];
            let buckets = srtt_buckets(&s.counters.srtt_histogram);
            let count = buckets.iter().map(|(_, n)| n).sum();
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(0.0, count, &buckets, None)?;
        }
        encode_udp(&self.0, &mut encoder)
    }
}

/// (name without `_total`, help, type, value) of the UDP subsets' series.
type UdpFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&crate::state::UdpSubsetCounters) -> u64,
);

const UDP_FAMILIES: &[UdpFamily] = &[
    (
        "tcpshift_udp_flows_started",
        "UDP flows that chose the subset: new flows, and flows idle past the timeout choosing again.",
        MetricType::Counter,
        |c| c.flows_started,
    ),
    (
        "tcpshift_udp_datagrams_steered",
        "UDP datagrams assigned to the subset's socket.",
        MetricType::Counter,
        |c| c.datagrams,
    ),
    (
        "tcpshift_udp_fallbacks_out",
        "UDP flows moved away from the subset because it had no live socket.",
        MetricType::Counter,
        |c| c.fallback_out,
    ),
    (
        "tcpshift_udp_fallbacks_in",
        "UDP flows moved to the subset because theirs had no live socket.",
        MetricType::Counter,
        |c| c.fallback_in,
    ),
    (
        "tcpshift_udp_misses",
        "UDP datagrams for the subset that found no subset with a live socket.",
        MetricType::Counter,
        |c| c.misses,
    ),
    (
        "tcpshift_udp_flows_expired",
        "UDP flows idle longer than the timeout when their next datagram came.",
        MetricType::Counter,
        |c| c.expired,
    ),
    (
        "tcpshift_udp_flow_evictions",
        "UDP flows of the subset forgotten by the full flow table (LRU eviction).",
        MetricType::Counter,
        |c| c.evictions,
    ),
    (
        "tcpshift_udp_flows_tracked",
        "UDP flows of the subset in the flow table now (idle ones included).",
        MetricType::Gauge,
        |c| c.flows_in_table,
    ),
];

/// The `tcpshift_udp_*` series, for the subsets of services that steer UDP.
fn encode_udp(status: &Status, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let udp: Vec<_> = status
        .services
        .iter()
        .flat_map(|svc| svc.subsets.iter().map(move |s| (svc, s)))
        .filter_map(|(svc, s)| s.udp.map(|c| (svc, s, c)))
        .collect();
    if udp.is_empty() {
        return Ok(());
    }
    for (name, help, kind, value) in UDP_FAMILIES {
        let mut family = encoder.encode_descriptor(name, help, None, *kind)?;
        for (svc, s, c) in &udp {
            let labels = [("service", svc.name.as_str()), ("subset", s.name.as_str())];
            let v = value(c);
            let metric = family.encode_family(&labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(v).encode(metric)?,
                _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(metric)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::CounterStatus;

    fn status() -> Status {
        let subset = |name: &str, weight, live, counters| SubsetStatus {
            name: name.into(),
            backend: "127.0.0.1:9001".parse().expect("addr"),
            weight,
            share: 0.0,
            live,
            udp: None,
            observed_share: None,
            counters,
            owner: Default::default(),
            limits: Default::default(),
        };
        Status {
            netns_inode: 1,
            state_dir: PathBuf::from("/x"),
            program_id: Some(1),
            accounting_program_id: Some(2),
            observed_window_secs: 10,
            debug_events: false,
            services: vec![ServiceStatus {
                name: "tcp-echo".into(),
                id: 0,
                listen: "*:31400".into(),
                mode: "hash",
                protocol: Default::default(),
                subsets: vec![
                    subset(
                        "v1",
                        80,
                        true,
                        CounterStatus {
                            chosen: 9,
                            steered: 10,
                            opened: 10,
                            closed: 7,
                            active: 3,
                            bytes_received: 1234,
                            bytes_sent: 5678,
                            fallback_in: 1,
                            reset_by_backend: 2,
                            closed_without_reply: 1,
                            retransmit_timeouts: 4,
                            srtt_histogram: {
                                let mut h = [0; SRTT_BUCKETS];
                                h[0] = 3;
                                h[2] = 4;
                                h
                            },
                            ..Default::default()
                        },
                    ),
                    subset(
                        "v2",
                        20,
                        false,
                        CounterStatus {
                            chosen: 1,
                            fallback_out: 1,
                            ..Default::default()
                        },
                    ),
                ],
                shadows: vec![crate::discovery::ShadowedListener {
                    address: "0.0.0.0:31400".parse().expect("addr"),
                    inode: 7,
                    pid: Some(42),
                    process: "legacy".into(),
                    user: "root".into(),
                }],
                fail_closed: false,
            }],
            warnings: vec![],
            read_only: false,
            udp_idle_timeout_secs: 30,
        }
    }

    #[test]
    fn udp_series_only_for_udp_subsets() {
        let mut st = status();
        assert!(!render(&st).expect("render").contains("tcpshift_udp_"));
        st.services[0].subsets[0].udp = Some(crate::state::UdpSubsetCounters {
            flows_started: 5,
            datagrams: 50,
            evictions: 2,
            flows_in_table: 3,
            ..Default::default()
        });
        let text = render(&st).expect("render");
        for line in [
            "tcpshift_udp_flows_started_total{service=\"tcp-echo\",subset=\"v1\"} 5",
            "tcpshift_udp_datagrams_steered_total{service=\"tcp-echo\",subset=\"v1\"} 50",
            "tcpshift_udp_flow_evictions_total{service=\"tcp-echo\",subset=\"v1\"} 2",
            "tcpshift_udp_flows_tracked{service=\"tcp-echo\",subset=\"v1\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(
            !text.contains("tcpshift_udp_flows_started_total{service=\"tcp-echo\",subset=\"v2\"}")
        );
    }

    #[test]
    fn renders_the_istio_like_names_with_service_and_subset_labels() {
        let text = render(&status()).expect("render");
        for line in [
            "# TYPE tcpshift_tcp_connections_opened_total counter",
            "tcpshift_tcp_connections_opened_total{service=\"tcp-echo\",subset=\"v1\"} 10",
            "tcpshift_tcp_connections_closed_total{service=\"tcp-echo\",subset=\"v1\"} 7",
            "# TYPE tcpshift_tcp_connections_active gauge",
            "tcpshift_tcp_connections_active{service=\"tcp-echo\",subset=\"v1\"} 3",
            "tcpshift_tcp_received_bytes_total{service=\"tcp-echo\",subset=\"v1\"} 1234",
            "tcpshift_tcp_sent_bytes_total{service=\"tcp-echo\",subset=\"v1\"} 5678",
            "tcpshift_lookups_total{service=\"tcp-echo\",subset=\"v2\"} 1",
            "tcpshift_fallbacks_total{service=\"tcp-echo\",subset=\"v2\",direction=\"out\"} 1",
            "tcpshift_fallbacks_total{service=\"tcp-echo\",subset=\"v1\",direction=\"in\"} 1",
            "# TYPE tcpshift_shadowed_listeners gauge",
            "tcpshift_shadowed_listeners{service=\"tcp-echo\"} 1",
            "tcpshift_misses_total{service=\"tcp-echo\",subset=\"v1\"} 0",
            "tcpshift_subset_weight{service=\"tcp-echo\",subset=\"v2\"} 20",
            "tcpshift_subset_socket_live{service=\"tcp-echo\",subset=\"v2\"} 0",
            "tcpshift_subset_socket_live{service=\"tcp-echo\",subset=\"v1\"} 1",
            "tcpshift_tcp_connections_reset_by_backend_total{service=\"tcp-echo\",subset=\"v1\"} 2",
            "tcpshift_tcp_connections_closed_without_reply_total{service=\"tcp-echo\",subset=\"v1\"} 1",
            "tcpshift_tcp_retransmit_timeouts_total{service=\"tcp-echo\",subset=\"v1\"} 4",
            "# TYPE tcpshift_tcp_srtt_at_close_seconds histogram",
            "tcpshift_tcp_srtt_at_close_seconds_count{service=\"tcp-echo\",subset=\"v1\"} 7",
            "tcpshift_tcp_srtt_at_close_seconds_bucket{service=\"tcp-echo\",subset=\"v1\",le=\"3.2e-05\"} 3",
            "tcpshift_tcp_srtt_at_close_seconds_bucket{service=\"tcp-echo\",subset=\"v1\",le=\"6.4e-05\"} 3",
            "tcpshift_tcp_srtt_at_close_seconds_bucket{service=\"tcp-echo\",subset=\"v1\",le=\"0.000128\"} 7",
            "tcpshift_tcp_srtt_at_close_seconds_bucket{service=\"tcp-echo\",subset=\"v1\",le=\"+Inf\"} 7",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn renders_limits_and_ejections() {
        use crate::state::{LimitStatus, OutlierStatus};
        let mut st = status();
        for s in st
            .services
            .iter_mut()
            .flat_map(|svc| svc.subsets.iter_mut())
        {
            if s.name == "v2" {
                s.limits = LimitStatus {
                    max_connections: Some(20),
                    open: 20,
                    refused_at_limit: 3,
                    diverted: 5,
                    outlier: Some(OutlierStatus {
                        ejected: true,
                        ejected_since_ms: 5_000,
                        times_ejected: 2,
                        reason: Some("consecutiveGatewayErrors".into()),
                        ..Default::default()
                    }),
                };
            }
        }
        let text = render(&st).expect("render");
        for line in [
            "tcpshift_subset_open_connections{service=\"tcp-echo\",subset=\"v2\"} 20",
            "tcpshift_subset_max_connections{service=\"tcp-echo\",subset=\"v2\"} 20",
            "tcpshift_subset_max_connections{service=\"tcp-echo\",subset=\"v1\"} 0",
            "tcpshift_refused_at_limit_total{service=\"tcp-echo\",subset=\"v2\"} 3",
            "tcpshift_diverted_at_limit_total{service=\"tcp-echo\",subset=\"v2\"} 5",
            "tcpshift_subset_times_ejected{service=\"tcp-echo\",subset=\"v2\"} 2",
            "tcpshift_subset_ejected_since_seconds{service=\"tcp-echo\",subset=\"v2\"} 5",
            "tcpshift_subset_ejected{service=\"tcp-echo\",subset=\"v2\",reason=\"consecutiveGatewayErrors\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }
}
