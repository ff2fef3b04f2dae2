//! Which IPv4 policy-routing rules are aws-node's, recognised by their exact shape (priority, selector
//! and table together) so that nobody else's rule at the same priority is mistaken for one:
//!
//! - 512  `from all to <podIP>/32 lookup main`               (per pod)
//! - 1024 `from all fwmark <m>/<m> lookup main`               (NodePort return traffic; m = 0x80 by default)
//! - 1024 `not from all to <VPC CIDR> lookup main`             (releases before 1.3)
//! - 1535 `from all to <cidr> lookup main`                    (AWS_EXTERNAL_SERVICE_CIDRS)
//! - 1536 `from <podIP>/32 [iif eni…] lookup <ENI table>`      (per pod on a secondary ENI)
//! - 10   `from all iif vlan.eth.<id> lookup <100+id>` and `from all iif eni… lookup <100+id>`
//!   (security groups for pods, strict mode: per branch-ENI pod)

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::route::RouteHeader;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::packet_route::AddressFamily;

use super::pod_veth::VethNames;

pub const TO_POD_PRIORITY: u32 = 512;
pub const NODEPORT_MARK_PRIORITY: u32 = 1024;
pub const EXTERNAL_SERVICE_PRIORITY: u32 = 1535;
pub const FROM_POD_PRIORITY: u32 = 1536;
pub const BRANCH_ENI_PRIORITY: u32 = 10;
/// aws-node's name for a branch ENI's VLAN link: `vlan.eth.<id>`.
const BRANCH_VLAN_PREFIX: &str = "vlan.eth.";

const TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;
const TABLE_DEFAULT: u32 = 253;
const TABLE_LOCAL: u32 = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsRule {
    ToPod {
        pod: Ipv4Addr,
    },
    NodePortMark {
        mark: u32,
        mask: u32,
    },
    /// Releases before 1.3: everything not bound for the VPC looks up main.
    NotToVpc {
        cidr: Ipv4Addr,
        len: u8,
    },
    ExternalService {
        cidr: Ipv4Addr,
        len: u8,
    },
    FromPod {
        pod: Ipv4Addr,
        table: u32,
    },
    /// Security groups for pods (strict mode): traffic in from a branch ENI's VLAN or from the
    /// pod's veth looks up the branch ENI's table.
    BranchEniIif {
        iif: String,
        table: u32,
    },
}

impl AwsRule {
    /// The pod this rule belongs to, for per-pod rules.
    pub fn pod(&self) -> Option<Ipv4Addr> {
        match *self {
            AwsRule::ToPod { pod } | AwsRule::FromPod { pod, .. } => Some(pod),
            AwsRule::NodePortMark { .. }
            | AwsRule::NotToVpc { .. }
            | AwsRule::ExternalService { .. }
            | AwsRule::BranchEniIif { .. } => None,
        }
    }

    /// The per-ENI table this rule sends traffic to, for rules that use one.
    pub fn eni_table(&self) -> Option<u32> {
        match *self {
            AwsRule::FromPod { table, .. } | AwsRule::BranchEniIif { table, .. } => Some(table),
            _ => None,
        }
    }
}

/// Everything a rule selects on, flattened.
#[derive(Debug, Default)]
struct Selectors {
    priority: Option<u32>,
    table: u32,
    src: Option<Ipv4Addr>,
    dst: Option<Ipv4Addr>,
    iif: Option<String>,
    invert: bool,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
    /// Anything else that narrows or redirects the rule (oif, ports, uid range, goto, …).
    other: bool,
}

fn selectors(msg: &RuleMessage) -> Selectors {
    let mut s = Selectors {
        table: u32::from(msg.header.table),
        invert: msg.header.flags.contains(RuleFlags::Invert),
        other: msg.header.tos != 0,
        ..Selectors::default()
    };
    for a in &msg.attributes {
        match a {
            RuleAttribute::Priority(p) => s.priority = Some(*p),
            RuleAttribute::Table(t) => s.table = *t,
            RuleAttribute::Source(IpAddr::V4(ip)) => s.src = Some(*ip),
            RuleAttribute::Destination(IpAddr::V4(ip)) => s.dst = Some(*ip),
            RuleAttribute::Iifname(n) => s.iif = Some(n.clone()),
            RuleAttribute::FwMark(m) => s.fwmark = Some(*m),
            RuleAttribute::FwMask(m) => s.fwmask = Some(*m),
            // Carried by every rule the kernel reports; not a selector.
            RuleAttribute::Protocol(_) => {}
            // "not set" (-1) values, should a kernel report them.
            RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v)
                if *v == u32::MAX => {}
            _ => s.other = true,
        }
    }
    s
}

/// The table a rule looks up (the attribute wins over the 8-bit header field).
pub fn table_of(msg: &RuleMessage) -> u32 {
    selectors(msg).table
}

