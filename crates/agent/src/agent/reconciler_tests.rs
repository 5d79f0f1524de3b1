//! The reconciler end to end over the in-memory backend and a clock the test
//! moves: heal, back-off, surge, gate, rollback and adoption, without root,
//! processes or sleeps.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::backend::fake::Fake;

/// Builds the appliance `t:{version}` in `home`'s store.
pub(super) fn build_appliance(home: &Path, version: u32) {
    let store = Store::open(home).unwrap();
    let app = home.join(format!("app-{version}"));
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("hello"), "#!/bin/sh\n").unwrap();
    std::fs::write(
        app.join("juice.toml"),
        format!("[appliance]\nname = \"t\"\nversion = \"{version}\"\n\n[build]\nfiles = [{{ from = \"hello\", to = \"/usr/bin/hello\" }}]\n\n[run]\ncommand = [\"/usr/bin/hello\"]\n"),
    )
    .unwrap();
    build(&store, &app, &BuildOptions::default()).unwrap();
}

/// A home with `t:1` and `t:2` built and unpacked, made once: each host starts
/// from a copy (a build takes tens of milliseconds).
fn template() -> &'static Path {
    static HOME: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        for version in [1, 2] {
            build_appliance(home.path(), version);
            materialise(&store, &format!("t:{version}")).unwrap();
        }
        home
    })
    .path()
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&source, &target);
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source).unwrap(), &target).unwrap();
        } else {
            std::fs::copy(&source, &target).unwrap();
        }
    }
}

/// A host: a home with `t:1` and `t:2`, the fake backend, the clock and an agent.
struct Host {
    home: tempfile::TempDir,
    fake: Fake,
    time: Arc<AtomicU64>,
    agent: Arc<Agent>,
    /// The last event read.
    seen: u64,
}

impl Host {
    fn new() -> Host {
        Host::with(Fake::new())
    }

    /// A host whose instances have health checks the test passes or fails.
    fn checked() -> Host {
        Host::with(Fake::with_health_checks())
    }

    fn with(fake: Fake) -> Host {
        let home = tempfile::tempdir().unwrap();
        copy_tree(template(), home.path());
        Host::over(home, fake, Arc::new(AtomicU64::new(1_000_000)))
    }

    /// A daemon over `home`, with the instances in `fake`, at `time`.
    fn over(home: tempfile::TempDir, fake: Fake, time: Arc<AtomicU64>) -> Host {
        let t = time.clone();
        let clock: Clock = Arc::new(move || t.load(Ordering::SeqCst));
        let store = Store::open(home.path()).unwrap();
        let agent = Agent::with_sandbox(home.path(), store, Box::new(fake.clone()), clock).unwrap();
        Host {
            home,
            fake,
            time,
            agent,
            seen: 0,
        }
    }

    /// The daemon stops and another starts over the same home.
    fn restart_daemon(self) -> Host {
        let Host {
            home,
            fake,
            time,
            agent,
            seen,
        } = self;
        drop(agent);
        Host {
            seen,
            ..Host::over(home, fake, time)
        }
    }

    /// Applies one group `web` of `size` instances of `t:{version}`, with `extra` lines.
    fn apply(&self, version: u32, size: u32, extra: &str) {
        let site = self.home.path().join("site.toml");
        std::fs::write(
            &site,
            format!("[group.web]\nimage = \"t:{version}\"\nsize = {size}\n{extra}"),
        )
        .unwrap();
        self.agent.apply(&Site::load(&site).unwrap(), true).unwrap();
    }

    fn pass(&self) {
        self.agent.reconcile().unwrap();
    }

    /// A pass `ms` later.
    fn after(&self, ms: u64) {
        self.advance(ms);
        self.pass();
    }

    fn now(&self) -> u64 {
        self.time.load(Ordering::SeqCst)
    }

    fn advance(&self, ms: u64) {
        self.time.fetch_add(ms, Ordering::SeqCst);
    }

    /// The events since the last call, oldest first.
    fn said(&mut self) -> Vec<String> {
        let events = self
            .agent
            .state()
            .events(self.seen, None, usize::MAX)
            .unwrap();
        self.seen = events.last().map_or(self.seen, |e| e.seq);
        events.into_iter().map(|e| e.message).collect()
    }

    /// The instances of `revision` the agent holds.
    fn of(&self, revision: u64) -> Vec<String> {
        self.agent
            .instances()
            .into_iter()
            .filter(|i| i.revision == revision)
            .map(|i| i.name)
            .collect()
    }

