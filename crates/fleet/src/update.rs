//! Host updates, a few hosts at a time: a semaphore of `N` slots in etcd, each slot a key
//! held under the holding host's own lease.
//!
//! - `update/slots/<i>` for `i` in `0..N`: a slot is taken only by a transaction "if the
//!   key does not exist, create it under my lease", so at most `N` keys in `0..N` exist
//!   at once, and a host that dies frees its slot when its lease expires. A host takes a
//!   slot only when it holds none ([`Store::acquire_slot`] looks first), and gives it back
//!   with a delete fenced on the slot still being its own ([`Store::release_slot`]).
//! - `update/desired`: the daemon the operator wants everywhere ([`Desired`]).
//! - `update/failed/<host>`: a host's failed update ([`Failure`]); while one is recorded
//!   no host takes a slot for a daemon update (the update is paused) until the operator
//!   clears them (`juice fleet update resume`).
//!
//! What a host does with these is [`next_step`], a pure function.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::HostId;
use crate::store::Store;

/// Everything about host updates is under this prefix.
pub const UPDATE: &str = "/juice/v1/update/";
/// The slots: `slots/<i>`.
pub const SLOTS: &str = "/juice/v1/update/slots/";
/// The daemon the operator wants.
pub const DESIRED: &str = "/juice/v1/update/desired";
/// Failed updates: `failed/<host>`.
pub const FAILED: &str = "/juice/v1/update/failed/";

/// The most slots an update may have: more hosts at once is no longer "a few".
pub const MAX_SLOTS: u32 = 1000;

/// The key of slot `i`.
pub fn slot_key(i: u32) -> String {
    format!("{SLOTS}{i}")
}

/// The slot number a key names, if it is a slot's key.
pub fn slot_of(key: &str) -> Option<u32> {
    let n = key.strip_prefix(SLOTS)?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// What a slot's key holds: who holds it, since when, for what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub host: HostId,
    pub started_ms: u64,
    /// `daemon <version> <sha256>` or `os <version>`.
    pub what: String,
}

impl Slot {
    /// Whether this slot is held for an OS update (given back by the trial's verdict).
    pub fn is_os(&self) -> bool {
        self.what.starts_with("os ")
    }
}

/// The daemon the operator wants on every host, from an image made by
/// `juice fleet update pack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The image reference hosts pull (a registry reference, or a name in their store).
    pub image: String,
    /// The version the image's label promises (`juice --version` must say it).
    pub version: String,
    /// sha256 of the binary, hex: a host whose running binary has it is done.
    pub sha256: String,
    /// At most this many hosts update at once.
    pub slots: u32,
    /// How long a new daemon's fleet groups must all be ready before it frees its slot.
    pub gate_ms: u64,
    /// A new daemon not healthy this long after it started goes back to the previous one.
    pub deadline_ms: u64,
    pub written_ms: u64,
}

/// A host's failed update, kept until the operator clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub host: HostId,
    /// The binary that failed (sha256, hex) and its version.
    pub sha256: String,
    pub version: String,
    pub reason: String,
    pub at_ms: u64,
}

/// Everything under `update/`, as of one read.
#[derive(Debug, Default)]
pub struct UpdateState {
    pub desired: Option<Desired>,
    /// The slots held now, by number, with the lease each is held under.
    pub slots: BTreeMap<u32, (Slot, i64)>,
    pub failed: BTreeMap<HostId, Failure>,
    /// Records that could not be read, each naming its key.
    pub malformed: Vec<Error>,
    /// The etcd revision of the read.
    pub revision: i64,
}

impl UpdateState {
    /// The slot `host` holds, if any.
    pub fn held_by(&self, host: &HostId) -> Option<(u32, &Slot, i64)> {
        self.slots
            .iter()
            .find(|(_, (s, _))| &s.host == host)
            .map(|(i, (s, l))| (*i, s, *l))
    }
}

/// What a host does next about a daemon update, from what it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do (no update wanted, or this host already runs it).
    Nothing,
    /// The host must wait: `why` says for what.
    Wait(String),
    /// Take a slot, then install the desired daemon.
    Acquire,
    /// Give back a daemon slot this host holds for no update in progress.
    Release(u32),
}

