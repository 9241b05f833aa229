//! Which service ports a ServiceEntry declares, and where each endpoint is sent
//! for each of them.
//!
//! - **Declared** (the `cloudmap-xds/ports` service attribute): exactly the ports
//!   listed. The first is the instance port: an instance's `AWS_INSTANCE_PORT`
//!   becomes its target for that port (ECS bridge mode: one stable service port,
//!   each task on its own host port); the other ports reach every instance at
//!   their own number, as does an instance that registers no port.
//! - **Derived** (no attribute): an instance with `AWS_INSTANCE_PORT=p` serves `p`
//!   with the protocol of `p` (`--port-protocols`, else 80 HTTP, 443 HTTPS, others
//!   TCP); an instance without a port serves 80 (HTTP) and 443 (HTTPS). A service
//!   port is published only if **every** endpoint serves its protocol, and each
//!   endpoint is sent to its own port of that protocol. So no endpoint ever gets
//!   traffic of one protocol on a port meant for another. When the endpoints share
//!   no protocol at all, the protocol served by the most endpoints wins (ties: the
//!   protocol of instances that registered a port, then the lowest port number)
//!   and the other endpoints are skipped as `port_conflict`.

use std::collections::{BTreeMap, BTreeSet};

use smallvec::SmallVec;

use super::settings::{Defaults, Origin, PortSpec, Protocol, default_port_name};

/// An endpoint's target port for each service port. Services declare a few ports, so
/// they live inline: a full build has one of these per endpoint.
pub type Targets = SmallVec<[u32; 4]>;

/// The two ports of an instance that registers none (the seed tutorial's rule).
pub const PORTLESS_PORTS: [u16; 2] = [80, 443];

/// A service port in effect and where its protocol came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPort {
    pub spec: PortSpec,
    pub origin: Origin,
}

/// The outcome for a set of endpoints, given by their registered ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub ports: Vec<PlannedPort>,
    /// Where each endpoint is sent; see [`PortPlan::targets_of`].
    pub targets: EndpointTargets,
    /// Why endpoints were left out, when some were.
    pub conflict: Option<String>,
}

/// Each endpoint's targets, in the order of [`PortPlan::ports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointTargets {
    /// Every endpoint is sent to the same ports: one list, not one copy per endpoint
    /// (a full build plans every service, nearly every one this way).
    Same(Targets),
    /// Per endpoint, in input order; `None` when the endpoint cannot serve the ports.
    Each(Vec<Option<Targets>>),
}

impl PortPlan {
    /// The target port of each of `ports` for endpoint `i` (input order), or `None`
    /// when the endpoint cannot serve them.
    pub fn targets_of(&self, i: usize) -> Option<&Targets> {
        match &self.targets {
            EndpointTargets::Same(targets) => Some(targets),
            EndpointTargets::Each(each) => each.get(i).and_then(Option::as_ref),
        }
    }
}

/// Declared ports: the first takes each instance's own port.
pub fn declared(ports: &[PortSpec], instance_ports: &[Option<u16>], origin: &Origin) -> PortPlan {
    let targets = EndpointTargets::Each(
        instance_ports
            .iter()
            .map(|own| {
                Some(
                    ports
                        .iter()
                        .enumerate()
                        .map(|(i, p)| match own {
                            Some(own) if i == 0 => u32::from(*own),
                            _ => u32::from(p.number),
                        })
                        .collect(),
                )
            })
            .collect(),
    );
    let ports = ports.iter().map(|p| PlannedPort { spec: p.clone(), origin: origin.clone() }).collect();
    PortPlan { ports, targets, conflict: None }
}

/// Ports derived from what the instances registered (see the module documentation).
pub fn derived(instance_ports: &[Option<u16>], defaults: &Defaults) -> PortPlan {
    // Nearly always every instance registers the same port (an ECS service's tasks
    // do): the plan is then the plan of one of them, for each. A full build plans
    // every service, and the general rules cost a dozen passes and allocations.
    match instance_ports.split_first() {
        Some((first, rest)) if rest.iter().all(|p| p == first) => {
            // One offer shares all its protocols with itself: every port it offers is
            // published, and each reaches the endpoint at that very number.
            let offer = match first {
                Some(p) => std::slice::from_ref(p),
                None => &PORTLESS_PORTS[..],
            };
            let ports = offer.iter().map(|&n| planned(n, defaults)).collect();
            let targets: Targets = offer.iter().map(|&n| u32::from(n)).collect();
            PortPlan { ports, targets: EndpointTargets::Same(targets), conflict: None }
        }
        _ => derived_each(instance_ports, defaults),
    }
}

/// Port `number` with the protocol the flags or the built-in rules give it.
fn planned(number: u16, defaults: &Defaults) -> PlannedPort {
    let p = defaults.protocol_of(number);
    PlannedPort {
        spec: PortSpec { number, name: default_port_name(number, p.value), protocol: p.value },
        origin: p.origin,
    }
}

