//! Materialising an image's root filesystem for the runtimes.
//!
//! [`materialise`] checks the manifest, config and layer blobs against their
//! digests *before* extracting anything, then extracts the layer into a
//! private temp directory with [`unpack_layer`], checks the uncompressed
//! stream against the config's `diff_id`, and only then renames the tree to
//! `$JUICE_HOME/rootfs/<diff_id>`: a content-addressed cache that runtimes
//! mount read-only. A tree under a digest name is always complete.
//!
//! The extractor is written here rather than using `tar::Entry::unpack_in`
//! because every refusal must be a typed error naming the entry, and because
//! it must never follow a symlink while writing: it checks every parent
//! component with `lstat` and creates files with `O_EXCL | O_NOFOLLOW`.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::appliance::ApplianceConfig;
use crate::confine::{Kind, check_link};
use crate::digest::{Digest, HashingReader};
use crate::store::{Store, StoreError, from_oci, open_layer};

/// Limits and permissions for extraction.
#[derive(Debug, Clone)]
pub struct UnpackPolicy {
    pub max_entries: u64,
    pub max_file_size: u64,
    pub max_total_size: u64,
    /// Image paths allowed to carry a setuid or setgid bit.
    pub allow_setid: BTreeSet<PathBuf>,
}

impl Default for UnpackPolicy {
    fn default() -> Self {
        UnpackPolicy {
            max_entries: 1_000_000,
            max_file_size: 8 << 30,
            max_total_size: 32 << 30,
            allow_setid: BTreeSet::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer entry {entry:?}: {reason}")]
    Hostile { entry: String, reason: String },
    #[error("the layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer entry {entry:?} is {size} bytes, above the limit of {limit}")]
    TooLarge {
        entry: String,
        size: u64,
        limit: u64,
    },
    #[error("the layer unpacks to more than {limit} bytes")]
    TooLargeTotal { limit: u64 },
    #[error("the layer is not a valid tar stream: {0}")]
    Archive(io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "image {image} has {layers} layers; Juice images have exactly one (`juice import` flattens others)"
    )]
    Layers { image: String, layers: usize },
}

/// Counts from one extraction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
}

/// A root filesystem ready for a runtime.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub path: PathBuf,
    pub image: Digest,
    pub reference: String,
    pub appliance: Option<ApplianceConfig>,
}

/// Verifies `reference`'s blobs and returns its unpacked root, extracting it once.
pub fn materialise(store: &Store, reference: &str) -> Result<Rootfs, UnpackError> {
    let image = store.image(reference)?;
    let name = image.record.reference.clone();
    let layers = image.manifest.layers();
    let diff_ids = image.config.rootfs().diff_ids();
    if layers.len() != 1 || diff_ids.len() != 1 {
        return Err(UnpackError::Layers {
            image: name,
            layers: layers.len(),
        });
    }
    let layer = &layers[0];
    let invalid = |reason: String| StoreError::Invalid {
        image: name.clone(),
        reason,
    };
    let layer_digest = from_oci(layer.digest()).map_err(invalid)?;
    let diff_id: Digest = diff_ids[0]
        .parse()
        .map_err(|e: crate::digest::BadDigest| invalid(e.to_string()))?;
    let rootfs = Rootfs {
        path: store.rootfs_dir().join(diff_id.hex()),
        image: image.record.digest,
        reference: name.clone(),
        appliance: image.appliance.clone(),
    };
    if rootfs.path.is_dir() {
        return Ok(rootfs);
    }

    // Every byte is checked before any of it is interpreted.
    store.check_blob(&name, &layer_digest, Some(layer.size()))?;

    let mut policy = UnpackPolicy::default();
    if let Some(a) = &image.appliance {
        policy.allow_setid = a.setuid.iter().map(|p| p.as_path().to_owned()).collect();
    }
    let staging = store.temp_path("rootfs");
    let result = (|| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|source| UnpackError::Write {
                path: staging.clone(),
                source,
            })?;
        let path = store.blob_path(&layer_digest);
        let file = fs::File::open(&path).map_err(|source| UnpackError::Write {
            path: path.clone(),
            source,
        })?;
        let tar_stream = open_layer(BufReader::new(file), layer.media_type()).map_err(invalid)?;
        let mut hashing = HashingReader::new(tar_stream);
        unpack_layer(&mut hashing, &staging, &policy)?;
        let (actual, _) = hashing.finish().map_err(UnpackError::Archive)?;
        if actual != diff_id {
            return Err(UnpackError::Store(StoreError::Mismatch {
                image: name.clone(),
                blob: layer_digest.to_string(),
                what: "the uncompressed digest",
                expected: diff_id.to_string(),
                actual: actual.to_string(),
            }));
        }
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o755)).map_err(|source| {
            UnpackError::Write {
                path: staging.clone(),
                source,
            }
        })?;
        match fs::rename(&staging, &rootfs.path) {
            Ok(()) => Ok(()),
            // Someone else materialised the same root meanwhile: theirs is as good as ours.
            Err(_) if rootfs.path.is_dir() => {
                let _ = fs::remove_dir_all(&staging);
                Ok(())
            }
            Err(source) => Err(UnpackError::Write {
                path: rootfs.path.clone(),
                source,
            }),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.map(|()| rootfs)
}

