//! The `Rollout` document (`apiVersion: tcpshift.io/v1alpha1`, `kind: Rollout`), parsed with
//! the shared YAML toolkit; errors are `file:line:column: Rollout NAME: field: message`.
//!
//! ```yaml
//! apiVersion: tcpshift.io/v1alpha1
//! kind: Rollout
//! metadata:
//!   name: tcp-echo
//! spec:
//!   service: tcp-echo
//!   stableSubset: v1
//!   canarySubset: v2
//!   steps:
//!   - setWeight: 20
//!   - pause: {duration: 30s}
//!   - setWeight: 100
//!   analysis:
//!     interval: 30s
//!     failureLimit: 1
//!     inconclusiveLimit: 3
//!     minConnections: 10
//!     metrics:
//!     - name: failure-rate
//!       thresholdRange: {max: 1}
//!       maxOverStable: 0.5
//! ```

use serde::Deserialize;
use serde_yaml::Value;

use crate::model::rollout::{
    API_VERSION, Analysis, KIND, Metric, MetricCheck, RolloutSpec, Step, parse_duration,
};
use crate::model::{validate_service_name, validate_subset_name};
use crate::yaml::{self, Error, FieldPath, Located, Seg, locate};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    service: String,
    stable_subset: String,
    canary_subset: String,
    steps: Vec<RawStep>,
    #[serde(default)]
    analysis: Option<RawAnalysis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStep {
    set_weight: Option<i64>,
    pause: Option<RawPause>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPause {
    duration: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAnalysis {
    interval: Option<String>,
    failure_limit: Option<u32>,
    inconclusive_limit: Option<u32>,
    min_connections: Option<u64>,
    metrics: Option<Vec<RawMetric>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMetric {
    name: String,
    threshold_range: Option<RawRange>,
    max_over_stable: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    max: f64,
}

/// Whether the YAML document `chunk` is a tcpshift `Rollout` (by its `kind` and `apiVersion`).
pub fn is_rollout_document(chunk: &str) -> bool {
    let Ok(Value::Mapping(m)) = serde_yaml::from_str::<Value>(chunk) else {
        return false;
    };
    m.get("kind").and_then(Value::as_str) == Some(KIND)
        && m.get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("tcpshift.io/"))
}

/// `text` with every `Rollout` document blanked (each of its lines but `---` markers made a
/// comment), so that the other documents keep their line numbers for their own parser.
pub fn without_rollouts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (_, chunk) in yaml::documents::split_documents(text) {
        if is_rollout_document(chunk) {
            for line in chunk.split_inclusive('\n') {
                if line.trim_end() == "---" {
                    out.push_str(line);
                } else {
                    out.push_str(if line.ends_with('\n') { "#\n" } else { "#" });
                }
            }
        } else {
            out.push_str(chunk);
        }
    }
    out
}

/// The path `spec.steps[2].setWeight` as a [`FieldPath`].
fn field_path(text: &str) -> FieldPath {
    let mut p = FieldPath::default();
    for part in text.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            p.0.push(Seg::Key(key.to_owned()));
        }
        for idx in rest.split('[') {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                p.0.push(Seg::Index(i));
            }
        }
    }
    p
}