    /// How many instances of revisions 1 and 2 the agent holds.
    fn per_revision(&self) -> (usize, usize) {
        (self.of(1).len(), self.of(2).len())
    }

    fn status(&self) -> GroupStatus {
        self.agent.groups().unwrap()[0].status
    }

    /// Up and past the gate at revision 1 with `size` instances.
    fn up(&mut self, size: u32) {
        self.apply(1, size, "");
        self.pass();
        for name in self.fake.running() {
            self.fake.healthy(&name, self.now());
        }
        self.after(10_000);
        assert!(self.said().iter().any(|m| m == "revision 1 is up"));
    }
}

impl Host {
    /// Up at revision 1 with `size` instances, then one pass into the rollout of
    /// revision 2: its first instances.
    fn rolling_out(&mut self, size: u32) -> Vec<String> {
        self.up(size);
        self.apply(2, size, "");
        self.pass();
        self.of(2)
    }
}

/// The event of a rollout of revision 2 that failed because `reason`.
fn rolled_back_because(reason: &str) -> String {
    format!("rollout of revision 2 failed: {reason}; rolling back to revision 1")
}

fn count(said: &[String], prefix: &str) -> usize {
    said.iter().filter(|m| m.starts_with(prefix)).count()
}

#[test]
fn an_instance_that_ends_is_replaced_at_once() {
    let mut h = Host::new();
    h.apply(1, 2, "");
    h.pass();
    assert_eq!(h.fake.running().len(), 2);
    let victim = h.fake.running()[0].clone();
    h.said();

    assert!(h.fake.exit(&victim, 1));
    h.pass();
    let said = h.said();
    assert_eq!(
        said[0],
        format!("instance {victim} ended: exited with code 1")
    );
    assert_eq!(count(&said, "started "), 1, "{said:?}");
    assert_eq!(h.fake.running().len(), 2);
    assert!(!h.fake.running().contains(&victim));
    assert_eq!(h.agent.groups().unwrap()[0].restarts, 1);

    // `juice top`'s sample: the live instances with their group's restarts, and the sums.
    let stats = h.agent.stats().unwrap();
    let names: Vec<&str> = stats.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, h.fake.running());
    assert!(stats.instances.iter().all(
        |i| i.restarts == 1 && i.memory_bytes == crate::backend::fake::FAKE_USAGE.memory_bytes
    ));
    assert_eq!(stats.groups.len(), 1);
    assert_eq!(stats.groups[0].instances, 2);
    assert_eq!(stats.groups[0].memory_bytes, 2 << 20);
    assert_eq!(stats.groups[0].restarts, 1);
}

#[test]
fn a_crash_loop_backs_off_doubling_and_a_healthy_replacement_ends_it() {
    let mut h = Host::new();
    h.apply(1, 1, "");
    h.pass();
    let crash = |h: &Host| {
        let running = h.fake.running();
        assert!(h.fake.exit(&running[0], 1));
        h.pass();
    };
    crash(&h);
    assert_eq!(h.fake.spawns(), 2, "the first crash is replaced at once");
    crash(&h);
    assert_eq!(h.fake.spawns(), 2, "the second waits 250 ms");
    h.after(249);
    assert_eq!(h.fake.spawns(), 2);
    h.after(1);
    assert_eq!(h.fake.spawns(), 3);
    h.said();

    crash(&h);
    let said = h.said();
    assert!(
        said.contains(&"crash loop: 3 failures in a row, next start in 500 ms".to_owned()),
        "{said:?}"
    );
    assert_eq!(h.status(), GroupStatus::CrashLoop { failures: 3 });
    h.after(500);
    assert_eq!(h.fake.running().len(), 1);
    // Past the gate, the replacement ends the loop and the first deployment is up.
    h.after(10_000);
    assert_eq!(h.status(), GroupStatus::Ok);
    assert!(h.said().contains(&"revision 1 is up".to_owned()));
}

