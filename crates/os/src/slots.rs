//! The kept OS versions of a running host: what `juice os status`, `update`, `rollback`
//! and the trial's verdict read and change.
//!
//! The boot partition is mounted at `/boot` ([`BootDir`]); each slot's `os.json` is a
//! [`SlotInfo`]. What happened is appended to `os/history.jsonl` on the data partition
//! (PID 1 appends there too when a trial gets no verdict), so a reason survives the
//! fallback it caused. Every change writes the version's files first and `grubenv` last:
//! the switch is the one in-place write of that block.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::{BootDir, DiskError, VersionFiles};
use crate::select::{BootState, Choice, SelectError, SlotFlags};
use crate::version::{OsConfig, OsVersion, VersionError};

/// Where PID 1 and the daemon meet: the daemon writes its verdict on a trial boot here
/// (`committed`, or `failed: REASON`), and PID 1 reboots a trial that has none by its deadline.
pub const VERDICT: &str = "/run/juice/os/verdict";

/// How many versions a host keeps by default, the booted one included.
pub const KEEP: usize = 3;

/// A slot's `os.json`: which version it holds and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotInfo {
    pub version: String,
    /// The image's manifest digest.
    pub digest: String,
    /// The reference it was installed from.
    pub reference: String,
    pub config: OsConfig,
    pub installed_ms: u64,
}

/// What the kernel command line says about this boot (GRUB adds both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Booted {
    pub slot: String,
    pub trial: bool,
}

impl Booted {
    /// `juice.os.slot=` and `juice.os.trial=` from a kernel command line; `None` when
    /// the host was not booted by Juice OS's GRUB.
    pub fn from_cmdline(cmdline: &str) -> Option<Booted> {
        let mut slot = None;
        let mut trial = false;
        for word in cmdline.split_whitespace() {
            if let Some(s) = word.strip_prefix("juice.os.slot=") {
                slot = Some(s.to_owned());
            } else if let Some(t) = word.strip_prefix("juice.os.trial=") {
                trial = t == "1";
            }
        }
        slot.filter(|s| crate::select::valid_slot(s))
            .map(|slot| Booted { slot, trial })
    }

    /// This boot, from `/proc/cmdline`.
    pub fn current() -> Option<Booted> {
        Booted::from_cmdline(&std::fs::read_to_string("/proc/cmdline").ok()?)
    }
}

/// `juice.os.deadline=SECONDS` on a kernel command line: the trial's deadline, when a
/// version sets its own.
pub fn deadline_from_cmdline(cmdline: &str) -> Option<std::time::Duration> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("juice.os.deadline="))
        .and_then(|s| s.parse().ok())
        .map(std::time::Duration::from_secs)
}

