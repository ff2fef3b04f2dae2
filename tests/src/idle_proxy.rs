//! A TCP proxy on loopback that closes every connection idle for longer than a limit, as load
//! balancers in front of etcd do (an NLB's idle timeout, a proxy's stream timeout). Real etcd
//! stays behind it; only the connection is cut, as such a proxy would.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct IdleProxy {
    /// `http://127.0.0.1:<port>`, for `--etcd-endpoints`.
    pub endpoint: String,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicU64>,
}

impl IdleProxy {
    /// Forwards 127.0.0.1:<free port> to `upstream`; a connection with no byte either way for
    /// `idle` is closed both ways.
    pub fn start(upstream: SocketAddr, idle: Duration) -> IdleProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), cut.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (s, c) = (s.clone(), c.clone());
                        std::thread::spawn(move || {
                            if let Ok(server) = TcpStream::connect(upstream) {
                                relay(client, server, idle, &s);
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        IdleProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            stop,
            cut,
        }
    }

    /// Connections closed so far (idle, or ended by either side).
    pub fn closed(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for IdleProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both ways until either side closes, the proxy stops, or nothing moved for `idle`.
fn relay(mut a: TcpStream, mut b: TcpStream, idle: Duration, stop: &AtomicBool) {
    let _ = a.set_nonblocking(true);
    let _ = b.set_nonblocking(true);
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = Instant::now();
    'relay: while !stop.load(Ordering::Relaxed) && last.elapsed() < idle {
        let mut moved = false;
        for forward in [true, false] {
            let (from, to) = if forward {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            match from.read(&mut buf) {
                Ok(0) => break 'relay,
                Ok(n) => {
                    // The other side blocks for this write: a full buffer waits, nothing drops.
                    let _ = to.set_nonblocking(false);
                    if to.write_all(&buf[..n]).is_err() {
                        break 'relay;
                    }
                    let _ = to.set_nonblocking(true);
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => break 'relay,
            }
        }
        if moved {
            last = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}
