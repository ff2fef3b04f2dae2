//! aws-node's policy routing, read and removed over netlink: its ip rules (see [`ip_rules`]), the
//! routes of the per-ENI (and branch-ENI) tables its rules point at, and the main-table routes
//! `<podIP> dev eni<hash> scope link` to its pods (veth names: see [`super::pod_veth`]).
//!
//! Only tables that aws-node's rules reference are emptied, and only when no rule that stays
//! (anyone else's, or a kept pod's) still uses them. The main, local and default tables are never
//! emptied; from main, only the /32 link routes to aws-node's pod veths go.
//!
//! With `keep_running_pods`, a pod whose host veth still exists (its main-table route is there, which
//! the kernel removes with the veth) keeps its rules, its route, and the ENI table it uses; a
//! branch-ENI pod (security groups for pods, strict mode) keeps its `iif` rules while the interface
//! they name exists. ENI tables no aws-node rule points at (an ENI with no pods) are left alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::RuleMessage;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};
use thiserror::Error;

use super::ip_rules::{self, AwsRule};
use super::pod_veth::VethNames;
use crate::netlink;

const TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;
const RESERVED_TABLES: [u32; 4] = [0, 253, TABLE_MAIN, 255];

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("cannot list {what}: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Delete(rtnetlink::Error),
}

/// The node's IPv4 rules, routes (all tables) and link names, as read at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub rules: Vec<RuleMessage>,
    pub routes: Vec<RouteMessage>,
    pub links: HashMap<u32, String>,
}

/// Opens a netlink connection in the current network namespace.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

pub async fn read(handle: &Handle) -> Result<Snapshot, NetlinkError> {
    let rules: Vec<RuleMessage> = handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetlinkError::Dump {
            what: "ip rules",
            source,
        })?;
    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet;
    // Without strict checking the kernel dumps every table, whatever the query says.
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetlinkError::Dump {
            what: "routes",
            source,
        })?;
    let links = handle
        .link()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(|source| NetlinkError::Dump {
            what: "links",
            source,
        })?
        .into_iter()
        .filter_map(|l| {
            let index = l.header.index;
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((index, n)),
                _ => None,
            })
        })
        .collect();
    Ok(Snapshot {
        rules,
        routes,
        links,
    })
}

pub fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn v4(a: &RouteAddress) -> Option<Ipv4Addr> {
    match a {
        RouteAddress::Inet(ip) => Some(*ip),
        _ => None,
    }
}

fn destination(msg: &RouteMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => v4(d),
        _ => None,
    })
}

fn gateway(msg: &RouteMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => v4(g),
        _ => None,
    })
}

fn oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// `<podIP> dev eni… scope link` in main: aws-node's route to a pod. Returns the pod IP and veth.
pub fn pod_route(
    msg: &RouteMessage,
    links: &HashMap<u32, String>,
    veths: &VethNames,
) -> Option<(Ipv4Addr, String)> {
    let h = &msg.header;
    if h.address_family != AddressFamily::Inet
        || route_table(msg) != TABLE_MAIN
        || h.destination_prefix_length != 32
        || h.scope != RouteScope::Link
        || h.kind != RouteType::Unicast
        || gateway(msg).is_some()
    {
        return None;
    }
    let dev = links.get(&oif(msg)?)?;
    veths
        .is_pod_veth(dev)
        .then(|| destination(msg).map(|ip| (ip, dev.clone())))?
}

/// A route written the way `ip route show table all` prints it.
pub struct DescribedRoute<'a>(pub &'a RouteMessage, pub &'a HashMap<u32, String>);

impl fmt::Display for DescribedRoute<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (msg, links) = (self.0, self.1);
        let h = &msg.header;
        match h.kind {
            RouteType::Unicast => {}
            RouteType::Local => f.write_str("local ")?,
            RouteType::Broadcast => f.write_str("broadcast ")?,
            RouteType::BlackHole => f.write_str("blackhole ")?,
            RouteType::Unreachable => f.write_str("unreachable ")?,
            RouteType::Prohibit => f.write_str("prohibit ")?,
            ref k => write!(f, "{k:?} ")?,
        }
        match (destination(msg), h.destination_prefix_length) {
            (_, 0) => f.write_str("default")?,
            (Some(d), 32) => write!(f, "{d}")?,
            (Some(d), l) => write!(f, "{d}/{l}")?,
            (None, l) => write!(f, "?/{l}")?,
        }
        if let Some(g) = gateway(msg) {
            write!(f, " via {g}")?;
        }
        if let Some(i) = oif(msg) {
            match links.get(&i) {
                Some(n) => write!(f, " dev {n}")?,
                None => write!(f, " dev #{i}")?,
            }
        }
        let table = route_table(msg);
        if table != TABLE_MAIN {
            write!(f, " table {table}")?;
        }
        match h.scope {
            RouteScope::Universe => Ok(()),
            RouteScope::Link => f.write_str(" scope link"),
            RouteScope::Host => f.write_str(" scope host"),
            ref s => write!(f, " scope {s:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Remove,
    /// Kept, and why.
    Keep(String),
}

#[derive(Debug, Clone)]
pub struct PlannedRule {
    pub msg: RuleMessage,
    pub kind: AwsRule,
    pub decision: Decision,
}

#[derive(Debug, Clone)]
pub struct PlannedRoute {
    pub msg: RouteMessage,
    pub decision: Decision,
}

#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub rules: Vec<PlannedRule>,
    pub routes: Vec<PlannedRoute>,
}

