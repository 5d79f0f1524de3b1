//! A host's registration: its record under its own lease, kept alive every third of the
//! lease's time to live. While etcd is away the host goes on with what it runs (nothing
//! here stops or starts anything); when etcd answers again it takes its lease over if
//! etcd still has it (re-putting its record under it), and grants a new one only if not.

use std::time::Duration;

use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::record::HostRecord;
use crate::store::{Connections, Store};
use etcd_client::LeaseGrantOptions;

/// The lease's time to live unless told otherwise: a dead host is gone within 10 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The range a lease's time to live may take. Below 2 s etcd itself extends it (its
/// minimum is 1.5 election timeouts); above 600 s a dead host lingers too long to be useful.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 2..=600;

/// What a registration reports as it goes, for the daemon's log.
#[derive(Debug)]
pub enum Status {
    /// The record is written under this lease.
    Registered { lease: i64, ttl: Duration },
    /// etcd was lost or the lease expired; the host tries again after `retry`.
    Lost { error: Error, retry: Duration },
}

/// A host's registration in the fleet; [`Registration::run`] keeps it until dropped.
pub struct Registration {
    pub endpoints: Endpoints,
    pub record: HostRecord,
    ttl: Duration,
    /// Where the lease's id is kept (`$JUICE_HOME/fleet/lease`), so that a daemon that
    /// restarts (a host update re-executes it) takes its lease over while etcd still has
    /// it, with the update slot held under it; `None` grants a new lease every time.
    pub lease_file: Option<std::path::PathBuf>,
}

impl Registration {
    /// A registration of `record` with a lease of `ttl_secs` (see [`TTL_RANGE`]).
    pub fn new(endpoints: Endpoints, record: HostRecord, ttl_secs: u64) -> Result<Registration> {
        if !TTL_RANGE.contains(&ttl_secs) {
            return Err(Error::LeaseTtl { secs: ttl_secs });
        }
        Ok(Registration {
            endpoints,
            record,
            ttl: Duration::from_secs(ttl_secs),
            lease_file: None,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often the lease is renewed, and how long each call to etcd may take: a third
    /// of the time to live, so two renewals can be lost before the lease expires.
    fn beat(&self) -> Duration {
        self.ttl / 3
    }

    /// Registers, keeps the lease alive, and registers again whenever etcd comes back;
    /// runs until the task running it is dropped (the lease then lapses by itself).
    pub async fn run(self, report: impl FnMut(Status) + Send) {
        self.run_on(None, report).await
    }

    /// [`Registration::run`], on `shared` connections when given (many hosts in one
    /// process, see [`Connections`]) instead of a connection of its own per lease.
    ///
    /// A lost session does not cost etcd a new lease: the host keeps the id of its lease
    /// and, when etcd answers again, asks that lease's time to live; while etcd still has
    /// it the host re-puts its record under it and renews it. The id is chosen by the host
    /// (a grant carries it), so a grant whose answer was lost is not a lease left behind:
    /// the next try finds it alive, or grants the same id. A lease given up (one with
    /// another time to live than this host's) is revoked when etcd answers. Retries back
    /// off exponentially with jitter, and from a whole lease when etcd says it has too
    /// many requests: a fleet that lost etcd together does not return in one wave.
    pub async fn run_on(self, shared: Option<Connections>, mut report: impl FnMut(Status) + Send) {
        let first_retry = Duration::from_millis(500);
        let mut retry = first_retry;
        let mut leases = Leases {
            current: self.lease_file.as_deref().and_then(read_lease),
            abandoned: Vec::new(),
        };
        loop {
            let mut registered = false;
            let error = self
                .session(shared.as_ref(), &mut report, &mut registered, &mut leases)
                .await;
            if registered {
                retry = first_retry;
            }
            let base = if overloaded(&error) {
                retry.max(self.ttl)
            } else {
                retry
            };
            let wait = jitter(base);
            report(Status::Lost { error, retry: wait });
            tokio::time::sleep(wait).await;
            retry = (base * 2).min(self.ttl * 3);
        }
    }

    /// One lease, from its grant (or its taking over) until it is lost: returns why it was
    /// lost.
    async fn session(
        &self,
        shared: Option<&Connections>,
        report: &mut impl FnMut(Status),
        registered: &mut bool,
        leases: &mut Leases,
    ) -> Error {
        let store = match shared {
            Some(c) => c.pick().0,
            None => match Store::connect(&self.endpoints, self.beat()).await {
                Ok(s) => s,
                Err(e) => return e,
            },
        };
        let mut client = store.client();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        // Leases given up earlier, revoked now that etcd may answer (one that is gone
        // already counts as revoked).
        while let Some(&old) = leases.abandoned.last() {
            match store
                .call("a lease's revocation", client.lease_revoke(old))
                .await
            {
                Ok(_) => {}
                Err(e) if lease_not_found(&e) => {}
                Err(e) => return e,
            }
            leases.abandoned.pop();
        }
        let kept = match leases.current {
            Some(id) => match store
                .call(
                    "the lease's time to live",
                    client.lease_time_to_live(id, None),
                )
                .await
            {
                Ok(a) if a.ttl() > 0 && a.granted_ttl() == ttl => Some(id),
                Ok(a) if a.ttl() > 0 => {
                    // Granted with another time to live (a daemon restarted with another
                    // --fleet-lease-ttl): given up, and revoked.
                    leases.abandoned.push(id);
                    leases.current = None;
                    return Error::LeaseExpired { lease: id };
                }
                Ok(_) => None,
                Err(e) => return e,
            },
            None => None,
        };
        let lease = match kept {
            Some(id) => id,
            None => {
                // A new id: the one kept, if any, is gone or was never granted. If this
                // grant's answer is lost, the next session finds it alive and takes it.
                let id = new_lease_id();
                leases.current = Some(id);
                let grant = client.lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(id)));
                match store.call("a lease", grant).await {
                    Ok(l) => l.id(),
                    Err(e) if lease_exists(&e) => id,
                    Err(e) => return e,
                }
            }
        };
        if let Some(file) = &self.lease_file
            && kept.is_none()
            && let Err(e) = write_lease(file, lease)
        {
            return e;
        }
        if let Err(e) = store.put_host(&self.record, lease).await {
            return e;
        }
        let (mut keeper, mut answers) = match store
            .call("the lease's renewal", client.lease_keep_alive(lease))
            .await
        {
            Ok(k) => k,
            Err(e) => return e,
        };
        *registered = true;
        report(Status::Registered {
            lease,
            ttl: self.ttl,
        });
        loop {
            tokio::time::sleep(self.beat()).await;
            if let Err(e) = store.call("the lease's renewal", keeper.keep_alive()).await {
                return e;
            }
            match store.call("the lease's renewal", answers.message()).await {
                Ok(Some(answer)) if answer.ttl() > 0 => {}
                Ok(Some(_)) => {
                    leases.current = None;
                    return Error::LeaseExpired { lease };
                }
                Ok(None) => {
                    return store.unreachable("etcd closed the lease's renewal stream".into());
                }
                Err(e) => return e,
            }
        }
    }
}

/// The lease a registration holds (or last asked for), and those it gave up and has yet
/// to revoke.
struct Leases {
    current: Option<i64>,
    abandoned: Vec<i64>,
}

/// Whether etcd refused because it is behind (`etcdserver: too many requests`: its
/// applied index trails its committed one by more than 5,000 entries).
fn overloaded(e: &Error) -> bool {
    matches!(e, Error::Etcd { source, .. } if source.to_string().contains("too many requests"))
}

/// Whether etcd answered that the lease granted already exists (a grant of this id that
/// went through although its answer was lost).
fn lease_exists(e: &Error) -> bool {
    matches!(e, Error::Etcd { source, .. } if source.to_string().contains("lease already exists"))
}

/// Whether etcd answered that it has no such lease.
fn lease_not_found(e: &Error) -> bool {
    matches!(e, Error::Etcd { source, .. } if source.to_string().contains("lease not found"))
}

/// A random number from the standard library's per-process random hash keys, mixed with
/// a counter and the time, so each call differs.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    h.write_u32(nanos);
    h.finish()
}

