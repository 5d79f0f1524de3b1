//! Frees what ended instances held (cgroups, addresses, their nftables pins) on a
//! thread of its own, so that the reconciler starts a replacement first: the
//! release costs an nftables transaction, and a heal should not wait for it.
//!
//! A daemon killed with releases pending leaves the instances' state behind;
//! the next daemon's start sweeps it (`Runtime::cleanup_stale`).

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};

use crate::backend::Handle;

pub struct Releaser {
    /// `None` if the thread could not be made: then releases happen inline.
    queue: Option<Sender<Box<dyn Handle>>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
}

impl Releaser {
    pub fn start() -> Releaser {
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let (tx, rx) = channel::<Box<dyn Handle>>();
        let p = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("juice-release".into())
            .spawn(move || {
                for mut handle in rx {
                    handle.release();
                    drop(handle);
                    let (count, done) = &*p;
                    let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
                    *n = n.saturating_sub(1);
                    done.notify_all();
                }
            });
        Releaser {
            queue: spawned.ok().map(|_| tx),
            pending,
        }
    }

    /// Frees what `handle` held, soon; `handle` must have ended (`reap`).
    pub fn release(&self, mut handle: Box<dyn Handle>) {
        let (count, _) = &*self.pending;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let Some(queue) = &self.queue else {
            handle.release();
            self.done_one();
            return;
        };
        if let Err(returned) = queue.send(handle) {
            // The thread is gone (it panicked): release here.
            let mut handle = returned.0;
            handle.release();
            self.done_one();
        }
    }

    fn done_one(&self) {
        let (count, done) = &*self.pending;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        done.notify_all();
    }

    /// Waits until every release asked for so far is done.
    pub fn settle(&self) {
        let (count, done) = &*self.pending;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = done.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Ended(Arc<AtomicUsize>);
    impl Handle for Ended {
        fn pid(&self) -> i32 {
            0
        }
        fn wait_fd(&self) -> std::os::fd::RawFd {
            -1
        }
        fn is_running(&self) -> bool {
            false
        }
        fn wait(&mut self) -> juice_sandbox::ExitReport {
            juice_sandbox::ExitReport {
                code: Some(0),
                signal: None,
                oom_killed: false,
            }
        }
        fn wait_timeout(&mut self, _: std::time::Duration) -> Option<juice_sandbox::ExitReport> {
            Some(self.wait())
        }
        fn stop(&mut self, _: std::time::Duration) -> juice_sandbox::ExitReport {
            self.wait()
        }
        fn address(&self) -> Option<std::net::Ipv4Addr> {
            None
        }
        fn started_unix_ms(&self) -> u64 {
            0
        }
        fn release(&mut self) {
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn settle_waits_for_every_release_asked_for() {
        let released = Arc::new(AtomicUsize::new(0));
        let r = Releaser::start();
        for _ in 0..10 {
            r.release(Box::new(Ended(released.clone())));
        }
        r.settle();
        assert_eq!(released.load(Ordering::SeqCst), 10);
    }
}
