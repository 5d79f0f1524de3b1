//! Paths inside an untrusted tree: resolved, never counted.
//!
//! An image or archive is hostile input. A symlink in it is only safe if,
//! followed through every other link in the same tree, it stays beneath the
//! tree's root: two links that each look "inside" when their `..` are counted
//! (`a/b -> ..` and `x -> a/b/../..`) together climb out. So "stays inside" is
//! decided here by walking the tree the way the kernel would, with a lookup
//! the caller provides (an in-memory map while building or flattening, the
//! entries recorded while unpacking). A `..` at the root is an escape, for
//! absolute targets too: nothing Juice accepts needs one, and refusing it
//! means a host-side reader can never be led above the root, whatever it uses
//! to follow links.
//!
//! Written here rather than taken from a crate: it is Juice's own rule about
//! its own trees, and it must work on trees that exist only in memory.
//!
//! ```
//! use std::path::{Path, PathBuf};
//! use juice_image::confine::{Kind, check_link};
//! let links = [("/a/b", ".."), ("/x", "a/b/../..")];
//! let lookup = |p: &Path| {
//!     if p == Path::new("/a") { return Some(Kind::Dir) }
//!     links.iter().find(|(l, _)| Path::new(l) == p).map(|(_, t)| Kind::Symlink(PathBuf::from(t)))
//! };
//! assert!(check_link(Path::new("/a/b"), lookup).is_ok());
//! assert!(check_link(Path::new("/x"), lookup).is_err());
//! ```

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The most symlinks followed for one path, as the kernel's ELOOP limit.
pub const MAX_HOPS: usize = 40;

/// What is at a path of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file, or anything else that is not a directory or a link.
    Other,
    Symlink(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Escape {
    #[error("followed through the tree's links, it climbs above the root")]
    AboveRoot,
    #[error("it is part of a symlink cycle (more than {MAX_HOPS} links)")]
    Loop,
}

/// Follows `path` (absolute in the tree) through every symlink, the last one
/// included, and returns where it ends. Missing components are taken as they
/// are written; a path through a non-directory stops there (the kernel would
/// fail it). Errors if the walk ever needs the parent of the root.
pub fn resolve(path: &Path, lookup: impl Fn(&Path) -> Option<Kind>) -> Result<PathBuf, Escape> {
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    push_components(&mut stack, path);
    let mut cur = PathBuf::from("/");
    let mut hops = 0;
    while let Some(name) = stack.pop() {
        if name == ".." {
            if cur == Path::new("/") {
                return Err(Escape::AboveRoot);
            }
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        match lookup(&next) {
            Some(Kind::Symlink(target)) => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(Escape::Loop);
                }
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                push_components(&mut stack, &target);
            }
            Some(Kind::Other) if !stack.is_empty() => return Ok(next),
            Some(_) | None => cur = next,
        }
    }
    Ok(cur)
}

/// Pushes `path`'s names in reverse, so the first is popped first.
fn push_components(stack: &mut Vec<std::ffi::OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => stack.push(n.to_owned()),
            Component::ParentDir => stack.push("..".into()),
            _ => {}
        }
    }
}

/// Whether the symlink at `link` stays beneath the root when followed through
/// every link of the tree (`lookup` must answer `Symlink` for `link` itself).
pub fn check_link(link: &Path, lookup: impl Fn(&Path) -> Option<Kind>) -> Result<(), Escape> {
    resolve(link, lookup).map(|_| ())
}

