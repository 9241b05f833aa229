use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;

use super::*;
use crate::model::{Health, HealthFilter, Instance, Registry, Service};
use crate::proto::SharedAny;
use crate::proto::envoy::service::discovery::v3::DiscoveryRequest;
use crate::snapshot::MCP_RESOURCE_TYPE_URL;
use crate::translate::{Options, translate};
use crate::xds::Connection;
use crate::xds::response::{DiscoveryResponse as SentResponse, Resources};

fn registry(services: &[(&str, &str)]) -> Registry {
    Registry::new(
        services
            .iter()
            .map(|(name, ip)| Service {
                namespace: "shop".into(),
                name: (*name).into(),
                // Per service, with a fraction of a second, as Cloud Map's CreateDate.
                created: SystemTime::UNIX_EPOCH
                    + Duration::from_millis(1_700_000_000_123 + name.len() as u64),
                attributes: Default::default(),
                instances: vec![Instance {
                    id: "i-1".into(),
                    health: Health::Healthy,
                    attributes: [
                        ("AWS_INSTANCE_IPV4".to_owned(), (*ip).to_owned()),
                        ("AWS_INSTANCE_PORT".to_owned(), "8080".to_owned()),
                    ]
                    .into(),
                }],
            })
            .collect(),
    )
}

fn own(services: &[(&str, &str)]) -> Snapshot {
    Snapshot::build(translate(&registry(services), &Options::new("istio-system", HealthFilter::All)))
}

/// What a peer's ADS stream delivers for `snapshot`: our own response encoding, decoded
/// as the generated message, exactly as the bootstrap client receives it.
fn on_the_wire(snapshot: &Snapshot) -> DiscoveryResponse {
    let sent = SentResponse {
        version_info: snapshot.version.clone(),
        resources: Resources::of(Arc::new(snapshot.clone())),
        type_url: SERVICE_ENTRY_TYPE_URL.into(),
        nonce: "7".into(),
        control_plane: None,
    };
    DiscoveryResponse::decode(sent.encode_to_vec().as_slice()).unwrap()
}

fn from() -> Borrowed {
    Borrowed {
        peer: "10.0.0.7:15099".into(),
        peer_instance: "cloudmap-xds-b-1".into(),
        peer_borrowed: false,
        at: SystemTime::now(),
    }
}

fn status(instance: &str, synced: bool, borrowed: bool, entries: u32) -> GetStatusResponse {
    GetStatusResponse {
        instance_id: instance.into(),
        synced,
        borrowed,
        service_entries: entries,
        ..Default::default()
    }
}

#[test]
fn targets_parse_names_ips_and_bracketed_ipv6() {
    let t = Target::parse("cloudmap-xds-peers.istio-system.svc:15099").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("cloudmap-xds-peers.istio-system.svc", 15099));
    assert_eq!(Target::parse("127.0.0.1:80").unwrap().to_string(), "127.0.0.1:80");
    let v6 = Target::parse("[::1]:15099").unwrap();
    assert_eq!((v6.host.as_str(), v6.to_string().as_str()), ("::1", "[::1]:15099"));
    for bad in ["", "host", "host:", ":15099", "host:0", "host:70000", "::1:15099", "[::1:15099", "a b:1"] {
        let err = Target::parse(bad).unwrap_err();
        assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
    }
}

#[test]
fn peers_are_judged_by_their_status() {
    let me = "a-1";
    assert_eq!(Verdict::of(&status(me, true, false, 5), me), Verdict::Itself, "never itself, even synced");
    assert_eq!(Verdict::of(&status("b", false, false, 0), me), Verdict::NotReady);
    assert_eq!(Verdict::of(&status("b", true, false, 0), me), Verdict::Empty, "synced, serving nothing");
    assert_eq!(Verdict::of(&status("b", false, true, 0), me), Verdict::Empty);
    assert_eq!(Verdict::of(&status("b", true, false, 5), me), Verdict::Synced);
    assert_eq!(
        Verdict::of(&status("b", false, true, 5), me),
        Verdict::Relaying,
        "a borrowing peer can be borrowed from"
    );
    let mut order = [Verdict::Relaying, Verdict::Synced];
    order.sort();
    assert_eq!(order, [Verdict::Synced, Verdict::Relaying], "synced peers are tried first");
}

#[test]
fn a_borrowed_set_is_the_peers_set_byte_for_byte() {
    let peer = own(&[("orders", "10.0.0.1"), ("carts", "10.0.0.2"), ("users", "10.0.0.3")]);
    let borrowed = borrowed_snapshot(on_the_wire(&peer), "istio-system", from()).unwrap();
    assert_eq!(borrowed.version, peer.version, "the snapshot version, hence version_info, is the peer's");
    assert!(borrowed.synced && !borrowed.is_own());
    assert_eq!(borrowed.borrowed.as_ref().unwrap().peer, "10.0.0.7:15099");
    assert_eq!(borrowed.encoded_resources(), peer.encoded_resources(), "the very bytes the peer sends");
    assert_eq!(borrowed.resources_field_len(), peer.resources_field_len());
    assert_eq!(borrowed.endpoints, peer.endpoints);
    for (b, p) in borrowed.resources.iter().zip(&peer.resources) {
        assert_eq!(
            (&b.name, &b.version, b.create_time, b.spec().unwrap()),
            (&p.name, &p.version, p.create_time, p.spec().unwrap())
        );
    }
    // The replica's own sync of the same Cloud Map content is the same set: same version.
    let ours = own(&[("users", "10.0.0.3"), ("orders", "10.0.0.1"), ("carts", "10.0.0.2")]);
    assert_eq!(ours.version, borrowed.version);
    assert_eq!(ours.encoded_resources(), borrowed.encoded_resources());
}

