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
            subsets.insert(s.name.clone().into(), s.addr.to_string().into());
            weights.insert(s.name.clone().into(), s.weight.into());
        }
        svc.insert("subsets".into(), Value::Mapping(subsets));
        svc.insert("weights".into(), Value::Mapping(weights));
        if v.config.protocol != Protocol::Tcp {
            svc.insert("protocol".into(), v.config.protocol.as_str().into());
        }
        services.insert(v.config.name.clone().into(), Value::Mapping(svc));
    }
    let mut doc = Mapping::new();
    doc.insert("services".into(), Value::Mapping(services));
    Value::Mapping(doc)
}
