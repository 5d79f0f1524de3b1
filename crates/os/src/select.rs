//! Which kept OS version boots: the rule GRUB runs (see [`crate::grub::config`]), in Rust.
//!
//! The state lives in `grubenv` ([`crate::grubenv`]): `juice_order` lists the slots,
//! most preferred first, and each slot has three flags, absent meaning 0:
//! `<slot>_ok` (installed and not known bad), `<slot>_try` (a trial boot was
//! attempted) and `<slot>_good` (committed).
//!
//! The rule: boot the first slot in the order that is ok and either committed or not yet
//! tried. A slot that is not committed boots as a trial, and its try flag is saved
//! before the kernel starts, so a trial that never commits is never booted again: the
//! next boot falls back by itself. Committed slots stay committed, so an outage that
//! makes a host reboot cannot bounce it between versions; only trials fall back.
//!
//! ```
//! use juice_os::select::BootState;
//! let mut state = BootState::default();
//! state.install("s1").unwrap();
//! state.commit("s1").unwrap();
//! state.install("s2").unwrap();
//! assert_eq!(state.begin().unwrap().slot, "s2"); // the new version's one trial
//! assert_eq!(state.choose().unwrap().slot, "s1"); // it never committed: fall back
//! ```

use std::collections::BTreeMap;

use crate::grubenv::{Env, GrubenvError};

/// The `grubenv` variable listing the slots, most preferred first, separated by spaces.
pub const ORDER_VAR: &str = "juice_order";

/// Why a boot-state operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// A slot name is not `s` and a number (GRUB builds variable names from it).
    #[error("slot name {0:?}: slots are named s1, s2, ...")]
    BadSlot(String),
    /// The slot is not on this disk.
    #[error("no OS version in slot {0}")]
    UnknownSlot(String),
    /// The slot is known bad, so it cannot be committed.
    #[error("slot {0} is marked bad; install it again to boot it")]
    NotOk(String),
    /// Only a committed slot can be preferred (a rollback goes to a known-good version).
    #[error("slot {0} is not committed; only a committed version can be preferred")]
    NotCommitted(String),
    /// Writing the state into the environment failed.
    #[error("cannot write the boot state: {0}")]
    Env(#[from] GrubenvError),
}

/// The flags of one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotFlags {
    /// Installed and not known bad (`<slot>_ok`).
    pub ok: bool,
    /// A trial boot was attempted (`<slot>_try`).
    pub tried: bool,
    /// Committed (`<slot>_good`).
    pub good: bool,
}

/// What boots next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The slot, e.g. `s2`.
    pub slot: String,
    /// Whether this is the slot's one trial boot (it is not committed).
    pub trial: bool,
}

/// The boot state of a disk: the order of its slots and their flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootState {
    /// Slots GRUB considers, most preferred first.
    pub order: Vec<String>,
    /// Every slot with state, including any not in the order (GRUB ignores those).
    pub slots: BTreeMap<String, SlotFlags>,
}