/// A directory to open files beneath with [`open_beneath`].
pub fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the regular file `rel` beneath `root` for reading. The kernel
/// resolves it (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`) and
/// refuses any step that would leave `root`: `..` above it, an absolute link,
/// a `/proc` magic link. A FIFO or device is refused without being waited on.
pub fn open_beneath(root: impl AsFd, rel: &Path) -> std::io::Result<File> {
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let fd = rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", rel.display()),
        ));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn tree(entries: &[(&str, Option<&str>)]) -> BTreeMap<PathBuf, Kind> {
        entries
            .iter()
            .map(|(p, t)| {
                let kind = match t {
                    Some("/") => Kind::Dir,
                    Some("") => Kind::Other,
                    Some(t) => Kind::Symlink(PathBuf::from(t)),
                    None => Kind::Dir,
                };
                (PathBuf::from(p), kind)
            })
            .collect()
    }

    fn check(t: &BTreeMap<PathBuf, Kind>, link: &str) -> Result<(), Escape> {
        check_link(Path::new(link), |p| t.get(p).cloned())
    }

    #[test]
    fn a_chain_of_links_that_each_count_inside_is_caught() {
        // Each passes a lexical count; together they climb out.
        let t = tree(&[
            ("/a", None),
            ("/a/b", Some("..")),
            ("/x", Some("a/b/../..")),
        ]);
        assert!(check(&t, "/a/b").is_ok());
        assert!(matches!(check(&t, "/x"), Err(Escape::AboveRoot)));
    }

    #[test]
    fn ordinary_links_pass() {
        let t = tree(&[
            ("/usr", None),
            ("/usr/lib", None),
            ("/lib", Some("usr/lib")),
            ("/usr/lib/libc.so", Some("../lib/libc.so.6")),
            ("/usr/lib/libc.so.6", Some("")),
            ("/etc", None),
            ("/etc/localtime", Some("/usr/share/zoneinfo/UTC")),
            ("/dangling", Some("nowhere/at/all")),
        ]);
        for l in ["/lib", "/usr/lib/libc.so", "/etc/localtime", "/dangling"] {
            assert_eq!(check(&t, l), Ok(()), "{l}");
        }
        assert_eq!(
            resolve(Path::new("/lib/libc.so"), |p| t.get(p).cloned()),
            Ok(PathBuf::from("/usr/lib/libc.so.6"))
        );
    }

    #[test]
    fn escapes_loops_and_absolute_climbs_are_refused() {
        let t = tree(&[
            ("/up", Some("../etc")),
            ("/abs", Some("/../etc")),
            ("/l1", Some("l2")),
            ("/l2", Some("l1")),
            ("/d", None),
            ("/d/deep", Some("../../../x")),
        ]);
        assert!(check(&t, "/up").is_err());
        assert!(check(&t, "/abs").is_err());
        assert_eq!(check(&t, "/l1"), Err(Escape::Loop));
        assert!(check(&t, "/d/deep").is_err());
    }

    #[test]
    fn open_beneath_refuses_every_way_out() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(t.path().join("secret"), b"s").unwrap();
        std::fs::write(root.join("a/ok"), b"ok").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/hostname", root.join("magic")).unwrap();
        std::os::unix::fs::symlink("a/ok", root.join("inside")).unwrap();
        let fd = open_root(&root).unwrap();
        let mut ok = String::new();
        std::io::Read::read_to_string(
            &mut open_beneath(&fd, Path::new("inside")).unwrap(),
            &mut ok,
        )
        .unwrap();
        assert_eq!(ok, "ok");
        for bad in [
            "up",
            "abs",
            "magic",
            "../secret",
            "/../secret",
            "a/../../secret",
            "a",
        ] {
            assert!(open_beneath(&fd, Path::new(bad)).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Random link trees: whatever passes never ends above the root, and the
        /// resolution agrees with a naive step-by-step walk that tracks depth.
        #[test]
        fn accepted_links_never_leave(links in proptest::collection::vec(
            (proptest::sample::select(vec!["/a", "/a/b", "/c", "/a/b/c", "/d"]),
             proptest::sample::select(vec!["..", "../..", "a", "a/b", "b/../..", "/a/..", "/..", "c/../../..", "."])),
            1..6)) {
            let mut t: BTreeMap<PathBuf, Kind> = BTreeMap::new();
            for (l, target) in &links {
                t.insert(PathBuf::from(l), Kind::Symlink(PathBuf::from(target)));
            }
            for (l, _) in &links {
                if let Ok(end) = resolve(Path::new(l), |p| t.get(p).cloned()) {
                    proptest::prop_assert!(end.starts_with("/"));
                    proptest::prop_assert!(!end.components().any(|c| c == Component::ParentDir));
                }
            }
        }
    }
}
