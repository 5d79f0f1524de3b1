//! Distribution and trust, against real peers: Debian's `docker-registry` on
//! loopback (with TLS and basic auth, or plain HTTP), skopeo and umoci.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{InstanceSweeper, Juice, Registry};

static SERIAL: Mutex<()> = Mutex::new(());

/// A hello-web appliance directory whose version (and so digest) is `version`.
fn app(j: &Juice, version: &str) -> String {
    let manifest = common::hello_web_manifest()
        .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
    common::write_appliance(&j.home.path().join(format!("app-{version}")), &manifest)
}

fn digest_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in {out}"))
        .to_owned()
}

/// `juice run` of an image whose program exits at once: hello-web refuses an unknown argument.
fn run_quietly(j: &Juice, image: &str) -> std::process::Output {
    run_quietly_with(j, image, &[])
}

/// Runs the imported program `image` quietly: it must print its greeting.
fn assert_says_hi(j: &Juice, image: &str) {
    let ran = run_quietly(j, image);
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        "imported says hi",
        "{}",
        common::text(&ran)
    );
}

/// [`run_quietly`] with extra environment (a CA for the pull).
fn run_quietly_with(j: &Juice, image: &str, env: &[(&str, &str)]) -> std::process::Output {
    j.cmd()
        .envs(env.iter().copied())
        .args([
            "run",
            "-q",
            "--network",
            "none",
            "--no-cgroup",
            image,
            "--",
            "--exit-now",
        ])
        .output()
        .unwrap()
}

/// hello-web started (and said so) under `juice run`.
fn hello_web_ran(out: &std::process::Output) -> bool {
    common::text(out).contains("unknown argument \"--exit-now\"")
}

/// `juice ARGS` with `input` on its stdin (a password).
fn with_stdin(j: &Juice, args: &[&str], input: &str) -> std::process::Output {
    common::output_with_input(j.cmd().args(args), input.as_bytes(), Duration::ZERO)
}

