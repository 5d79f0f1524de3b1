//! The fleet over mutual TLS to a real etcd (Debian's etcd-server, started here on
//! loopback with `--client-cert-auth` and killed by PID), with the certificates of
//! `juice certs fleet` and the users and roles of `juice fleet auth`: a host joins and
//! runs what a controller assigns it, both over TLS; a host's certificate can write its
//! own records and no other's; a client without a certificate from the fleet's CA is
//! refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Etcd, InstanceSweeper, Juice, NetnsHost, until_local};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A short lease, so the tests take seconds.
const LEASE_SECS: &str = "3";

/// A fleet CA (`juice certs fleet init` and `etcd`) and an etcd serving it with
/// `--client-cert-auth`, auth set up by the operator (`juice fleet auth setup`).
struct TlsFleet {
    ca: PathBuf,
    etcd: Etcd,
    /// Runs the operator's commands (its home is only a place to run from).
    operator: Juice,
}

impl TlsFleet {
    fn start(scratch: &Path, also: &[std::net::Ipv4Addr]) -> TlsFleet {
        let operator = Juice::new();
        let ca = scratch.join("fleet-ca");
        let out = operator.ok(&["certs", "fleet", "init", ca.to_str().unwrap()]);
        assert!(out.contains("ca-key.pem"), "{out}");
        let mut etcd_certs = vec!["certs", "fleet", "etcd", ca.to_str().unwrap()];
        let sans: Vec<String> = std::iter::once("127.0.0.1".to_owned())
            .chain(also.iter().map(ToString::to_string))
            .collect();
        for s in &sans {
            etcd_certs.extend(["--san", s]);
        }
        operator.ok(&etcd_certs);
        let etcd = Etcd::start_tls(&scratch.join("etcd"), &ca, also);
        let fleet = TlsFleet { ca, etcd, operator };
        let out = fleet.as_operator(&["fleet", "auth", "setup"]);
        assert!(out.contains("auth is enabled"), "{out}");
        fleet
    }

    fn operator_tls(&self) -> PathBuf {
        self.ca.join("operator")
    }

    /// `juice ARGS --endpoints E --tls OPERATOR`, which must succeed.
    fn as_operator(&self, args: &[&str]) -> String {
        let (e, tls) = (self.etcd.endpoint(), self.operator_tls());
        let mut all = args.to_vec();
        all.extend(["--endpoints", &e, "--tls", tls.to_str().unwrap()]);
        self.operator.ok(&all)
    }

    /// A certificate for the host `j` (its id from `juice fleet id`), allowed in etcd as
    /// a host (and a controller): the id and the certificate's directory.
    fn admit(&self, j: &Juice, controller: bool) -> (String, PathBuf) {
        let id = j.ok(&["fleet", "id"]).trim().to_owned();
        assert_eq!(id.len(), 32, "{id}");
        let out = self.operator.ok(&[
            "certs",
            "fleet",
            "host",
            self.ca.to_str().unwrap(),
            "--id",
            &id,
        ]);
        assert!(out.contains(&format!("host-{id}")), "{out}");
        let mut args = vec!["fleet", "auth", "host", &id];
        if controller {
            args.push("--controller");
        }
        self.as_operator(&args);
        (id.clone(), self.ca.join(format!("host-{id}")))
    }

