//! Services written back in the loader's format: what `tcpshiftctl get services -o yaml`
//! prints (and what can be applied again).

use serde_yaml::{Mapping, Value};

use crate::model::{Listen, Protocol, ServiceView};

/// A `services:` document describing `views` (the loader's configuration format, weights
/// included): what `tcpshiftctl get services -o yaml` prints.
pub fn services_document(views: &[ServiceView]) -> Value {
    let mut services = Mapping::new();
    for v in views {
        let mut svc = Mapping::new();
        let listen = match v.config.listen {
            Listen::Any { port } => Value::from(port),
            Listen::Addr(a) => Value::from(a.to_string()),
        };
        svc.insert("listen".into(), listen);
        let mut subsets = Mapping::new();
        let mut weights = Mapping::new();
        for s in &v.config.subsets {
            let addr = Value::from(s.addr.to_string());
            let value = if s.owner.is_empty() {
                addr
            } else {
                // The mapping form, so that applying the output again keeps the rule.
                let mut m = Mapping::new();
                m.insert("address".into(), addr);
                if let Some(uid) = s.owner.uid {
                    m.insert("user".into(), uid.into());
                }
                if let Some(c) = &s.owner.cgroup {
                    m.insert("cgroup".into(), c.clone().into());
                }
                Value::Mapping(m)
            };
            subsets.insert(s.name.clone().into(), value);
            weights.insert(s.name.clone().into(), s.weight.into());
        }
        svc.insert("subsets".into(), Value::Mapping(subsets));
        svc.insert("weights".into(), Value::Mapping(weights));
        if v.config.fail_closed {
            svc.insert("failClosed".into(), true.into());
        }
        if v.config.protocol != Protocol::Tcp {
            svc.insert("protocol".into(), v.config.protocol.as_str().into());
        }
        services.insert(v.config.name.clone().into(), Value::Mapping(svc));
    }
    let mut doc = Mapping::new();
    doc.insert("services".into(), Value::Mapping(services));
    Value::Mapping(doc)
}