/// aws-node's rule kind, or `None` when the rule is anyone else's.
pub fn classify(msg: &RuleMessage, veths: &VethNames) -> Option<AwsRule> {
    if msg.header.family != AddressFamily::Inet || msg.header.action != RuleAction::ToTable {
        return None;
    }
    let s = selectors(msg);
    if s.other {
        return None;
    }
    let (src_len, dst_len) = (msg.header.src_len, msg.header.dst_len);
    let no_mark = s.fwmark.unwrap_or(0) == 0;
    if s.invert {
        // The one inverted rule aws-node ever wrote.
        let shape = s.priority == Some(NODEPORT_MARK_PRIORITY)
            && s.table == TABLE_MAIN
            && dst_len > 0
            && src_len == 0
            && s.iif.is_none()
            && no_mark;
        return shape.then_some(AwsRule::NotToVpc {
            cidr: s.dst?,
            len: dst_len,
        });
    }
    match s.priority? {
        TO_POD_PRIORITY
            if s.table == TABLE_MAIN
                && dst_len == 32
                && src_len == 0
                && s.iif.is_none()
                && no_mark =>
        {
            Some(AwsRule::ToPod { pod: s.dst? })
        }
        NODEPORT_MARK_PRIORITY
            if s.table == TABLE_MAIN && dst_len == 0 && src_len == 0 && s.iif.is_none() =>
        {
            let mark = s.fwmark.filter(|m| *m != 0)?;
            let mask = s.fwmask.unwrap_or(u32::MAX);
            (mark == mask).then_some(AwsRule::NodePortMark { mark, mask })
        }
        EXTERNAL_SERVICE_PRIORITY
            if s.table == TABLE_MAIN
                && dst_len > 0
                && src_len == 0
                && s.iif.is_none()
                && no_mark =>
        {
            Some(AwsRule::ExternalService {
                cidr: s.dst?,
                len: dst_len,
            })
        }
        FROM_POD_PRIORITY
            if !matches!(s.table, 0 | TABLE_MAIN | TABLE_DEFAULT | TABLE_LOCAL)
                && src_len == 32
                && dst_len == 0
                && no_mark
                && s.iif.as_deref().is_none_or(|i| veths.is_pod_veth(i)) =>
        {
            Some(AwsRule::FromPod {
                pod: s.src?,
                table: s.table,
            })
        }
        BRANCH_ENI_PRIORITY
            if !matches!(s.table, 0 | TABLE_MAIN | TABLE_DEFAULT | TABLE_LOCAL)
                && src_len == 0
                && dst_len == 0
                && no_mark =>
        {
            let iif = s.iif?;
            (iif.starts_with(BRANCH_VLAN_PREFIX) || veths.is_pod_veth(&iif)).then_some(
                AwsRule::BranchEniIif {
                    iif,
                    table: s.table,
                },
            )
        }
        _ => None,
    }
}

fn table_name(t: u32) -> String {
    match t {
        TABLE_MAIN => "main".to_string(),
        TABLE_DEFAULT => "default".to_string(),
        TABLE_LOCAL => "local".to_string(),
        t => t.to_string(),
    }
}