/// [`derived`], endpoint by endpoint.
fn derived_each(instance_ports: &[Option<u16>], defaults: &Defaults) -> PortPlan {
    // Runs once per service on every build: no collection per endpoint but the targets.
    let offers: Vec<&[u16]> = instance_ports
        .iter()
        .map(|p| match p {
            Some(p) => std::slice::from_ref(p),
            None => &PORTLESS_PORTS[..],
        })
        .collect();
    let protocol = |n: u16| defaults.protocol_of(n).value;
    let protocols_of = |offer: &[u16]| offer.iter().fold(ProtocolSet::EMPTY, |set, n| set.with(protocol(*n)));

    // Which endpoints stay: all of them when they share a protocol; otherwise the largest group.
    let mut kept: Vec<bool> = vec![true; offers.len()];
    let mut conflict = None;
    if !offers.is_empty() {
        let shared = offers.iter().fold(ProtocolSet::ALL, |set, offer| set.and(protocols_of(offer)));
        if shared.is_empty() {
            let winner = winning_protocol(&offers, instance_ports, &protocol);
            for (keep, offer) in kept.iter_mut().zip(&offers) {
                *keep = offer.iter().any(|n| protocol(*n) == winner);
            }
            let dropped = kept.iter().filter(|k| !**k).count();
            conflict = Some(format!(
                "the instances share no protocol; {winner} (served by the most instances) wins and \
                 {dropped} instance(s) serving only other protocols are left out; set the {} service attribute \
                 to declare the ports",
                super::settings::PORTS_KEY
            ));
        }
    }

    let kept_offers: Vec<&[u16]> = offers.iter().zip(&kept).filter(|(_, k)| **k).map(|(o, _)| *o).collect();
    let mut numbers: Vec<u16> = if kept_offers.is_empty() {
        PORTLESS_PORTS.to_vec()
    } else {
        kept_offers.iter().flat_map(|o| o.iter().copied()).collect()
    };
    numbers.sort_unstable();
    numbers.dedup();
    let shared = if kept_offers.is_empty() {
        numbers.iter().fold(ProtocolSet::EMPTY, |set, n| set.with(protocol(*n)))
    } else {
        kept_offers.iter().fold(ProtocolSet::ALL, |set, offer| set.and(protocols_of(offer)))
    };
    let ports: Vec<PlannedPort> =
        numbers.iter().filter(|n| shared.contains(protocol(**n))).map(|&n| planned(n, defaults)).collect();

    let targets = offers
        .iter()
        .zip(&kept)
        .map(|(offer, keep)| {
            keep.then(|| {
                ports
                    .iter()
                    .map(|p| {
                        // Its own port of that protocol: the same number when it serves it, else the lowest.
                        let target = if offer.contains(&p.spec.number) {
                            p.spec.number
                        } else {
                            offer
                                .iter()
                                .copied()
                                .filter(|n| protocol(*n) == p.spec.protocol)
                                .min()
                                .unwrap_or(p.spec.number)
                        };
                        u32::from(target)
                    })
                    .collect()
            })
        })
        .collect();
    PortPlan { ports, targets: EndpointTargets::Each(targets), conflict }
}

/// A set of protocols as bits, so an endpoint's protocols cost no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProtocolSet(u32);

impl ProtocolSet {
    const EMPTY: ProtocolSet = ProtocolSet(0);
    const ALL: ProtocolSet = ProtocolSet(u32::MAX);

    fn bit(p: Protocol) -> u32 {
        1 << (p as u32)
    }

    fn with(self, p: Protocol) -> Self {
        ProtocolSet(self.0 | Self::bit(p))
    }

    fn and(self, other: Self) -> Self {
        ProtocolSet(self.0 & other.0)
    }