/// Extracts a tar stream into the empty directory `dest`, refusing anything hostile.
pub fn unpack_layer<R: Read>(
    reader: R,
    dest: &Path,
    policy: &UnpackPolicy,
) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    // What each image path is, to check every link once the whole tree is known.
    let mut kinds: std::collections::BTreeMap<PathBuf, Kind> = std::collections::BTreeMap::new();
    for entry in archive.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        stats.entries += 1;
        if stats.entries > policy.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: policy.max_entries,
            });
        }
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let hostile = |reason: &str| UnpackError::Hostile {
            entry: raw.clone(),
            reason: reason.to_owned(),
        };
        let rel = clean_path(&raw).map_err(&hostile)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        if rel
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".wh."))
        {
            return Err(hostile(
                "whiteout files are not allowed in a Juice layer (`juice import` applies them)",
            ));
        }
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(UnpackError::Archive)?;
        let size = header.entry_size().map_err(UnpackError::Archive)?;
        if size > policy.max_file_size {
            return Err(UnpackError::TooLarge {
                entry: raw,
                size,
                limit: policy.max_file_size,
            });
        }
        stats.bytes = stats.bytes.saturating_add(size);
        if stats.bytes > policy.max_total_size {
            return Err(UnpackError::TooLargeTotal {
                limit: policy.max_total_size,
            });
        }
        let image_path = Path::new("/").join(&rel);
        if mode & 0o6000 != 0 && !kind.is_dir() && !policy.allow_setid.contains(&image_path) {
            return Err(hostile(
                "has a setuid or setgid bit that the image does not declare",
            ));
        }
        if !seen.insert(rel.clone()) && !kind.is_dir() {
            return Err(hostile("appears twice in the layer"));
        }
        let target = dest.join(&rel);
        ensure_parents(dest, &rel).map_err(|e| match e {
            ParentError::NotDir(p) => {
                hostile(&format!("its parent {p} is not a directory (a symlink?)"))
            }
            ParentError::Io(path, source) => UnpackError::Write { path, source },
        })?;
        let write_err = |source: io::Error| UnpackError::Write {
            path: target.clone(),
            source,
        };
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {
                    kinds.insert(image_path.clone(), Kind::Dir);
                }
                Ok(_) => return Err(hostile("a directory replaces an earlier non-directory")),
                Err(_) => {
                    fs::DirBuilder::new()
                        .mode(mode & 0o1777)
                        .create(&target)
                        .map_err(write_err)?;
                    kinds.insert(image_path.clone(), Kind::Dir);
                }
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(mode & 0o7777)
                    .open(&target)
                    .map_err(write_err)?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut out)
                    .map_err(UnpackError::Archive)?;
                if copied != size {
                    return Err(hostile("is truncated"));
                }
                // `mode` at creation is filtered by the umask; set it exactly.
                fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(write_err)?;
                out.sync_all().map_err(write_err)?;
                kinds.insert(image_path.clone(), Kind::Other);
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| hostile("is a symlink without a target"))?
                    .into_owned();
                if link.as_os_str().is_empty() {
                    return Err(hostile("is a symlink without a target"));
                }
                std::os::unix::fs::symlink(&link, &target).map_err(write_err)?;
                kinds.insert(image_path.clone(), Kind::Symlink(link));
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| hostile("is a hard link without a target"))?
                    .into_owned();
                let link_rel = clean_path(&link.to_string_lossy())
                    .map_err(|r| hostile(&format!("hard link target: {r}")))?;
                if link_rel.as_os_str().is_empty() {
                    return Err(hostile("is a hard link to the root"));
                }
                ensure_parents(dest, &link_rel)
                    .map_err(|_| hostile("is a hard link through a symlink"))?;
                let source = dest.join(&link_rel);
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(hostile(
                            "is a hard link to something that is not an earlier regular file",
                        ));
                    }
                }
                fs::hard_link(&source, &target).map_err(write_err)?;
                kinds.insert(image_path.clone(), Kind::Other);
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(hostile("is a device node"));
            }
            tar::EntryType::Fifo => return Err(hostile("is a FIFO")),
            other => return Err(hostile(&format!("has unsupported type {other:?}"))),
        }
    }
    // Parents made implicitly are directories too.
    let dirs: Vec<PathBuf> = kinds
        .keys()
        .flat_map(|p| {
            p.ancestors()
                .skip(1)
                .map(Path::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    for d in dirs {
        kinds.entry(d).or_insert(Kind::Dir);
    }
    let lookup = |p: &Path| kinds.get(p).cloned();
    for (path, kind) in &kinds {
        if matches!(kind, Kind::Symlink(_)) {
            check_link(path, lookup).map_err(|e| UnpackError::Hostile {
                entry: path.display().to_string(),
                reason: format!("is a symlink that escapes: {e}"),
            })?;
        }
    }
    Ok(stats)
}

/// An entry path made relative and normal; `..`, absolute paths and NUL are refused.
fn clean_path(raw: &str) -> Result<PathBuf, &'static str> {
    if raw.contains('\0') {
        return Err("has a NUL byte in its path");
    }
    if raw.starts_with('/') {
        return Err("has an absolute path");
    }
    let mut out = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("has '..' in its path"),
            Component::RootDir | Component::Prefix(_) => return Err("has an absolute path"),
        }
    }
    Ok(out)
}

