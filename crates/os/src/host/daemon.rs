//! The daemon under PID 1: its command line from `host.toml`, and restarts with back-off.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use juice_os::settings::Settings;

/// The daemon's executable in the root.
pub const JUICE: &str = "/usr/bin/juice";

/// The first wait before a restart; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A daemon that ran this long before it exited starts again from [`FIRST_BACKOFF`].
const STABLE_RUN: Duration = Duration::from_secs(60);

/// `juice daemon`'s arguments for `settings`.
pub fn arguments(settings: &Settings, home: &Path) -> Vec<String> {
    let mut args = vec!["daemon".to_owned()];
    if let Some(listen) = settings.daemon.listen {
        args.push("--listen".into());
        args.push(listen.to_string());
        if let Some(tls) = settings.tls_dir(home) {
            args.push("--tls".into());
            args.push(tls.display().to_string());
        }
    }
    if let Some(site) = settings.site_file(home) {
        args.push("--site".into());
        args.push(site.display().to_string());
    }
    args
}

/// `juice daemon`'s environment for `settings` beyond its home: how it reaches registries.
pub fn environment(settings: &Settings, home: &Path) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let r = &settings.registries;
    if !r.insecure.is_empty() {
        env.push(("JUICE_INSECURE_REGISTRIES".into(), r.insecure.join(",")));
    }
    if !r.ca.is_empty() {
        let files: Vec<String> =
            r.ca.iter()
                .map(|p| home.join(p).display().to_string())
                .collect();
        env.push(("JUICE_REGISTRY_CA".into(), files.join(":")));
    }
    env
}

/// The daemon's process and when to start it again.
pub struct Supervisor {
    args: Vec<String>,
    env: Vec<(String, String)>,
    home: String,
    pub pid: Option<i32>,
    started: Instant,
    backoff: Duration,
    next_start: Option<Instant>,
}

impl Supervisor {
    pub fn new(args: Vec<String>, env: Vec<(String, String)>, home: &Path) -> Supervisor {
        Supervisor {
            args,
            env,
            home: home.display().to_string(),
            pid: None,
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
            next_start: Some(Instant::now()),
        }
    }

    /// Starts the daemon if it is due.
    pub fn start_if_due(&mut self, log: &impl Fn(&str)) {
        let Some(at) = self.next_start else { return };
        if Instant::now() < at {
            return;
        }
        // The child's signal mask and dispositions are reset by std before the exec.
        let spawned = Command::new(JUICE)
            .args(&self.args)
            .env_clear()
            .env("JUICE_HOME", &self.home)
            .env("PATH", "/usr/sbin:/usr/bin")
            .env("HOME", &self.home)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => {
                let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
                log(&format!(
                    "started the daemon (pid {pid}): {JUICE} {}",
                    self.args.join(" ")
                ));
                // PID 1 reaps every child itself; the handle is not waited on.
                drop(child);
                self.pid = Some(pid);
                self.started = Instant::now();
                self.next_start = None;
            }
            Err(e) => {
                log(&format!("cannot start the daemon {JUICE}: {e}"));
                self.schedule_restart(log);
            }
        }
    }

    /// The daemon `pid` ended with `how`: start it again after the back-off.
    pub fn exited(&mut self, pid: i32, how: &str, log: &impl Fn(&str)) -> bool {
        if self.pid != Some(pid) {
            return false;
        }
        self.pid = None;
        log(&format!("the daemon (pid {pid}) {how}"));
        if self.started.elapsed() >= STABLE_RUN {
            self.backoff = FIRST_BACKOFF;
        }
        self.schedule_restart(log);
        true
    }

    fn schedule_restart(&mut self, log: &impl Fn(&str)) {
        log(&format!(
            "starting the daemon again in {} s",
            self.backoff.as_secs()
        ));
        self.next_start = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// No restarts from now on (shutdown).
    pub fn stop_restarting(&mut self) {
        self.next_start = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_gets_listen_tls_and_site_from_the_settings() {
        let text = "version = 2\n[daemon]\nlisten = \"0.0.0.0:7443\"\ntls = \"tls\"\n[site]\nfile = \"site.toml\"\n";
        let s = Settings::parse(text, Path::new("host.toml"))
            .unwrap()
            .settings;
        assert_eq!(
            arguments(&s, Path::new("/var/lib/juice")),
            [
                "daemon",
                "--listen",
                "0.0.0.0:7443",
                "--tls",
                "/var/lib/juice/tls",
                "--site",
                "/var/lib/juice/site.toml"
            ]
        );
        assert_eq!(
            arguments(&Settings::default(), Path::new("/var/lib/juice")),
            ["daemon"]
        );
    }

    #[test]
    fn restarts_back_off_from_one_second_to_thirty() {
        let mut s = Supervisor::new(vec![], vec![], Path::new("/x"));
        s.pid = Some(7);
        let mut waits = Vec::new();
        for _ in 0..7 {
            waits.push(s.backoff.as_secs());
            s.pid = Some(7);
            assert!(s.exited(7, "exited", &|_| {}));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert!(!s.exited(8, "exited", &|_| {}), "not the daemon");
    }
}