/// What goes and what stays (only aws-node's things appear in the plan).
pub fn plan(snap: &Snapshot, keep_running_pods: bool, veths: &VethNames) -> Plan {
    // Pods whose veth still exists: their main-table route is still there.
    let live: BTreeMap<Ipv4Addr, String> = if keep_running_pods {
        snap.routes
            .iter()
            .filter_map(|r| pod_route(r, &snap.links, veths))
            .collect()
    } else {
        BTreeMap::new()
    };
    let keep_reason = |pod: Ipv4Addr| {
        live.get(&pod)
            .map(|dev| format!("pod {pod} still runs behind {dev}"))
    };
    // Branch-ENI pods (security groups for pods, strict mode) are live while their links exist.
    let live_links: BTreeSet<&str> = if keep_running_pods {
        snap.links.values().map(String::as_str).collect()
    } else {
        BTreeSet::new()
    };

    let mut out = Plan::default();
    // Tables that a rule staying behind still looks up.
    let mut tables_in_use: BTreeSet<u32> = BTreeSet::new();
    let mut aws_tables: BTreeSet<u32> = BTreeSet::new();
    for msg in &snap.rules {
        let Some(kind) = ip_rules::classify(msg, veths) else {
            tables_in_use.insert(ip_rules::table_of(msg));
            continue;
        };
        let reason = match &kind {
            AwsRule::BranchEniIif { iif, .. } => live_links
                .contains(iif.as_str())
                .then(|| format!("branch-ENI pod link {iif} still exists")),
            k => k.pod().and_then(keep_reason),
        };
        let decision = match reason {
            Some(reason) => Decision::Keep(reason),
            None => Decision::Remove,
        };
        if let Some(table) = kind.eni_table() {
            match decision {
                Decision::Remove => aws_tables.insert(table),
                Decision::Keep(_) => tables_in_use.insert(table),
            };
        }
        out.rules.push(PlannedRule {
            msg: msg.clone(),
            kind,
            decision,
        });
    }

    for msg in &snap.routes {
        if msg.header.address_family != AddressFamily::Inet {
            continue;
        }
        let table = route_table(msg);
        if aws_tables.contains(&table) && !RESERVED_TABLES.contains(&table) {
            let decision = if tables_in_use.contains(&table) {
                Decision::Keep(format!(
                    "table {table} is still looked up by a rule that stays"
                ))
            } else {
                Decision::Remove
            };
            out.routes.push(PlannedRoute {
                msg: msg.clone(),
                decision,
            });
        } else if let Some((pod, _)) = pod_route(msg, &snap.links, veths) {
            let decision = match keep_reason(pod) {
                Some(reason) => Decision::Keep(reason),
                None => Decision::Remove,
            };
            out.routes.push(PlannedRoute {
                msg: msg.clone(),
                decision,
            });
        }
    }
    out
}

fn gone_already(e: &rtnetlink::Error) -> bool {
    netlink::is_errno(e, netlink::ENOENT) || netlink::is_errno(e, netlink::ESRCH)
}

/// Deletes one rule; one already gone counts as deleted.
pub async fn delete_rule(handle: &Handle, msg: &RuleMessage) -> Result<(), NetlinkError> {
    match handle.rule().del(msg.clone()).execute().await {
        Err(e) if !gone_already(&e) => Err(NetlinkError::Delete(e)),
        _ => Ok(()),
    }
}