enum ParentError {
    NotDir(String),
    Io(PathBuf, io::Error),
}

/// Creates missing parents of `rel` under `dest`; refuses any parent that is not a real directory.
fn ensure_parents(dest: &Path, rel: &Path) -> Result<(), ParentError> {
    let mut cur = dest.to_owned();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ParentError::NotDir(
                    cur.strip_prefix(dest).unwrap_or(&cur).display().to_string(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&cur)
                    .map_err(|e| ParentError::Io(cur.clone(), e))?;
            }
            Err(e) => return Err(ParentError::Io(cur.clone(), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry written byte by byte, so tests can make what `tar::Builder` would refuse.
    #[derive(Debug, Clone)]
    struct RawEntry {
        path: String,
        kind: u8,
        mode: u32,
        link: String,
        data: Vec<u8>,
    }

    fn file(path: &str, data: &[u8]) -> RawEntry {
        RawEntry {
            path: path.into(),
            kind: b'0',
            mode: 0o644,
            link: String::new(),
            data: data.to_vec(),
        }
    }
    fn dir(path: &str) -> RawEntry {
        RawEntry {
            path: path.into(),
            kind: b'5',
            mode: 0o755,
            link: String::new(),
            data: vec![],
        }
    }
    fn link(path: &str, kind: u8, target: &str) -> RawEntry {
        RawEntry {
            path: path.into(),
            kind,
            mode: 0o777,
            link: target.into(),
            data: vec![],
        }
    }

    fn archive(entries: &[RawEntry]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut h = tar::Header::new_old();
            {
                let old = h.as_old_mut();
                old.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
                old.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
                old.linkflag[0] = e.kind;
            }
            h.set_mode(e.mode);
            h.set_size(e.data.len() as u64);
            h.set_mtime(0);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&e.data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn unpack(entries: &[RawEntry]) -> (tempfile::TempDir, Result<UnpackStats, UnpackError>) {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("root");
        fs::create_dir(&dest).unwrap();
        let r = unpack_layer(&archive(entries)[..], &dest, &UnpackPolicy::default());
        (t, r)
    }

    fn refused(entries: &[RawEntry], why: &str) {
        let (t, r) = unpack(entries);
        let msg = r.expect_err("must be refused").to_string();
        assert!(msg.contains(why), "expected {why:?} in {msg:?}");
        // Nothing was written outside the destination.
        let outside: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            outside,
            vec![std::ffi::OsString::from("root")],
            "something escaped"
        );
    }

    #[test]
    fn a_plain_layer_unpacks() {
        let (t, r) = unpack(&[
            dir("usr/"),
            dir("usr/bin/"),
            file("usr/bin/app", b"#!"),
            link("bin", b'2', "usr/bin"),
            link("usr/bin/same", b'1', "usr/bin/app"),
            link("etc-link", b'2', "/etc/passwd"),
        ]);
        let stats = r.unwrap();
        assert_eq!(stats.entries, 6);
        let root = t.path().join("root");
        assert_eq!(fs::read(root.join("usr/bin/app")).unwrap(), b"#!");
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(fs::read(root.join("usr/bin/same")).unwrap(), b"#!");
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        refused(&[file("../evil", b"x")], "'..'");
        refused(&[file("a/../../evil", b"x")], "'..'");
        refused(&[file("/etc/evil", b"x")], "absolute path");
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        refused(
            &[link("esc", b'2', "/tmp"), file("esc/evil", b"x")],
            "not a directory",
        );
        refused(
            &[link("esc", b'2', "../.."), file("esc/evil", b"x")],
            "not a directory",
        );
        refused(&[link("a/b/up", b'2', "../../../x")], "escapes");
        refused(&[link("up", b'2', "../x")], "escapes");
    }

    #[test]
    fn a_chain_of_links_that_each_look_inside_is_refused() {
        // `a/b -> ..` is fine alone; `x -> a/b/../..` counts as inside, but resolves above the root.
        refused(
            &[
                dir("a/"),
                link("a/b", b'2', ".."),
                link("x", b'2', "a/b/../.."),
            ],
            "escapes",
        );
        // The same with the links in the other order, and through an absolute target.
        refused(
            &[
                link("x", b'2', "/a/b/../.."),
                dir("a/"),
                link("a/b", b'2', "/"),
            ],
            "escapes",
        );
    }

    #[test]
    fn a_symlink_planted_where_a_file_goes_is_not_followed() {
        refused(
            &[link("f", b'2', "/etc/passwd"), file("f", b"x")],
            "appears twice",
        );
    }

    #[test]
    fn hard_links_must_point_at_earlier_files_inside() {
        refused(&[link("h", b'1', "../../etc/passwd")], "'..'");
        refused(&[link("h", b'1', "/etc/passwd")], "absolute path");
        refused(&[link("h", b'1', "missing")], "not an earlier regular file");
        refused(
            &[link("l", b'2', "/"), link("h", b'1', "l/etc/passwd")],
            "through a symlink",
        );
    }

    #[test]
    fn devices_fifos_and_setuid_are_refused() {
        refused(
            &[RawEntry {
                kind: b'3',
                ..file("dev/evil", b"")
            }],
            "device node",
        );
        refused(
            &[RawEntry {
                kind: b'4',
                ..file("dev/evil", b"")
            }],
            "device node",
        );
        refused(
            &[RawEntry {
                kind: b'6',
                ..file("fifo", b"")
            }],
            "FIFO",
        );
        refused(
            &[RawEntry {
                mode: 0o4755,
                ..file("su", b"x")
            }],
            "setuid",
        );
        refused(
            &[RawEntry {
                mode: 0o2755,
                ..file("sg", b"x")
            }],
            "setgid",
        );
    }

    #[test]
    fn declared_setuid_is_allowed() {
        let t = tempfile::tempdir().unwrap();
        let policy = UnpackPolicy {
            allow_setid: [PathBuf::from("/su")].into(),
            ..UnpackPolicy::default()
        };
        let bytes = archive(&[RawEntry {
            mode: 0o4755,
            ..file("su", b"x")
        }]);
        unpack_layer(&bytes[..], t.path(), &policy).unwrap();
        let mode = fs::metadata(t.path().join("su"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o4755);
    }

    #[test]
    fn absurd_sizes_and_counts_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let tight = UnpackPolicy {
            max_entries: 3,
            max_file_size: 10,
            max_total_size: 15,
            ..UnpackPolicy::default()
        };
        let many: Vec<RawEntry> = (0..5).map(|i| file(&format!("f{i}"), b"")).collect();
        let err = unpack_layer(&archive(&many)[..], t.path(), &tight).unwrap_err();
        assert!(matches!(err, UnpackError::TooManyEntries { .. }), "{err}");
        let t = tempfile::tempdir().unwrap();
        let err =
            unpack_layer(&archive(&[file("big", &[0; 11])])[..], t.path(), &tight).unwrap_err();
        assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
        let t = tempfile::tempdir().unwrap();
        let err = unpack_layer(
            &archive(&[file("a", &[0; 8]), file("b", &[0; 8])])[..],
            t.path(),
            &tight,
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::TooLargeTotal { .. }), "{err}");
    }

    #[test]
    fn whiteouts_and_garbage_are_refused() {
        refused(&[file("etc/.wh.passwd", b"")], "whiteout");
        let t = tempfile::tempdir().unwrap();
        let mut bytes = archive(&[file("a", b"hello")]);
        bytes[148] ^= 0xff; // break the header checksum
        assert!(unpack_layer(&bytes[..], t.path(), &UnpackPolicy::default()).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn entry() -> impl Strategy<Value = RawEntry> {
            let name =
                prop::collection::vec(prop_oneof!["\\.\\.", "\\.", "[a-c]{1,2}", "", "/"], 1..5)
                    .prop_map(|parts| parts.join("/"));
            let kind = prop_oneof![
                Just(b'0'),
                Just(b'1'),
                Just(b'2'),
                Just(b'3'),
                Just(b'5'),
                Just(b'6')
            ];
            (
                name.clone(),
                kind,
                name,
                prop::collection::vec(any::<u8>(), 0..20),
                prop_oneof![Just(0o644u32), Just(0o4755)],
            )
                .prop_filter("fits the header", |(p, _, l, _, _)| {
                    !p.is_empty() && p.len() < 100 && l.len() < 100
                })
                .prop_map(|(path, kind, link, data, mode)| RawEntry {
                    data: if kind == b'0' { data } else { vec![] },
                    path,
                    kind,
                    mode,
                    link,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]
            /// Whatever the entries, nothing lands outside the destination and nothing panics.
            #[test]
            fn nothing_escapes(entries in prop::collection::vec(entry(), 1..8)) {
                let t = tempfile::tempdir().unwrap();
                let dest = t.path().join("root");
                fs::create_dir(&dest).unwrap();
                let _ = unpack_layer(&archive(&entries)[..], &dest, &UnpackPolicy::default());
                let outside: Vec<_> = fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
                prop_assert_eq!(outside, vec![std::ffi::OsString::from("root")]);
                for e in walkdir::WalkDir::new(&dest).follow_links(false) {
                    let e = e.unwrap();
                    let m = e.path().symlink_metadata().unwrap();
                    prop_assert!(m.is_dir() || m.is_file() || m.file_type().is_symlink());
                    prop_assert_eq!(m.permissions().mode() & 0o6000, 0);
                }
            }
        }
    }
}
