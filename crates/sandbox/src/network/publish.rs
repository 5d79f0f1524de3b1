//! Published ports: a TCP forwarder in the process that holds the instances
//! (`juice run`, the daemon), from a host address to instance addresses.
//! Doing it in user space keeps loopback clients working (kernel DNAT of
//! 127.0.0.1 needs `route_localnet`), needs no rules on the host, and lets the
//! daemon send traffic only to instances that are ready (round robin).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{NetworkError, PortMapping};

/// How long a connection waits for a ready instance before it is closed.
const HOLD: Duration = Duration::from_secs(5);

/// The addresses traffic may go to; the owner updates it as instances become ready or go.
pub type Targets = Arc<RwLock<Vec<Ipv4Addr>>>;

/// Forwards while alive; stops listening when dropped.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    targets: Targets,
}

impl Publisher {
    /// Listens on every mapping's host address and forwards to one fixed `target`.
    pub fn start(ports: &[PortMapping], target: Ipv4Addr) -> Result<Publisher, NetworkError> {
        Publisher::start_to(ports, Arc::new(RwLock::new(vec![target])))
    }

    /// Listens on every mapping's host address and forwards each connection to the
    /// next of `targets`; with no target, a connection is closed at once.
    pub fn start_to(ports: &[PortMapping], targets: Targets) -> Result<Publisher, NetworkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in ports {
            let addr = SocketAddrV4::new(p.host_ip, p.host_port);
            let publish_err = |source| NetworkError::Publish {
                addr: addr.to_string(),
                source,
            };
            let listener = TcpListener::bind(addr).map_err(publish_err)?;
            listener.set_nonblocking(true).map_err(publish_err)?;
            let (stop, targets, port) = (stop.clone(), targets.clone(), p.port);
            threads.push(std::thread::spawn(move || {
                accept_loop(listener, &targets, port, &stop)
            }));
        }
        Ok(Publisher {
            stop,
            threads,
            targets,
        })
    }

    pub fn targets(&self) -> &Targets {
        &self.targets
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connections one published port forwards at once (each costs two threads);
/// past this a new client is closed at once rather than exhausting the daemon.
pub const MAX_FORWARDS: usize = 512;

fn accept_loop(listener: TcpListener, targets: &Targets, port: u16, stop: &AtomicBool) {
    let next = AtomicUsize::new(0);
    let open = std::sync::Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                if open.load(Ordering::Relaxed) >= MAX_FORWARDS {
                    drop(client);
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let open = open.clone();
                let n = next.fetch_add(1, Ordering::Relaxed);
                let targets = targets.clone();
                std::thread::spawn(move || {
                    struct Done(std::sync::Arc<AtomicUsize>);
                    impl Drop for Done {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    let _done = Done(open);
                    // No ready instance yet: hold the client a moment rather than refuse at once.
                    let deadline = std::time::Instant::now() + HOLD;
                    let ip = loop {
                        {
                            let t = targets.read().unwrap_or_else(|e| e.into_inner());
                            if !t.is_empty() {
                                break Some(t[n % t.len()]);
                            }
                        }
                        if std::time::Instant::now() > deadline {
                            break None;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    };
                    if let Some(ip) = ip {
                        let _ = forward(client, SocketAddr::V4(SocketAddrV4::new(ip, port)));
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn forward(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    let (mut c_read, mut s_write) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let _ = io::copy(&mut s_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}
