//! Helpers for tests that drive the real `juice` binary.
#![allow(dead_code)]

pub mod fleet;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// A `juice` with its own, empty `$JUICE_HOME`.
pub struct Juice {
    pub home: tempfile::TempDir,
}

impl Juice {
    pub fn new() -> Juice {
        Juice {
            home: tempfile::tempdir().expect("a temp dir for JUICE_HOME"),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_juice"));
        c.env("JUICE_HOME", self.home.path())
            .current_dir(workspace());
        c
    }

    /// Runs `juice ARGS`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("juice runs");
        assert!(
            out.status.success(),
            "juice {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `juice ARGS`, which must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("juice runs");
        assert!(
            !out.status.success(),
            "juice {args:?} should have failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn layout(&self) -> PathBuf {
        self.home.path().join("images")
    }

    /// The path of a blob named by digest.
    pub fn blob(&self, digest: &str) -> PathBuf {
        self.layout()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a finished command said and how it ended: (stdout, stderr, exit code).
pub fn outcome(out: &Output) -> (String, String, Option<i32>) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Finds a free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` from `port` on loopback over HTTP/1.1, reading for at most `timeout`
/// at a time: the whole answer (head and body), whatever its status.
pub fn http_get(port: u16, path: &str, timeout: std::time::Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Runs `cmd` with `input` on its stdin, which stays open `linger` longer (for a
/// peer that answers late) before it closes; returns all it wrote.
pub fn output_with_input(cmd: &mut Command, input: &[u8], linger: std::time::Duration) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    std::thread::sleep(linger);
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Fails loudly when a tool a test needs is missing: such a test must never pass silently.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "this test needs `{tool}` (installed by .ci/run)");
}

/// A binary of the workspace, built by `cargo build --release` (which .ci/run does first)
/// into the same directory as `juice`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_juice")).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release` first (as .ci/run does)",
        p.display()
    );
    p
}

/// The hello-web example program.
pub fn hello_web_binary() -> PathBuf {
    workspace_binary("hello-web")
}

/// Stops (and reaps) a child when dropped, so a failing test leaves no process behind:
/// SIGTERM first (`juice run` then stops and releases its instance), SIGKILL after 15 s.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd`, guarded from the start.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(cmd.spawn().expect("the command starts"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies a directory tree (plain files and dirs) for tests that change an example.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// A small deterministic random source for fault-injection loops. The seed
/// comes from `JUICE_TEST_SEED` if set (to replay a run), else from the clock,
/// and is printed either way.
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = match std::env::var("JUICE_TEST_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("JUICE_TEST_SEED={s:?} is not a number")),
            Err(_) => u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos(),
            )
            .expect("nanoseconds since 1970 fit 64 bits until 2554"),
        };
        eprintln!("random seed {seed} (replay with JUICE_TEST_SEED={seed})");
        Rng(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Kills, when dropped, every instance (sandbox or microVM) whose state is under `home`: a daemon leaves
/// its instances running by design, so a failing test must not leave them behind.
/// By pid, from the state files; never by name.
pub struct InstanceSweeper(pub PathBuf);

impl Drop for InstanceSweeper {
    fn drop(&mut self) {
        // Sandboxes under instances/, microVMs (their QEMU) under vms/.
        let dirs = ["instances", "vms"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.0.join(d)).ok())
            .flat_map(|d| d.flatten());
        for d in dirs {
            let Ok(bytes) = std::fs::read(d.path().join("state.json")) else {
                continue;
            };
            let Ok(state) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            if let Some(pid) = state["pid"].as_i64() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Published ports outlive the daemon (DNAT rules): withdraw this home's.
        use juice_net::publish;
        let published: std::collections::BTreeMap<String, Option<publish::Published>> =
            publish::current(&self.0)
                .into_keys()
                .map(|owner| (owner, None))
                .collect();
        let _ = publish::apply(&self.0, &published);
    }
}

/// examples/hello-web's manifest, pointing at the built program and the example's files,
/// so it can be written into any directory (and edited first).
pub fn hello_web_manifest() -> String {
    let example = workspace().join("examples/hello-web");
    std::fs::read_to_string(example.join("juice.toml"))
        .expect("examples/hello-web/juice.toml")
        .replace(
            "../../target/x86_64-unknown-linux-musl/release/hello-web",
            hello_web_binary().to_str().expect("a UTF-8 path"),
        )
        .replace("\"static/\"", &format!("\"{}/static/\"", example.display()))
}

/// Writes a site file `file` (in `j`'s home) with `site` in it, and the app it builds:
/// `manifest` as `app/juice.toml` (in the home), unless that is already written, so a
/// daemon never reads a half-rewritten manifest. Returns the site file's path.
pub fn write_site(j: &Juice, app: &str, manifest: &str, file: &str, site: &str) -> String {
    let app = j.home.path().join(app);
    std::fs::create_dir_all(&app).unwrap();
    if !app.join("juice.toml").exists() {
        std::fs::write(app.join("juice.toml"), manifest).unwrap();
    }
    let file = j.home.path().join(file);
    std::fs::write(&file, site).unwrap();
    file.to_str().unwrap().to_owned()
}

/// Writes `manifest` as DIR/juice.toml (making DIR); returns DIR as a string.
pub fn write_appliance(dir: &Path, manifest: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("juice.toml"), manifest).unwrap();
    dir.to_str().unwrap().to_owned()
}

/// Builds the probe appliance `probe:TAG` (juice-probe, run as root inside); `rest`
/// follows its `[run]` user line (more `[run]` keys, then further tables).
pub fn probe_image_with(j: &Juice, tag: &str, rest: &str) {
    let dir = write_appliance(
        &j.home.path().join(format!("src-{tag}")),
        &format!(
            "[appliance]\nname = \"probe\"\nversion = \"{tag}\"\n\n[build]\nbinaries = [{{ from = \"{}\", to = \"/usr/bin/probe\" }}]\n\n[run]\ncommand = [\"/usr/bin/probe\"]\nuser = \"0:0\"\n{rest}\n",
            workspace_binary("juice-probe").display()
        ),
    );
    j.ok(&["build", &dir]);
}

/// `juice run -q probe:TAG EXTRA -- ARGS`: (stdout, stderr, exit code).
pub fn probe(j: &Juice, tag: &str, extra: &[&str], args: &[&str]) -> (String, String, i32) {
    let image = format!("probe:{tag}");
    let out = j
        .cmd()
        .args(["run", "-q", &image])
        .args(extra)
        .arg("--")
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr, code) = outcome(&out);
    (stdout, stderr, code.unwrap_or(-1))
}

