//! Just enough HTTP/1.1 to read the local daemon's `/status` (`overlayd status`), with a deadline:
//! one GET, `Connection: close`, the body read to the end.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("nothing answers on {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {secs} s")]
    Timeout { addr: SocketAddr, secs: u64 },
    #[error("{addr}: {detail}")]
    Bad { addr: SocketAddr, detail: String },
}

/// Where to reach a server listening on `addr`: a wildcard listen address means loopback.
pub fn local_target(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

/// GET `path` from `addr`: the status code and the body.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), HttpError> {
    match tokio::time::timeout(timeout, get_inner(addr, path)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout {
            addr,
            secs: timeout.as_secs(),
        }),
    }
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect { addr, source })?;
    let bad = |detail: String| HttpError::Bad { addr, detail };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| bad(format!("cannot send the request: {e}")))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .await
        .map_err(|e| bad(format!("cannot read the answer: {e}")))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("the answer is not HTTP".into()))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("the answer has no status code".into()))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(bad("chunked answers are not supported".into()));
    }
    Ok((code, body.to_string()))
}
