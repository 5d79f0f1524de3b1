//! Frees what ended instances held (cgroups, addresses, their nftables pins) on a
//! thread of its own, so that the reconciler starts a replacement first: the
//! release costs an nftables transaction, and a heal should not wait for it.
//!
//! A daemon killed with releases pending leaves the instances' state behind;
//! the next daemon's start sweeps it (`Runtime::cleanup_stale`).
//!
//! After each release the directories of ended instances (their logs, for
//! `juice logs`) are pruned to the newest few per group, so that a crash loop
//! does not fill the disk with one directory per try.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};

use crate::backend::Handle;

pub struct Releaser {
    /// `None` if the thread could not be made: then releases happen inline.
    queue: Option<Sender<Box<dyn Handle>>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
}

impl Releaser {
    /// Releases on a thread of its own; prunes ended instances' directories in `home`.
    pub fn start(home: &Path) -> Releaser {
        let home = home.to_owned();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let (tx, rx) = channel::<Box<dyn Handle>>();
        let p = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("juice-release".into())
            .spawn(move || {
                for mut handle in rx {
                    handle.release();
                    drop(handle);
                    prune_ended(&home, KEEP_ENDED);
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

/// How many ended instances of each group keep their directory (and logs).
pub const KEEP_ENDED: usize = 3;

/// Removes the directories of ended instances (no `state.json`) that the agent
/// named (`GROUP-rN-XXXX`), but the newest `keep` of each group.
pub fn prune_ended(home: &Path, keep: usize) {
    for kind in ["instances", "vms"] {
        let Ok(entries) = std::fs::read_dir(home.join(kind)) else {
            continue;
        };
        let mut ended: std::collections::BTreeMap<String, Vec<(std::time::SystemTime, PathBuf)>> =
            Default::default();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(group) = group_of(&name) else {
                continue;
            };
            let path = e.path();
            // symlink_metadata: a directory entry of ours is never followed.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !meta.is_dir() || path.join("state.json").exists() {
                continue;
            }
            let when = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            ended
                .entry(group.to_owned())
                .or_default()
                .push((when, path));
        }
        for mut dirs in ended.into_values() {
            dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
            for (_, d) in dirs.into_iter().skip(keep) {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// `web` for `web-r3-1a2b`; `None` for names the agent does not make.
fn group_of(name: &str) -> Option<&str> {
    let (rest, nonce) = name.rsplit_once('-')?;
    let (group, revision) = rest.rsplit_once("-r")?;
    (nonce.len() == 4
        && nonce.bytes().all(|b| b.is_ascii_hexdigit())
        && !revision.is_empty()
        && revision.bytes().all(|b| b.is_ascii_digit())
        && !group.is_empty())
    .then_some(group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An instance that has ended, whose release takes a moment and is counted.
    struct Ended(Arc<AtomicUsize>, juice_runtime::Process);
    impl Handle for Ended {
        fn process(&self) -> &juice_runtime::Process {
            &self.1
        }
        fn process_mut(&mut self) -> &mut juice_runtime::Process {
            &mut self.1
        }
        fn collect(&mut self, _: Option<nix::sys::wait::WaitStatus>) -> juice_runtime::ExitReport {
            juice_runtime::ExitReport {
                code: Some(0),
                signal: None,
                oom_killed: false,
            }
        }
        fn free(&mut self) {
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn stop(&mut self, _: std::time::Duration) -> juice_runtime::ExitReport {
            self.wait()
        }
        fn address(&self) -> Option<std::net::Ipv4Addr> {
            None
        }
        fn started_unix_ms(&self) -> u64 {
            0
        }
    }

    #[test]
    fn settle_waits_for_every_release_asked_for() {
        let released = Arc::new(AtomicUsize::new(0));
        let home = tempfile::tempdir().unwrap();
        let r = Releaser::start(home.path());
        for _ in 0..10 {
            let fd = juice_runtime::process::dead_pidfd().unwrap();
            let mut ended = Ended(
                released.clone(),
                juice_runtime::Process::with_fd(0, fd, false),
            );
            ended.reap();
            r.release(Box::new(ended));
        }
        r.settle();
        assert_eq!(released.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn ended_directories_are_pruned_to_the_newest_of_each_group() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("instances");
        let make = |name: &str, running: bool, age_s: u64| {
            let d = dir.join(name);
            std::fs::create_dir_all(d.join("logs")).unwrap();
            if running {
                std::fs::write(d.join("state.json"), "{}").unwrap();
            }
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
            std::fs::File::open(&d).unwrap().set_modified(t).unwrap();
        };
        for i in 0..6u64 {
            make(&format!("web-r1-000{i}"), false, 100 - i);
        }
        make("web-r2-00aa", true, 1000);
        make("db-r1-0001", false, 5);
        make("mine-1234", false, 1000); // `juice run`'s naming: not the agent's
        prune_ended(home.path(), 3);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "db-r1-0001",
                "mine-1234",
                "web-r1-0003",
                "web-r1-0004",
                "web-r1-0005",
                "web-r2-00aa"
            ]
        );
        assert_eq!(group_of("my-app-r12-beef"), Some("my-app"));
        assert_eq!(group_of("web-rx-beef"), None);
        assert_eq!(group_of("web-r1-beefy"), None);
    }
}