#[test]
fn a_response_not_fit_to_serve_is_refused_with_its_reason() {
    let peer = own(&[("orders", "10.0.0.1")]);
    let empty = own(&[]);
    assert_eq!(borrowed_snapshot(on_the_wire(&empty), "istio-system", from()).unwrap_err(), Refusal::Empty);

    let refusal = borrowed_snapshot(on_the_wire(&peer), "mesh", from()).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "the peer publishes \"istio-system/cloudmap-orders.shop\", outside this replica's publish namespace \
         \"mesh\" (--publish-namespace must be the same on every replica)"
    );

    let mut wrong_type = on_the_wire(&peer);
    wrong_type.type_url = "networking.istio.io/v1/VirtualService".into();
    assert!(matches!(borrowed_snapshot(wrong_type, "istio-system", from()), Err(Refusal::Type(_))));

    let mut garbage = on_the_wire(&peer);
    garbage
        .resources
        .push(SharedAny { type_url: MCP_RESOURCE_TYPE_URL.into(), value: vec![0xff, 0xff].into() });
    let refusal = borrowed_snapshot(garbage, "istio-system", from()).unwrap_err();
    assert!(refusal.to_string().starts_with("resource 1: undecodable MCP resource"), "{refusal}");

    let mut foreign = on_the_wire(&peer);
    foreign.resources[0].type_url = "type.googleapis.com/google.protobuf.Empty".into();
    assert!(matches!(
        borrowed_snapshot(foreign, "istio-system", from()),
        Err(Refusal::Decode { index: 0, error: DecodeError::ResourceType(_) })
    ));
}

#[test]
fn own_sets_win_over_borrowed_ones_and_partial_ones_do_not() {
    let (publisher, mut rx) = snapshot::channel();
    let peer = own(&[("orders", "10.0.0.1"), ("carts", "10.0.0.2")]);
    let borrowed = || borrowed_snapshot(on_the_wire(&peer), "istio-system", from()).unwrap();

    // Nothing yet: the borrowed set is served.
    assert!(publisher.publish_borrowed(borrowed()));
    assert!(rx.borrow_and_update().borrowed.is_some());
    // The same set again (a peer's repeated push): nobody woken.
    assert!(!publisher.publish_borrowed(borrowed()));
    assert!(!rx.has_changed().unwrap());
    // A partial own set (--initial-sync-timeout) never replaces a complete borrowed one.
    assert!(!publisher.publish_partial(own(&[("orders", "10.0.0.1")])));
    assert!(rx.borrow().borrowed.is_some());
    // The own complete sync replaces it, even with the same content: no longer borrowed.
    assert!(publisher.publish(own(&[("carts", "10.0.0.2"), ("orders", "10.0.0.1")])));
    let served = rx.borrow_and_update().clone();
    assert!(served.is_own());
    assert_eq!(served.version, peer.version);
    // And from then on a borrowed set never comes back.
    assert!(!publisher.publish_borrowed(borrowed()));
    assert!(publisher.current().is_own());
    // An own set with other content wins over the borrowed one too.
    let (publisher, _rx) = snapshot::channel();
    publisher.publish_borrowed(borrowed());
    assert!(publisher.publish(own(&[("orders", "10.0.0.9")])));
    assert!(publisher.current().is_own());
    assert_ne!(publisher.current().version, peer.version);
}

#[test]
fn a_stream_sees_no_change_when_the_own_sync_equals_the_borrowed_set() {
    let peer = own(&[("orders", "10.0.0.1"), ("carts", "10.0.0.2")]);
    let borrowed = Arc::new(borrowed_snapshot(on_the_wire(&peer), "istio-system", from()).unwrap());
    let mut stream = Connection::new();
    let request = DiscoveryRequest { type_url: SERVICE_ENTRY_TYPE_URL.into(), ..Default::default() };
    let first = stream.handle_request(&request, &borrowed).response.expect("a borrowed set is served");
    assert_eq!(first.version_info, peer.version);
    assert_eq!(first.resources, peer.encoded_resources());

    let same = Arc::new(own(&[("carts", "10.0.0.2"), ("orders", "10.0.0.1")]));
    assert!(stream.handle_snapshot(&same).is_empty(), "istiod is sent nothing: it already has this set");
    let changed = Arc::new(own(&[("orders", "10.0.0.9")]));
    let pushes = stream.handle_snapshot(&changed);
    assert_eq!(pushes.len(), 1, "different content from the own sync is pushed");
    assert_eq!(pushes[0].version_info, changed.version);
}

#[test]
fn the_ca_file_follows_the_grpc_ports_tls() {
    assert!(Tls::load(false, None, None).unwrap().is_none());
    assert!(matches!(Tls::load(true, None, None), Err(Error::CaFileRequired)));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    assert!(matches!(Tls::load(false, Some(&ca), None), Err(Error::CaFileWithoutTls)));
    assert!(matches!(Tls::load(true, Some(&ca), None), Err(Error::ReadCa { .. })));
    std::fs::write(&ca, "not a certificate").unwrap();
    assert!(matches!(Tls::load(true, Some(&ca), None), Err(Error::NoCa { .. })));
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    let tls = Tls::load(true, Some(&ca), Some("peers.example".into())).unwrap().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("peers.example"));
}

#[test]
fn instance_ids_differ_between_processes_on_one_host() {
    assert_ne!(instance_id(), instance_id());
}
