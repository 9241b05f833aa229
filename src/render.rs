//! ServiceEntries as Kubernetes objects (YAML or JSON), the way users read them:
//! `cloudmap-xds render` and the admin JSON view.

use serde_json::{Map, Value, json};

use crate::model::Service;
use crate::proto::istio::networking::v1alpha3::{ServiceEntry, WorkloadEntry};
use crate::translate::{Entry, Explanation};

pub const API_VERSION: &str = "networking.istio.io/v1";

/// The spec in the CRD's JSON shape (camelCase, enums by name, defaults omitted
/// except `resolution`, which the seed tutorial shows).
pub fn spec_json(spec: &ServiceEntry) -> Value {
    let mut out = Map::new();
    let mut put = |key: &str, value: Value, empty: bool| {
        if !empty {
            out.insert(key.to_owned(), value);
        }
    };
    put("hosts", json!(spec.hosts), spec.hosts.is_empty());
    put("addresses", json!(spec.addresses), spec.addresses.is_empty());
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"name": p.name, "number": p.number, "protocol": p.protocol});
            if p.target_port != 0 {
                port["targetPort"] = json!(p.target_port);
            }
            port
        })
        .collect();
    put("ports", Value::Array(ports), spec.ports.is_empty());
    put("location", json!(spec.location().as_str_name()), spec.location == 0);
    put("resolution", json!(spec.resolution().as_str_name()), false);
    let endpoints: Vec<Value> = spec.endpoints.iter().map(endpoint_json).collect();
    put("endpoints", Value::Array(endpoints), spec.endpoints.is_empty());
    put("exportTo", json!(spec.export_to), spec.export_to.is_empty());
    put("subjectAltNames", json!(spec.subject_alt_names), spec.subject_alt_names.is_empty());
    Value::Object(out)
}

fn endpoint_json(e: &WorkloadEntry) -> Value {
    let mut out = Map::new();
    out.insert("address".into(), json!(e.address));
    if !e.ports.is_empty() {
        out.insert("ports".into(), json!(e.ports));
    }
    if !e.labels.is_empty() {
        out.insert("labels".into(), json!(e.labels));
    }
    if !e.locality.is_empty() {
        out.insert("locality".into(), json!(e.locality));
    }
    if e.weight != 0 {
        out.insert("weight".into(), json!(e.weight));
    }
    Value::Object(out)
}

/// One ServiceEntry as a Kubernetes object.
pub fn object(entry: &Entry) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "ServiceEntry",
        "metadata": {"name": entry.name, "namespace": entry.namespace},
        "spec": spec_json(&entry.spec),
    })
}

/// Multi-document YAML, one document per entry.
pub fn yaml(entries: &[Entry]) -> Result<String, serde_norway::Error> {
    let mut out = String::new();
    for entry in entries {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&object(entry))?);
    }
    Ok(out)
}

/// One service's [`Explanation`] in the shape `render --explain` prints.
pub fn explanation_json(service: &Service, explanation: &Explanation, publish_namespace: &str) -> Value {
    let ports: Vec<Value> = explanation
        .ports
        .iter()
        .map(|p| {
            json!({"name": p.spec.name, "number": p.spec.number, "protocol": p.spec.protocol.as_str(),
                   "from": p.origin.to_string()})
        })
        .collect();
    let endpoints: Vec<Value> = explanation
        .spec
        .endpoints
        .iter()
        .zip(&explanation.endpoint_instances)
        .map(|(e, instances)| json!({"address": e.address, "ports": e.ports, "instances": instances}))
        .collect();
    let mut skipped: Vec<Value> = explanation
        .skipped
        .iter()
        .map(|(id, reason)| json!({"instance": id, "reason": reason.to_string()}))
        .collect();
    skipped.extend(explanation.health_filtered.iter().map(|(id, health)| {
        json!({"instance": id, "reason": format!("{} and left out by the health filter", health.as_str())})
    }));
    json!({
        "serviceEntry": format!("{publish_namespace}/{}", explanation.name),
        "cloudMapService": format!("{}/{}", service.namespace, service.name),
        "host": explanation.host,
        "ports": {"from": ports_origin(explanation), "ports": ports},
        "location": {"value": explanation.location.value.as_str_name(), "from": explanation.location.origin.to_string()},
        "exportTo": {"value": explanation.export_to.value, "from": explanation.export_to.origin.to_string()},
        "resolution": {"value": explanation.resolution.value.as_str_name(), "from": resolution_origin(explanation)},
        "addresses": {"value": explanation.spec.addresses, "mode": explanation.addresses.value.to_string(),
                      "from": explanation.addresses.origin.to_string()},
        "endpoints": endpoints,
        "skippedInstances": skipped,
        "invalidSettings": explanation.invalid_settings.iter()
            .map(|i| json!({"key": i.key, "value": i.value, "reason": i.reason})).collect::<Vec<_>>(),
        "skippedLabels": explanation.skipped_labels,
        "notes": explanation.notes,
        "spec": spec_json(&explanation.spec),
    })
}

/// Where the port list came from, in words.
pub fn ports_origin(explanation: &Explanation) -> String {
    match explanation.ports_origin {
        crate::translate::settings::Origin::Default => {
            "derived from the instances' AWS_INSTANCE_PORT (each port's protocol: see `from`)".into()
        }
        ref origin => origin.to_string(),
    }
}

/// Where the resolution came from, in words.
pub fn resolution_origin(explanation: &Explanation) -> String {
    match explanation.resolution.origin {
        crate::translate::settings::Origin::Default => {
            "default: STATIC when every endpoint is an IP, else DNS".into()
        }
        ref origin => origin.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::model::{Health, HealthFilter, Instance, Registry, Service};
    use crate::translate::{Options, translate};

    #[test]
    fn golden_case_renders_like_the_tutorial() {
        let registry = Registry::new(vec![Service {
            namespace: "my-namespace".into(),
            name: "getmesh-external-service".into(),
            created: SystemTime::UNIX_EPOCH,
            attributes: Default::default(),
            instances: vec![Instance {
                id: "i-1".into(),
                health: Health::Healthy,
                attributes: [("AWS_INSTANCE_IPV4".to_string(), "52.192.72.89".to_string())].into(),
            }],
        }]);
        let options = Options::new("istio-system", HealthFilter::All);
        let text = yaml(&translate(&registry, &options).entries).unwrap();
        let expected = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: cloudmap-getmesh-external-service.my-namespace
  namespace: istio-system
spec:
  addresses:
  - 52.192.72.89
  endpoints:
  - address: 52.192.72.89
    ports:
      http: 80
      https: 443
  hosts:
  - getmesh-external-service.my-namespace
  ports:
  - name: http
    number: 80
    protocol: HTTP
  - name: https
    number: 443
    protocol: HTTPS
  resolution: STATIC
";
        assert_eq!(text, expected);
    }
}
