//! Small netlink helpers shared by node discovery and the data plane.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

pub const ENOENT: i32 = -2;
pub const ESRCH: i32 = -3;
pub const EEXIST: i32 = -17;
pub const ENODEV: i32 = -19;

/// Whether `e` is the kernel answering with errno `code` (negative, as netlink carries it).
pub fn is_errno(e: &rtnetlink::Error, code: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == code)
}

/// The link called `name`, or `None` if there is none.
pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if is_errno(&e, ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The names of every link of the handle's netns, in one dump. A dump the kernel marks
/// interrupted (links changed while it was made) may miss some, so it is made again, a few times
/// at most; then it is an error, never a short list.
pub async fn link_names(handle: &Handle) -> Result<HashSet<String>, String> {
    for _ in 0..3 {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut answers = handle.clone().request(req).map_err(|e| e.to_string())?;
        let (mut names, mut interrupted) = (HashSet::new(), false);
        while let Some(msg) = answers.next().await {
            interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    for a in l.attributes {
                        if let LinkAttribute::IfName(n) = a {
                            names.insert(n);
                        }
                    }
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(format!("link dump: {e}"));
                }
                _ => {}
            }
        }
        if !interrupted {
            return Ok(names);
        }
    }
    Err("link dump interrupted three times (links changing)".into())
}

pub fn link_mtu(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}