/// The probe without a network, which must succeed: its stdout, trimmed.
pub fn probe_line(j: &Juice, tag: &str, args: &[&str]) -> String {
    let (out, err, code) = probe(j, tag, &["--network", "none"], args);
    assert_eq!(code, 0, "probe {args:?} failed: {out}{err}");
    out.trim().to_owned()
}

/// `juice daemon` for `j` with extra environment, once its socket answers; stopped
/// (by PID) when the guard drops.
pub fn daemon_with_env(j: &Juice, env: &[(&str, &str)]) -> ChildGuard {
    let child = j
        .cmd()
        .arg("daemon")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("juice daemon starts");
    answering(j, ChildGuard(child))
}

/// `daemon` once its socket answers.
fn answering(j: &Juice, daemon: ChildGuard) -> ChildGuard {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(j.home.path().join("juice.sock")).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the daemon's socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemon
}

/// `juice debug NAME -- ARGS`: (stdout, stderr, exit code).
#[allow(dead_code)]
pub fn debug(j: &Juice, name: &str, args: &[&str]) -> (String, String, i32) {
    let out = j
        .cmd()
        .args(["debug", name, "--"])
        .args(args)
        .output()
        .unwrap();
    let (o, e, c) = outcome(&out);
    (o, e, c.unwrap_or(-1))
}

pub fn daemon(j: &Juice) -> ChildGuard {
    daemon_with_env(j, &[])
}

