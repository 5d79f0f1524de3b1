//! Published ports: a TCP forwarder in the process that holds the instance
//! (`juice run`, the daemon), from a host address to the instance's address.
//! Doing it in user space keeps loopback clients working (kernel DNAT of
//! 127.0.0.1 needs `route_localnet`) and needs no rules on the host.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{NetworkError, PortMapping};

/// Forwards while alive; stops listening when dropped.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Publisher {
    /// Listens on every mapping's host address and forwards to `target`.
    pub fn start(ports: &[PortMapping], target: Ipv4Addr) -> Result<Publisher, NetworkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in ports {
            let addr = SocketAddrV4::new(p.host_ip, p.host_port);
            let listener = TcpListener::bind(addr).map_err(|source| NetworkError::Publish {
                addr: addr.to_string(),
                source,
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|source| NetworkError::Publish {
                    addr: addr.to_string(),
                    source,
                })?;
            let to = SocketAddr::V4(SocketAddrV4::new(target, p.port));
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || accept_loop(listener, to, &stop)));
        }
        Ok(Publisher { stop, threads })
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

fn accept_loop(listener: TcpListener, to: SocketAddr, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                std::thread::spawn(move || {
                    let _ = forward(client, to);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
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