#[test]
fn a_rollout_surges_one_at_a_time_behind_the_health_gate() {
    let mut h = Host::new();
    h.up(2);
    h.apply(2, 2, "");
    h.pass();
    assert_eq!(h.per_revision(), (2, 1), "one extra while the old serve");
    assert_eq!(h.status(), GroupStatus::RollingOut);

    // Nothing moves until the new instance has been healthy for the gate (10 s).
    h.pass();
    h.after(9_999);
    assert_eq!(h.per_revision(), (2, 1));
    assert_eq!(h.fake.spawns(), 3);
    h.said();

    h.after(1);
    assert_eq!(h.per_revision(), (1, 2));
    let said = h.said();
    assert!(said[0].starts_with("stopped web-r1-"), "{said:?}");
    assert!(
        said[0].contains("(replaced by the current revision)"),
        "{said:?}"
    );
    assert!(said[1].starts_with("started web-r2-"), "{said:?}");

    h.after(10_000);
    assert_eq!(h.per_revision(), (0, 2));
    let said = h.said();
    assert_eq!(
        said.last().unwrap(),
        "rollout from revision 1 to 2 complete"
    );
    assert_eq!(h.status(), GroupStatus::Ok);
}

#[test]
fn a_new_revision_that_crashes_is_rolled_back_and_the_old_never_stopped() {
    let mut h = Host::new();
    h.up(2);
    let old = h.of(1);
    h.apply(2, 2, "");
    h.pass();
    let new = h.of(2);
    h.said();

    assert!(h.fake.exit(&new[0], 3));
    h.pass();
    let said = h.said();
    assert_eq!(
        said,
        [
            format!("instance {} ended: exited with code 3", new[0]),
            rolled_back_because("an instance of revision 2 ended: exited with code 3"),
        ]
    );
    assert_eq!(h.status(), GroupStatus::RolledBack { failed: 2 });
    assert_eq!(h.of(1), old);
    assert!(h.of(2).is_empty());
    assert_eq!(h.agent.groups().unwrap()[0].revision, 1);
}

#[test]
fn a_new_revision_that_cannot_start_is_rolled_back() {
    let mut h = Host::new();
    h.up(1);
    h.fake.fail_spawns(Some("no kernel"));
    h.apply(2, 1, "");
    h.pass();
    let said = h.said();
    assert!(
        said.iter().any(|m| m.starts_with("apply: replace")),
        "{said:?}"
    );
    let tail = &said[said.len() - 2..];
    assert_eq!(
        tail,
        [
            "cannot start an instance of revision 2: no kernel (failed start 1 in a row; next try in 250ms)",
            &rolled_back_because("cannot start an instance of revision 2: no kernel"),
        ]
    );
    assert_eq!(h.status(), GroupStatus::RolledBack { failed: 2 });
    assert_eq!(h.of(1).len(), 1);
}

#[test]
fn a_paused_rollout_stops_the_new_revision_and_keeps_the_old() {
    let mut h = Host::new();
    h.up(2);
    h.fake.fail_spawns(Some("no kernel"));
    let pause = "[group.web.update]\non_failure = \"pause\"\n";
    h.apply(2, 2, pause);
    h.pass();
    assert_eq!(h.status(), GroupStatus::Paused);
    assert!(h.said().last().unwrap().ends_with("; paused"));
    h.after(60_000);
    assert_eq!(h.per_revision(), (2, 0));
    assert_eq!(h.fake.spawns(), 3, "a paused rollout starts nothing");
}

#[test]
fn a_new_daemon_adopts_running_instances_and_replaces_the_gone() {
    let mut h = Host::new();
    h.up(2);
    let before = h.fake.running();
    // One ends while no daemon runs.
    let mut h = h.restart_daemon();
    assert!(h.fake.exit(&before[0], 1));
    h.said();

    h.agent.adopt().unwrap();
    let said = h.said();
    assert!(
        said.contains(&format!("adopted running instance {}", before[1])),
        "{said:?}"
    );
    assert!(
        said.contains(&format!("instance {} was gone", before[0])),
        "{said:?}"
    );
    assert_eq!(h.of(1), [before[1].clone()]);

    h.pass();
    assert_eq!(h.fake.spawns(), 3, "only the gone one is started again");
    assert!(h.fake.running().contains(&before[1]));
    assert_eq!(h.fake.running().len(), 2);
}

#[test]
fn a_new_revision_that_fails_its_health_check_is_rolled_back() {
    let mut h = Host::checked();
    let new = h.rolling_out(2);
    h.said();

    assert!(h.fake.fail_check(&new[0], "GET /health: 500"));
    h.pass();
    let said = h.said();
    assert_eq!(
        said[0],
        rolled_back_because(&format!(
            "instance {} of revision 2 failed its health check: GET /health: 500",
            new[0]
        ))
    );
    assert!(
        said[1].starts_with(&format!("stopped {} (its revision failed)", new[0])),
        "{said:?}"
    );
    assert_eq!(h.status(), GroupStatus::RolledBack { failed: 2 });
    assert_eq!(h.per_revision(), (2, 0));
}