/// Whether `name` is a slot name: `s` then a number without leading zeros.
pub fn valid_slot(name: &str) -> bool {
    match name.strip_prefix('s') {
        Some(n) => !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

fn check_slot(name: &str) -> Result<(), SelectError> {
    if valid_slot(name) {
        Ok(())
    } else {
        Err(SelectError::BadSlot(name.to_string()))
    }
}

const FLAGS: [&str; 3] = ["ok", "try", "good"];

impl BootState {
    /// Reads the state from an environment. A slot name in `juice_order` that is not a
    /// slot name is refused (GRUB would paste it into a command).
    pub fn from_env(env: &Env) -> Result<BootState, SelectError> {
        let mut state = BootState::default();
        for slot in env.get(ORDER_VAR).unwrap_or("").split_ascii_whitespace() {
            check_slot(slot)?;
            if !state.order.iter().any(|s| s == slot) {
                state.order.push(slot.to_string());
            }
        }
        let slots_with_flags = env.iter().filter_map(|(name, _)| {
            let (slot, flag) = name.rsplit_once('_')?;
            (valid_slot(slot) && FLAGS.contains(&flag)).then_some(slot)
        });
        for slot in state
            .order
            .iter()
            .map(String::as_str)
            .chain(slots_with_flags)
        {
            let flag = |f: &str| env.get(&format!("{slot}_{f}")) == Some("1");
            state.slots.insert(
                slot.to_string(),
                SlotFlags {
                    ok: flag("ok"),
                    tried: flag("try"),
                    good: flag("good"),
                },
            );
        }
        Ok(state)
    }

    /// Writes the state into an environment, as GRUB expects it: flags that are 0 are
    /// removed (smaller blocks), and flags of slots no longer kept are removed too.
    pub fn write_to(&self, env: &mut Env) -> Result<(), SelectError> {
        let stale: Vec<String> = env
            .iter()
            .filter_map(|(name, _)| {
                let (slot, flag) = name.rsplit_once('_')?;
                (valid_slot(slot) && FLAGS.contains(&flag)).then(|| name.to_string())
            })
            .collect();
        for name in stale {
            env.remove(&name);
        }
        env.set(ORDER_VAR, &self.order.join(" "))?;
        for (slot, flags) in &self.slots {
            for (flag, on) in [("ok", flags.ok), ("try", flags.tried), ("good", flags.good)] {
                if on {
                    env.set(&format!("{slot}_{flag}"), "1")?;
                }
            }
        }
        Ok(())
    }

    /// The slot GRUB boots next: the first in the order that is ok and committed or not
    /// yet tried. `None` means nothing is bootable (GRUB says so and reboots).
    pub fn choose(&self) -> Option<Choice> {
        self.order.iter().find_map(|slot| {
            let f = self.slots.get(slot)?;
            (f.ok && (f.good || !f.tried)).then(|| Choice {
                slot: slot.clone(),
                trial: !f.good,
            })
        })
    }

    /// What GRUB does at boot: choose, and for a trial record that it was tried.
    pub fn begin(&mut self) -> Option<Choice> {
        let choice = self.choose()?;
        if choice.trial
            && let Some(f) = self.slots.get_mut(&choice.slot)
        {
            f.tried = true;
        }
        Some(choice)
    }

    /// A new version was written into `slot`: it goes first, ok and untried, so the
    /// next boot is its trial.
    pub fn install(&mut self, slot: &str) -> Result<(), SelectError> {
        check_slot(slot)?;
        self.order.retain(|s| s != slot);
        self.order.insert(0, slot.to_string());
        self.slots.insert(
            slot.to_string(),
            SlotFlags {
                ok: true,
                tried: false,
                good: false,
            },
        );
        Ok(())
    }

    /// The version in `slot` proved healthy: it is committed, and boots from now on
    /// whenever it is the first ok slot.
    pub fn commit(&mut self, slot: &str) -> Result<(), SelectError> {
        let f = self.flags_mut(slot)?;
        if !f.ok {
            return Err(SelectError::NotOk(slot.to_string()));
        }
        f.good = true;
        Ok(())
    }

    /// The version in `slot` is known bad: it is never booted again (until installed
    /// again), committed or not.
    pub fn mark_bad(&mut self, slot: &str) -> Result<(), SelectError> {
        let f = self.flags_mut(slot)?;
        f.ok = false;
        f.good = false;
        Ok(())
    }

    /// Rolls back (or forward) to a kept committed version: it goes first in the order.
    pub fn prefer(&mut self, slot: &str) -> Result<(), SelectError> {
        let f = self.flags_mut(slot)?;
        if !(f.ok && f.good) {
            return Err(SelectError::NotCommitted(slot.to_string()));
        }
        self.order.retain(|s| s != slot);
        self.order.insert(0, slot.to_string());
        Ok(())
    }

    /// Drops a slot from the state (after its files were removed).
    pub fn forget(&mut self, slot: &str) {
        self.order.retain(|s| s != slot);
        self.slots.remove(slot);
    }

    /// Makes room for one more version so that at most `keep` stay kept with it: returns
    /// the name for the new slot (the lowest unused; never one of the evicted, so the new
    /// files can be written before the old are removed) and the slots to evict, worst
    /// first: bad ones, then uncommitted, then the least preferred.
    ///
    /// The committed slot that boots now (the first committed in the order) and `booted`
    /// are never evicted, so fewer than asked may be returned when `keep` is small.
    pub fn free_slot(&self, keep: usize, booted: Option<&str>) -> (String, Vec<String>) {
        let mut n: u32 = 1;
        let new = loop {
            let name = format!("s{n}");
            if !self.slots.contains_key(&name) {
                break name;
            }
            n += 1;
        };
        let protected = self
            .order
            .iter()
            .find(|s| self.slots.get(*s).is_some_and(|f| f.ok && f.good))
            .map(String::as_str);
        let position = |slot: &str| {
            self.order
                .iter()
                .position(|s| s == slot)
                .unwrap_or(usize::MAX)
        };
        let mut candidates: Vec<(&str, SlotFlags)> = self
            .slots
            .iter()
            .map(|(s, f)| (s.as_str(), *f))
            .filter(|(s, _)| Some(*s) != protected && Some(*s) != booted)
            .collect();
        // Worst first: not ok, then ok but uncommitted, then committed; each least preferred first.
        candidates.sort_by_key(|(s, f)| {
            (
                u8::from(f.ok) + u8::from(f.ok && f.good),
                std::cmp::Reverse(position(s)),
            )
        });
        let excess = (self.slots.len() + 1).saturating_sub(keep.max(1));
        let evict = candidates
            .into_iter()
            .take(excess)
            .map(|(s, _)| s.to_string())
            .collect();
        (new, evict)
    }

    fn flags_mut(&mut self, slot: &str) -> Result<&mut SlotFlags, SelectError> {
        check_slot(slot)?;
        self.slots
            .get_mut(slot)
            .ok_or_else(|| SelectError::UnknownSlot(slot.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A state from a compact description: "s2:ok,try s1:ok,good" (order as written).
    fn state(desc: &str) -> BootState {
        let mut st = BootState::default();
        for part in desc.split_whitespace() {
            let (slot, flags) = part.split_once(':').unwrap_or((part, ""));
            st.order.push(slot.to_string());
            st.slots.insert(
                slot.to_string(),
                SlotFlags {
                    ok: flags.contains("ok"),
                    tried: flags.contains("try"),
                    good: flags.contains("good"),
                },
            );
        }
        st
    }

    fn choice(slot: &str, trial: bool) -> Option<Choice> {
        Some(Choice {
            slot: slot.into(),
            trial,
        })
    }

    #[test]
    fn choose_follows_the_rule() {
        let cases = [
            ("", None),
            ("s1:ok,good", choice("s1", false)),
            ("s1:good", None),
            ("s2:ok s1:ok,good", choice("s2", true)),
            ("s2:ok,try s1:ok,good", choice("s1", false)),
            ("s2:ok,try,good s1:ok,good", choice("s2", false)),
            ("s3:ok,try s2:try,good s1:ok,good", choice("s1", false)),
            ("s2:ok,try s1:ok,try", None),
            ("s1:ok", choice("s1", true)),
        ];
        for (desc, want) in cases {
            assert_eq!(state(desc).choose(), want, "{desc}");
        }
    }

    #[test]
    fn begin_burns_a_trial_but_never_a_committed_boot() {
        let mut st = state("s2:ok s1:ok,good");
        assert_eq!(st.begin(), choice("s2", true));
        assert!(st.slots["s2"].tried);
        assert_eq!(st.begin(), choice("s1", false));
        assert_eq!(st.begin(), choice("s1", false));
        assert_eq!(st, state("s2:ok,try s1:ok,good"));
    }

    #[test]
    fn install_commit_mark_bad_and_prefer() {
        let mut st = state("s1:ok,good");
        st.install("s2").unwrap();
        assert_eq!(st, state("s2:ok s1:ok,good"));
        st.begin();
        st.commit("s2").unwrap();
        assert_eq!(st, state("s2:ok,try,good s1:ok,good"));
        st.prefer("s1").unwrap();
        assert_eq!(st.choose(), choice("s1", false));
        st.mark_bad("s1").unwrap();
        assert_eq!(st.choose(), choice("s2", false));
        assert_eq!(st.commit("s1"), Err(SelectError::NotOk("s1".into())));
        assert_eq!(st.prefer("s1"), Err(SelectError::NotCommitted("s1".into())));
        assert_eq!(st.commit("s9"), Err(SelectError::UnknownSlot("s9".into())));
        assert_eq!(
            st.install("a;reboot"),
            Err(SelectError::BadSlot("a;reboot".into()))
        );
        // Reinstalling a slot resets it to a fresh trial.
        st.install("s1").unwrap();
        assert_eq!(
            st.slots["s1"],
            SlotFlags {
                ok: true,
                tried: false,
                good: false
            }
        );
        assert_eq!(st.order, ["s1", "s2"]);
    }

    #[test]
    fn free_slot_evicts_the_worst_and_never_the_running_or_committed_version() {
        /// (state, keep, booted, new slot, evicted)
        type Case<'a> = (&'a str, usize, Option<&'a str>, &'a str, &'a [&'a str]);
        let cases: [Case; 7] = [
            ("", 3, None, "s1", &[]),
            ("s1:ok,good", 3, None, "s2", &[]),
            ("s2:ok,good s1:ok,good", 2, Some("s2"), "s3", &["s1"]),
            (
                "s3:ok,try s2:ok,good s1:ok,good",
                2,
                Some("s2"),
                "s4",
                &["s3", "s1"],
            ),
            (
                "s3:ok,good s2 s1:ok,good",
                2,
                Some("s3"),
                "s4",
                &["s2", "s1"],
            ),
            // The booted slot (a trial) and the committed preferred one both stay.
            ("s2:ok,try s1:ok,good", 1, Some("s2"), "s3", &[]),
            ("s1:ok,good s3:ok,good", 3, None, "s2", &[]),
        ];
        for (desc, keep, booted, new, evict) in cases {
            let (n, e) = state(desc).free_slot(keep, booted);
            assert_eq!(
                (n.as_str(), e.iter().map(String::as_str).collect::<Vec<_>>()),
                (new, evict.to_vec()),
                "{desc}"
            );
        }
    }

    #[test]
    fn the_env_encoding_round_trips_and_refuses_hostile_slot_names() {
        let st = state("s2:ok,try s1:ok,good s3");
        let mut env = Env::default();
        env.set("s7_ok", "1").unwrap(); // a stale slot, dropped on write
        env.set("other", "kept").unwrap();
        st.write_to(&mut env).unwrap();
        assert_eq!(env.get(ORDER_VAR), Some("s2 s1 s3"));
        assert_eq!(env.get("s2_try"), Some("1"));
        assert_eq!(env.get("s2_good"), None);
        assert_eq!(env.get("s7_ok"), None);
        assert_eq!(env.get("other"), Some("kept"));
        assert_eq!(BootState::from_env(&env).unwrap(), st);

        let mut bad = Env::default();
        bad.set(ORDER_VAR, "s1 ${reboot}").unwrap();
        assert_eq!(
            BootState::from_env(&bad),
            Err(SelectError::BadSlot("${reboot}".into()))
        );
    }

    fn arb_state() -> impl Strategy<Value = BootState> {
        proptest::collection::vec((1u32..8, any::<bool>(), any::<bool>(), any::<bool>()), 0..7)
            .prop_map(|v| {
                let mut st = BootState::default();
                for (n, ok, tried, good) in v {
                    let slot = format!("s{n}");
                    if !st.slots.contains_key(&slot) {
                        st.order.push(slot.clone());
                        st.slots.insert(slot, SlotFlags { ok, tried, good });
                    }
                }
                st
            })
    }

    proptest! {
        #[test]
        fn choose_never_boots_a_bad_or_burnt_trial(st in arb_state()) {
            if let Some(c) = st.choose() {
                let f = st.slots[&c.slot];
                prop_assert!(f.ok);
                prop_assert!(f.good || !f.tried);
                prop_assert_eq!(c.trial, !f.good);
            }
        }

        #[test]
        fn a_trial_that_never_commits_boots_once_then_a_committed_version_sticks(st in arb_state()) {
            let mut st = st;
            let mut seen = Vec::new();
            for _ in 0..10 {
                match st.begin() {
                    Some(c) if c.trial => {
                        prop_assert!(!seen.contains(&c.slot), "trial {} booted twice", c.slot);
                        seen.push(c.slot);
                    }
                    Some(c) => {
                        // A committed choice is stable: every later boot picks it again.
                        prop_assert_eq!(st.begin(), Some(c));
                        break;
                    }
                    None => break,
                }
            }
        }

        #[test]
        fn the_env_round_trip_keeps_any_state(st in arb_state()) {
            let mut env = Env::default();
            st.write_to(&mut env).unwrap();
            prop_assert_eq!(BootState::from_env(&Env::parse(&env.to_block().unwrap()).unwrap()).unwrap(), st);
        }
    }
}