/// Every `Rollout` document of the YAML stream `text` (file `file` in messages), checked on its
/// own; other documents are skipped.
pub fn parse_rollouts(text: &str, file: &str) -> Result<Vec<RolloutSpec>, Error> {
    let mut out = Vec::new();
    for (offset, chunk) in yaml::documents::split_documents(text) {
        if !is_rollout_document(chunk) {
            continue;
        }
        let object = serde_yaml::from_str::<Value>(chunk)
            .ok()
            .and_then(|v| v.get("metadata")?.get("name")?.as_str().map(str::to_owned))
            .map(|n| format!("Rollout {n}"));
        let fail = |field: &str, message: String| -> Error {
            let loc = locate(chunk, &field_path(field));
            Located::new(file, message)
                .at(loc.map(|(l, _)| l + offset), loc.map(|(_, c)| c))
                .object(object.clone())
                .field(field)
                .into()
        };
        yaml::documents::check_flow_nesting(chunk, file)?;
        let doc: Doc = serde_yaml::from_str(chunk).map_err(|e| -> Error {
            Located::from_yaml(file, offset, &e)
                .object(object.clone())
                .into()
        })?;
        let api = serde_yaml::from_str::<Value>(chunk)
            .ok()
            .and_then(|v| v.get("apiVersion")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        if api != API_VERSION {
            return Err(fail(
                "apiVersion",
                format!("{api:?} is not supported; expected {API_VERSION}"),
            ));
        }
        let spec = from_doc(doc).map_err(|(f, m)| fail(&f, m))?;
        spec.validate().map_err(|e| fail(&e.field, e.message))?;
        out.push(spec);
    }
    Ok(out)
}

fn from_doc(doc: Doc) -> Result<RolloutSpec, (String, String)> {
    let name = doc.metadata.name;
    if name.is_empty() || name.len() > 63 {
        return Err((
            "metadata.name".into(),
            "give a name of 1 to 63 bytes".into(),
        ));
    }
    let s = doc.spec;
    validate_service_name(&s.service).map_err(|e| ("spec.service".into(), e))?;
    validate_subset_name(&s.stable_subset).map_err(|e| ("spec.stableSubset".into(), e))?;
    validate_subset_name(&s.canary_subset).map_err(|e| ("spec.canarySubset".into(), e))?;
    let mut steps = Vec::new();
    for (i, step) in s.steps.iter().enumerate() {
        let at = format!("spec.steps[{i}]");
        steps.push(match (step.set_weight, &step.pause) {
            (Some(w), None) => Step::SetWeight(u32::try_from(w).unwrap_or(u32::MAX)),
            (None, Some(p)) => Step::Pause(match &p.duration {
                Some(d) => Some(parse_duration(d).map_err(|e| (format!("{at}.pause.duration"), e))?),
                None => None,
            }),
            _ => {
                return Err((
                    at,
                    "give exactly one of `setWeight: N` and `pause: {duration: 30s}` (or `pause: {}`)"
                        .into(),
                ));
            }
        });
    }
    let mut analysis = Analysis::default();
    if let Some(a) = s.analysis {
        if let Some(i) = a.interval {
            analysis.interval =
                parse_duration(&i).map_err(|e| ("spec.analysis.interval".to_string(), e))?;
        }
        analysis.failure_limit = a.failure_limit.unwrap_or(analysis.failure_limit);
        analysis.inconclusive_limit = a.inconclusive_limit.unwrap_or(analysis.inconclusive_limit);
        analysis.min_connections = a.min_connections.unwrap_or(analysis.min_connections);
        if let Some(metrics) = a.metrics {
            analysis.metrics = Vec::new();
            for (i, m) in metrics.into_iter().enumerate() {
                let metric = Metric::from_name(&m.name).ok_or_else(|| {
                    (
                        format!("spec.analysis.metrics[{i}].name"),
                        format!(
                            "unknown metric {:?}; expected one of {}",
                            m.name,
                            Metric::ALL.map(|(_, n)| n).join(", ")
                        ),
                    )
                })?;
                analysis.metrics.push(MetricCheck {
                    metric,
                    max: m.threshold_range.map(|r| r.max),
                    max_over_stable: m.max_over_stable,
                });
            }
        }
    }
    Ok(RolloutSpec {
        name,
        service: s.service,
        stable: s.stable_subset,
        canary: s.canary_subset,
        steps,
        analysis,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DOC: &str = "\
apiVersion: tcpshift.io/v1alpha1
kind: Rollout
metadata:
  name: echo
spec:
  service: tcp-echo
  stableSubset: v1
  canarySubset: v2
  steps:
  - setWeight: 20
  - pause: {duration: 30s}
  - setWeight: 50
  - pause: {}
  - setWeight: 100
  analysis:
    interval: 10s
    failureLimit: 2
    inconclusiveLimit: 4
    minConnections: 20
    metrics:
    - name: failure-rate
      thresholdRange: {max: 1}
    - name: reset-rate
      maxOverStable: 0.5
";

    #[test]
    fn a_complete_document_is_read() {
        let text = format!("services: []\n---\n{DOC}");
        let specs = parse_rollouts(&text, "r.yaml").expect("parse");
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!((s.name.as_str(), s.service.as_str()), ("echo", "tcp-echo"));
        assert_eq!((s.stable.as_str(), s.canary.as_str()), ("v1", "v2"));
        assert_eq!(
            s.steps,
            [
                Step::SetWeight(20),
                Step::Pause(Some(Duration::from_secs(30))),
                Step::SetWeight(50),
                Step::Pause(None),
                Step::SetWeight(100)
            ]
        );
        assert_eq!(s.analysis.interval, Duration::from_secs(10));
        assert_eq!(s.analysis.failure_limit, 2);
        assert_eq!(s.analysis.min_connections, 20);
        assert_eq!(s.analysis.metrics[1].max_over_stable, Some(0.5));
        // The other documents keep their lines; the rollout's are comments.
        let rest = without_rollouts(&text);
        assert_eq!(rest.lines().count(), text.lines().count());
        assert!(rest.starts_with("services: []\n---\n#\n"));
        assert!(!rest.contains("Rollout"));
    }

    #[test]
    fn bad_documents_say_file_line_and_field() {
        let cases = [
            (
                "setWeight: 50",
                "setWeight: 150",
                "r.yaml:12:16: Rollout echo: spec.steps[2].setWeight: 150 is out of range",
            ),
            (
                "duration: 30s",
                "duration: 30",
                "r.yaml:11:23: Rollout echo: spec.steps[1].pause.duration: \"30\" is not a duration",
            ),
            (
                "name: reset-rate",
                "name: latency",
                "r.yaml:23:13: Rollout echo: spec.analysis.metrics[1].name: unknown metric \"latency\"",
            ),
            (
                "canarySubset: v2",
                "canarySubset: v1",
                "r.yaml:8:17: Rollout echo: spec.canarySubset: the canary subset",
            ),
            (
                "interval: 10s",
                "interval: ten",
                "r.yaml:16:15: Rollout echo: spec.analysis.interval: \"ten\" is not a duration",
            ),
            (
                "failureLimit: 2",
                "failureLimits: 2",
                "r.yaml:17:5: Rollout echo: spec.analysis: unknown field `failureLimits`",
            ),
        ];
        let mut wrong = Vec::new();
        for (from, to, want) in cases {
            let text = DOC.replace(from, to);
            let e = parse_rollouts(&text, "r.yaml").expect_err(to).to_string();
            if !e.starts_with(want) {
                wrong.push(format!("{to}: got {e}\nwant {want}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        let never = DOC
            .replace("setWeight: 20", "setWeight: 0")
            .replace("setWeight: 50", "setWeight: 0")
            .replace("setWeight: 100", "setWeight: 0");
        let e = parse_rollouts(&never, "r.yaml")
            .expect_err("never")
            .to_string();
        assert!(
            e.contains("spec.steps: the steps never give the canary any traffic"),
            "{e}"
        );
    }
}