    fn contains(self, p: Protocol) -> bool {
        self.0 & Self::bit(p) != 0
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The protocol served by the most endpoints; ties go to the protocol of endpoints
/// that registered a port, then to the protocol of the lowest port number.
fn winning_protocol(
    offers: &[&[u16]],
    instance_ports: &[Option<u16>],
    protocol: &impl Fn(u16) -> Protocol,
) -> Protocol {
    let mut score: BTreeMap<Protocol, (usize, usize, std::cmp::Reverse<u16>)> = BTreeMap::new();
    for (offer, registered) in offers.iter().zip(instance_ports) {
        let protocols: BTreeSet<Protocol> = offer.iter().map(|n| protocol(*n)).collect();
        for p in protocols {
            let lowest = offer.iter().copied().filter(|n| protocol(*n) == p).min().unwrap_or(u16::MAX);
            let entry = score.entry(p).or_insert((0, 0, std::cmp::Reverse(u16::MAX)));
            entry.0 += 1;
            entry.1 += usize::from(registered.is_some());
            entry.2 = entry.2.max(std::cmp::Reverse(lowest));
        }
    }
    score.into_iter().max_by(|a, b| a.1.cmp(&b.1)).map_or(Protocol::Tcp, |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(plan: &PortPlan) -> Vec<(u16, &str, Protocol)> {
        plan.ports.iter().map(|p| (p.spec.number, p.spec.name.as_str(), p.spec.protocol)).collect()
    }

    /// Port name → target, in name order.
    fn targets(plan: &PortPlan, i: usize) -> Option<Vec<(&str, u32)>> {
        plan.targets_of(i).map(|t| {
            let mut named: Vec<(&str, u32)> =
                plan.ports.iter().map(|p| p.spec.name.as_str()).zip(t.iter().copied()).collect();
            named.sort();
            named
        })
    }

    #[test]
    fn a_tls_instance_and_a_portless_one_share_only_https() {
        // The case: one instance on 443, one without a port. HTTP on 80 must not reach 443.
        let plan = derived(&[Some(443), None], &Defaults::default());
        assert_eq!(names(&plan), [(443, "https", Protocol::Https)]);
        assert_eq!(targets(&plan, 0), Some(vec![("https", 443)]));
        assert_eq!(targets(&plan, 1), Some(vec![("https", 443)]));
        assert!(plan.conflict.is_none());
    }

    #[test]
    fn bridge_mode_tcp_ports_each_reach_every_task_at_its_own_port() {
        let plan = derived(&[Some(32768), Some(32769)], &Defaults::default());
        assert_eq!(names(&plan), [(32768, "tcp-32768", Protocol::Tcp), (32769, "tcp-32769", Protocol::Tcp)]);
        assert_eq!(targets(&plan, 0), Some(vec![("tcp-32768", 32768), ("tcp-32769", 32768)]));
        assert_eq!(targets(&plan, 1), Some(vec![("tcp-32768", 32769), ("tcp-32769", 32769)]));
    }

    #[test]
    fn with_a_protocol_flag_http_on_8080_joins_portless_http() {
        let defaults =
            Defaults { port_protocols: BTreeMap::from([(8080, Protocol::Http)]), ..Defaults::default() };
        let plan = derived(&[Some(8080), None], &defaults);
        assert_eq!(names(&plan), [(80, "http", Protocol::Http), (8080, "http-8080", Protocol::Http)]);
        assert_eq!(plan.ports[1].origin, Origin::Flag(super::super::settings::PORT_PROTOCOLS_FLAG));
        assert_eq!(targets(&plan, 0), Some(vec![("http", 8080), ("http-8080", 8080)]));
        assert_eq!(targets(&plan, 1), Some(vec![("http", 80), ("http-8080", 80)]));
    }

    #[test]
    fn no_shared_protocol_keeps_the_largest_group() {
        // Two TCP tasks and one portless (HTTP/HTTPS) instance: TCP wins, the portless one is left out.
        let plan = derived(&[Some(5432), None, Some(5433)], &Defaults::default());
        assert_eq!(names(&plan), [(5432, "tcp-5432", Protocol::Tcp), (5433, "tcp-5433", Protocol::Tcp)]);
        assert!(targets(&plan, 1).is_none());
        assert!(plan.conflict.as_deref().unwrap().contains("TCP"), "{:?}", plan.conflict);
        // A tie: the instance that registered a port wins over the portless one.
        let plan = derived(&[None, Some(8080)], &Defaults::default());
        assert_eq!(names(&plan), [(8080, "tcp-8080", Protocol::Tcp)]);
        assert!(targets(&plan, 0).is_none());
        assert_eq!(targets(&plan, 1), Some(vec![("tcp-8080", 8080)]));
    }

    #[test]
    fn instances_on_one_port_get_what_the_rules_give_each() {
        let with_flag =
            Defaults { port_protocols: BTreeMap::from([(8080, Protocol::Http)]), ..Defaults::default() };
        for defaults in [Defaults::default(), with_flag] {
            for port in [Some(8080), Some(80), Some(443), Some(5432), None] {
                for n in 1..5 {
                    let ports = vec![port; n];
                    let (fast, each) = (derived(&ports, &defaults), derived_each(&ports, &defaults));
                    assert_eq!(
                        (&fast.ports, &fast.conflict),
                        (&each.ports, &each.conflict),
                        "{port:?} x {n}"
                    );
                    assert!((0..n).all(|i| fast.targets_of(i) == each.targets_of(i)), "{port:?} x {n}");
                }
            }
        }
    }

    #[test]
    fn no_instances_offer_http_and_https() {
        let plan = derived(&[], &Defaults::default());
        assert_eq!(names(&plan), [(80, "http", Protocol::Http), (443, "https", Protocol::Https)]);
    }

    #[test]
    fn declared_ports_send_the_instance_port_to_the_first() {
        let ports = vec![
            PortSpec { number: 80, name: "http".into(), protocol: Protocol::Http },
            PortSpec { number: 9090, name: "metrics".into(), protocol: Protocol::Http },
        ];
        let origin = Origin::Attribute(super::super::settings::PORTS_KEY);
        let plan = declared(&ports, &[Some(32768), None], &origin);
        assert_eq!(targets(&plan, 0), Some(vec![("http", 32768), ("metrics", 9090)]));
        assert_eq!(targets(&plan, 1), Some(vec![("http", 80), ("metrics", 9090)]));
        assert!(plan.ports.iter().all(|p| p.origin == origin));
    }
}