#[test]
fn the_gate_counts_from_when_the_check_first_passed() {
    let mut h = Host::checked();
    let new = h.rolling_out(1);
    h.after(20_000);
    assert_eq!(h.per_revision(), (1, 1), "starting is not healthy");

    h.fake.healthy(&new[0], h.now());
    h.after(9_999);
    assert_eq!(h.per_revision(), (1, 1));
    h.after(1);
    assert_eq!(h.per_revision(), (0, 1));
    assert_eq!(
        h.said().last().unwrap(),
        "rollout from revision 1 to 2 complete"
    );
}

#[test]
fn a_new_revision_never_healthy_within_the_gate_and_30_s_is_rolled_back() {
    let mut h = Host::checked();
    let new = h.rolling_out(1);
    h.after(40_000);
    assert_eq!(h.status(), GroupStatus::RollingOut);
    h.said();

    h.after(1);
    assert_eq!(
        h.said()[0],
        rolled_back_because(&format!(
            "instance {} of revision 2 did not become healthy within 40s",
            new[0]
        ))
    );
    assert_eq!(h.status(), GroupStatus::RolledBack { failed: 2 });
}

#[test]
fn the_operators_groups_and_the_fleets_neither_change_nor_delete_each_other() {
    let h = Host::new();
    let site = |text: &str| Site::parse(text, std::path::Path::new("site.toml")).unwrap();
    let names = |h: &Host| -> Vec<String> {
        h.agent
            .groups()
            .unwrap()
            .into_iter()
            .map(|g| g.name)
            .collect()
    };
    h.agent
        .apply(&site("[group.web]\nimage = \"t:1\"\n"), true)
        .unwrap();
    let fleet = h
        .agent
        .apply_fleet(&site(
            "[group.fleet-web]\nimage = \"t:1\"\nsize = 2\n[group.fleet-bad]\nimage = \"no-such:1\"\n",
        ))
        .unwrap();
    assert_eq!(
        names(&h),
        ["fleet-web", "web"],
        "the fleet's apply kept web"
    );
    assert!(
        fleet.failed[&GroupName::try_from("fleet-bad".to_owned()).unwrap()].contains("no-such"),
        "{fleet:?}"
    );
    // The operator applies another site: web goes, fleet-web stays.
    let changes = h
        .agent
        .apply(&site("[group.api]\nimage = \"t:1\"\n"), true)
        .unwrap();
    assert!(
        changes.iter().all(|c| c.group != "fleet-web"),
        "{changes:?}"
    );
    assert_eq!(names(&h), ["api", "fleet-web"]);
    // A site may not name a fleet group.
    let e = h
        .agent
        .apply(&site("[group.fleet-web]\nimage = \"t:1\"\n"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("belong to groups the fleet assigns"), "{e}");
    // The same fleet site again changes nothing; an empty one deletes only fleet groups.
    let again = h
        .agent
        .apply_fleet(&site("[group.fleet-web]\nimage = \"t:1\"\nsize = 2\n"))
        .unwrap();
    assert!(
        again.changes.iter().all(|c| c.action == Action::Unchanged),
        "{again:?}"
    );
    h.agent.apply_fleet(&Site::default()).unwrap();
    assert_eq!(names(&h), ["api"]);
    // The fleet's apply takes only fleet groups.
    assert!(
        h.agent
            .apply_fleet(&site("[group.web]\nimage = \"t:1\"\n"))
            .is_err()
    );
}

#[test]
fn a_sites_resources_replace_the_images_and_a_change_of_them_is_a_new_revision() {
    let mut h = Host::new();
    h.apply(1, 1, "");
    h.pass();
    let first = h.of(1);
    let image = h.fake.limits(&first[0]).unwrap();
    h.apply(1, 1, "resources = { cpus = 0.25, memory = \"32MiB\" }\n");
    h.pass();
    let said = h.said();
    let second = h.of(2);
    assert_eq!(
        second.len(),
        1,
        "a change of resources makes revision 2: {said:?}"
    );
    let limits = h.fake.limits(&second[0]).unwrap();
    assert_eq!(limits.cpus, Some(0.25), "{limits:?}");
    assert_eq!(limits.memory, Some(32 << 20), "{limits:?}");
    // What the site leaves out stays the image's (or the host's default).
    assert_eq!(limits.pids, image.pids);
}
