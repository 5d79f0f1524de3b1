//! Health checks from the host into an instance: a TCP connect, or an HTTP GET
//! that must answer 2xx. There is no shell in an appliance to exec a check in.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use juice_image::manifest::{HealthCheck, Probe};

use crate::state::Clock;

pub use juice_runtime::Health;

/// Probes until dropped. Every prober of the process is a task on one thread
/// (`juice-health`), not a thread each: a host with 500 instances has one
/// prober thread, and a probe that waits for its timeout delays no other.
pub struct Prober {
    pub health: Arc<Mutex<Health>>,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The probers' runtime, on a thread of its own, made on first use.
fn probers() -> Result<&'static tokio::runtime::Handle, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Handle, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot make the health probes' runtime: {e}"))?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name("juice-health".into())
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .map_err(|e| format!("cannot start the health probes' thread: {e}"))?;
            Ok(handle)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Prober {
    /// Probes `address` with `check`; `changed` is called on every health transition,
    /// and `clock` tells when it became healthy.
    pub fn start(
        check: Option<HealthCheck>,
        address: Option<Ipv4Addr>,
        changed: Arc<dyn Fn() + Send + Sync>,
        durations: prometheus_client::metrics::histogram::Histogram,
        clock: Clock,
    ) -> Prober {
        let (Some(check), Some(address)) = (check, address) else {
            return Prober {
                health: Arc::new(Mutex::new(Health::assumed(clock()))),
                task: None,
            };
        };
        let health = Arc::new(Mutex::new(Health::starting()));
        let task = match probers() {
            Ok(rt) => {
                let h = health.clone();
                Some(
                    rt.spawn(async move {
                        run(check, address, &h, &*changed, &durations, &clock).await
                    })
                    .abort_handle(),
                )
            }
            Err(e) => {
                // Never healthy, and the reason is shown where health is.
                lock(&health).last_error = Some(e);
                None
            }
        };
        Prober { health, task }
    }

    /// Health the instance reports itself (an in-memory backend's), not probed.
    pub fn reported(health: Arc<Mutex<Health>>) -> Prober {
        Prober { health, task: None }
    }

    pub fn snapshot(&self) -> Health {
        lock(&self.health).clone()
    }
}

fn lock(h: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run(
    check: HealthCheck,
    address: Ipv4Addr,
    health: &Mutex<Health>,
    changed: &(dyn Fn() + Send + Sync),
    durations: &prometheus_client::metrics::histogram::Histogram,
    clock: &Clock,
) {
    let started = Instant::now();
    // The first probe soon after start, then every interval.
    let mut wait = Duration::from_millis(50);
    loop {
        tokio::time::sleep(wait).await;
        wait = check.interval;
        let t = Instant::now();
        let result = probe(&check.probe, address, check.timeout).await;
        durations.observe(t.elapsed().as_secs_f64());
        let mut h = lock(health);
        let (was_healthy, was_failed) = (h.healthy, h.failed);
        match result {
            Ok(()) => {
                if !h.healthy {
                    h.healthy_since_ms = Some(clock());
                }
                h.healthy = true;
                h.ever_healthy = true;
                h.failures = 0;
                h.last_error = None;
            }
            Err(e) => {
                h.last_error = Some(e);
                h.healthy = false;
                h.healthy_since_ms = None;
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

/// One probe, within `timeout` in all.
pub async fn probe(probe: &Probe, address: Ipv4Addr, timeout: Duration) -> Result<(), String> {
    let port = match probe {
        Probe::Http { port, .. } | Probe::Tcp { port } => port.get(),
    };
    let addr = SocketAddr::from((address, port));
    let what = match probe {
        Probe::Http { path, .. } => format!("GET {path}"),
        Probe::Tcp { .. } => format!("connect {addr}"),
    };
    tokio::time::timeout(timeout, probe_once(probe, addr))
        .await
        .map_err(|_| {
            format!(
                "{what}: no answer within {}",
                humantime::format_duration(timeout)
            )
        })?
}

async fn probe_once(probe: &Probe, addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let Probe::Http { path, .. } = probe else {
        return Ok(());
    };
    // One write: a server that reads once and answers must see the whole request.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: juice-health\r\n\r\n",
        addr.ip()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match stream.read(&mut head[n..]).await {
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
    use crate::state::system_clock;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn probe(p: &Probe, a: Ipv4Addr, t: Duration) -> Result<(), String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(super::probe(p, a, t))
    }

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

    #[test]
    fn a_server_that_never_answers_times_out() {
        // Accepts (the kernel does) but never reads or answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // The error is the timeout's own: the probe gave up, it did not hang or fail otherwise.
        let e = probe(&http(port), Ipv4Addr::LOCALHOST, Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("no answer within 200ms"), "{e}");
        drop(l);
    }

    fn histogram() -> prometheus_client::metrics::histogram::Histogram {
        prometheus_client::metrics::histogram::Histogram::new([0.1, 1.0])
    }

    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    #[test]
    fn probers_share_one_thread() {
        let ok = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let check = HealthCheck {
            probe: http(ok),
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(1),
            retries: 3,
            start_period: Duration::ZERO,
        };
        // The probers' thread exists after the first one.
        let first = Prober::start(
            Some(check.clone()),
            Some(Ipv4Addr::LOCALHOST),
            Arc::new(|| {}),
            histogram(),
            system_clock(),
        );
        let before = threads();
        let many: Vec<Prober> = (0..50)
            .map(|_| {
                Prober::start(
                    Some(check.clone()),
                    Some(Ipv4Addr::LOCALHOST),
                    Arc::new(|| {}),
                    histogram(),
                    system_clock(),
                )
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !many.iter().all(|p| p.snapshot().healthy) {
            assert!(
                Instant::now() < deadline,
                "not all 50 probers saw a healthy server"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Other tests of this binary run in threads of their own: allow for them.
        assert!(
            threads() < before + 10,
            "{} threads, {before} before",
            threads()
        );
        drop(many);
        drop(first);
    }
}
