//! The image half of Juice, driven through the real `juice` binary:
//! build, inspect, verify, rmi, gc, interoperability and crash safety.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ChildGuard, Juice, Rng, copy_dir, free_port, require, workspace};
use juice_image::store::Store;
use juice_image::unpack::materialise;

fn inspect_json(j: &Juice, image: &str) -> serde_json::Value {
    serde_json::from_str(&j.ok(&["inspect", image, "-o", "json"])).expect("inspect -o json is JSON")
}

fn layer_digest(j: &Juice, image: &str) -> String {
    inspect_json(j, image)["oci_manifest"]["layers"][0]["digest"]
        .as_str()
        .expect("a layer digest")
        .to_owned()
}

#[test]
fn nginx_builds_with_its_closure_and_runs_from_its_own_root() {
    require("nginx");
    let j = Juice::new();
    let out = j.ok(&["build", "examples/nginx", "-t", "nginx:1"]);
    assert!(out.starts_with("built nginx:1 sha256:"), "{out}");

    let shown = j.ok(&["inspect", "nginx:1"]);
    for lib in [
        "libssl.so.3",
        "libcrypto.so.3",
        "libpcre2-8.so.0",
        "libz.so.1",
        "libc.so.6",
        "ld-linux-x86-64.so.2",
    ] {
        assert!(shown.contains(lib), "{lib} missing from:\n{shown}");
    }
    let json = inspect_json(&j, "nginx:1");
    let needs = &json["appliance"]["closure"]["/usr/sbin/nginx"];
    assert!(needs.as_array().is_some_and(|a| a.len() >= 5), "{json}");

    // The closure is complete: nginx checks its configuration inside nothing but its own root.
    let store = Store::open(j.home.path()).unwrap();
    let root = materialise(&store, "nginx:1").expect("materialise").path;
    let status = Command::new("chroot")
        .arg(&root)
        .args(["/usr/sbin/nginx", "-t", "-c", "/etc/nginx/nginx.conf"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", common::text(&status));
    // ... and exactly enough: no shell, no package manager, no coreutils.
    for absent in ["bin/sh", "usr/bin/apt", "usr/bin/ls", "usr/bin/dpkg"] {
        assert!(
            !root.join(absent).exists(),
            "{absent} should not be in the image"
        );
    }
    // A second materialise reuses the content-addressed tree.
    assert_eq!(materialise(&store, "nginx:1").unwrap().path, root);
}

#[test]
fn hello_web_serves_from_its_own_root_as_its_declared_user() {
    common::hello_web_binary();
    let j = Juice::new();
    j.ok(&["build", "examples/hello-web"]);
    let store = Store::open(j.home.path()).unwrap();
    let root = materialise(&store, "hello-web:0.1.0").unwrap().path;
    let port = free_port();
    let _guard = ChildGuard::spawn(
        Command::new("chroot")
            .arg("--userspec=1000:1000")
            .arg(&root)
            .args([
                "/usr/bin/hello-web",
                "--port",
                &port.to_string(),
                "--root",
                "/srv/www",
            ])
            .stdout(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        match common::http_get(port, "/healthz", Duration::from_secs(5)) {
            Ok(body) => break body,
            Err(e) if Instant::now() > deadline => panic!("hello-web never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
        "{health}"
    );
    let page = common::http_get(port, "/index.html", Duration::from_secs(5)).unwrap();
    assert!(page.contains("hello from a juice appliance"), "{page}");
}

#[test]
fn builds_are_reproducible_byte_for_byte() {
    require("nginx");
    let a = Juice::new();
    let b = Juice::new();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&workspace().join("examples/nginx"), copy.path());
    // Different mtimes and permission bits on the inputs must not matter.
    std::thread::sleep(Duration::from_millis(20));
    let conf = copy.path().join("nginx.conf");
    std::fs::write(&conf, std::fs::read(&conf).unwrap()).unwrap();
    Command::new("chmod")
        .arg("600")
        .arg(&conf)
        .status()
        .unwrap();

    let da = a.ok(&["build", "examples/nginx", "-q"]);
    let db = b.ok(&["build", copy.path().to_str().unwrap(), "-q"]);
    assert_eq!(da, db, "the same inputs must give the same digest");
    assert!(
        da.trim().starts_with("sha256:") && da.lines().count() == 1,
        "-q prints only the digest: {da}"
    );
    let (la, lb) = (
        layer_digest(&a, "nginx:1.22"),
        layer_digest(&b, "nginx:1.22"),
    );
    assert_eq!(
        std::fs::read(a.blob(&la)).unwrap(),
        std::fs::read(b.blob(&lb)).unwrap()
    );

    // No host path or build time leaks into the config.
    let config = inspect_json(&a, "nginx:1.22")["oci_config"].to_string();
    assert!(!config.contains("created"), "{config}");
    assert!(!config.contains(workspace().to_str().unwrap()), "{config}");

    // A changed input gives a different image.
    std::fs::write(copy.path().join("www/index.html"), "changed").unwrap();
    let dc = b.ok(&["build", copy.path().to_str().unwrap(), "-q"]);
    assert_ne!(da, dc);
}

#[test]
fn verify_catches_a_flipped_byte_and_materialise_refuses_it() {
    require("nginx");
    let j = Juice::new();
    j.ok(&["build", "examples/nginx", "-t", "nginx:1"]);
    assert!(j.ok(&["verify", "nginx:1"]).contains("ok nginx:1"));
    let layer = layer_digest(&j, "nginx:1");
    let path = j.blob(&layer);
    let original = std::fs::read(&path).unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&path, &flipped).unwrap();

    let err = j.fails(&["verify", "nginx:1"]);
    assert!(
        err.contains("image nginx:1") && err.contains(&layer) && err.contains("corrupt"),
        "{err}"
    );
    let err = j.fails(&["verify"]);
    assert!(err.contains(&layer), "{err}");

    let store = Store::open(j.home.path()).unwrap();
    let err = materialise(&store, "nginx:1").unwrap_err().to_string();
    assert!(
        err.contains("image nginx:1") && err.contains(&layer),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(store.rootfs_dir()).unwrap().count(),
        0,
        "nothing was unpacked"
    );

    std::fs::write(&path, &original).unwrap();
    j.ok(&["verify"]);

    // The config (which carries the appliance manifest) is checked on every read.
    let config = inspect_json(&j, "nginx:1")["oci_manifest"]["config"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut bytes = std::fs::read(j.blob(&config)).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(j.blob(&config), &bytes).unwrap();
    let err = j.fails(&["inspect", "nginx:1"]);
    assert!(err.contains(&config) && err.contains("corrupt"), "{err}");
}

#[test]
fn skopeo_and_umoci_read_what_juice_built() {
    require("nginx");
    require("skopeo");
    require("umoci");
    let j = Juice::new();
    let digest = j.ok(&["build", "examples/nginx", "-t", "nginx:1", "-q"]);
    let layout = j.layout();
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:nginx:1", layout.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["Digest"].as_str(), Some(digest.trim()));

    let copy = tempfile::tempdir().unwrap();
    let out = Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:nginx:1", layout.display()))
        .arg(format!("oci:{}:copied", copy.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));

    let bundle = tempfile::tempdir().unwrap();
    let dest = bundle.path().join("b");
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:nginx:1", layout.display()))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(dest.join("rootfs/usr/sbin/nginx").is_file());
    let runtime = std::fs::read_to_string(dest.join("config.json")).unwrap();
    assert!(
        runtime.contains("/usr/sbin/nginx"),
        "the entrypoint reaches the runtime config"
    );
}

/// Writes an appliance directory with `juice.toml` and returns it.
fn appliance(dir: &Path, build: &str, command: &str) -> String {
    common::write_appliance(
        dir,
        &format!(
            "[appliance]\nname = \"t\"\nversion = \"1\"\n\n[build]\n{build}\n\n[run]\ncommand = [\"{command}\"]\n"
        ),
    )
}

#[test]
fn bad_input_gets_a_clear_error_and_stores_nothing() {
    let j = Juice::new();
    let t = tempfile::tempdir().unwrap();
    let juice = env!("CARGO_BIN_EXE_juice");

    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = j.fails(&["build", empty.to_str().unwrap()]);
    assert!(
        err.contains("cannot read") && err.contains("juice.toml"),
        "{err}"
    );

    let d = appliance(
        &t.path().join("typo"),
        &format!("binaries = [\"{juice}\"]\nfiels = []"),
        juice,
    );
    let err = j.fails(&["build", &d]);
    assert!(
        err.contains("juice.toml:7:1") && err.contains("did you mean `files`"),
        "{err}"
    );

    let d = appliance(
        &t.path().join("missing"),
        "binaries = [\"/no/such/program\"]",
        "/no/such/program",
    );
    let err = j.fails(&["build", &d]);
    assert!(err.contains("/no/such/program"), "{err}");

    let script = t.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let d = appliance(
        &t.path().join("notelf"),
        &format!("binaries = [\"{}\"]", script.display()),
        "/x",
    );
    let err = j.fails(&["build", &d]);
    assert!(err.contains("is not an ELF file"), "{err}");

    // An appliance that copies its `data` directory in.
    let with_data = |dir: &Path| {
        appliance(
            dir,
            &format!("binaries = [\"{juice}\"]\nfiles = [{{ from = \"data\", to = \"/data\" }}]"),
            juice,
        )
    };
    let dir = t.path().join("broken");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::os::unix::fs::symlink("nowhere", dir.join("data/link")).unwrap();
    let d = with_data(&dir);
    let err = j.fails(&["build", &d]);
    assert!(err.contains("data/link is a broken symlink"), "{err}");

    let dir = t.path().join("cycle");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::os::unix::fs::symlink("b", dir.join("data/a")).unwrap();
    std::os::unix::fs::symlink("a", dir.join("data/b")).unwrap();
    let d = with_data(&dir);
    let err = j.fails(&["build", &d]);
    assert!(err.contains("symlink cycle"), "{err}");

    let d = appliance(
        &t.path().join("noprog"),
        &format!("binaries = [\"{juice}\"]"),
        "/usr/bin/absent",
    );
    let err = j.fails(&["build", &d]);
    assert!(
        err.contains("run.command") && err.contains("/usr/bin/absent is not in the image"),
        "{err}"
    );

    // An unreadable file, for a user who cannot read it.
    let dir = t.path().join("unreadable");
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "s").unwrap();
    Command::new("chmod")
        .arg("000")
        .arg(&secret)
        .status()
        .unwrap();
    let d = appliance(
        &dir,
        &format!("binaries = [\"{juice}\"]\nfiles = [{{ from = \"secret\", to = \"/s\" }}]"),
        juice,
    );
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(j.home.path())
        .arg(t.path())
        .status()
        .unwrap();
    Command::new("chmod")
        .arg("000")
        .arg(&secret)
        .status()
        .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(t.path())
        .status()
        .unwrap();
    let out = {
        use std::os::unix::process::CommandExt;
        j.cmd()
            .args(["build", &d])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("secret") && err.contains("ermission denied"),
        "{err}"
    );

    // None of it left anything in the store.
    assert_eq!(
        std::fs::read_dir(j.layout().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(j.ok(&["images", "-o", "json"]).trim(), "[]");
}

#[test]
fn rmi_and_gc_reclaim_only_what_nothing_uses() {
    require("nginx");
    common::hello_web_binary();
    let j = Juice::new();
    j.ok(&["build", "examples/nginx", "-t", "nginx:1"]);
    j.ok(&["build", "examples/hello-web", "-t", "web:1"]);
    let store = Store::open(j.home.path()).unwrap();
    materialise(&store, "nginx:1").unwrap();
    materialise(&store, "web:1").unwrap();
    let blobs = |j: &Juice| {
        std::fs::read_dir(j.layout().join("blobs/sha256"))
            .unwrap()
            .count()
    };
    assert_eq!(blobs(&j), 6);

    // Nothing to collect while both are tagged.
    let report: serde_json::Value = serde_json::from_str(&j.ok(&["gc", "-o", "json"])).unwrap();
    assert_eq!(report["blobs_removed"], 0);

    let out = j.ok(&["rmi", "nginx"]);
    assert!(out.contains("untagged nginx:1"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&j.ok(&["gc", "-o", "json"])).unwrap();
    assert_eq!(report["blobs_removed"], 3, "{report}");
    assert_eq!(report["rootfs_removed"], 1, "{report}");
    assert_eq!(blobs(&j), 3);
    j.ok(&["verify"]);
    let listed = j.ok(&["images"]);
    assert!(
        listed.contains("web:1") && !listed.contains("nginx"),
        "{listed}"
    );
    let err = j.fails(&["inspect", "nginx:1"]);
    assert!(err.contains("no image \"nginx:1\""), "{err}");
}

#[test]
fn kill_9_at_random_points_of_build_and_gc_leaves_a_consistent_store() {
    require("nginx");
    let j = Juice::new();
    let src = tempfile::tempdir().unwrap();
    copy_dir(&workspace().join("examples/nginx"), src.path());
    let dir = src.path().to_str().unwrap().to_owned();
    let mut rng = Rng::from_env_or_time();
    // Kill anywhere from the start to half again the time a whole build takes on this machine.
    let started = Instant::now();
    j.ok(&["build", &dir, "-t", "nginx:first"]);
    let window = (u64::try_from(started.elapsed().as_millis()).unwrap() * 3 / 2).max(50);
    let mut killed_mid_build = 0;
    for i in 0..24 {
        // A new input each time, so every build does the full work.
        std::fs::write(src.path().join("www/variant.txt"), format!("{i}")).unwrap();
        let mut guard = ChildGuard::spawn(
            j.cmd()
                .args(["build", &dir, "-t", &format!("nginx:v{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        std::thread::sleep(Duration::from_millis(rng.below(window)));
        if guard.0.try_wait().unwrap().is_none() {
            killed_mid_build += 1;
        }
        let _ = guard.0.kill(); // SIGKILL
        let _ = guard.0.wait();
        if i % 4 == 3 {
            // The build it names may have been killed before it tagged anything.
            let _ = j.cmd().args(["rmi", &format!("nginx:v{}", i - 1)]).output();
            let child = j.cmd().arg("gc").stdout(Stdio::null()).spawn().unwrap();
            let mut gc = ChildGuard(child);
            std::thread::sleep(Duration::from_millis(rng.below(30)));
            let _ = gc.0.kill();
            let _ = gc.0.wait();
        }
        // After any kill: the index parses, every tagged image is whole, every blob matches its name.
        j.ok(&["verify"]);
    }
    eprintln!("{killed_mid_build} of 24 builds were killed before they finished");
    assert!(
        killed_mid_build > 0,
        "the kills must land during builds to test anything"
    );
    assert!(
        killed_mid_build < 24,
        "some builds must also finish, so that later kills hit a store with images"
    );
    j.ok(&["gc"]);
    j.ok(&["verify"]);
    let out = j.ok(&["build", &dir, "-t", "nginx:final"]);
    assert!(out.contains("nginx:final"), "{out}");
    j.ok(&["verify", "nginx:final"]);
    assert_eq!(
        std::fs::read_dir(j.home.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}