/// A lease id chosen by the host: positive and never 0 (0 asks etcd to choose).
fn new_lease_id() -> i64 {
    i64::try_from(random_u64() >> 1).unwrap_or(1).max(1)
}

/// `base` with jitter: a uniform pick between half of it and all of it.
fn jitter(base: Duration) -> Duration {
    let half = base / 2;
    let span = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    half + Duration::from_millis(random_u64() % (span + 1))
}

/// The lease id kept in `file`, if it holds one (anything else counts as none).
fn read_lease(file: &std::path::Path) -> Option<i64> {
    let text = std::fs::read_to_string(file).ok()?;
    i64::from_str_radix(text.trim(), 16).ok()
}

/// Keeps `lease` in `file` (hex), replacing it whole: a temp file, synced, renamed.
fn write_lease(file: &std::path::Path, lease: i64) -> Result<()> {
    let err = |source| Error::File {
        path: file.to_owned(),
        source,
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = file.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(format!("{lease:x}\n").as_bytes())
            .map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, file).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_lease_reads_back_and_anything_else_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet/lease");
        assert_eq!(read_lease(&file), None);
        write_lease(&file, 0x694d_7c1e_22a0_1f03).unwrap();
        assert_eq!(read_lease(&file), Some(0x694d_7c1e_22a0_1f03));
        std::fs::write(&file, "not a lease").unwrap();
        assert_eq!(read_lease(&file), None);
    }

    #[test]
    fn lease_ids_are_positive_and_differ() {
        let ids: std::collections::BTreeSet<i64> = (0..1000).map(|_| new_lease_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|&i| i > 0));
    }

    #[test]
    fn jitter_stays_between_half_and_all_and_spreads() {
        let base = Duration::from_millis(1000);
        let picks: Vec<Duration> = (0..1000).map(|_| jitter(base)).collect();
        assert!(picks.iter().all(|&d| d >= base / 2 && d <= base));
        let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
        assert!(distinct.len() > 100, "{} distinct waits", distinct.len());
    }
}