/// Deletes one route; one already gone counts as deleted.
pub async fn delete_route(handle: &Handle, msg: &RouteMessage) -> Result<(), NetlinkError> {
    match handle.route().del(msg.clone()).execute().await {
        Err(e) if !gone_already(&e) => Err(NetlinkError::Delete(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::ip_rules::tests::rule;

    fn route(
        table: u32,
        dst: Option<(Ipv4Addr, u8)>,
        gw: Option<Ipv4Addr>,
        oif: u32,
        scope: RouteScope,
    ) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = u8::try_from(table).unwrap_or(252);
        m.header.kind = RouteType::Unicast;
        m.header.scope = scope;
        m.attributes.push(RouteAttribute::Table(table));
        if let Some((ip, len)) = dst {
            m.header.destination_prefix_length = len;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        }
        if let Some(g) = gw {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(g)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        m
    }

    const LIVE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const STALE: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 20);
    const GW2: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);

    fn node() -> Snapshot {
        let links = HashMap::from([
            (1, "lo".to_string()),
            (2, "eth0".to_string()),
            (3, "eth1".to_string()),
            (4, "eni0a1b2c3d4e5".to_string()),
        ]);
        let rules = vec![
            rule(0, 255, None, None, None),
            rule(512, 254, None, Some((LIVE, 32)), None),
            rule(512, 254, None, Some((STALE, 32)), None),
            rule(1024, 254, None, None, Some((0x80, 0x80))),
            rule(1536, 2, Some((LIVE, 32)), None, None),
            rule(1536, 3, Some((STALE, 32)), None, None),
            // Someone else's rule into table 100.
            rule(2000, 100, Some((Ipv4Addr::new(10, 0, 0, 0), 8)), None, None),
            rule(32766, 254, None, None, None),
        ];
        let routes = vec![
            route(
                254,
                None,
                Some(Ipv4Addr::new(192, 168, 0, 1)),
                2,
                RouteScope::Universe,
            ),
            route(254, Some((LIVE, 32)), None, 4, RouteScope::Link),
            route(2, None, Some(GW2), 3, RouteScope::Universe),
            route(2, Some((GW2, 32)), None, 3, RouteScope::Link),
            route(3, None, Some(GW2), 3, RouteScope::Universe),
            route(100, None, Some(GW2), 3, RouteScope::Universe),
        ];
        Snapshot {
            rules,
            routes,
            links,
        }
    }

    fn removed(p: &Plan) -> (Vec<String>, Vec<String>) {
        let snap = node();
        (
            p.rules
                .iter()
                .filter(|r| r.decision == Decision::Remove)
                .map(|r| ip_rules::Described(&r.msg).to_string())
                .collect(),
            p.routes
                .iter()
                .filter(|r| r.decision == Decision::Remove)
                .map(|r| DescribedRoute(&r.msg, &snap.links).to_string())
                .collect(),
        )
    }

    #[test]
    fn everything_of_aws_node_goes_without_keep() {
        let p = plan(&node(), false, &VethNames::default());
        let (rules, routes) = removed(&p);
        assert_eq!(
            rules,
            [
                "512: from all to 192.168.1.10/32 lookup main",
                "512: from all to 192.168.2.20/32 lookup main",
                "1024: from all fwmark 0x80/0x80 lookup main",
                "1536: from 192.168.1.10/32 lookup 2",
                "1536: from 192.168.2.20/32 lookup 3",
            ]
        );
        assert_eq!(
            routes,
            [
                "192.168.1.10 dev eni0a1b2c3d4e5 scope link",
                "default via 192.168.2.1 dev eth1 table 2",
                "192.168.2.1 dev eth1 table 2 scope link",
                "default via 192.168.2.1 dev eth1 table 3",
            ]
        );
        assert!(p.rules.iter().all(|r| r.decision == Decision::Remove));
    }

    #[test]
    fn running_pods_keep_their_rules_route_and_table() {
        let p = plan(&node(), true, &VethNames::default());
        let (rules, routes) = removed(&p);
        assert_eq!(
            rules,
            [
                "512: from all to 192.168.2.20/32 lookup main",
                "1024: from all fwmark 0x80/0x80 lookup main",
                "1536: from 192.168.2.20/32 lookup 3",
            ]
        );
        assert_eq!(routes, ["default via 192.168.2.1 dev eth1 table 3"]);
        let kept: Vec<&PlannedRoute> = p
            .routes
            .iter()
            .filter(|r| r.decision != Decision::Remove)
            .collect();
        assert_eq!(kept.len(), 1, "the live pod's main route is listed as kept");
    }

    #[test]
    fn a_table_someone_else_uses_is_not_emptied() {
        let mut snap = node();
        snap.rules.push(rule(
            3000,
            3,
            Some((Ipv4Addr::new(172, 16, 0, 0), 12)),
            None,
            None,
        ));
        let p = plan(&snap, false, &VethNames::default());
        let (_, routes) = removed(&p);
        assert!(!routes.iter().any(|r| r.contains("table 3")), "{routes:?}");
    }
}