    /// `juice fleet get hosts -o json` as the operator.
    fn hosts(&self) -> Vec<serde_json::Value> {
        let out = self.as_operator(&["fleet", "get", "hosts", "-o", "json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    fn until_hosts(&self, n: usize, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let now = self.hosts();
            if now.len() == n {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "not {n} hosts after {limit:?}: {now:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `etcdctl ARGS` with the certificate in `dir`: (succeeded, stdout and stderr).
fn etcdctl_as(etcd: &Etcd, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = etcd
        .etcdctl_as(dir)
        .args(args)
        .output()
        .expect("etcdctl runs");
    (out.status.success(), common::text(&out))
}

const HELLO_FLEET: &str = r#"
[group.web]
image = "hello-web:0.1.0"
count = 2
spread = "zone"
resources = { cpus = 0.1, memory = "64MiB" }
"#;

#[test]
fn hosts_join_over_mutual_tls_and_run_what_a_controller_assigns_over_tls() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let (n1, n2) = (NetnsHost::new(1), NetnsHost::new(2));
    let fleet = TlsFleet::start(scratch.path(), &[n1.outside, n2.outside]);
    let (j1, j2) = (Juice::new(), Juice::new());
    let _sweepers = (
        InstanceSweeper(j1.home.path().to_owned()),
        InstanceSweeper(j2.home.path().to_owned()),
    );
    let app = common::write_appliance(
        &scratch.path().join("hello-web"),
        &common::hello_web_manifest(),
    );
    for j in [&j1, &j2] {
        j.ok(&["build", &app]);
    }
    // Host 1 stands as controller, its certificate given by --fleet-tls; host 2's is
    // copied to where a daemon looks by default, $JUICE_HOME/fleet-tls.
    let (id1, tls1) = fleet.admit(&j1, true);
    let (id2, tls2) = fleet.admit(&j2, false);
    common::copy_dir(&tls2, &j2.home.path().join("fleet-tls"));
    let (e1, e2) = (
        fleet.etcd.endpoint_at(n1.outside),
        fleet.etcd.endpoint_at(n2.outside),
    );
    assert!(e1.starts_with("https://"), "{e1}");
    let _d1 = n1.daemon(
        &j1,
        &[
            "--fleet",
            &e1,
            "--fleet-tls",
            tls1.to_str().unwrap(),
            "--fleet-lease",
            LEASE_SECS,
            "--fleet-controller",
            "--label",
            "zone=a",
        ],
        &j1.home.path().join("daemon.log"),
    );
    let _d2 = n2.daemon(
        &j2,
        &[
            "--fleet",
            &e2,
            "--fleet-lease",
            LEASE_SECS,
            "--label",
            "zone=b",
        ],
        &j2.home.path().join("daemon.log"),
    );
    let took = fleet.until_hosts(2, Duration::from_secs(15));
    eprintln!("both hosts registered over mutual TLS {took:?} after their daemons answered");
    let ids: Vec<String> = fleet
        .hosts()
        .iter()
        .map(|h| h["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(ids.contains(&id1) && ids.contains(&id2), "{ids:?}");

    // The operator's table over TLS.
    let table = fleet.as_operator(&["fleet", "get", "hosts"]);
    assert!(
        table.starts_with("HOST") && table.contains(&id1) && table.contains(&id2),
        "{table}"
    );

    // The controller (host 1) is elected over TLS and places what the operator applies.
    let start = Instant::now();
    loop {
        let out = fleet.as_operator(&["fleet", "get", "controller", "-o", "json"]);
        let leader: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if leader["host"] == id1.as_str() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "host 1 is not elected: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = scratch.path().join("fleet.toml");
    std::fs::write(&file, HELLO_FLEET).unwrap();
    let out = fleet.as_operator(&["fleet", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.contains("fleet spec stored"), "{out}");
    let applied = Instant::now();
    until_local(&j1, 1, Duration::from_secs(60));
    until_local(&j2, 1, Duration::from_secs(60));
    // Each host reported it, over TLS, under its own certificate.
    let start = Instant::now();
    loop {
        let out = fleet.as_operator(&["fleet", "get", "groups", "-o", "json"]);
        let groups: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        let ready = groups
            .iter()
            .find(|g| g["name"] == "web")
            .map(|g| g["ready_now"].clone());
        if ready == Some(2.into()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "web is not 2/2 ready in the reports: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "apply to 2/2 ready and reported over TLS: {:?}",
        applied.elapsed()
    );
}

#[test]
fn a_host_certificate_cannot_write_another_hosts_records() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let fleet = TlsFleet::start(scratch.path(), &[]);
    let (ja, jb) = (Juice::new(), Juice::new());
    let (a, tls_a) = fleet.admit(&ja, false);
    let (b, tls_b) = fleet.admit(&jb, false);
    let etcd = &fleet.etcd;
    let tls_a = tls_a.as_path();

    // B's record, under a lease of B's, written with B's certificate.
    let out = etcd
        .etcdctl_as(&tls_b)
        .args(["lease", "grant", "60"])
        .output()
        .expect("etcdctl runs");
    assert!(out.status.success(), "{}", common::text(&out));
    let out = String::from_utf8_lossy(&out.stdout);
    let lease_b = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no lease id in {out}"))
        .to_owned();
    let host_b = format!("/juice/v1/hosts/{b}");
    let (ok, out) = etcdctl_as(etcd, &tls_b, &["put", &host_b, "{}", "--lease", &lease_b]);
    assert!(ok, "B writes its own record: {out}");

    // A's own record and reports: allowed.
    for key in [
        format!("/juice/v1/hosts/{a}"),
        format!("/juice/v1/reports/{a}/web"),
    ] {
        let (ok, out) = etcdctl_as(etcd, tls_a, &["put", &key, "{}"]);
        assert!(ok, "A may write {key}: {out}");
    }
    // Everything else A might write: refused by etcd.
    for key in [
        host_b.clone(),
        format!("/juice/v1/hosts/{a}x"),
        format!("/juice/v1/reports/{b}/x"),
        format!("/juice/v1/assign/{a}/x"),
        "/juice/v1/spec".to_owned(),
        "/juice/v1/controller/leader".to_owned(),
    ] {
        let (ok, out) = etcdctl_as(etcd, tls_a, &["put", &key, "{}"]);
        assert!(
            !ok && out.contains("permission denied"),
            "A wrote {key}: {out}"
        );
    }
    let (ok, out) = etcdctl_as(etcd, tls_a, &["del", &host_b]);
    assert!(
        !ok && out.contains("permission denied"),
        "A deleted B's record: {out}"
    );
    // Nor can A revoke B's lease (and B's record with it).
    let (ok, out) = etcdctl_as(etcd, tls_a, &["lease", "revoke", &lease_b]);
    assert!(
        !ok && out.contains("permission denied"),
        "A revoked B's lease: {out}"
    );
    // Renewing B's lease is not checked by etcd 3.4 (docs/fleet.md says so): shown, not judged.
    let (ok, out) = etcdctl_as(etcd, tls_a, &["lease", "keep-alive", "--once", &lease_b]);
    eprintln!(
        "A renewing B's lease: {} ({})",
        if ok { "allowed" } else { "refused" },
        out.trim()
    );
    // A reads what hosts read; B's record is still there, as B wrote it.
    let out = etcd
        .etcdctl_as(tls_a)
        .args(["get", &host_b, "--print-value-only"])
        .output()
        .expect("etcdctl runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "{}",
        "{}",
        common::text(&out)
    );

    // Juice says each refusal in one sentence naming the certificate's user and the key.
    let (e, tls_a_str) = (etcd.endpoint(), tls_a.to_str().unwrap());
    // (a fleet of no groups: it plans on no hosts, so only the write of the spec is left)
    let file = scratch.path().join("fleet.toml");
    std::fs::write(&file, "").unwrap();
    let err = ja.fails(&[
        "fleet",
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--endpoints",
        &e,
        "--tls",
        tls_a_str,
    ]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.trim(),
        format!("juice: etcd refused to let \"host-{a}\" write /juice/v1/spec: permission denied")
    );
    let err = ja.fails(&[
        "fleet",
        "auth",
        "host",
        &a,
        "--controller",
        "--endpoints",
        &e,
        "--tls",
        tls_a_str,
    ]);
    assert!(
        err.contains(&format!(
            "etcd refused to let \"host-{a}\" access the fleet's users and roles: permission denied"
        )),
        "{err}"
    );

    // A daemon whose host id is B's but whose certificate is A's cannot register: its
    // log names the key and the user.
    let jx = Juice::new();
    std::fs::write(jx.home.path().join("host-id"), format!("{b}\n")).unwrap();
    let _sweeper = InstanceSweeper(jx.home.path().to_owned());
    let log = jx.home.path().join("daemon.log");
    let _daemon = common::daemon_with(
        &jx,
        &[
            "--fleet",
            &e,
            "--fleet-tls",
            tls_a_str,
            "--fleet-lease",
            LEASE_SECS,
        ],
        &[],
        &log,
    );
    let want = format!(
        "etcd refused to let \\\"host-{a}\\\" write /juice/v1/hosts/{b}: permission denied"
    );
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("fleet registration lost") && text.contains(&want) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no refusal naming the key in the daemon's log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A host taken away can no longer write even its own record.
    fleet.as_operator(&["fleet", "auth", "remove", &a]);
    let (ok, out) = etcdctl_as(etcd, tls_a, &["put", &format!("/juice/v1/hosts/{a}"), "{}"]);
    assert!(!ok && out.contains("permission denied"), "{out}");
}

#[test]
fn a_client_without_a_certificate_from_the_fleets_ca_is_refused() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let fleet = TlsFleet::start(scratch.path(), &[]);
    let etcd = &fleet.etcd;
    let j = Juice::new();
    let (_, tls) = fleet.admit(&j, false);
    let e = etcd.endpoint();
    // The host's own certificate reads.
    let (ok, out) = etcdctl_as(etcd, &tls, &["get", "--prefix", "/juice/v1/"]);
    assert!(ok, "{out}");

    // No client certificate: etcd ends the handshake.
    let out = std::process::Command::new("etcdctl")
        .args(["--endpoints", &e, "--command-timeout=3s", "--cacert"])
        .arg(fleet.ca.join("ca.pem"))
        .args(["get", "--prefix", "/juice/v1/"])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl runs");
    assert!(!out.status.success(), "{}", common::text(&out));

    // A certificate from another CA (with the right CA to trust etcd): refused by etcd.
    let other = scratch.path().join("other-ca");
    j.ok(&["certs", "fleet", "init", other.to_str().unwrap()]);
    let id = j.ok(&["fleet", "id"]).trim().to_owned();
    let forged = j
        .ok(&[
            "certs",
            "fleet",
            "host",
            other.to_str().unwrap(),
            "--id",
            &id,
        ])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(forged.contains("host-"), "{forged}");
    let forged = other.join(format!("host-{id}"));
    std::fs::copy(fleet.ca.join("ca.pem"), forged.join("ca.pem")).unwrap();
    let (ok, out) = etcdctl_as(etcd, &forged, &["get", "--prefix", "/juice/v1/"]);
    assert!(!ok, "{out}");
    let err = j.fails(&[
        "fleet",
        "get",
        "hosts",
        "--endpoints",
        &e,
        "--tls",
        forged.to_str().unwrap(),
    ]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("juice: etcd at {e} is unreachable (")),
        "{err}"
    );
    // The same certificate from the fleet's CA works.
    let ok_out = j.ok(&[
        "fleet",
        "get",
        "hosts",
        "--endpoints",
        &e,
        "--tls",
        tls.to_str().unwrap(),
    ]);
    assert!(ok_out.starts_with("HOST"), "{ok_out}");

    // Plain http to the TLS port, and https without the files, never get an answer.
    let plain = e.replacen("https://", "http://", 1);
    let err = j.fails(&["fleet", "get", "hosts", "--endpoints", &plain]);
    assert!(err.contains("is unreachable"), "{err}");
    let empty = scratch.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = j.fails(&[
        "fleet",
        "get",
        "hosts",
        "--endpoints",
        &e,
        "--tls",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(
        err.trim(),
        format!(
            "juice: fleet TLS: {}/ca.pem: missing (https:// endpoints need the fleet's CA, this client's certificate and its key: `juice certs fleet` makes them)",
            empty.display()
        )
    );
    // Mixing http and https is refused before anything is sent.
    let err = j.fails(&[
        "fleet",
        "get",
        "hosts",
        "--endpoints",
        &format!("{e},{plain}"),
    ]);
    assert!(err.contains("mix http:// and https://"), "{err}");
}