/// `juice daemon ARGS` for `j` with extra environment, once its socket answers, its
/// stderr (the JSON log) in `log`; stopped (by PID) when the guard drops.
pub fn daemon_with(j: &Juice, args: &[&str], env: &[(&str, &str)], log: &Path) -> ChildGuard {
    let log = std::fs::File::create(log).expect("the daemon's log file");
    let guard = ChildGuard::spawn(
        j.cmd()
            .arg("daemon")
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    answering(j, guard)
}

/// A one-member etcd (Debian's etcd-server) on loopback, on free ports, its data in
/// `data`; killed by its PID when dropped, so a failing test leaves no etcd behind.
/// Start another on the same data and ports with [`Etcd::restart`].
pub struct Etcd {
    child: ChildGuard,
    pub data: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// Addresses it also listens on for clients (a network namespace's way in).
    pub also: Vec<std::net::Ipv4Addr>,
    /// With mutual TLS: the fleet's CA directory (`juice certs fleet init`), whose
    /// `etcd/` etcd serves with and whose `operator/` (etcd's `root`) checks its health.
    pub tls: Option<PathBuf>,
}

/// A killed etcd's data, ports and addresses, to start it again with [`Etcd::restart`].
pub struct StoppedEtcd(pub PathBuf, pub u16, pub u16, pub Vec<std::net::Ipv4Addr>);

impl Etcd {
    /// A new etcd with its data in `data` (made if missing).
    pub fn start(data: &Path) -> Etcd {
        Etcd::start_on(data, free_port(), free_port(), Vec::new())
    }

    /// A new etcd that also listens on `also` (on the same client port).
    pub fn start_also_on(data: &Path, also: &[std::net::Ipv4Addr]) -> Etcd {
        Etcd::start_on(data, free_port(), free_port(), also.to_vec())
    }

    /// A new etcd serving clients only with mutual TLS (`--client-cert-auth`), with the
    /// certificates of the fleet CA in `ca` (made by `juice certs fleet init` and `etcd`,
    /// valid for 127.0.0.1 and `also`). Auth (users, roles) is left to the test.
    pub fn start_tls(data: &Path, ca: &Path, also: &[std::net::Ipv4Addr]) -> Etcd {
        Etcd::start_with(data, free_port(), free_port(), also.to_vec(), Some(ca))
    }

    fn start_on(
        data: &Path,
        client_port: u16,
        peer_port: u16,
        also: Vec<std::net::Ipv4Addr>,
    ) -> Etcd {
        Etcd::start_with(data, client_port, peer_port, also, None)
    }

    fn start_with(
        data: &Path,
        client_port: u16,
        peer_port: u16,
        also: Vec<std::net::Ipv4Addr>,
        tls: Option<&Path>,
    ) -> Etcd {
        require("etcd");
        std::fs::create_dir_all(data).unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let listen: Vec<String> = std::iter::once(client.clone())
            .chain(also.iter().map(|a| format!("{scheme}://{a}:{client_port}")))
            .collect();
        let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ca) = tls {
            let etcd = ca.join("etcd");
            tls_args.push("--client-cert-auth".into());
            for (flag, file) in [
                ("--trusted-ca-file", "ca.pem"),
                ("--cert-file", "cert.pem"),
                ("--key-file", "key.pem"),
            ] {
                tls_args.push(flag.into());
                tls_args.push(etcd.join(file).into());
            }
        }
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .unwrap();
        let child = ChildGuard::spawn(
            Command::new("etcd")
                .args(["--name", "juice-test", "--data-dir"])
                .arg(data)
                .args(["--listen-client-urls", &listen.join(",")])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("juice-test={peer}")])
                .args(&tls_args)
                .stdout(std::process::Stdio::null())
                .stderr(log),
        );
        let etcd = Etcd {
            child,
            data: data.to_owned(),
            client_port,
            peer_port,
            also,
            tls: tls.map(Path::to_owned),
        };
        etcd.wait_healthy();
        etcd
    }

    /// The client endpoint, for `--fleet` and `--endpoints`.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `etcdctl` (API 3) against this etcd; with TLS, as the operator (etcd's `root`).
    pub fn etcdctl(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.args(["--endpoints", &self.endpoint(), "--command-timeout=3s"])
            .env("ETCDCTL_API", "3");
        if let Some(ca) = &self.tls {
            self.etcdctl_tls(&mut cmd, &ca.join("operator"));
        }
        cmd
    }

    /// `etcdctl` against this etcd with the client certificate in `dir` (`ca.pem`,
    /// `cert.pem`, `key.pem`).
    pub fn etcdctl_as(&self, dir: &Path) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.args(["--endpoints", &self.endpoint(), "--command-timeout=3s"])
            .env("ETCDCTL_API", "3");
        self.etcdctl_tls(&mut cmd, dir);
        cmd
    }

    fn etcdctl_tls(&self, cmd: &mut Command, dir: &Path) {
        cmd.arg("--cacert")
            .arg(dir.join("ca.pem"))
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"));
    }

    /// Waits until `etcdctl endpoint health` says yes (10 s at most).
    fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ok = self
                .etcdctl()
                .args(["endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "etcd on {} did not become healthy (log: {})",
                self.endpoint(),
                self.data.with_extension("log").display()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// This etcd's process id (to pause it with SIGSTOP, by PID).
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The client endpoint at `addr` (one of `also`).
    pub fn endpoint_at(&self, addr: std::net::Ipv4Addr) -> String {
        format!("{}://{addr}:{}", self.scheme(), self.client_port)
    }

    /// Kills this etcd (by PID) and waits for it to be gone. (Restarting it serves
    /// plain http: a TLS etcd is not restarted by any test.)
    pub fn kill(self) -> StoppedEtcd {
        let Etcd {
            mut child,
            data,
            client_port,
            peer_port,
            also,
            tls: _,
        } = self;
        let _ = child.0.kill();
        let _ = child.0.wait();
        StoppedEtcd(data, client_port, peer_port, also)
    }

    /// A new etcd on the data, ports and addresses of one that was killed.
    pub fn restart(StoppedEtcd(data, client_port, peer_port, also): StoppedEtcd) -> Etcd {
        Etcd::start_on(&data, client_port, peer_port, also)
    }
}

/// What the fleet's helpers need of an etcd: its client endpoints for `--endpoints`.
pub trait EtcdEndpoints {
    fn endpoint(&self) -> String;
}

impl EtcdEndpoints for Etcd {
    fn endpoint(&self) -> String {
        Etcd::endpoint(self)
    }
}

/// A three-member etcd on loopback (free ports, a data dir each under `data`), each
/// member killed by its PID when dropped (or by [`EtcdCluster::kill`]).
pub struct EtcdCluster {
    members: Vec<Option<ChildGuard>>,
    pub client_ports: Vec<u16>,
    also: Vec<std::net::Ipv4Addr>,
}

impl EtcdCluster {
    /// Starts the three members, also listening on `also` (a namespace's way in), and
    /// waits until each is healthy.
    pub fn start(data: &Path, also: &[std::net::Ipv4Addr]) -> EtcdCluster {
        require("etcd");
        require("etcdctl");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("juice-test-{}", std::process::id());
        let mut members = Vec::new();
        for (i, (client_port, peer_port)) in ports.iter().enumerate() {
            let dir = data.join(format!("m{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let client = format!("http://127.0.0.1:{client_port}");
            let listen: Vec<String> = std::iter::once(client.clone())
                .chain(also.iter().map(|a| format!("http://{a}:{client_port}")))
                .collect();
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = std::fs::File::create(data.join(format!("m{i}.log"))).unwrap();
            members.push(Some(ChildGuard::spawn(
                Command::new("etcd")
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(&dir)
                    .args(["--listen-client-urls", &listen.join(",")])
                    .args(["--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer])
                    .args(["--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &cluster.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", &token])
                    .stdout(std::process::Stdio::null())
                    .stderr(log),
            )));
        }
        let etcd = EtcdCluster {
            members,
            client_ports: ports.iter().map(|p| p.0).collect(),
            also: also.to_vec(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !etcd.all_healthy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the 3-member etcd did not become healthy (logs in {})",
                data.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        etcd
    }

    fn all_healthy(&self) -> bool {
        Command::new("etcdctl")
            .args(["--endpoints", &self.endpoint(), "--command-timeout=1s"])
            .args(["endpoint", "health"])
            .env("ETCDCTL_API", "3")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The members' client endpoints at `addr` (one of `also`), comma-separated.
    pub fn endpoints_at(&self, addr: std::net::Ipv4Addr) -> String {
        assert!(self.also.contains(&addr), "{addr} is not listened on");
        self.client_ports
            .iter()
            .map(|p| format!("http://{addr}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the member that leads now (`etcdctl endpoint status`).
    pub fn leader(&self) -> usize {
        let live: Vec<String> = (0..3)
            .filter(|&i| self.members[i].is_some())
            .map(|i| format!("http://127.0.0.1:{}", self.client_ports[i]))
            .collect();
        let out = Command::new("etcdctl")
            .args(["--endpoints", &live.join(","), "--command-timeout=2s"])
            .args(["endpoint", "status", "-w", "json"])
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl endpoint status: {}",
            text(&out)
        );
        let status: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("etcdctl's status is not JSON ({e}): {}", text(&out)));
        let leader = status
            .iter()
            .find(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
            .unwrap_or_else(|| panic!("no member says it leads: {}", text(&out)));
        let endpoint = leader["Endpoint"].as_str().unwrap_or_default();
        self.client_ports
            .iter()
            .position(|p| endpoint.ends_with(&format!(":{p}")))
            .unwrap_or_else(|| panic!("{endpoint} is not a member"))
    }

    /// SIGKILLs member `i` and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut m) = self.members[i].take() {
            let _ = m.0.kill();
            let _ = m.0.wait();
        }
    }
}

impl EtcdEndpoints for EtcdCluster {
    /// Every member's loopback endpoint, comma-separated (a killed one's too: clients
    /// must get by without it).
    fn endpoint(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A network namespace of its own for a daemon, so that two daemons on this machine
/// each have their own `juice0` bridge, addresses and nftables tables (they would
/// otherwise share them). A veth pair links it to this namespace: `outside` here,
/// `inside` in the namespace. Deleted (with the veth) when dropped.
pub struct NetnsHost {
    pub name: String,
    pub outside: std::net::Ipv4Addr,
    pub inside: std::net::Ipv4Addr,
    /// The veth's end in this namespace: down, the namespace is cut off.
    pub link: String,
}

impl NetnsHost {
    /// Namespace number `n` of this test process (0 to 63).
    pub fn new(n: u8) -> NetnsHost {
        require("ip");
        require("nsenter");
        let pid = std::process::id();
        let name = format!("juice-t{pid}-{n}");
        // A /30 per namespace in 10.201.0.0/16, chosen by pid and n.
        let block = (pid % 1024) * 64 + u32::from(n % 64);
        let base = u32::from(std::net::Ipv4Addr::new(10, 201, 0, 0)) + (block % 16384) * 4;
        let (outside, inside) = (
            std::net::Ipv4Addr::from(base + 1),
            std::net::Ipv4Addr::from(base + 2),
        );
        let (host_end, ns_end) = (
            format!("jth{}", block % 100_000),
            format!("jtn{}", block % 100_000),
        );
        let host = NetnsHost {
            name: name.clone(),
            outside,
            inside,
            link: host_end.clone(),
        };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip runs");
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end, "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{outside}/30"), "dev", &host_end]);
        ip(&["link", "set", &host_end, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{inside}/30"),
            "dev",
            &ns_end,
        ]);
        ip(&["-n", &name, "link", "set", &ns_end, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        host
    }

    /// `juice daemon ARGS` for `j` inside this namespace, as [`daemon_with`] does.
    pub fn daemon(&self, j: &Juice, args: &[&str], log: &Path) -> ChildGuard {
        self.daemon_from(Path::new(env!("CARGO_BIN_EXE_juice")), j, args, log)
    }

    /// [`NetnsHost::daemon`] with the `juice` at `binary` (a copy, for a daemon that may
    /// replace its own binary), its log appended to `log`.
    pub fn daemon_from(&self, binary: &Path, j: &Juice, args: &[&str], log: &Path) -> ChildGuard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("the daemon's log file");
        // nsenter enters only the network namespace (`ip netns exec` would also mount a
        // fresh /sys, without the cgroup hierarchy), and execs juice: the guard's PID is juice's.
        let guard = ChildGuard::spawn(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.name))
                .arg(binary)
                .arg("daemon")
                .args(args)
                .env("JUICE_HOME", j.home.path())
                .current_dir(workspace())
                .stdout(std::process::Stdio::null())
                .stderr(log),
        );
        answering(j, guard)
    }
}

impl NetnsHost {
    /// Cuts the namespace off (its veth's outer end down): a partition. What runs inside
    /// goes on; nothing outside reaches it, nor it anything outside.
    pub fn cut(&self) {
        self.link_set("down");
    }

    /// Undoes [`NetnsHost::cut`].
    pub fn heal(&self) {
        self.link_set("up");
    }

    fn link_set(&self, state: &str) {
        let out = Command::new("ip")
            .args(["link", "set", &self.link, state])
            .output()
            .expect("ip runs");
        assert!(
            out.status.success(),
            "ip link set {} {state}: {}",
            self.link,
            text(&out)
        );
    }

    /// Runs `program ARGS` inside the namespace (network only), its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg(program)
            .args(args)
            .output()
            .expect("nsenter runs")
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        // The veth pair goes at once with its end here (the namespace's own teardown, which
        // would take it too, happens later, so a next namespace of the same number in this
        // process would find the name taken); then the namespace.
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A `docker-registry` of our own on loopback, stopped by PID when dropped.
pub struct Registry {
    _guard: ChildGuard,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The CA that signed its certificate, when it speaks TLS.
    pub ca: Option<PathBuf>,
}

impl Registry {
    /// `secure`: TLS with a certificate from `juice certs`, and basic auth (user `ci`, password `s3cret`).
    pub fn start(j: &Juice, secure: bool) -> Registry {
        require("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}/data\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().display()
        );
        let mut ca = None;
        if secure {
            require("htpasswd");
            let certs = dir.path().join("certs");
            j.ok(&["certs", certs.to_str().unwrap(), "--host", "127.0.0.1"]);
            config.push_str(&format!(
                "  tls:\n    certificate: {0}/server.pem\n    key: {0}/server-key.pem\nauth:\n  htpasswd:\n    realm: juice-test\n    path: {1}/htpasswd\n",
                certs.display(),
                dir.path().display()
            ));
            let out = std::process::Command::new("htpasswd")
                .args(["-Bbn", "ci", "s3cret"])
                .output()
                .unwrap();
            assert!(out.status.success());
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            ca = Some(certs.join("ca.pem"));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let guard = ChildGuard::spawn(
            std::process::Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Registry {
            _guard: guard,
            port,
            dir,
            ca,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn reference(&self, repo: &str) -> String {
        format!("{}/{repo}", self.host())
    }

    /// The registry's own copy of a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// `juice get groups -o json` against `j`'s daemon: the groups by name.
pub fn local_groups(j: &Juice) -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = j.ok(&["get", "groups", "-o", "json"]);
    let groups: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    groups
        .into_iter()
        .map(|g| (g["name"].as_str().unwrap_or_default().to_owned(), g))
        .collect()
}

/// Waits until `j` runs `size` ready instances of `fleet-web` (and no other size), or
/// none at all when `size` is 0.
pub fn until_local(j: &Juice, size: u64, limit: std::time::Duration) -> std::time::Duration {
    let start = std::time::Instant::now();
    loop {
        let groups = local_groups(j);
        let done = match groups.get("fleet-web") {
            None => size == 0,
            Some(g) => size > 0 && g["size"] == size && g["ready"] == size && g["running"] == size,
        };
        if done {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} does not run {size} ready fleet-web after {limit:?}: {groups:?}",
            j.home.path().display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