/// One entry of `os/history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub at_ms: u64,
    /// installed, trial, committed, failed, rolled-back, evicted
    pub event: String,
    pub slot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One kept version as `juice os status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotStatus {
    pub slot: String,
    pub version: Option<String>,
    pub digest: Option<String>,
    /// installed and not known bad
    pub ok: bool,
    pub tried: bool,
    pub committed: bool,
    pub booted: bool,
}

/// The answer to `juice os status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OsStatus {
    pub booted: Option<Booted>,
    /// Kept versions, most preferred first.
    pub versions: Vec<SlotStatus>,
    /// What GRUB will boot next.
    pub next: Option<NextBoot>,
    pub last_failure: Option<HistoryEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NextBoot {
    pub slot: String,
    pub trial: bool,
}

impl From<Choice> for NextBoot {
    fn from(c: Choice) -> NextBoot {
        NextBoot {
            slot: c.slot,
            trial: c.trial,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotsError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error("this host was not booted by Juice OS (no juice.os.slot= on its kernel command line)")]
    NotJuiceOs,
    #[error("no kept version is named {0:?} (see `juice os status`)")]
    NoVersion(String),
    #[error("version {version} in slot {slot} never committed, so it cannot be rolled back to")]
    NotCommitted { version: String, slot: String },
    #[error("no other committed version is kept to roll back to")]
    NothingToRollBackTo,
    #[error("this boot is not a trial: there is nothing to {0}")]
    NotTrial(&'static str),
    #[error("{0} is already the running, committed version")]
    AlreadyRunning(String),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A running host's kept versions and its record of what happened to them.
pub struct Slots {
    pub boot: BootDir,
    /// Where the boot partition is mounted.
    pub boot_root: PathBuf,
    /// `$JUICE_HOME/os` on the data partition.
    pub records: PathBuf,
    pub booted: Option<Booted>,
}

impl Slots {
    pub fn new(boot: &Path, records: &Path, booted: Option<Booted>) -> Slots {
        Slots {
            boot: BootDir::new(boot),
            boot_root: boot.to_owned(),
            records: records.to_owned(),
            booted,
        }
    }

    fn history_path(&self) -> PathBuf {
        self.records.join("history.jsonl")
    }

    /// Appends one entry to the history, durably.
    pub fn record(&self, event: &str, slot: &str, version: Option<&str>, reason: Option<&str>) {
        let entry = HistoryEntry {
            at_ms: now_ms(),
            event: event.to_owned(),
            slot: slot.to_owned(),
            version: version.map(str::to_owned),
            reason: reason.map(str::to_owned),
        };
        let path = self.history_path();
        let result = std::fs::create_dir_all(&self.records).and_then(|()| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)?;
            let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
            f.sync_all()
        });
        if let Err(e) = result {
            eprintln!(
                "juice: cannot record {event} of slot {slot} in {}: {e}",
                path.display()
            );
        }
    }

    /// Every history entry, oldest first; a damaged line is skipped.
    pub fn history(&self) -> Vec<HistoryEntry> {
        std::fs::read_to_string(self.history_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn state(&self) -> Result<BootState, SlotsError> {
        Ok(self.boot.read_state()?)
    }

    fn save(&self, state: &BootState) -> Result<(), SlotsError> {
        Ok(self.boot.write_state(state)?)
    }

    /// The `os.json` of a slot, if it has a readable one.
    pub fn info(&self, slot: &str) -> Option<SlotInfo> {
        let bytes = std::fs::read(self.boot_root.join("os").join(slot).join("os.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn status(&self) -> Result<OsStatus, SlotsError> {
        let state = self.state()?;
        let booted_slot = self.booted.as_ref().map(|b| b.slot.as_str());
        let mut slots: Vec<&String> = state.order.iter().collect();
        for s in state.slots.keys() {
            if !slots.contains(&s) {
                slots.push(s);
            }
        }
        let versions = slots
            .into_iter()
            .map(|slot| {
                let f = state
                    .slots
                    .get(slot)
                    .copied()
                    .unwrap_or(SlotFlags::default());
                let info = self.info(slot);
                SlotStatus {
                    slot: slot.clone(),
                    version: info.as_ref().map(|i| i.version.clone()),
                    digest: info.map(|i| i.digest),
                    ok: f.ok,
                    tried: f.tried,
                    committed: f.good,
                    booted: Some(slot.as_str()) == booted_slot,
                }
            })
            .collect();
        let last_failure = self
            .history()
            .into_iter()
            .rev()
            .find(|e| e.event == "failed");
        Ok(OsStatus {
            booted: self.booted.clone(),
            versions,
            next: state.choose().map(NextBoot::from),
            last_failure,
        })
    }

    /// Writes a verified version beside the kept ones and makes it the next boot's trial.
    /// Versions beyond `keep` are evicted first (never the booted or the committed one
    /// that boots now). `work` is a directory on the data partition for the extraction.
    pub fn install(
        &self,
        store: &juice_image::store::Store,
        version: &OsVersion,
        keep: usize,
        work: &Path,
    ) -> Result<String, SlotsError> {
        let mut state = self.state()?;
        let booted = self.booted.as_ref().map(|b| b.slot.as_str());
        let (slot, evict) = state.free_slot(keep, booted);
        // Forget the evicted in grubenv before their files go, so GRUB never names a
        // missing directory.
        if !evict.is_empty() {
            for s in &evict {
                state.forget(s);
            }
            self.save(&state)?;
            for s in &evict {
                let info = self.info(s);
                self.boot.remove_version(s)?;
                self.record(
                    "evicted",
                    s,
                    info.as_ref().map(|i| i.version.as_str()),
                    None,
                );
            }
        }
        let dir = work.join(format!("os-{slot}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(juice_image::PathError::at("create", &dir))?;
        let written = (|| {
            let files = version.extract(store, &dir)?;
            let info = SlotInfo {
                version: version.config.version.clone(),
                digest: version.record.digest.to_string(),
                reference: version.record.reference.clone(),
                config: version.config.clone(),
                installed_ms: now_ms(),
            };
            let os_json = serde_json::to_vec_pretty(&info).map_err(|e| VersionError::Invalid {
                image: version.record.reference.clone(),
                reason: e.to_string(),
            })?;
            self.boot.write_version(&VersionFiles {
                slot: slot.clone(),
                vmlinuz: files.vmlinuz,
                initrd: files.initrd,
                os_json,
                cmdline: version.config.cmdline.clone(),
            })?;
            Ok::<(), SlotsError>(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        written?;
        // The switch: the last write.
        state.install(&slot)?;
        self.save(&state)?;
        self.record("installed", &slot, Some(&version.config.version), None);
        Ok(slot)
    }

    /// The booted trial proved healthy.
    pub fn commit(&self) -> Result<(), SlotsError> {
        let booted = self.booted.as_ref().ok_or(SlotsError::NotJuiceOs)?;
        if !booted.trial {
            return Err(SlotsError::NotTrial("commit"));
        }
        let mut state = self.state()?;
        state.commit(&booted.slot)?;
        self.save(&state)?;
        let v = self.info(&booted.slot).map(|i| i.version);
        self.record("committed", &booted.slot, v.as_deref(), None);
        Ok(())
    }

    /// The booted trial failed: it is marked bad, and the reason kept.
    pub fn fail(&self, reason: &str) -> Result<(), SlotsError> {
        let booted = self.booted.as_ref().ok_or(SlotsError::NotJuiceOs)?;
        if !booted.trial {
            return Err(SlotsError::NotTrial("fail"));
        }
        let mut state = self.state()?;
        state.mark_bad(&booted.slot)?;
        self.save(&state)?;
        let v = self.info(&booted.slot).map(|i| i.version);
        self.record("failed", &booted.slot, v.as_deref(), Some(reason));
        Ok(())
    }

    /// After a fallback: every trial preferred before the booted version that was tried
    /// and never committed failed before anyone could judge it (a kernel that panicked,
    /// a PID 1 that gave up at its deadline). Each is marked bad, and unless PID 1 already
    /// recorded why, the history says so. Returns the slots settled.
    pub fn settle_unjudged(&self) -> Result<Vec<String>, SlotsError> {
        let Some(booted) = &self.booted else {
            return Ok(Vec::new());
        };
        let mut state = self.state()?;
        let ahead: Vec<String> = state
            .order
            .iter()
            .take_while(|s| **s != booted.slot)
            .filter(|s| {
                state
                    .slots
                    .get(*s)
                    .is_some_and(|f| f.ok && f.tried && !f.good)
            })
            .cloned()
            .collect();
        if ahead.is_empty() {
            return Ok(ahead);
        }
        let history = self.history();
        for slot in &ahead {
            state.mark_bad(slot)?;
        }
        self.save(&state)?;
        for slot in &ahead {
            let since_install = history
                .iter()
                .rev()
                .take_while(|e| !(e.slot == *slot && e.event == "installed"));
            let explained = since_install
                .into_iter()
                .any(|e| e.slot == *slot && e.event == "failed");
            if !explained {
                let v = self.info(slot).map(|i| i.version);
                self.record(
                    "failed",
                    slot,
                    v.as_deref(),
                    Some(
                        "its trial boot never reached the daemon's verdict: the kernel or PID 1 \
                         failed first, and the boot loader fell back",
                    ),
                );
            }
        }
        Ok(ahead)
    }

    /// Makes a kept, committed version the one that boots next: `to` names a version,
    /// or by default the committed version preferred after the one that boots now.
    pub fn rollback(&self, to: Option<&str>) -> Result<String, SlotsError> {
        let mut state = self.state()?;
        let committed: Vec<String> = state
            .order
            .iter()
            .filter(|s| state.slots.get(*s).is_some_and(|f| f.ok && f.good))
            .cloned()
            .collect();
        let slot = match to {
            Some(version) => {
                let slot = state
                    .slots
                    .keys()
                    .find(|s| self.info(s).is_some_and(|i| i.version == version))
                    .cloned()
                    .ok_or_else(|| SlotsError::NoVersion(version.to_owned()))?;
                if !committed.contains(&slot) {
                    return Err(SlotsError::NotCommitted {
                        version: version.to_owned(),
                        slot,
                    });
                }
                if committed.first() == Some(&slot)
                    && state.choose().is_some_and(|c| c.slot == slot)
                {
                    return Err(SlotsError::AlreadyRunning(version.to_owned()));
                }
                slot
            }
            None => committed
                .get(1)
                .cloned()
                .ok_or(SlotsError::NothingToRollBackTo)?,
        };
        state.prefer(&slot)?;
        self.save(&state)?;
        let v = self.info(&slot).map(|i| i.version);
        self.record("rolled-back", &slot, v.as_deref(), None);
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grubenv::Env;
    use crate::version::{file_sha256, pack};
    use juice_image::store::Store;

    struct Host {
        _dir: tempfile::TempDir,
        root: PathBuf,
        store: Store,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::create_dir_all(root.join("boot/grub")).unwrap();
        std::fs::write(
            root.join("boot/grub/grubenv"),
            Env::default().to_block().unwrap(),
        )
        .unwrap();
        let store = Store::open(&root.join("home")).unwrap();
        Host {
            _dir: dir,
            root,
            store,
        }
    }

    impl Host {
        fn slots(&self, booted: Option<(&str, bool)>) -> Slots {
            Slots::new(
                &self.root.join("boot"),
                &self.root.join("home/os"),
                booted.map(|(slot, trial)| Booted {
                    slot: slot.into(),
                    trial,
                }),
            )
        }

        fn version(&self, name: &str) -> OsVersion {
            let k = self.root.join(format!("k-{name}"));
            let i = self.root.join(format!("i-{name}"));
            std::fs::write(&k, format!("kernel {name}")).unwrap();
            std::fs::write(&i, format!("initrd {name}")).unwrap();
            let config = OsConfig {
                version: name.into(),
                cmdline: "console=ttyS0".into(),
                kernel_release: "6.1".into(),
                kernel_sha256: file_sha256(&k).unwrap(),
                initrd_sha256: file_sha256(&i).unwrap(),
                juice: "0.1.0".into(),
            };
            let reference = format!("juice-os:{name}");
            pack(&self.store, &reference, &config, &k, &i).unwrap();
            OsVersion::open(&self.store, &reference).unwrap()
        }

        fn install(&self, slots: &Slots, name: &str) -> String {
            let work = self.root.join("work");
            std::fs::create_dir_all(&work).unwrap();
            slots
                .install(&self.store, &self.version(name), KEEP, &work)
                .unwrap()
        }
    }

    fn summary(s: &OsStatus) -> Vec<String> {
        s.versions
            .iter()
            .map(|v| {
                format!(
                    "{}={}{}{}{}",
                    v.slot,
                    v.version.as_deref().unwrap_or("?"),
                    if v.ok { "" } else { " bad" },
                    if v.committed { " committed" } else { "" },
                    if v.tried { " tried" } else { "" }
                )
            })
            .collect()
    }

    #[test]
    fn an_update_is_the_next_trial_and_a_commit_keeps_it() {
        let h = host();
        let first = h.slots(None);
        assert_eq!(h.install(&first, "1"), "s1");
        // As `juice os disk` leaves it: the first version committed.
        let mut st = first.boot.read_state().unwrap();
        st.commit("s1").unwrap();
        first.boot.write_state(&st).unwrap();

        let running = h.slots(Some(("s1", false)));
        assert_eq!(h.install(&running, "2"), "s2");
        let status = running.status().unwrap();
        assert_eq!(summary(&status), ["s2=2", "s1=1 committed"]);
        assert_eq!(
            status.next,
            Some(NextBoot {
                slot: "s2".into(),
                trial: true
            })
        );
        assert_eq!(
            std::fs::read(h.root.join("boot/os/s2/vmlinuz")).unwrap(),
            b"kernel 2"
        );

        // GRUB marks the try and boots s2 as a trial; the daemon commits it.
        let mut st = running.boot.read_state().unwrap();
        st.begin();
        running.boot.write_state(&st).unwrap();
        let trial = h.slots(Some(("s2", true)));
        trial.commit().unwrap();
        let status = trial.status().unwrap();
        assert_eq!(summary(&status), ["s2=2 committed tried", "s1=1 committed"]);
        assert_eq!(status.next.unwrap().slot, "s2");
        let events: Vec<String> = trial.history().into_iter().map(|e| e.event).collect();
        assert_eq!(events, ["installed", "installed", "committed"]);
    }

    #[test]
    fn a_failed_trial_is_marked_bad_with_its_reason_and_the_old_version_boots() {
        let h = host();
        let s = h.slots(None);
        h.install(&s, "1");
        let mut st = s.boot.read_state().unwrap();
        st.commit("s1").unwrap();
        s.boot.write_state(&st).unwrap();
        h.install(&h.slots(Some(("s1", false))), "2");
        let trial = h.slots(Some(("s2", true)));
        trial.fail("critical group web is not healthy").unwrap();
        let status = trial.status().unwrap();
        assert_eq!(summary(&status), ["s2=2 bad", "s1=1 committed"]);
        assert_eq!(status.next.unwrap().slot, "s1");
        let last = status.last_failure.unwrap();
        assert_eq!(last.slot, "s2");
        assert_eq!(
            last.reason.as_deref(),
            Some("critical group web is not healthy")
        );
        // Not a trial: nothing to commit or fail.
        assert!(matches!(
            h.slots(Some(("s1", false))).commit(),
            Err(SlotsError::NotTrial(_))
        ));
    }

    #[test]
    fn a_trial_that_never_reached_a_verdict_is_marked_bad_once_the_old_version_runs() {
        let h = host();
        let s = h.slots(None);
        h.install(&s, "1");
        let mut st = s.boot.read_state().unwrap();
        st.commit("s1").unwrap();
        s.boot.write_state(&st).unwrap();
        h.install(&h.slots(Some(("s1", false))), "2");
        // GRUB tried s2; its kernel panicked; GRUB fell back to s1.
        let mut st = s.boot.read_state().unwrap();
        assert_eq!(st.begin().unwrap().slot, "s2");
        s.boot.write_state(&st).unwrap();
        let after = h.slots(Some(("s1", false)));
        assert_eq!(after.settle_unjudged().unwrap(), ["s2"]);
        let status = after.status().unwrap();
        assert_eq!(summary(&status), ["s2=2 bad tried", "s1=1 committed"]);
        let why = status.last_failure.unwrap().reason.unwrap();
        assert!(why.contains("never reached the daemon's verdict"), "{why}");
        // Settled once: a second start finds nothing.
        assert!(after.settle_unjudged().unwrap().is_empty());
    }

    #[test]
    fn a_rollback_goes_to_any_kept_committed_version_and_eviction_spares_the_running_one() {
        let h = host();
        let mut booted = "s1".to_owned();
        for name in ["1", "2", "3"] {
            let s = h.slots(Some((&booted, false)));
            let slot = h.install(&s, name);
            let mut st = s.boot.read_state().unwrap();
            st.begin();
            st.commit(&slot).unwrap();
            s.boot.write_state(&st).unwrap();
            booted = slot;
        }
        let s = h.slots(Some((&booted, false)));
        assert_eq!(
            summary(&s.status().unwrap()),
            [
                "s3=3 committed tried",
                "s2=2 committed tried",
                "s1=1 committed tried"
            ]
        );
        // Default: the committed version before the current one.
        assert_eq!(s.rollback(None).unwrap(), "s2");
        // Any kept committed version, by name.
        assert_eq!(s.rollback(Some("1")).unwrap(), "s1");
        assert_eq!(s.status().unwrap().next.unwrap().slot, "s1");
        assert!(matches!(
            s.rollback(Some("9")),
            Err(SlotsError::NoVersion(_))
        ));
        // A fourth version evicts the least preferred that is neither booted (s3) nor
        // the committed one that boots next (s1).
        let slot = h.install(&s, "4");
        let names = summary(&s.status().unwrap());
        assert_eq!(names.len(), KEEP, "{names:?}");
        assert!(names[0].starts_with(&format!("{slot}=4")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("s3=3")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("s1=1")), "{names:?}");
        assert!(!h.root.join("boot/os/s2").exists());
        assert!(
            s.history()
                .iter()
                .any(|e| e.event == "evicted" && e.slot == "s2")
        );
    }

    #[test]
    fn the_command_line_names_the_slot_and_the_trial() {
        assert_eq!(
            Booted::from_cmdline("console=ttyS0 juice.os.slot=s2 juice.os.trial=1 quiet"),
            Some(Booted {
                slot: "s2".into(),
                trial: true
            })
        );
        assert_eq!(
            Booted::from_cmdline("juice.os.slot=s1 juice.os.trial=0"),
            Some(Booted {
                slot: "s1".into(),
                trial: false
            })
        );
        assert_eq!(Booted::from_cmdline("console=ttyS0"), None);
        assert_eq!(Booted::from_cmdline("juice.os.slot=../x"), None);
    }
}