/// The next step of `host`, running a binary of sha256 `running`, given the update
/// records, and whether it has an update of its own in progress (a new daemon on trial,
/// or one going back): that one's slot is its business.
pub fn next_step(host: &HostId, running: &str, state: &UpdateState, in_progress: bool) -> Step {
    if in_progress {
        return Step::Nothing;
    }
    let held = state.held_by(host);
    if let Some((i, slot, _)) = held
        && !slot.is_os()
    {
        return Step::Release(i);
    }
    let Some(desired) = &state.desired else {
        return Step::Nothing;
    };
    if desired.sha256 == running {
        return Step::Nothing;
    }
    if !state.failed.is_empty() {
        let hosts: Vec<&str> = state.failed.keys().map(HostId::as_str).collect();
        return Step::Wait(format!(
            "the update is paused: failed on {} (`juice fleet update resume` clears it)",
            hosts.join(", ")
        ));
    }
    if held.is_some() {
        return Step::Wait("this host holds a slot for its OS update".into());
    }
    let busy = (0..desired.slots)
        .filter(|i| state.slots.contains_key(i))
        .count();
    if busy >= desired.slots as usize {
        return Step::Wait(format!("all {} update slots are held", desired.slots));
    }
    Step::Acquire
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn bad(key: &str, reason: String) -> Error {
    Error::Record {
        key: key.to_owned(),
        reason,
    }
}

impl Store {
    /// Everything under `update/`, in one read.
    pub async fn update_state(&self) -> Result<UpdateState> {
        let (kvs, revision) = self.get_prefix("the update records", UPDATE).await?;
        let mut state = UpdateState {
            revision,
            ..UpdateState::default()
        };
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key == DESIRED {
                match serde_json::from_slice::<Desired>(kv.value()) {
                    Ok(d) => state.desired = Some(d),
                    Err(e) => state
                        .malformed
                        .push(bad(&key, format!("its value is not a desired daemon: {e}"))),
                }
            } else if let Some(host) = key.strip_prefix(FAILED) {
                let parsed = host
                    .parse::<HostId>()
                    .map_err(|e| bad(&key, e.to_string()))
                    .and_then(|h| {
                        let f: Failure = serde_json::from_slice(kv.value())
                            .map_err(|e| bad(&key, format!("its value is not a failure: {e}")))?;
                        Ok((h, f))
                    });
                match parsed {
                    Ok((h, f)) => {
                        state.failed.insert(h, f);
                    }
                    Err(e) => state.malformed.push(e),
                }
            } else if key.starts_with(SLOTS) {
                let parsed = slot_of(&key)
                    .ok_or_else(|| bad(&key, "the key is not update/slots/<number>".into()))
                    .and_then(|i| {
                        let s: Slot = serde_json::from_slice(kv.value())
                            .map_err(|e| bad(&key, format!("its value is not a slot: {e}")))?;
                        Ok((i, s))
                    });
                match parsed {
                    Ok((i, s)) => {
                        state.slots.insert(i, (s, kv.lease()));
                    }
                    Err(e) => state.malformed.push(e),
                }
            }
        }
        Ok(state)
    }

    /// Takes a free slot among `0..slots` for `host` under `lease`, unless it holds one
    /// already (then that one is returned). `None` when every slot is held. Each slot is
    /// taken by a transaction that creates its key only if it does not exist, so two hosts
    /// never hold the same slot and no more than `slots` are ever held.
    pub async fn acquire_slot(
        &self,
        host: &HostId,
        lease: i64,
        slots: u32,
        what: &str,
    ) -> Result<Option<u32>> {
        let state = self.update_state().await?;
        if let Some((i, _, _)) = state.held_by(host) {
            return Ok(Some(i));
        }
        let slot = Slot {
            host: host.clone(),
            started_ms: now_ms(),
            what: what.to_owned(),
        };
        // A slot is strings and a number: this cannot fail.
        let value = serde_json::to_vec(&slot).unwrap_or_default();
        for i in (0..slots.min(MAX_SLOTS)).filter(|i| !state.slots.contains_key(i)) {
            let key = slot_key(i);
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let mut client = self.client();
            let answer = self.call("an update slot", client.txn(txn)).await?;
            if answer.succeeded() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Gives back the slot `host` holds, if it holds one: the delete happens only if the
    /// slot is still the one read as `host`'s (its `mod_revision`), so a slot another host
    /// took since is never freed. Returns the slot freed.
    pub async fn release_slot(&self, host: &HostId) -> Result<Option<u32>> {
        self.release_slot_if(host, |_| true).await
    }

    /// [`Store::release_slot`], only if the slot `host` holds is one `which` says yes to
    /// (an OS update gives back only an OS update's slot).
    pub async fn release_slot_if(
        &self,
        host: &HostId,
        which: impl Fn(&Slot) -> bool,
    ) -> Result<Option<u32>> {
        let (kvs, _) = self.get_prefix("the update slots", SLOTS).await?;
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(i) = slot_of(&key) else { continue };
            let Ok(slot) = serde_json::from_slice::<Slot>(kv.value()) else {
                continue;
            };
            if &slot.host != host || !which(&slot) {
                continue;
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            let mut client = self.client();
            let answer = self.call("an update slot", client.txn(txn)).await?;
            if answer.succeeded() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Stores the daemon the operator wants.
    pub async fn put_desired(&self, desired: &Desired) -> Result<()> {
        let mut client = self.client();
        // Strings and numbers: this cannot fail.
        let value = serde_json::to_vec(desired).unwrap_or_default();
        self.call("the desired daemon", client.put(DESIRED, value, None))
            .await
            .map(drop)
    }

    /// Records `failure` (no lease: it stays until the operator clears it).
    pub async fn put_failure(&self, failure: &Failure) -> Result<()> {
        let mut client = self.client();
        let value = serde_json::to_vec(failure).unwrap_or_default();
        self.call(
            "the update's failure",
            client.put(format!("{FAILED}{}", failure.host), value, None),
        )
        .await
        .map(drop)
    }

    /// Clears every recorded failure (the update resumes); returns how many there were.
    pub async fn clear_failures(&self) -> Result<i64> {
        let mut client = self.client();
        let answer = self
            .call(
                "the update's failures",
                client.delete(
                    FAILED,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            )
            .await?;
        Ok(answer.deleted())
    }

    /// Takes a slot for an OS update of `host`, under a lease of its own of `ttl` (an OS
    /// update reboots, and the host's own lease would run out meanwhile): the slot is held
    /// until the trial's verdict gives it back, or, if the host never returns, `ttl`
    /// after it was taken. The number of slots is the desired daemon update's (1 if none);
    /// refused while a failure is recorded. Returns the slot.
    pub async fn acquire_os_slot(
        &self,
        host: &HostId,
        ttl: std::time::Duration,
        version: &str,
    ) -> Result<std::result::Result<u32, String>> {
        let state = self.update_state().await?;
        if !state.failed.is_empty() {
            let hosts: Vec<&str> = state.failed.keys().map(HostId::as_str).collect();
            return Ok(Err(format!(
                "the fleet's host updates are paused: failed on {} (`juice fleet update resume` clears it)",
                hosts.join(", ")
            )));
        }
        let slots = state.desired.as_ref().map_or(1, |d| d.slots);
        let mut client = self.client();
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = self
            .call(
                "a lease for an OS update's slot",
                client.lease_grant(secs, None),
            )
            .await?
            .id();
        match self
            .acquire_slot(host, lease, slots, &format!("os {version}"))
            .await?
        {
            Some(i) => Ok(Ok(i)),
            None => {
                let _ = self
                    .call(
                        "a lease for an OS update's slot",
                        client.lease_revoke(lease),
                    )
                    .await;
                let holders: Vec<String> = state
                    .slots
                    .values()
                    .map(|(s, _)| format!("{} ({})", s.host, s.what))
                    .collect();
                Ok(Err(format!(
                    "all {slots} update slot(s) of the fleet are held (by {}); try again when one is free",
                    holders.join(", ")
                )))
            }
        }
    }

    /// Whether etcd still has `lease` (its time to live is above zero).
    pub async fn lease_alive(&self, lease: i64) -> Result<bool> {
        let mut client = self.client();
        let answer = self
            .call(
                "the lease's time to live",
                client.lease_time_to_live(lease, None),
            )
            .await?;
        Ok(answer.ttl() > 0)
    }

    /// Renews `lease` once, now (before a daemon re-executes itself, so its successor has
    /// the whole time to live to take the lease over). Whether etcd still had it.
    pub async fn renew_once(&self, lease: i64) -> Result<bool> {
        let mut client = self.client();
        let (mut keeper, mut answers) = self
            .call("the lease's renewal", client.lease_keep_alive(lease))
            .await?;
        self.call("the lease's renewal", keeper.keep_alive())
            .await?;
        match self.call("the lease's renewal", answers.message()).await? {
            Some(a) => Ok(a.ttl() > 0),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: &str) -> HostId {
        n.parse().unwrap()
    }

    fn desired(slots: u32) -> Desired {
        Desired {
            image: "juice-daemon:2".into(),
            version: "0.2.0".into(),
            sha256: "bb".repeat(32),
            slots,
            gate_ms: 5000,
            deadline_ms: 60_000,
            written_ms: 1,
        }
    }

    fn slot(h: &str, what: &str) -> (Slot, i64) {
        (
            Slot {
                host: host(h),
                started_ms: 1,
                what: what.into(),
            },
            7,
        )
    }

    const OLD: &str = "aaaa";

    #[test]
    fn slot_keys_are_numbers_and_nothing_else() {
        assert_eq!(slot_key(3), "/juice/v1/update/slots/3");
        assert_eq!(slot_of("/juice/v1/update/slots/3"), Some(3));
        assert_eq!(slot_of(&slot_key(999)), Some(999));
        for bad in [
            "/juice/v1/update/slots/",
            "/juice/v1/update/slots/03",
            "/juice/v1/update/slots/-1",
            "/juice/v1/update/slots/1/x",
            "/juice/v1/update/desired",
        ] {
            assert_eq!(slot_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_host_takes_a_slot_only_when_one_is_free_nothing_failed_and_it_needs_the_update() {
        let me = host("h1");
        let mut s = UpdateState::default();
        assert_eq!(next_step(&me, OLD, &s, false), Step::Nothing);
        s.desired = Some(desired(1));
        assert_eq!(next_step(&me, OLD, &s, false), Step::Acquire);
        // Already running it.
        assert_eq!(next_step(&me, &"bb".repeat(32), &s, false), Step::Nothing);
        // The one slot is held by another host.
        s.slots.insert(0, slot("h2", "daemon 0.2.0"));
        assert!(matches!(next_step(&me, OLD, &s, false), Step::Wait(w) if w.contains("all 1")));
        // A slot beyond N does not count against it (N was raised, then lowered).
        s.desired = Some(desired(2));
        s.slots.insert(5, slot("h3", "daemon 0.2.0"));
        assert_eq!(next_step(&me, OLD, &s, false), Step::Acquire);
        // A failure anywhere pauses it.
        s.failed.insert(
            host("h2"),
            Failure {
                host: host("h2"),
                sha256: "bb".into(),
                version: "0.2.0".into(),
                reason: "x".into(),
                at_ms: 1,
            },
        );
        assert!(
            matches!(next_step(&me, OLD, &s, false), Step::Wait(w) if w.contains("paused: failed on h2"))
        );
    }

    #[test]
    fn a_daemon_slot_held_for_nothing_is_given_back_and_an_os_slot_is_kept() {
        let me = host("h1");
        let mut s = UpdateState {
            desired: Some(desired(1)),
            ..UpdateState::default()
        };
        s.slots.insert(0, slot("h1", "daemon 0.2.0"));
        assert_eq!(next_step(&me, OLD, &s, false), Step::Release(0));
        // While its own update is in progress, the slot is that update's.
        assert_eq!(next_step(&me, OLD, &s, true), Step::Nothing);
        s.slots.insert(0, slot("h1", "os 1.2.0"));
        assert!(matches!(next_step(&me, OLD, &s, false), Step::Wait(w) if w.contains("OS update")));
        assert_eq!(s.held_by(&me).map(|(i, _, l)| (i, l)), Some((0, 7)));
        assert!(s.held_by(&host("h9")).is_none());
    }
}
