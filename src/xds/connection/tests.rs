use std::time::SystemTime;

use super::*;
use crate::model::{Health, HealthFilter, Instance, Registry, Service};
use crate::proto::envoy::service::discovery::v3::Node;
use crate::proto::google::rpc::Status;
use crate::translate::{Options, translate};

const SE_V1: &str = "networking.istio.io/v1/ServiceEntry";
const SE_V1ALPHA3: &str = "networking.istio.io/v1alpha3/ServiceEntry";
const VS: &str = "networking.istio.io/v1/VirtualService";

fn snapshot(ips: &[&str]) -> Snapshot {
    let registry = Registry::new(vec![Service {
        namespace: "my-namespace".into(),
        name: "getmesh-external-service".into(),
        created: SystemTime::UNIX_EPOCH,
        attributes: Default::default(),
        instances: ips
            .iter()
            .map(|ip| Instance {
                id: ip.to_string(),
                health: Health::Healthy,
                attributes: [("AWS_INSTANCE_IPV4".to_string(), ip.to_string())].into(),
            })
            .collect(),
    }]);
    let options = Options::new("istio-system", HealthFilter::All);
    Snapshot::build(translate(&registry, &options))
}

/// The first request of istiod's `pkg/adsc`: Node on the first only, a bogus nonce.
fn initial(type_url: &str, with_node: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: "2026-11-25 17:45:24.1 +0000 UTC m=+0.1".into(),
        node: with_node.then(|| Node {
            id: "sidecar~10.0.0.1~istiod.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ack(response: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: response.type_url.clone(),
        version_info: response.version_info.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

#[test]
fn initial_request_gets_the_full_state_with_the_echoed_type_url() {
    let snap = snapshot(&["52.192.72.89"]);
    let mut conn = Connection::new();
    let out = conn.handle_request(&initial(SE_V1, true), &snap);
    assert_eq!(out.kind, RequestKind::Initial);
    let response = out.response.unwrap();
    assert_eq!(response.type_url, SE_V1);
    assert_eq!(response.version_info, snap.version);
    assert!(!response.nonce.is_empty());
    assert_eq!(response.resources, snap.encoded_resources());
    assert_eq!(conn.node_id(), Some("sidecar~10.0.0.1~istiod.istio-system~istio-system.svc.cluster.local"));

    let old = conn.handle_request(&initial(SE_V1ALPHA3, false), &snap).response.unwrap();
    assert_eq!(old.type_url, SE_V1ALPHA3);
    assert_eq!(old.resources.len(), 1);
    assert_ne!(old.nonce, response.nonce);
}

#[test]
fn unknown_types_get_an_empty_list_with_a_version() {
    let snap = snapshot(&["10.0.0.1"]);
    let mut conn = Connection::new();
    for type_url in
        [VS, "core/v1alpha1/MeshConfig", "extensions.istio.io/v1alpha1/TrafficExtension", "anything at all"]
    {
        let response = conn.handle_request(&initial(type_url, false), &snap).response.unwrap();
        assert_eq!(response.type_url, type_url);
        assert!(response.resources.is_empty());
        assert_eq!(response.version_info, EMPTY_TYPE_VERSION);
        assert!(!response.nonce.is_empty());
    }
}

#[test]
fn ack_records_the_version_and_sends_nothing() {
    let snap = snapshot(&["10.0.0.1"]);
    let mut conn = Connection::new();
    let response = conn.handle_request(&initial(SE_V1, true), &snap).response.unwrap();
    let out = conn.handle_request(&ack(&response), &snap);
    assert_eq!(out, Outcome { kind: RequestKind::Ack, response: None });
    let state = &conn.types()[SE_V1];
    assert_eq!(state.last_version_acked, snap.version);
    assert_eq!((state.acks, state.responses_sent), (1, 1));
    // The same snapshot again changes nothing.
    assert!(conn.handle_snapshot(&snap).is_empty());
}

#[test]
fn nack_is_counted_and_nothing_is_resent() {
    let snap = snapshot(&["10.0.0.1"]);
    let mut conn = Connection::new();
    let response = conn.handle_request(&initial(SE_V1, true), &snap).response.unwrap();
    let mut nack = ack(&response);
    nack.version_info = String::new();
    nack.error_detail = Some(Status { code: 3, message: "bad port".into(), details: vec![] });
    let out = conn.handle_request(&nack, &snap);
    assert_eq!(out, Outcome { kind: RequestKind::Nack { error: "bad port".into() }, response: None });
    let state = &conn.types()[SE_V1];
    assert_eq!((state.nacks, state.acks), (1, 0));
    assert_eq!(state.last_nack_error.as_deref(), Some("bad port"));
    assert_eq!(state.last_version_acked, "");
    // A later snapshot still flows after a NACK.
    assert_eq!(conn.handle_snapshot(&snapshot(&["10.0.0.2"])).len(), 1);
}

#[test]
fn a_new_snapshot_pushes_every_service_entry_alias_and_nothing_else() {
    let first = snapshot(&["10.0.0.1"]);
    let mut conn = Connection::new();
    for type_url in [SE_V1, SE_V1ALPHA3, VS] {
        let r = conn.handle_request(&initial(type_url, false), &first).response.unwrap();
        conn.handle_request(&ack(&r), &first);
    }
    let second = snapshot(&["10.0.0.1", "10.0.0.2"]);
    let pushes = conn.handle_snapshot(&second);
    let types: Vec<_> = pushes.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, [SE_V1, SE_V1ALPHA3]);
    assert!(pushes.iter().all(|r| r.version_info == second.version && r.resources.len() == 1));
    assert!(conn.handle_snapshot(&second).is_empty(), "pushed once per version");
}

#[test]
fn stale_nonces_are_ignored() {
    let first = snapshot(&["10.0.0.1"]);
    let mut conn = Connection::new();
    let r1 = conn.handle_request(&initial(SE_V1, false), &first).response.unwrap();
    let second = snapshot(&["10.0.0.2"]);
    let r2 = conn.handle_snapshot(&second).remove(0);
    // The ACK of the superseded response arrives late.
    assert_eq!(conn.handle_request(&ack(&r1), &second).kind, RequestKind::Stale);
    assert_eq!(conn.types()[SE_V1].last_version_acked, "");
    assert_eq!(conn.handle_request(&ack(&r2), &second).kind, RequestKind::Ack);
    // A repeated initial request (bogus nonce) for a type already answered is stale too.
    assert_eq!(conn.handle_request(&initial(SE_V1, false), &second).kind, RequestKind::Stale);
}

#[test]
fn service_entries_wait_for_the_first_sync_but_other_types_do_not() {
    let unsynced = Snapshot::unsynced();
    let mut conn = Connection::new();
    assert_eq!(
        conn.handle_request(&initial(SE_V1, true), &unsynced),
        Outcome { kind: RequestKind::Deferred, response: None }
    );
    assert!(conn.handle_request(&initial(VS, false), &unsynced).response.is_some());
    assert!(conn.handle_snapshot(&unsynced).is_empty());
    let synced = snapshot(&["10.0.0.1"]);
    let pushes = conn.handle_snapshot(&synced);
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].type_url, SE_V1);
    assert!(!conn.types()[SE_V1].awaiting_sync);
}

#[test]
fn requests_without_type_are_invalid() {
    let mut conn = Connection::new();
    assert_eq!(conn.handle_request(&DiscoveryRequest::default(), &snapshot(&[])).kind, RequestKind::Invalid);
    assert!(conn.types().is_empty());
}
