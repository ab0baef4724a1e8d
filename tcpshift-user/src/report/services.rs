//! `tcpshiftctl get services`, `get virtualservice` and what `tcpshiftctl apply` did, as text.

use std::collections::HashMap;

use super::{header, table};
use crate::{
    istio::{RouteInfo, VirtualService},
    model::{Change, Protocol, ServiceConfig, ServiceView, SubsetConfig},
};

/// The `tcpshiftctl get services` table: one row per service.
pub fn services_table(views: &[ServiceView]) -> String {
    let mut rows = vec![header(&[
        "SERVICE",
        "LISTEN",
        "SUBSETS",
        "WEIGHTS",
        "LIVE",
        "VIRTUALSERVICE",
    ])];
    for v in views {
        let per_subset = |value: fn(&SubsetConfig) -> String| {
            let items: Vec<String> = v
                .config
                .subsets
                .iter()
                .map(|s| format!("{}={}", s.name, value(s)))
                .collect();
            items.join(",")
        };
        let live = v.live.iter().filter(|l| **l).count();
        let vs = v
            .annotation
            .as_deref()
            .and_then(RouteInfo::from_annotation)
            .map_or_else(|| "-".to_owned(), |r| r.virtual_service);
        rows.push(vec![
            v.config.name.clone(),
            // A UDP service's address says so (`127.0.0.1:5300/udp`); TCP ones stay as they were.
            match v.config.protocol {
                Protocol::Tcp => v.config.listen.to_string(),
                p => format!("{}/{p}", v.config.listen),
            },
            per_subset(|s| s.addr.to_string()),
            per_subset(|s| s.weight.to_string()),
            format!("{live}/{}", v.live.len()),
            vs,
        ]);
    }
    table(&rows, views.is_empty(), "no services")
}

/// The `tcpshiftctl get virtualservice` table: one row per VirtualService.
pub fn virtual_services_table(all: &[VirtualService]) -> String {
    let mut rows = vec![header(&["NAME", "GATEWAYS", "HOSTS", "SERVICES"])];
    for vs in all {
        let quoted = |l: &[String]| {
            let l: Vec<String> = l.iter().map(|h| format!("{h:?}")).collect();
            format!("[{}]", l.join(","))
        };
        let services: Vec<String> = vs
            .spec
            .tcp
            .iter()
            .filter_map(|r| r.route.first().map(|d| d.destination.host.clone()))
            .collect();
        rows.push(vec![
            vs.metadata.name.clone(),
            quoted(&vs.spec.gateways),
            quoted(&vs.spec.hosts),
            services.join(","),
        ]);
    }
    table(&rows, all.is_empty(), "no VirtualServices")
}

/// The word `tcpshiftctl apply` prints for a change.
pub fn change_word(c: &Change) -> &'static str {
    match c {
        Change::Created => "created",
        Change::Redefined => "configured",
        Change::Reweighted => "reweighted",
        Change::Unchanged => "unchanged",
    }
}

/// What `tcpshiftctl apply` did (or, with `dry_run`, would do): one line per service,
/// `service/NAME CHANGE: listen ADDR, SUBSET=WEIGHT (ADDR), ...`, the definition taken from
/// `services` (the applied ones, by name).
pub fn applied(changes: &[(String, Change)], services: &[&ServiceConfig], dry_run: bool) -> String {
    let suffix = if dry_run { " (dry run)" } else { "" };
    let by_name: HashMap<&str, &ServiceConfig> =
        services.iter().map(|s| (s.name.as_str(), *s)).collect();
    let mut out = String::new();
    for (name, change) in changes {
        let detail = by_name
            .get(name.as_str())
            .map(|s| {
                let subsets: Vec<String> = s
                    .subsets
                    .iter()
                    .map(|x| format!("{}={} ({})", x.name, x.weight, x.addr))
                    .collect();
                format!(": listen {}, {}", s.listen, subsets.join(", "))
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "service/{name} {}{suffix}{detail}\n",
            change_word(change)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Listen;

    fn service() -> ServiceConfig {
        let subset = |name: &str, port, weight| SubsetConfig {
            name: name.into(),
            addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            weight,
            owner: Default::default(),
        };
        ServiceConfig {
            name: "tcp-echo".into(),
            listen: Listen::parse("*:31400").expect("listen"),
            subsets: vec![subset("v1", 9001, 80), subset("v2", 9002, 20)],
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Default::default(),
        }
    }

    #[test]
    fn services_table_has_one_row_per_service() {
        let view = ServiceView {
            id: 0,
            config: service(),
            live: vec![true, false],
            annotation: None,
        };
        let t = services_table(&[view]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "SERVICE   LISTEN   SUBSETS                              WEIGHTS      LIVE  VIRTUALSERVICE",
                "tcp-echo  *:31400  v1=127.0.0.1:9001,v2=127.0.0.1:9002  v1=80,v2=20  1/2   -",
            ],
            "{t}"
        );
        assert!(services_table(&[]).ends_with("(no services)\n"));
        assert!(virtual_services_table(&[]).ends_with("(no VirtualServices)\n"));
    }

    #[test]
    fn applied_names_the_change_and_the_definition() {
        let s = service();
        let changes = [
            ("tcp-echo".to_owned(), Change::Reweighted),
            ("other".to_owned(), Change::Unchanged),
        ];
        assert_eq!(
            applied(&changes, &[&s], true),
            "service/tcp-echo reweighted (dry run): listen *:31400, v1=80 (127.0.0.1:9001), \
             v2=20 (127.0.0.1:9002)\nservice/other unchanged (dry run)\n"
        );
    }
}
