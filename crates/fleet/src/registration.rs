//! A host's registration: its record under its own lease, kept alive every third of the
//! lease's time to live. While etcd is away the host goes on with what it runs (nothing
//! here stops or starts anything); when etcd answers again it registers anew, with a new
//! lease, because the old one has most likely expired and taken the record with it.

use std::time::Duration;

use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::record::HostRecord;
use crate::store::{Connections, Store};

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
    pub async fn run_on(self, shared: Option<Connections>, mut report: impl FnMut(Status) + Send) {
        // The first retry is quick; each next one waits twice as long, up to the time to
        // live, so a fleet that lost etcd together does not return in one wave.
        let first_retry = Duration::from_millis(500);
        let mut retry = first_retry;
        // Only the first session takes over the lease a previous daemon left: after a
        // loss of etcd the host registers anew, as before.
        let mut take_over = self.lease_file.is_some();
        loop {
            let mut registered = false;
            let error = self
                .session(
                    shared.as_ref(),
                    &mut report,
                    &mut registered,
                    std::mem::take(&mut take_over),
                )
                .await;
            if registered {
                retry = first_retry;
            }
            report(Status::Lost { error, retry });
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(self.ttl);
        }
    }

    /// One lease, from its grant until it is lost: returns why it was lost.
    async fn session(
        &self,
        shared: Option<&Connections>,
        report: &mut impl FnMut(Status),
        registered: &mut bool,
        take_over: bool,
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
        let kept = match (&self.lease_file, take_over) {
            (Some(file), true) => match read_lease(file) {
                Some(id) => match store.lease_alive(id).await {
                    Ok(true) => Some(id),
                    Ok(false) => None,
                    Err(e) => return e,
                },
                None => None,
            },
            _ => None,
        };
        let lease = match kept {
            Some(id) => id,
            None => match store.call("a lease", client.lease_grant(ttl, None)).await {
                Ok(l) => l.id(),
                Err(e) => return e,
            },
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
                Ok(Some(_)) => return Error::LeaseExpired { lease },
                Ok(None) => {
                    return store.unreachable("etcd closed the lease's renewal stream".into());
                }
                Err(e) => return e,
            }
        }
    }
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
}