/// `juice login` to `reg` with the test registry's credential; the auth file is 0600.
fn login(j: &Juice, reg: &Registry) {
    let ca = reg.ca.as_ref().unwrap().to_str().unwrap();
    let out = with_stdin(
        j,
        &["login", &reg.host(), "--username", "ci", "--ca", ca],
        "s3cret\n",
    );
    assert!(out.status.success(), "{}", common::text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(j.home.path().join("auth.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The blobs in a store (none after a pull the policy refused).
fn blob_count(j: &Juice) -> usize {
    std::fs::read_dir(j.layout().join("blobs/sha256")).map_or(0, |d| d.count())
}

#[test]
fn a_signed_image_travels_through_a_registry_and_runs_only_where_trusted() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let publisher = Juice::new();
    let reg = Registry::start(&publisher, true);
    let ca = reg.ca.clone().unwrap();
    let ca = ca.to_str().unwrap();
    let auth = ["--ca", ca, "-q"];
    let good = reg.reference("apps/hello:1");

    publisher.ok(&["build", &app(&publisher, "1.0.0"), "-t", "hello:1"]);
    let keys = publisher.home.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    publisher.ok(&["keygen", keys.join("ci").to_str().unwrap()]);
    // Signed for the repository hosts will pull it from: a signature counts for that name only.
    let out = publisher.ok(&[
        "sign",
        "hello:1",
        "--key",
        keys.join("ci.key").to_str().unwrap(),
        "--identity",
        &good,
    ]);
    assert!(
        out.contains(&format!("for {}/apps/hello ", reg.host())),
        "{out}"
    );

    // TLS by default: without our CA the registry's certificate is refused; without credentials, the push.
    let err = publisher.fails(&["push", "hello:1", &good, "-q"]);
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("tls"),
        "{err}"
    );
    let err = publisher.fails(&["push", "hello:1", &good, "--ca", ca, "-q"]);
    assert!(
        err.contains("registry 127.0.0.1")
            && (err.contains("401") || err.to_lowercase().contains("auth")),
        "{err}"
    );
    // A password is never taken from the command line, where the process list shows it.
    let err = publisher.fails(&["push", "hello:1", &good, "--user", "ci:s3cret", "--ca", ca]);
    assert!(err.contains("process list"), "{err}");
    // A wrong password is refused by the registry at login, and nothing is filed.
    let out = with_stdin(
        &publisher,
        &["login", &reg.host(), "--username", "ci", "--ca", ca],
        "wrong\n",
    );
    assert!(!out.status.success(), "{}", common::text(&out));
    assert!(!publisher.home.path().join("auth.json").exists());
    login(&publisher, &reg);
    let mut args = vec!["push", "hello:1", good.as_str()];
    args.extend(auth);
    let out = publisher.ok(&args);
    assert!(
        out.contains("2 blob(s)") && out.contains("1 signature(s)"),
        "{out}"
    );
    let digest = digest_line(&out);
    // Again: every blob is already there.
    let out = publisher.ok(&args);
    assert!(
        out.contains("0 blob(s)") && out.contains("2 already there"),
        "{out}"
    );

    // An unsigned image, and one signed by a key the host does not trust.
    publisher.ok(&["build", &app(&publisher, "2.0.0"), "-t", "hello:2"]);
    let unsigned = reg.reference("apps/unsigned:2");
    publisher.ok(&["push", "hello:2", &unsigned, "--ca", ca, "-q"]);
    publisher.ok(&["build", &app(&publisher, "3.0.0"), "-t", "hello:3"]);
    publisher.ok(&["keygen", keys.join("rogue").to_str().unwrap()]);
    let rogue = reg.reference("apps/rogue:3");
    publisher.ok(&[
        "sign",
        "hello:3",
        "--key",
        keys.join("rogue.key").to_str().unwrap(),
        "--identity",
        &rogue,
    ]);
    publisher.ok(&["push", "hello:3", &rogue, "--ca", ca, "-q"]);
    // The attack: the trusted image, its valid `ci` signature (made for apps/hello) along,
    // published under another name the same rule covers. Push says the signature is not for it.
    let copy = reg.reference("apps/copy:1");
    let out = publisher
        .cmd()
        .args(["push", "hello:1", &copy, "--ca", ca, "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no signature of hello:1 is for"),
        "{}",
        common::text(&out)
    );

    // Another host, empty, with a strict policy: only what `ci` signed runs.
    let policy = format!(
        "unsigned = \"deny\"\n\n[keys]\nci = \"{}\"\n\n[[trust]]\nimages = \"{}/apps/*\"\nkeys = [\"ci\"]\n",
        keys.join("ci.pub").display(),
        reg.host()
    );
    let host = Juice::new();
    let _sweeper = InstanceSweeper(host.home.path().to_owned());
    std::fs::write(host.home.path().join("policy.toml"), &policy).unwrap();
    login(&host, &reg);
    let mut pull = vec!["pull", good.as_str()];
    pull.extend(auth);
    let out = host.ok(&pull);
    assert!(out.contains("1 signature(s)"), "{out}");
    assert_eq!(digest_line(&out), digest, "the same image, by digest");
    host.ok(&[
        "verify",
        &good,
        "--key",
        keys.join("ci.pub").to_str().unwrap(),
    ]);
    let ran = run_quietly(&host, &good);
    assert!(hello_web_ran(&ran), "{}", common::text(&ran));

    // What the policy refuses is refused at the pull, before any blob moves: a third host
    // with the same policy ends with nothing in its store, not even the manifest.
    let strict = Juice::new();
    let _strict_sweeper = InstanceSweeper(strict.home.path().to_owned());
    std::fs::write(strict.home.path().join("policy.toml"), &policy).unwrap();
    login(&strict, &reg);
    let rule = format!("\"{}/apps/*\"", reg.host());
    let not_for_copy = format!("it is for {0}/apps/hello, not {0}/apps/copy", reg.host());
    for (image, why) in [
        (&unsigned, "it has no signature"),
        (&rogue, "none of its 1 signature(s) verifies"),
        (&copy, not_for_copy.as_str()),
    ] {
        let mut p = vec!["pull", image.as_str()];
        p.extend(auth);
        let err = strict.fails(&p);
        assert!(
            err.contains("is not trusted") && err.contains(&rule) && err.contains(why),
            "{image}: {err}"
        );
        // `juice run` of the reference pulls, and is refused the same way; nothing starts.
        let out = run_quietly_with(&strict, image, &[("JUICE_REGISTRY_CA", ca)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("is not trusted") && err.contains(why), "{err}");
        assert!(!hello_web_ran(&out), "nothing started: {err}");
    }
    assert_eq!(
        blob_count(&strict),
        0,
        "no blob of a refused image was downloaded"
    );
    assert_eq!(strict.ok(&["images"]).lines().count(), 1, "only the header");

    // Another spelling of a covered name does not escape the rule: with unsigned images
    // allowed, an unsigned image named with the default port and upper case is still
    // covered by the rule for `registry.example.com/apps/*`.
    let lax = Juice::new();
    let _lax_sweeper = InstanceSweeper(lax.home.path().to_owned());
    std::fs::write(
        lax.home.path().join("policy.toml"),
        format!(
            "unsigned = \"allow\"\n\n[keys]\nci = \"{}\"\n\n[[trust]]\nimages = \"registry.example.com/apps/*\"\nkeys = [\"ci\"]\n",
            keys.join("ci.pub").display(),
        ),
    )
    .unwrap();
    let escape = "REGISTRY.example.com:443/apps/evil:1";
    lax.ok(&["build", &app(&lax, "4.0.0"), "-t", escape]);
    let out = run_quietly(&lax, escape);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("is not trusted")
            && err.contains("\"registry.example.com/apps/*\"")
            && err.contains("covers registry.example.com/apps/evil"),
        "{}",
        common::text(&out)
    );
    assert!(!hello_web_ran(&out));
    // The control: an image whose only name no rule covers runs unsigned under the same policy
    // (another version: the same digest would have the covered name too, and be refused).
    lax.ok(&["build", &app(&lax, "5.0.0"), "-t", "fine:1"]);
    let out = run_quietly(&lax, "fine:1");
    assert!(hello_web_ran(&out), "{}", common::text(&out));

    // A signature tampered with on this host no longer counts.
    let sig_file = host
        .home
        .path()
        .join("signatures")
        .join(format!("{}.json", digest.trim_start_matches("sha256:")));
    let original = std::fs::read_to_string(&sig_file).unwrap();
    let sigs: serde_json::Value = serde_json::from_str(&original).unwrap();
    let sig = sigs[0]["signature"].as_str().unwrap();
    // Another valid base64 signature of the same length: its first character changed.
    let tampered = format!(
        "{}{}",
        if sig.starts_with('A') { 'B' } else { 'A' },
        &sig[1..]
    );
    std::fs::write(&sig_file, original.replace(sig, &tampered)).unwrap();
    let out = run_quietly(&host, &good);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not verify"),
        "{}",
        common::text(&out)
    );
    std::fs::write(&sig_file, &original).unwrap();

    // The daemon enforces the same policy, and a refused apply leaves the running group alone.
    // It pulls what a site names and it lacks, with the CA of its environment and the
    // credential filed in its home's auth.json.
    let d = common::daemon_with_env(&host, &[("JUICE_REGISTRY_CA", ca)]);
    let site = |image: &str| {
        let f = host.home.path().join("site.toml");
        std::fs::write(&f, format!("[group.web]\nimage = \"{image}\"\nsize = 1\n")).unwrap();
        f.to_str().unwrap().to_owned()
    };
    let by_digest = format!("{}/apps/hello@{digest}", reg.host());
    host.ok(&["apply", "-f", &site(&by_digest)]);
    assert!(
        host.ok(&["images"]).contains("@sha256:"),
        "the daemon pulled it"
    );
    let instances = || -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&host.ok(&["get", "instances", "-o", "json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while instances().len() != 1 {
        assert!(Instant::now() < deadline, "the trusted group did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = instances();
    let err = host.fails(&["apply", "-f", &site(&rogue)]);
    assert!(
        err.contains("web") && err.contains("is not trusted"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = instances();
    assert_eq!(before[0]["name"], after[0]["name"]);
    assert_eq!(before[0]["pid"], after[0]["pid"]);
    host.ok(&["delete", "web"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !instances().is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(d);

    // A layer tampered with inside the registry is refused, and nothing of it is kept.
    let third = Juice::new();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(host.blob(&digest)).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no layer in {manifest}"));
    let file = reg.blob_file(&layer);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    // A credential for this command only: the user name as an argument, the password on stdin.
    let out = with_stdin(
        &third,
        &[
            "pull",
            &good,
            "--user",
            "ci",
            "--password-stdin",
            "--ca",
            ca,
            "-q",
        ],
        "s3cret\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains(&layer) || err.to_lowercase().contains("digest"),
        "{err}"
    );
    assert!(
        third.ok(&["images"]).lines().count() <= 1,
        "no image was tagged"
    );
    let blobs = std::fs::read_dir(third.layout().join("blobs/sha256"))
        .unwrap()
        .count();
    assert!(blobs <= 1, "at most the verified config blob: {blobs}");
    let tmp = std::fs::read_dir(third.home.path().join("tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0, "no partial download left behind");
}

#[test]
fn skopeo_reads_what_juice_pushed_and_juice_pulls_what_skopeo_pushed() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::require("skopeo");
    let j = Juice::new();
    let reg = Registry::start(&j, false);
    let host = reg.host();
    j.ok(&["build", &app(&j, "1.0.0"), "-t", "hello:1"]);
    let target = reg.reference("juice/hello:1");
    let digest = digest_line(&j.ok(&["push", "hello:1", &target, "--insecure", &host, "-q"]));

    // Plain HTTP only for hosts named as insecure.
    let err = j.fails(&["pull", &target, "-q"]);
    assert!(err.contains(&host), "{err}");

    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{target}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());
    assert_eq!(inspected["Os"], "linux");

    // skopeo copies our store's image to the registry; a fresh Juice pulls it and runs it.
    let from = format!("oci:{}:hello:1", j.layout().display());
    let theirs = reg.reference("skopeo/hello:1");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--dest-tls-verify=false",
            &from,
            &format!("docker://{theirs}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let other = Juice::new();
    let pulled = other.ok(&["pull", &theirs, "--insecure", &host, "-q"]);
    assert_eq!(
        digest_line(&pulled),
        digest,
        "skopeo kept the manifest's bytes"
    );
    other.ok(&["verify", &theirs]);
    let ran = run_quietly(&other, &theirs);
    assert!(hello_web_ran(&ran), "{}", common::text(&ran));

    // Export: an OCI archive that skopeo reads, with the same digest.
    let archive = j.home.path().join("hello.tar");
    j.ok(&["export", "hello:1", archive.to_str().unwrap()]);
    let out = Command::new("skopeo")
        .args(["inspect", &format!("oci-archive:{}", archive.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());
    // Juice imports it back (an OCI archive) as the same program.
    j.ok(&["import", archive.to_str().unwrap(), "-t", "again:1"]);
    assert!(hello_web_ran(&run_quietly(&j, "again:1")));
    // And a second export is byte for byte the same.
    let again = j.home.path().join("again.tar");
    j.ok(&["export", "hello:1", again.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&archive).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

/// An OCI image assembled by umoci from a small root: a dynamically linked C
/// program with glibc, files it never uses, and a second layer that deletes one.
fn umoci_image(dir: &Path) -> PathBuf {
    for tool in ["umoci", "gcc", "skopeo"] {
        common::require(tool);
    }
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}\n{}", common::text(&out));
    };
    std::fs::write(
        dir.join("hello.c"),
        "#include <stdio.h>\n#include <stdlib.h>\nint main(void){printf(\"imported says %s\\n\", getenv(\"GREETING\")); return 0;}\n",
    )
    .unwrap();
    sh("gcc -O2 -o hello hello.c");
    sh("umoci init --layout layout && umoci new --image layout:app");
    sh("umoci unpack --rootless --image layout:app bundle");
    let root = dir.join("bundle/rootfs");
    for d in [
        "usr/bin",
        "lib/x86_64-linux-gnu",
        "lib64",
        "usr/share/doc/junk",
        "etc",
        "data",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(dir.join("hello"), root.join("usr/bin/hello")).unwrap();
    std::fs::copy(
        "/lib/x86_64-linux-gnu/libc.so.6",
        root.join("lib/x86_64-linux-gnu/libc.so.6"),
    )
    .unwrap();
    std::fs::copy(
        "/lib64/ld-linux-x86-64.so.2",
        root.join("lib64/ld-linux-x86-64.so.2"),
    )
    .unwrap();
    // Unused: a library nothing links and some documentation.
    std::fs::copy(
        "/lib/x86_64-linux-gnu/libz.so.1",
        root.join("lib/x86_64-linux-gnu/libz.so.1"),
    )
    .unwrap();
    std::fs::write(root.join("usr/share/doc/junk/README"), vec![b'x'; 200_000]).unwrap();
    std::fs::write(root.join("etc/doomed"), "deleted by the second layer").unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/:/nonexistent\napp:x:1234:1234::/:/nonexistent\n",
    )
    .unwrap();
    sh("umoci repack --image layout:app bundle");
    std::fs::remove_file(root.join("etc/doomed")).unwrap();
    sh("umoci repack --image layout:app bundle");
    sh(
        "umoci config --image layout:app --config.entrypoint /usr/bin/hello --config.env GREETING=hi --config.user app --config.volume /data",
    );
    sh("skopeo copy -q oci:layout:app docker-archive:app.tar:example/app:1");
    dir.join("layout")
}

#[test]
fn container_images_import_as_appliances_pruned_or_whole() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let layout = umoci_image(work.path());
    let j = Juice::new();

    // A docker save archive, whole.
    let archive = work.path().join("app.tar");
    let out = j.ok(&["import", archive.to_str().unwrap(), "-t", "app:whole"]);
    assert!(
        out.contains("as 1234:1234") && out.contains("layer(s) flattened"),
        "{out}"
    );
    assert!(
        out.contains("[[volumes]]") && out.contains("/data"),
        "{out}"
    );
    assert_says_hi(&j, "app:whole");

    // The OCI layout, pruned to the program's closure.
    let source = format!("{}:app", layout.display());
    let out = j.ok(&[
        "import",
        &source,
        "-t",
        "app:pruned",
        "--prune",
        "-o",
        "json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kept = report["kept_bytes"].as_u64().unwrap();
    let total = report["bytes"].as_u64().unwrap();
    assert!(kept < total, "{report}");
    let dropped = report["dropped"].to_string();
    assert!(dropped.contains("/usr/share/doc"), "{dropped}");
    assert_says_hi(&j, "app:pruned");
    // What the layers deleted is gone; what pruning dropped is gone; the closure is there.
    let inspect = j.ok(&["inspect", "app:pruned", "-o", "json"]);
    assert!(
        inspect.contains("libc.so.6") && !inspect.contains("libz"),
        "{inspect}"
    );
    let whole = j.ok(&["inspect", "app:whole", "-o", "json"]);
    let unpacked = |image: &str| {
        let r = juice_image_tree(&j, image);
        (
            r.contains("/etc/doomed"),
            r.contains("libz.so.1"),
            r.contains("README"),
        )
    };
    assert_eq!(unpacked("app:whole"), (false, true, true), "{whole}");
    assert_eq!(unpacked("app:pruned"), (false, false, false));

    // Broken and hostile input: a clear error, and nothing new in the store.
    let before = j.ok(&["images"]);
    let bad = work.path().join("bad.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(9);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", &b"[{oops"[..])
        .unwrap();
    std::fs::write(&bad, b.into_inner().unwrap()).unwrap();
    let err = j.fails(&["import", bad.to_str().unwrap(), "-t", "bad:1"]);
    assert!(err.contains("manifest.json is not valid"), "{err}");
    let evil = work.path().join("evil.tar");
    std::fs::write(
        &evil,
        docker_archive_with_layer(&[("../../etc/cron.d/x", b"* * * * * root sh")]),
    )
    .unwrap();
    let err = j.fails(&["import", evil.to_str().unwrap(), "-t", "evil:1"]);
    assert!(
        err.contains("layer 1") && err.contains("climbs out of the root"),
        "{err}"
    );
    assert_eq!(j.ok(&["images"]), before);
}

/// The paths of an image's layer, through an OCI archive export and tar.
fn juice_image_tree(j: &Juice, image: &str) -> String {
    let out = j
        .home
        .path()
        .join(format!("{}.tar", image.replace(':', "-")));
    j.ok(&["export", image, out.to_str().unwrap()]);
    let mut names = String::new();
    let mut archive = tar::Archive::new(std::fs::File::open(&out).unwrap());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        if path.starts_with("blobs/") {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                let mut layer = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
                for f in layer.entries().unwrap() {
                    names.push_str(&format!("/{}\n", f.unwrap().path().unwrap().display()));
                }
            }
        }
    }
    names
}

/// A `docker save` archive with one layer holding `files` under raw (unchecked) names.
fn docker_archive_with_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        let n = name.as_bytes();
        h.as_old_mut().name[..n.len()].copy_from_slice(n);
        h.set_cksum();
        layer.append(&h, *data).unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let config =
        br#"{"config":{"Entrypoint":["/x"]},"rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#;
    let manifest = br#"[{"Config":"config.json","RepoTags":["evil:1"],"Layers":["layer.tar"]}]"#;
    let mut outer = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        ("config.json", &config[..]),
        ("layer.tar", &layer[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        outer.append_data(&mut h, name, data).unwrap();
    }
    outer.into_inner().unwrap()
}

/// `juice pull HOST/REPO --insecure HOST -q`, which must fail; returns stderr.
fn pull_insecure_fails(j: &Juice, host: &str, repo: &str) -> String {
    j.fails(&["pull", &format!("{host}/{repo}"), "--insecure", host, "-q"])
}

/// A plain-HTTP server on loopback, one request per connection, whose thread ends with
/// the test process: `answer` gets the server's port, each request's path and
/// `Authorization` header, and the connection to answer on. Returns the port.
fn serve(
    answer: impl Fn(u16, String, Option<String>, std::net::TcpStream) + Send + 'static,
) -> u16 {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut authorization = None;
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("authorization")
                {
                    authorization = Some(v.trim().to_owned());
                }
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            answer(port, path, authorization, stream);
        }
    });
    port
}

/// How the fake registry misbehaves when the image's layer is fetched.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// Other bytes of the right length.
    WrongContent,
    /// Half the body, then the connection closes.
    Truncated,
    /// A 503 for the layer (after the config came through).
    ServerError,
    /// The connection closes before any answer.
    GoesAway,
    /// None: the layer as it is.
    None,
}

/// The paths a fake registry was asked for.
type Hits = std::sync::Arc<Mutex<Vec<String>>>;

/// A registry that serves one real image over plain HTTP, with one fault on its layer.
/// Its thread ends with the test process; it listens on loopback only.
fn fake_registry(
    blobs: std::collections::BTreeMap<String, Vec<u8>>,
    manifest: Vec<u8>,
    layer: String,
    fault: Fault,
) -> (u16, Hits) {
    use std::io::Write;
    let hits = Hits::default();
    let log = hits.clone();
    let port = serve(move |_, path, _, stream| {
        log.lock().unwrap().push(path.clone());
        let mut out = stream;
        let respond = |out: &mut std::net::TcpStream,
                       status: &str,
                       ctype: &str,
                       body: &[u8],
                       claimed: usize| {
            let _ = write!(
                out,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {claimed}\r\nConnection: close\r\n\r\n"
            );
            let _ = out.write_all(body);
        };
        if path == "/v2/" {
            respond(&mut out, "200 OK", "application/json", b"{}", 2);
        } else if path.contains("/manifests/") && !path.contains(".sig") {
            respond(
                &mut out,
                "200 OK",
                "application/vnd.oci.image.manifest.v1+json",
                &manifest,
                manifest.len(),
            );
        } else if let Some(d) = path.split("/blobs/").nth(1) {
            let Some(body) = blobs.get(d) else {
                respond(&mut out, "404 Not Found", "application/json", b"{}", 2);
                return;
            };
            if d != layer {
                respond(
                    &mut out,
                    "200 OK",
                    "application/octet-stream",
                    body,
                    body.len(),
                );
                return;
            }
            match fault {
                Fault::WrongContent => {
                    let mut other = body.clone();
                    let mid = other.len() / 2;
                    other[mid] ^= 0xff;
                    respond(
                        &mut out,
                        "200 OK",
                        "application/octet-stream",
                        &other,
                        other.len(),
                    );
                }
                Fault::Truncated => respond(
                    &mut out,
                    "200 OK",
                    "application/octet-stream",
                    &body[..body.len() / 2],
                    body.len(),
                ),
                Fault::ServerError => respond(
                    &mut out,
                    "503 Service Unavailable",
                    "text/plain",
                    b"overloaded",
                    10,
                ),
                Fault::GoesAway => drop(out),
                Fault::None => respond(
                    &mut out,
                    "200 OK",
                    "application/octet-stream",
                    body,
                    body.len(),
                ),
            }
        } else {
            respond(&mut out, "404 Not Found", "application/json", b"{}", 2);
        }
    });
    (port, hits)
}

/// A hello-web image for a fake registry: its manifest, its layer's digest, and its blobs.
fn served_image() -> (Vec<u8>, String, std::collections::BTreeMap<String, Vec<u8>>) {
    let source = Juice::new();
    let digest = digest_line(
        &source
            .ok(&["build", &app(&source, "1.0.0"), "-t", "hello:1"])
            .replace(' ', "\n"),
    );
    let manifest = std::fs::read(source.blob(&digest)).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer = doc["layers"][0]["digest"].as_str().unwrap().to_owned();
    let config = doc["config"]["digest"].as_str().unwrap().to_owned();
    let blobs = [&layer, &config]
        .iter()
        .map(|d| ((*d).clone(), std::fs::read(source.blob(d)).unwrap()))
        .collect();
    (manifest, layer, blobs)
}

#[test]
fn an_image_over_the_size_limit_is_refused_before_its_layers_are_fetched() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (manifest, layer, blobs) = served_image();
    // The registry declares a 9 GiB layer (over the 8 GiB default); the bytes would be small.
    let mut doc: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    doc["layers"][0]["size"] = serde_json::json!(9u64 << 30);
    let huge = serde_json::to_vec(&doc).unwrap();
    let (port, hits) = fake_registry(blobs.clone(), huge, layer.clone(), Fault::None);
    let host = format!("127.0.0.1:{port}");
    let j = Juice::new();
    let err = pull_insecure_fails(&j, &host, "apps/hello:1");
    assert!(
        err.contains(&layer) && err.contains("over the limit") && err.contains("before download"),
        "{err}"
    );
    let asked = hits.lock().unwrap().clone();
    assert!(
        !asked.iter().any(|p| p.contains("/blobs/")),
        "no blob was fetched: {asked:?}"
    );
    assert_eq!(blob_count(&j), 0);

    // The limit is the user's: the real image, under a limit smaller than its layer.
    let (port, hits) = fake_registry(blobs, manifest, layer.clone(), Fault::None);
    let host = format!("127.0.0.1:{port}");
    let reference = format!("{host}/apps/hello:1");
    let err = j.fails(&[
        "pull",
        &reference,
        "--insecure",
        &host,
        "--max-image-size",
        "4K",
        "-q",
    ]);
    assert!(
        err.contains(&layer) && err.contains("over the limit of 4096"),
        "{err}"
    );
    assert!(!hits.lock().unwrap().iter().any(|p| p.contains("/blobs/")));
    // And the same image within the default limit comes through.
    j.ok(&["pull", &reference, "--insecure", &host, "-q"]);
    j.ok(&["verify", &reference]);
}

#[test]
fn a_misbehaving_registry_gets_a_clear_error_and_leaves_nothing_behind() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (manifest, layer, blobs) = served_image();
    for (fault, want) in [
        (Fault::WrongContent, "nothing was stored"),
        (Fault::Truncated, "nothing was stored"),
        (Fault::ServerError, "503"),
        (Fault::GoesAway, "fetching blob"),
    ] {
        let (port, _) = fake_registry(blobs.clone(), manifest.clone(), layer.clone(), fault);
        let host = format!("127.0.0.1:{port}");
        let j = Juice::new();
        let err = pull_insecure_fails(&j, &host, "apps/hello:1");
        assert!(
            err.contains(&host) && err.contains(want),
            "{fault:?}: {err}"
        );
        assert!(
            j.ok(&["images"]).lines().count() <= 1,
            "{fault:?}: nothing tagged"
        );
        assert!(
            !j.blob(&layer).exists(),
            "{fault:?}: the bad layer is not in the store"
        );
        let tmp = std::fs::read_dir(j.home.path().join("tmp"))
            .unwrap()
            .count();
        assert_eq!(tmp, 0, "{fault:?}: no partial download left");
        // Asking for the right digest by name is checked too: a manifest that does not match is refused.
        if fault == Fault::WrongContent {
            let wrong = format!("{host}/apps/hello@sha256:{}", "0".repeat(64));
            let err = j.fails(&["pull", &wrong, "--insecure", &host, "-q"]);
            assert!(
                err.contains("Invalid digest") || err.contains("refused"),
                "{err}"
            );
        }
    }
}

#[test]
fn a_layer_too_big_to_hold_is_streamed_up_and_arrives_whole() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let j = Juice::new();
    let reg = Registry::start(&j, false);
    let dir = app(&j, "9.0.0");
    // 24 MiB that gzip cannot shrink: the layer is past the 16 MiB monolithic limit.
    let mut rng = common::Rng::from_env_or_time();
    let noise: Vec<u8> = (0..24 << 20)
        .map(|_| u8::try_from(rng.below(256)).unwrap())
        .collect();
    std::fs::write(Path::new(&dir).join("noise.bin"), &noise).unwrap();
    let manifest = std::fs::read_to_string(Path::new(&dir).join("juice.toml"))
        .unwrap()
        .replace(
            "files = [",
            "files = [{ from = \"noise.bin\", to = \"/srv/noise.bin\" }, ",
        );
    std::fs::write(Path::new(&dir).join("juice.toml"), manifest).unwrap();
    j.ok(&["build", &dir, "-t", "big:1"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&j.ok(&["inspect", "big:1", "-o", "json"])).unwrap();
    assert!(
        inspect["layer_size"].as_u64().unwrap() > 16 << 20,
        "{}",
        inspect["layer_size"]
    );
    let target = reg.reference("big/app:1");
    let pushed = j.ok(&["push", "big:1", &target, "--insecure", &reg.host(), "-q"]);
    let other = Juice::new();
    let pulled = other.ok(&["pull", &target, "--insecure", &reg.host(), "-q"]);
    assert_eq!(digest_line(&pushed), digest_line(&pulled));
    other.ok(&["verify", &target]);
}

/// What a [`recorder`] was asked: each request's path and `Authorization` header.
type Recorded = std::sync::Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A plain-HTTP listener on loopback that records every request's `Authorization` header:
/// `/v2/` answers 401 with `challenge`, `/token` hands out a token, anything else is 401.
/// Its thread ends with the test process.
fn recorder(challenge: impl Fn(u16) -> String + Send + 'static) -> (u16, Recorded) {
    use std::io::Write;
    let seen = Recorded::default();
    let log = seen.clone();
    let port = serve(move |port, path, authorization, stream| {
        log.lock().unwrap().push((path.clone(), authorization));
        let mut out = stream;
        let (status, extra, body) = if path.starts_with("/token") {
            ("200 OK", String::new(), r#"{"token":"t0ken"}"#.to_owned())
        } else {
            (
                "401 Unauthorized",
                format!("WWW-Authenticate: {}\r\n", challenge(port)),
                "{}".to_owned(),
            )
        };
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    (port, seen)
}

/// The `Authorization` value of basic credentials.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[test]
fn a_credential_is_sent_only_to_the_registry_it_is_for() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let j = Juice::new();
    // Registry A, real, with TLS and basic auth: the credential is filed for it.
    let a = Registry::start(&j, true);
    login(&j, &a);
    let auth_file = j.home.path().join("auth.json");
    let a_secret = basic("ci", "s3cret");

    // Registry B asks every client for basic credentials. It gets none: they are A's.
    let (b, seen_b) = recorder(|_| "Basic realm=\"b\"".to_owned());
    let b_host = format!("127.0.0.1:{b}");
    let err = pull_insecure_fails(&j, &b_host, "apps/x:1");
    assert!(err.contains("401") && err.contains("juice login"), "{err}");
    let seen = seen_b.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|(_, a)| a.is_none()),
        "B saw a credential: {seen:?}"
    );

    // Registry C has a credential of its own (loopback, so plain HTTP may carry it) and sends
    // clients to a token realm on B. B gets no credential at all: neither A's nor C's.
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&auth_file).unwrap()).unwrap();
    let realm = format!("http://127.0.0.1:{b}/token");
    let (c, seen_c) = recorder(move |_| format!("Bearer realm=\"{realm}\",service=\"c\""));
    let c_host = format!("127.0.0.1:{c}");
    file["auths"][&c_host] = serde_json::json!({ "username": "cu", "password": "cp" });
    std::fs::write(&auth_file, serde_json::to_vec(&file).unwrap()).unwrap();
    seen_b.lock().unwrap().clear();
    pull_insecure_fails(&j, &c_host, "apps/x:1");
    let seen = seen_b.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(p, _)| p.starts_with("/token")),
        "the token was asked for: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, a)| a.is_none()),
        "the realm on B saw a credential: {seen:?}"
    );
    // C itself got the token, never a password.
    let seen = seen_c.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(_, a)| a.as_deref().is_none_or(|a| a == "Bearer t0ken")),
        "{seen:?}"
    );

    // The control: a realm on the registry's own origin gets that registry's credential (and
    // only it), so the silence above is the rule at work, not a credential never read.
    let (d, seen_d) = recorder(|port| format!("Bearer realm=\"http://127.0.0.1:{port}/token\""));
    let d_host = format!("127.0.0.1:{d}");
    file["auths"][&d_host] = serde_json::json!({ "username": "du", "password": "dp" });
    std::fs::write(&auth_file, serde_json::to_vec(&file).unwrap()).unwrap();
    pull_insecure_fails(&j, &d_host, "apps/x:1");
    let seen = seen_d.lock().unwrap().clone();
    let d_secret = basic("du", "dp");
    assert!(
        seen.iter()
            .any(|(p, a)| p.starts_with("/token") && a.as_deref() == Some(d_secret.as_str())),
        "{seen:?}"
    );
    for (_, a) in seen_b.lock().unwrap().iter().chain(seen.iter()) {
        assert_ne!(
            a.as_deref(),
            Some(a_secret.as_str()),
            "A's credential went elsewhere"
        );
    }

    // The old global credential from the environment is refused, not sent everywhere.
    let out = j
        .cmd()
        .args([
            "pull",
            &format!("{b_host}/apps/x:1"),
            "--insecure",
            &b_host,
            "-q",
        ])
        .env("JUICE_REGISTRY_USER", "ci")
        .env("JUICE_REGISTRY_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("no longer reads it"),
        "{}",
        common::text(&out)
    );
}
