//! A blocking rtnetlink socket: the plugin makes a handful of requests and exits, so it needs
//! neither an async runtime nor a background task, only send and receive.
//!
//! Requests can be batched: several messages go to the kernel in one `send`, which processes them
//! in order and acknowledges each (every request carries `NLM_F_ACK`), so a step that needs three
//! changes costs one system call and one wait. [`Netlink::send`] and [`Netlink::collect`] are
//! separate so that requests on two sockets (the node's and the pod's) are in flight together.

use std::io;
use std::num::NonZeroI32;

use nix::errno::Errno;
use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{constants::NETLINK_ROUTE, Socket};

/// A failed request: the kernel's errno, or trouble with the socket itself.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("{}", Errno::from_raw(*.0))]
    Kernel(i32),
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("cannot decode the kernel's answer: {0}")]
    Decode(String),
}

impl NlError {
    pub fn is(&self, errno: Errno) -> bool {
        matches!(self, NlError::Kernel(e) if *e == errno as i32)
    }
}

/// What a request is: its flags follow from it.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Create; fails with EEXIST if the object is there.
    Create,
    /// Change or delete an existing object (also RTM_NEWLINK on a bridge port).
    Change,
    /// Read one object.
    Get,
    /// Read all objects of a kind.
    Dump,
}

impl Kind {
    fn flags(self) -> u16 {
        NLM_F_REQUEST
            | NLM_F_ACK
            | match self {
                Kind::Create => NLM_F_CREATE | NLM_F_EXCL,
                Kind::Change | Kind::Get => 0,
                Kind::Dump => NLM_F_DUMP,
            }
    }
}

/// The answer to one request: the messages it returned (none for a change).
pub type Reply = Result<Vec<RouteNetlinkMessage>, NlError>;

/// Requests sent and not yet collected, by sequence number.
pub struct Pending(Vec<u32>);

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// The kernel's dump chunks are at most 32 KiB; a message is never split across reads.
const RECV_BUF: usize = 64 * 1024;

impl Netlink {
    /// A socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Netlink> {
        // No bind or connect: the kernel binds the socket at its first send, and an unconnected
        // netlink socket sends to the kernel (port 0). Three system calls a socket saved.
        let socket = Socket::new(NETLINK_ROUTE)?;
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `requests` in one system call.
    pub fn send(&mut self, requests: Vec<(RouteNetlinkMessage, Kind)>) -> Result<Pending, NlError> {
        let mut out = Vec::new();
        let mut seqs = Vec::with_capacity(requests.len());
        for (inner, kind) in requests {
            self.seq = self.seq.wrapping_add(1);
            let mut msg = NetlinkMessage::from(inner);
            msg.header.flags = kind.flags();
            msg.header.sequence_number = self.seq;
            msg.finalize();
            let start = out.len();
            // Each message starts 4-byte aligned (NLMSG_ALIGN).
            out.resize(start + msg.buffer_len().next_multiple_of(4), 0);
            msg.serialize(&mut out[start..]);
            seqs.push(self.seq);
        }
        self.socket.send(&out, 0)?;
        Ok(Pending(seqs))
    }

    /// Waits for the answers to `pending`, in the order the requests were sent. A request is
    /// answered by its acknowledgement (errno 0 or the error) or, for a dump, by NLMSG_DONE.
    pub fn collect(&mut self, pending: Pending) -> Result<Vec<Reply>, NlError> {
        let seqs = pending.0;
        let mut replies: Vec<Option<Reply>> = seqs.iter().map(|_| None).collect();
        let mut data: Vec<Vec<RouteNetlinkMessage>> = seqs.iter().map(|_| Vec::new()).collect();
        // A dump the kernel marks interrupted (the objects changed while it was made) may miss
        // some: answered EINTR, so that nobody takes a missing link for a gone one.
        let mut interrupted = vec![false; seqs.len()];
        // Each read brings at least one message, and every request ends with one: bounded by the
        // kernel's answers, never by time.
        while replies.iter().any(Option::is_none) {
            self.buf.clear();
            // MSG_TRUNC: the datagram's real size, so a cut answer is an error, not garbage.
            let n = self.socket.recv(&mut self.buf, nix::libc::MSG_TRUNC)?;
            if n > self.buf.len() {
                return Err(NlError::Decode(format!(
                    "a {n}-byte answer does not fit the {RECV_BUF}-byte buffer"
                )));
            }
            let mut off = 0;
            while off < self.buf.len() {
                // Checked: 16 <= len <= what is left, so the loop always advances.
                let len = NetlinkBuffer::new_checked(&self.buf[off..])
                    .map_err(|e| NlError::Decode(e.to_string()))?
                    .length() as usize;
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..off + len])
                        .map_err(|e| NlError::Decode(e.to_string()))?;
                off += len.next_multiple_of(4);
                let Some(i) = seqs.iter().position(|s| *s == msg.header.sequence_number) else {
                    continue; // an answer to nothing we wait for
                };
                if replies[i].is_some() {
                    continue;
                }
                interrupted[i] |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => data[i].push(m),
                    NetlinkPayload::Error(e) => {
                        replies[i] = Some(match e.code.map(NonZeroI32::get) {
                            None => Ok(std::mem::take(&mut data[i])),
                            Some(code) => Err(NlError::Kernel(-code)),
                        });
                    }
                    NetlinkPayload::Done(_) if interrupted[i] => {
                        replies[i] = Some(Err(NlError::Kernel(Errno::EINTR as i32)))
                    }
                    NetlinkPayload::Done(_) => replies[i] = Some(Ok(std::mem::take(&mut data[i]))),
                    _ => {}
                }
            }
        }
        Ok(replies.into_iter().flatten().collect())
    }

    /// One request, answered.
    pub fn request(&mut self, msg: RouteNetlinkMessage, kind: Kind) -> Reply {
        let pending = self.send(vec![(msg, kind)])?;
        self.collect_one(pending)
    }

    /// The answer to a single request sent with [`Netlink::send`]; trouble with the socket
    /// counts as the request's failure.
    pub fn collect_one(&mut self, pending: Pending) -> Reply {
        let [reply] = answers(self.collect(pending)?)?;
        reply
    }

    /// Several requests in one send, answered in order.
    pub fn batch(
        &mut self,
        requests: Vec<(RouteNetlinkMessage, Kind)>,
    ) -> Result<Vec<Reply>, NlError> {
        let pending = self.send(requests)?;
        self.collect(pending)
    }

    /// `N` requests in one send, answered in order.
    pub fn batch_of<const N: usize>(
        &mut self,
        requests: [(RouteNetlinkMessage, Kind); N],
    ) -> Result<[Reply; N], NlError> {
        let pending = self.send(requests.into())?;
        answers(self.collect(pending)?)
    }
}

/// The replies to `N` requests as an array (collect returns one per request).
pub fn answers<const N: usize>(replies: Vec<Reply>) -> Result<[Reply; N], NlError> {
    replies
        .try_into()
        .map_err(|r: Vec<Reply>| NlError::Decode(format!("{} answers to {N} requests", r.len())))
}
