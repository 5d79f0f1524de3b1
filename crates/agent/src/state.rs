//! The agent's state in an embedded ACID database (redb) at `$JUICE_HOME/agent.redb`:
//! groups with their revisions and rollout state, instances, and events.
//! Values are JSON, so the records can evolve with serde defaults.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::site::{GroupName, Isolation, Publish, UpdatePolicy};

const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Events kept; older ones are dropped.
const MAX_EVENTS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state database {path}: {reason}")]
    Db { path: String, reason: String },
    #[error("a record in the state database is damaged: {0}")]
    Damaged(String),
}

fn db_err(e: impl std::fmt::Display) -> StateError {
    StateError::Db {
        path: "agent.redb".into(),
        reason: e.to_string(),
    }
}

/// What a revision runs. A change to any of these makes a new revision; size and
/// update policy apply in place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Template {
    /// The image as written in the site file.
    pub image: String,
    /// What it resolved to when the revision was made.
    pub digest: String,
    pub isolation: Isolation,
    pub publish: Vec<Publish>,
    pub links: Vec<GroupName>,
    /// The site's override of the image's resources (absent in records made before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resources: Option<juice_image::manifest::Resources>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Revision {
    pub number: u64,
    pub template: Template,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Rollout {
    /// Every instance runs the current revision, which has proven healthy.
    Stable,
    /// Replacing instances of `from` with `to`.
    Progressing {
        from: Option<u64>,
        to: u64,
        since_ms: u64,
    },
    /// `to` failed and the group went back to `from`.
    RolledBack {
        failed: u64,
        to: u64,
        reason: String,
    },
    /// `at` failed and the policy says pause: nothing is replaced until the next apply.
    Paused { at: u64, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupRecord {
    pub name: GroupName,
    pub size: u32,
    pub update: UpdatePolicy,
    pub revisions: Vec<Revision>,
    pub current: u64,
    /// The newest revision that completed a rollout.
    pub last_good: Option<u64>,
    pub rollout: Rollout,
    /// Instances that ended on their own (crashed, killed) and were replaced.
    #[serde(default)]
    pub restarts: u64,
    /// Consecutive failures, for the crash-loop back-off.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub backoff_until_ms: u64,
    /// Consecutive starts that failed before an instance ran (a missing backend,
    /// an image that cannot be unpacked): they back off too, from 250 ms.
    #[serde(default)]
    pub start_failures: u32,
    /// Gates the commit of a trial OS version (site.toml's `critical`).
    #[serde(default)]
    pub critical: bool,
}

impl GroupRecord {
    pub fn revision(&self, n: u64) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.number == n)
    }
    pub fn current_revision(&self) -> Option<&Revision> {
        self.revision(self.current)
    }
    /// Makes `to` the current revision and starts rolling out to it from the present one.
    pub fn start_rollout(&mut self, to: u64) {
        self.rollout = Rollout::Progressing {
            from: Some(self.current),
            to,
            since_ms: now_ms(),
        };
        self.current = to;
        self.failures = 0;
        self.start_failures = 0;
        self.backoff_until_ms = 0;
    }

    pub fn next_number(&self) -> u64 {
        self.revisions.iter().map(|r| r.number).max().unwrap_or(0) + 1
    }
    /// Keeps the newest `keep` revisions, and always the current and last good ones.
    pub fn prune(&mut self) {
        let keep = self.update.keep_revisions.max(1) as usize;
        let mut numbers: Vec<u64> = self.revisions.iter().map(|r| r.number).collect();
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        let newest: Vec<u64> = numbers.into_iter().take(keep).collect();
        let (current, good) = (self.current, self.last_good);
        self.revisions.retain(|r| {
            newest.contains(&r.number) || r.number == current || Some(r.number) == good
        });
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceRecord {
    pub name: String,
    pub group: GroupName,
    pub revision: u64,
    pub created_ms: u64,
    /// Which backend runs it (records from before this field are sandboxes).
    #[serde(default)]
    pub isolation: Isolation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    pub group: Option<String>,
    pub instance: Option<String>,
    pub message: String,
}

/// Milliseconds since the Unix epoch, or on a test's fake clock: the time the
/// reconciler and the health checks go by.
pub type Clock = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock ([`now_ms`]).
pub fn system_clock() -> Clock {
    std::sync::Arc::new(now_ms)
}

pub use juice_runtime::process::now_unix_ms as now_ms;

pub struct State {
    db: Database,
}

impl State {
    pub fn open(path: &Path) -> Result<State, StateError> {
        let db = Database::create(path).map_err(|e| StateError::Db {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(GROUPS).map_err(db_err)?;
        tx.open_table(INSTANCES).map_err(db_err)?;
        tx.open_table(EVENTS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(State { db })
    }

    fn all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StateError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| StateError::Damaged(e.to_string()))?,
            );
        }
        Ok(out)
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StateError::Damaged(e.to_string()))?;
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(table)
            .map_err(db_err)?
            .insert(key, bytes.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(table)
            .map_err(db_err)?
            .remove(key)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub fn groups(&self) -> Result<Vec<GroupRecord>, StateError> {
        self.all(GROUPS)
    }
    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>, StateError> {
        Ok(self.groups()?.into_iter().find(|g| g.name.as_str() == name))
    }
    pub fn put_group(&self, g: &GroupRecord) -> Result<(), StateError> {
        self.put(GROUPS, g.name.as_str(), g)
    }
    pub fn delete_group(&self, name: &str) -> Result<(), StateError> {
        self.delete(GROUPS, name)
    }

    pub fn instances(&self) -> Result<Vec<InstanceRecord>, StateError> {
        self.all(INSTANCES)
    }
    pub fn put_instance(&self, i: &InstanceRecord) -> Result<(), StateError> {
        self.put(INSTANCES, &i.name, i)
    }
    pub fn delete_instance(&self, name: &str) -> Result<(), StateError> {
        self.delete(INSTANCES, name)
    }

    /// Appends an event (and drops the oldest beyond the cap).
    pub fn event(
        &self,
        group: Option<&str>,
        instance: Option<&str>,
        message: &str,
    ) -> Result<Event, StateError> {
        self.event_and_forget(group, instance, message, None)
    }

    /// Drops an instance's record and appends the event that says why, in one
    /// commit (one disk flush on the path of a heal, not two).
    pub fn instance_ended(
        &self,
        group: &str,
        instance: &str,
        message: &str,
    ) -> Result<Event, StateError> {
        self.event_and_forget(Some(group), Some(instance), message, Some(instance))
    }

    fn event_and_forget(
        &self,
        group: Option<&str>,
        instance: Option<&str>,
        message: &str,
        forget: Option<&str>,
    ) -> Result<Event, StateError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        if let Some(name) = forget {
            tx.open_table(INSTANCES)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?;
        }
        let event = {
            let mut t = tx.open_table(EVENTS).map_err(db_err)?;
            let seq = t.last().map_err(db_err)?.map_or(1, |(k, _)| k.value() + 1);
            let event = Event {
                seq,
                time_ms: now_ms(),
                group: group.map(str::to_owned),
                instance: instance.map(str::to_owned),
                message: message.to_owned(),
            };
            let bytes =
                serde_json::to_vec(&event).map_err(|e| StateError::Damaged(e.to_string()))?;
            t.insert(seq, bytes.as_slice()).map_err(db_err)?;
            if seq > MAX_EVENTS {
                t.remove(seq - MAX_EVENTS).map_err(db_err)?;
            }
            event
        };
        tx.commit().map_err(db_err)?;
        Ok(event)
    }

    /// Events after `since`, optionally for one group, oldest first, at most `limit`.
    pub fn events(
        &self,
        since: u64,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StateError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(EVENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.range(since + 1..).map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            let e: Event = serde_json::from_slice(v.value())
                .map_err(|e| StateError::Damaged(e.to_string()))?;
            if group.is_none() || e.group.as_deref() == group {
                out.push(e);
            }
        }
        let skip = out.len().saturating_sub(limit);
        Ok(out.split_off(skip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> GroupRecord {
        GroupRecord {
            name: GroupName::try_from(name.to_owned()).unwrap(),
            size: 1,
            update: UpdatePolicy::default(),
            revisions: vec![],
            current: 0,
            last_good: None,
            rollout: Rollout::Stable,
            restarts: 0,
            failures: 0,
            backoff_until_ms: 0,
            start_failures: 0,
            critical: false,
        }
    }

    #[test]
    fn records_survive_reopening() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("agent.redb");
        {
            let s = State::open(&path).unwrap();
            s.put_group(&group("web")).unwrap();
            s.put_instance(&InstanceRecord {
                name: "web-r1-abcd".into(),
                group: GroupName::try_from("web".to_owned()).unwrap(),
                revision: 1,
                created_ms: 1,
                isolation: Isolation::Sandbox,
            })
            .unwrap();
            for i in 0..5 {
                s.event(Some("web"), None, &format!("e{i}")).unwrap();
            }
            s.event(Some("db"), None, "other").unwrap();
        }
        let s = State::open(&path).unwrap();
        assert_eq!(s.group("web").unwrap().unwrap().name.as_str(), "web");
        assert_eq!(s.instances().unwrap().len(), 1);
        let web = s.events(0, Some("web"), 3).unwrap();
        assert_eq!(
            web.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["e2", "e3", "e4"]
        );
        assert_eq!(s.events(5, None, 100).unwrap().len(), 1);
        s.delete_group("web").unwrap();
        assert!(s.group("web").unwrap().is_none());
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_ones_in_use() {
        let mut g = group("web");
        g.update.keep_revisions = 2;
        for n in 1..=5 {
            g.revisions.push(Revision {
                number: n,
                template: Template {
                    image: "x".into(),
                    digest: "d".into(),
                    isolation: Isolation::Sandbox,
                    publish: vec![],
                    links: vec![],
                    resources: None,
                },
                created_ms: n,
            });
        }
        g.current = 5;
        g.last_good = Some(1);
        g.prune();
        assert_eq!(
            g.revisions.iter().map(|r| r.number).collect::<Vec<_>>(),
            [1, 4, 5]
        );
    }
}
