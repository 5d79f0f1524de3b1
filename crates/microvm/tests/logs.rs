//! A microVM's log rotates like a sandbox's: past its size `app.log` becomes
//! `app.log.1` and QEMU writes a new `app.log` (QMP chardev-change), nothing lost.
//! Boots hello-web for real (TCG) on the Juice bridge; needs root.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use juice_image::build::{BuildOptions, build};
use juice_image::store::Store;
use juice_image::unpack::materialise;
use juice_microvm::{Runtime, Vm};
use juice_runtime::{Handle, InstanceSpec, NetworkSpec};

/// Stops the VM even when an assertion fails.
struct Stopper(Option<Vm>);

impl Drop for Stopper {
    fn drop(&mut self) {
        if let Some(vm) = self.0.as_mut() {
            vm.stop(Duration::ZERO);
        }
    }
}

fn get(addr: std::net::Ipv4Addr, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&(addr, 8080).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn the_log_of_a_microvm_rotates_without_losing_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let guest = root.join("target/x86_64-unknown-linux-musl/release/juice-guest");
    assert!(
        guest.is_file(),
        "run `cargo build --release` first (as .ci/run does)"
    );
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    build(
        &store,
        &root.join("examples/hello-web"),
        &BuildOptions {
            tag: Some("hello-web:logs".into()),
        },
    )
    .unwrap();
    let rootfs = materialise(&store, "hello-web:logs").unwrap();
    let runtime = Runtime::with_guest_init(home.path(), guest).unwrap();

    let mut spec = InstanceSpec::new("logrot", &rootfs.path, vec!["/usr/bin/hello-web".into()]);
    spec.program.uid = 1000;
    spec.program.gid = 1000;
    spec.network = Some(NetworkSpec::new("logrot-test"));
    spec.log_max_bytes = 200;
    spec.log_keep = 2;
    let mut vm = Stopper(Some(runtime.spawn(&spec).unwrap()));
    let v = vm.0.as_mut().unwrap();
    v.wait_started(Duration::from_secs(90)).unwrap();
    let addr = v.address().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(addr, "/healthz").is_err() {
        assert!(Instant::now() < deadline, "hello-web did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = runtime.log_path("logrot");
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    for i in 0..10 {
        get(addr, &format!("/before-{i}")).unwrap();
    }
    // Past 200 bytes now: it rotates.
    let wait = Instant::now() + Duration::from_secs(10);
    while lines(&log).matches("/before-9").count() == 0 {
        assert!(
            Instant::now() < wait,
            "the request log did not arrive: {}",
            lines(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(v.rotate_log().unwrap());
    let first = lines(&log.with_extension("log.1"));
    assert!(
        first.contains("GET /before-0") && first.contains("GET /before-9"),
        "{first}"
    );
    for i in 0..3 {
        get(addr, &format!("/after-{i}")).unwrap();
    }
    let wait = Instant::now() + Duration::from_secs(10);
    while !lines(&log).contains("GET /after-2") {
        assert!(
            Instant::now() < wait,
            "QEMU did not write the new app.log: {:?}",
            lines(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !lines(&log).contains("before-"),
        "the new file starts after the rotation"
    );
    let report = v.stop(Duration::from_secs(10));
    assert_eq!(report.signal, Some(15), "{report}");
}