/// A rule written the way `ip rule` prints it.
pub struct Described<'a>(pub &'a RuleMessage);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = self.0;
        let s = selectors(msg);
        write!(f, "{}:", s.priority.unwrap_or(0))?;
        if msg.header.flags.contains(RuleFlags::Invert) {
            f.write_str(" not")?;
        }
        match s.src {
            Some(ip) => write!(f, " from {ip}/{}", msg.header.src_len)?,
            None => f.write_str(" from all")?,
        }
        if let Some(ip) = s.dst {
            write!(f, " to {ip}/{}", msg.header.dst_len)?;
        }
        if let Some(m) = s.fwmark {
            match s.fwmask {
                Some(k) if k != u32::MAX => write!(f, " fwmark {m:#x}/{k:#x}")?,
                _ => write!(f, " fwmark {m:#x}")?,
            }
        }
        if let Some(i) = &s.iif {
            write!(f, " iif {i}")?;
        }
        match msg.header.action {
            RuleAction::ToTable => write!(f, " lookup {}", table_name(s.table)),
            ref a => write!(f, " {a:?}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn classify_default(m: &RuleMessage) -> Option<AwsRule> {
        classify(m, &VethNames::default())
    }

    pub(crate) fn rule(
        priority: u32,
        table: u32,
        src: Option<(Ipv4Addr, u8)>,
        dst: Option<(Ipv4Addr, u8)>,
        fwmark: Option<(u32, u32)>,
    ) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = RuleAction::ToTable;
        m.header.table = u8::try_from(table).unwrap_or(0);
        m.attributes.push(RuleAttribute::Priority(priority));
        m.attributes.push(RuleAttribute::Table(table));
        if let Some((ip, len)) = src {
            m.header.src_len = len;
            m.attributes.push(RuleAttribute::Source(IpAddr::V4(ip)));
        }
        if let Some((ip, len)) = dst {
            m.header.dst_len = len;
            m.attributes
                .push(RuleAttribute::Destination(IpAddr::V4(ip)));
        }
        if let Some((mark, mask)) = fwmark {
            m.attributes.push(RuleAttribute::FwMark(mark));
            m.attributes.push(RuleAttribute::FwMask(mask));
        }
        m
    }

    const POD: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

    #[test]
    fn recognises_aws_node_rules() {
        assert_eq!(
            classify_default(&rule(512, 254, None, Some((POD, 32)), None)),
            Some(AwsRule::ToPod { pod: POD })
        );
        assert_eq!(
            classify_default(&rule(1024, 254, None, None, Some((0x80, 0x80)))),
            Some(AwsRule::NodePortMark {
                mark: 0x80,
                mask: 0x80
            })
        );
        assert_eq!(
            classify_default(&rule(
                1535,
                254,
                None,
                Some((Ipv4Addr::new(10, 50, 0, 0), 16)),
                None
            )),
            Some(AwsRule::ExternalService {
                cidr: Ipv4Addr::new(10, 50, 0, 0),
                len: 16
            })
        );
        assert_eq!(
            classify_default(&rule(1536, 2, Some((POD, 32)), None, None)),
            Some(AwsRule::FromPod { pod: POD, table: 2 })
        );
        let mut vlan = rule(10, 107, None, None, None);
        vlan.attributes
            .push(RuleAttribute::Iifname("vlan.eth.7".into()));
        assert_eq!(
            classify_default(&vlan),
            Some(AwsRule::BranchEniIif {
                iif: "vlan.eth.7".into(),
                table: 107
            })
        );
        assert_eq!(
            Described(&vlan).to_string(),
            "10: from all iif vlan.eth.7 lookup 107"
        );
        let mut someone = rule(10, 107, None, None, None);
        someone
            .attributes
            .push(RuleAttribute::Iifname("wg0".into()));
        assert_eq!(
            classify_default(&someone),
            None,
            "priority 10 from another interface"
        );
        let mut old = rule(
            1024,
            254,
            None,
            Some((Ipv4Addr::new(192, 168, 0, 0), 16)),
            None,
        );
        old.header.flags = RuleFlags::Invert;
        assert_eq!(
            classify_default(&old),
            Some(AwsRule::NotToVpc {
                cidr: Ipv4Addr::new(192, 168, 0, 0),
                len: 16
            })
        );
        assert_eq!(
            Described(&old).to_string(),
            "1024: not from all to 192.168.0.0/16 lookup main"
        );
    }

    #[test]
    fn leaves_look_alikes_alone() {
        // Same priorities, other shapes.
        assert_eq!(
            classify_default(&rule(512, 100, None, Some((POD, 32)), None)),
            None
        );
        assert_eq!(
            classify_default(&rule(512, 254, None, Some((POD, 24)), None)),
            None
        );
        assert_eq!(
            classify_default(&rule(1024, 254, None, None, Some((0x4000, 0xc000)))),
            None
        );
        assert_eq!(classify_default(&rule(1024, 254, None, None, None)), None);
        assert_eq!(
            classify_default(&rule(1536, 254, Some((POD, 32)), None, None)),
            None
        );
        assert_eq!(
            classify_default(&rule(1536, 2, Some((POD, 24)), None, None)),
            None
        );
        // Other priorities.
        assert_eq!(
            classify_default(&rule(100, 254, None, Some((POD, 32)), None)),
            None
        );
        assert_eq!(classify_default(&rule(32766, 254, None, None, None)), None);
        // An inverted rule that is not the pre-1.3 VPC rule.
        let mut inv = rule(512, 254, None, Some((POD, 32)), None);
        inv.header.flags = RuleFlags::Invert;
        assert_eq!(classify_default(&inv), None);
        let mut inv = rule(
            1024,
            100,
            None,
            Some((Ipv4Addr::new(10, 0, 0, 0), 16)),
            None,
        );
        inv.header.flags = RuleFlags::Invert;
        assert_eq!(classify_default(&inv), None);
        // A rule with an extra selector (uid range, ports, …).
        let mut extra = rule(1536, 2, Some((POD, 32)), None, None);
        extra.attributes.push(RuleAttribute::Oifname("eth0".into()));
        assert_eq!(classify_default(&extra), None);
    }

    #[test]
    fn describes_like_ip_rule() {
        assert_eq!(
            Described(&rule(512, 254, None, Some((POD, 32)), None)).to_string(),
            "512: from all to 192.168.1.10/32 lookup main"
        );
        assert_eq!(
            Described(&rule(1024, 254, None, None, Some((0x80, 0x80)))).to_string(),
            "1024: from all fwmark 0x80/0x80 lookup main"
        );
        assert_eq!(
            Described(&rule(1536, 3, Some((POD, 32)), None, None)).to_string(),
            "1536: from 192.168.1.10/32 lookup 3"
        );
    }
}
