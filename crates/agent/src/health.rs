//! Health checks from the host into an instance: a TCP connect, or an HTTP GET
//! that must answer 2xx. There is no shell in an appliance to exec a check in.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use juice_image::manifest::{HealthCheck, Probe};

/// What the prober has seen so far.
#[derive(Debug, Clone)]
pub struct Health {
    pub healthy: bool,
    /// Since when the instance has been healthy without a break.
    pub healthy_since: Option<Instant>,
    pub ever_healthy: bool,
    /// Consecutive failed probes past the start period.
    pub failures: u32,
    /// The check has failed `retries` times in a row.
    pub failed: bool,
    pub last_error: Option<String>,
}

impl Health {
    fn new() -> Health {
        Health {
            healthy: false,
            healthy_since: None,
            ever_healthy: false,
            failures: 0,
            failed: false,
            last_error: None,
        }
    }

    /// An instance without a check is healthy from the start.
    pub fn assumed(now: Instant) -> Health {
        Health {
            healthy: true,
            healthy_since: Some(now),
            ever_healthy: true,
            ..Health::new()
        }
    }

    /// Healthy for at least `gate`, without a break.
    pub fn passed_gate(&self, gate: Duration) -> bool {
        self.healthy && self.healthy_since.is_some_and(|t| t.elapsed() >= gate)
    }
}

/// Probes in a thread until dropped.
pub struct Prober {
    pub health: Arc<Mutex<Health>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Prober {
    /// Probes `address` with `check`; `changed` is called on every health transition.
    pub fn start(
        check: Option<HealthCheck>,
        address: Option<Ipv4Addr>,
        changed: Arc<dyn Fn() + Send + Sync>,
        durations: prometheus_client::metrics::histogram::Histogram,
    ) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let (Some(check), Some(address)) = (check, address) else {
            return Prober {
                health: Arc::new(Mutex::new(Health::assumed(Instant::now()))),
                stop,
            };
        };
        let health = Arc::new(Mutex::new(Health::new()));
        let (h, s) = (health.clone(), stop.clone());
        std::thread::spawn(move || run(check, address, &h, &s, &*changed, &durations));
        Prober { health, stop }
    }

    pub fn snapshot(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn run(
    check: HealthCheck,
    address: Ipv4Addr,
    health: &Mutex<Health>,
    stop: &AtomicBool,
    changed: &(dyn Fn() + Send + Sync),
    durations: &prometheus_client::metrics::histogram::Histogram,
) {
    let started = Instant::now();
    // The first probe soon after start, then every interval.
    let mut wait = Duration::from_millis(50);
    loop {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(
                Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
        wait = check.interval;
        let t = Instant::now();
        let result = probe(&check.probe, address, check.timeout);
        durations.observe(t.elapsed().as_secs_f64());
        let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
        let (was_healthy, was_failed) = (h.healthy, h.failed);
        match result {
            Ok(()) => {
                if !h.healthy {
                    h.healthy_since = Some(Instant::now());
                }
                h.healthy = true;
                h.ever_healthy = true;
                h.failures = 0;
                h.last_error = None;
            }
            Err(e) => {
                h.last_error = Some(e);
                h.healthy = false;
                h.healthy_since = None;
                // Failures in the start period do not count; before the first success they
                // count only once the start period is over.
                if started.elapsed() >= check.start_period {
                    h.failures += 1;
                    if h.failures >= check.retries {
                        h.failed = true;
                    }
                }
            }
        }
        let transition = h.healthy != was_healthy || h.failed != was_failed;
        drop(h);
        if transition {
            changed();
        }
    }
}

/// One probe.
pub fn probe(probe: &Probe, address: Ipv4Addr, timeout: Duration) -> Result<(), String> {
    let port = match probe {
        Probe::Http { port, .. } | Probe::Tcp { port } => port.get(),
    };
    let addr = SocketAddr::from((address, port));
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let Probe::Http { path, .. } = probe else {
        return Ok(());
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // One write: a server that reads once and answers must see the whole request.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nUser-Agent: juice-health\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    let started = Instant::now();
    while n < 12 && started.elapsed() < timeout {
        match stream.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("GET {path}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if line.starts_with("HTTP/1.") && status.starts_with('2') {
        Ok(())
    } else {
        Err(format!(
            "GET {path}: answered {:?}",
            line.lines().next().unwrap_or("nothing")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn server(answer: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer.as_bytes());
            }
        });
        port
    }

    fn http(port: u16) -> Probe {
        Probe::Http {
            path: "/healthz".into(),
            port: port.try_into().unwrap(),
        }
    }

    #[test]
    fn http_needs_a_2xx() {
        let ok = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let t = Duration::from_secs(1);
        assert!(probe(&http(ok), Ipv4Addr::LOCALHOST, t).is_ok());
        let e = probe(&http(bad), Ipv4Addr::LOCALHOST, t).unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(
            probe(
                &Probe::Tcp {
                    port: closed.try_into().unwrap()
                },
                Ipv4Addr::LOCALHOST,
                t
            )
            .is_err()
        );
        assert!(
            probe(
                &Probe::Tcp {
                    port: ok.try_into().unwrap()
                },
                Ipv4Addr::LOCALHOST,
                t
            )
            .is_ok()
        );
    }
}
