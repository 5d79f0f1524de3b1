//! The image's root filesystem as a sorted map, before it becomes a layer.
//!
//! Host paths keep their place and their symlinks: adding
//! `/lib/x86_64-linux-gnu/libc.so.6` on a merged-/usr host adds the symlink
//! `/lib -> usr/lib` and the file under `/usr/lib`, just as the loader will
//! walk them at run time.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::confine::{Kind, check_link};

/// The most symlinks followed for one path, as the kernel's ELOOP limit.
const MAX_HOPS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is a broken symlink (its target {target} does not exist)")]
    BrokenSymlink { path: PathBuf, target: PathBuf },
    #[error("{path} is part of a symlink cycle")]
    SymlinkCycle { path: PathBuf },
    #[error(
        "symlink {path} -> {target} climbs above the image root (followed through the image's links)"
    )]
    EscapingSymlink { path: PathBuf, target: PathBuf },
    #[error("{path} is a {kind}; only regular files, directories and symlinks go into an image")]
    Special { path: PathBuf, kind: &'static str },
    #[error("{image_path} is added twice with different contents (from {first} and {second})")]
    Conflict {
        image_path: PathBuf,
        first: String,
        second: String,
    },
    #[error("{path} is not a directory but a path goes through it")]
    NotADirectory { path: PathBuf },
}

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Host(p) => p.display().to_string(),
            Source::Bytes(_) => "generated content".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { source: Source, mode: u32 },
    Symlink { target: PathBuf },
}

impl Node {
    fn describe(&self) -> String {
        match self {
            Node::Dir { .. } => "a directory".into(),
            Node::File { source, .. } => source.describe(),
            Node::Symlink { target } => format!("a symlink to {}", target.display()),
        }
    }
}

/// Absolute image paths to nodes; `BTreeMap` order puts parents before children.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
}

impl Tree {
    pub fn new() -> Tree {
        let mut t = Tree::default();
        t.nodes
            .insert(PathBuf::from("/"), Node::Dir { mode: 0o755 });
        t
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&PathBuf, &Node)> {
        self.nodes.iter()
    }

    pub fn get(&self, path: &Path) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Inserts a node, creating parent directories; an equal node already there is fine.
    pub fn insert(&mut self, path: &Path, node: Node) -> Result<(), TreeError> {
        let path = self.resolve_parents(path)?;
        if let Some(parent) = path.parent() {
            self.mkdir_p(parent)?;
        }
        match self.nodes.entry(path.clone()) {
            Entry::Vacant(v) => {
                v.insert(node);
                Ok(())
            }
            Entry::Occupied(o) if *o.get() == node => Ok(()),
            // Two directories with different modes: the first one wins, contents merge.
            Entry::Occupied(o)
                if matches!((o.get(), &node), (Node::Dir { .. }, Node::Dir { .. })) =>
            {
                Ok(())
            }
            Entry::Occupied(o) => Err(TreeError::Conflict {
                image_path: path,
                first: o.get().describe(),
                second: node.describe(),
            }),
        }
    }

    fn mkdir_p(&mut self, dir: &Path) -> Result<(), TreeError> {
        for ancestor in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            match self.nodes.get(ancestor) {
                None => {
                    self.nodes
                        .insert(ancestor.to_owned(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(TreeError::NotADirectory {
                        path: ancestor.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Follows symlinks already in the tree among `path`'s parents, staying inside the root.
    fn resolve_parents(&self, path: &Path) -> Result<PathBuf, TreeError> {
        let mut pending: Vec<Component> = path.components().rev().collect();
        let mut out = PathBuf::from("/");
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            match c {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(name) => {
                    let next = out.join(name);
                    let is_last = pending.is_empty();
                    match self.nodes.get(&next) {
                        Some(Node::Symlink { target }) if !is_last => {
                            hops += 1;
                            if hops > MAX_HOPS {
                                return Err(TreeError::SymlinkCycle {
                                    path: path.to_owned(),
                                });
                            }
                            if target.is_absolute() {
                                out = PathBuf::from("/");
                            }
                            pending.extend(target.components().rev());
                        }
                        _ => out = next,
                    }
                }
            }
        }
        Ok(out)
    }

    /// Adds a host path at the same place in the image, keeping every symlink
    /// on the way. Returns the image path of the real file (or directory).
    pub fn add_host_path(&mut self, host: &Path) -> Result<PathBuf, TreeError> {
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, host);
        let mut cur = PathBuf::from("/");
        let mut hops = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&name);
            let meta = std::fs::symlink_metadata(&next).map_err(|e| io_error(&next, e))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(TreeError::SymlinkCycle {
                        path: host.to_owned(),
                    });
                }
                let target = std::fs::read_link(&next).map_err(|e| io_error(&next, e))?;
                self.insert(
                    &next,
                    Node::Symlink {
                        target: target.clone(),
                    },
                )?;
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
            } else if ft.is_dir() {
                self.insert(&next, Node::Dir { mode: 0o755 })?;
                cur = next;
            } else if ft.is_file() {
                if !pending.is_empty() {
                    return Err(TreeError::NotADirectory { path: next });
                }
                let mode = normal_file_mode(meta.permissions().mode(), false);
                self.insert(
                    &next,
                    Node::File {
                        source: Source::Host(next.clone()),
                        mode,
                    },
                )?;
                cur = next;
            } else {
                return Err(special(&next, &ft));
            }
        }
        Ok(cur)
    }

    /// Copies a host file or directory tree to `to` in the image. Symlinks are
    /// kept as symlinks; they must resolve on the host (no broken links, no cycles).
    pub fn copy_from_host(&mut self, from: &Path, to: &Path) -> Result<(), TreeError> {
        let meta = std::fs::metadata(from).map_err(|e| io_error(from, e))?;
        if meta.is_file() {
            return self.insert(to, host_file(from, &meta)?);
        }
        for entry in walkdir::WalkDir::new(from)
            .follow_links(false)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(from).to_owned();
                match e.into_io_error() {
                    Some(source) => io_error(&path, source),
                    None => TreeError::SymlinkCycle { path },
                }
            })?;
            let rel = entry.path().strip_prefix(from).unwrap_or(Path::new(""));
            let dest = to.join(rel);
            let ft = entry.file_type();
            if ft.is_dir() {
                self.insert(&dest, Node::Dir { mode: 0o755 })?;
            } else if ft.is_symlink() {
                let target =
                    std::fs::read_link(entry.path()).map_err(|e| io_error(entry.path(), e))?;
                if let Err(e) = std::fs::metadata(entry.path()) {
                    return Err(if e.raw_os_error() == Some(40) {
                        TreeError::SymlinkCycle {
                            path: entry.path().to_owned(),
                        }
                    } else {
                        TreeError::BrokenSymlink {
                            path: entry.path().to_owned(),
                            target,
                        }
                    });
                }
                self.insert(&dest, Node::Symlink { target })?;
            } else {
                let meta = entry
                    .metadata()
                    .map_err(|e| io_error(entry.path(), e.into()))?;
                self.insert(&dest, host_file(entry.path(), &meta)?)?;
            }
        }
        Ok(())
    }

    /// Whether `path` names a regular file in the image, after following symlinks.
    pub fn resolves_to_file(&self, path: &Path) -> bool {
        let mut p = path.to_owned();
        for _ in 0..MAX_HOPS {
            let Ok(resolved) = self.resolve_parents(&p) else {
                return false;
            };
            match self.nodes.get(&resolved) {
                Some(Node::File { .. }) => return true,
                Some(Node::Symlink { target }) => {
                    p = resolved.parent().unwrap_or(Path::new("/")).join(target);
                }
                _ => return false,
            }
        }
        false
    }

    /// Refuses a symlink that, followed through the tree's other links, climbs
    /// above the root ([`crate::confine`]): the whole tree is known only now.
    pub fn check_links(&self) -> Result<(), TreeError> {
        let lookup = |p: &Path| {
            self.nodes.get(p).map(|n| match n {
                Node::Dir { .. } => Kind::Dir,
                Node::File { .. } => Kind::Other,
                Node::Symlink { target } => Kind::Symlink(target.clone()),
            })
        };
        for (path, node) in &self.nodes {
            if let Node::Symlink { target } = node {
                check_link(path, lookup).map_err(|_| TreeError::EscapingSymlink {
                    path: path.clone(),
                    target: target.clone(),
                })?;
            }
        }
        Ok(())
    }

    /// Lets `path` keep a setuid/setgid bit it would otherwise lose.
    pub fn allow_setid(&mut self, path: &Path) -> Result<bool, TreeError> {
        let resolved = self.resolve_parents(path)?;
        match self.nodes.get_mut(&resolved) {
            Some(Node::File {
                source: Source::Host(host),
                mode,
            }) => {
                let meta = std::fs::metadata(&*host).map_err(|e| io_error(host, e))?;
                *mode = normal_file_mode(meta.permissions().mode(), true);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Pushes `path`'s components onto a stack so that its first component pops first.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

fn io_error(path: &Path, e: std::io::Error) -> TreeError {
    match e.kind() {
        std::io::ErrorKind::NotFound => TreeError::Missing {
            path: path.to_owned(),
        },
        _ => TreeError::Read {
            path: path.to_owned(),
            source: e,
        },
    }
}

fn host_file(path: &Path, meta: &std::fs::Metadata) -> Result<Node, TreeError> {
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(special(path, &ft));
    }
    // Fail now, naming the file, rather than halfway through writing the layer.
    std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    Ok(Node::File {
        source: Source::Host(path.to_owned()),
        mode: normal_file_mode(meta.permissions().mode(), false),
    })
}

fn special(path: &Path, ft: &std::fs::FileType) -> TreeError {
    let kind = if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    TreeError::Special {
        path: path.to_owned(),
        kind,
    }
}

/// Executable files become 0755, others 0644; setuid/setgid only when allowed.
pub fn normal_file_mode(host_mode: u32, keep_setid: bool) -> u32 {
    let base = if host_mode & 0o111 != 0 { 0o755 } else { 0o644 };
    if keep_setid {
        base | (host_mode & 0o6000)
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn host_symlink_chains_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("usr/lib")).unwrap();
        std::fs::write(d.join("usr/lib/libfoo.so.1.2.3"), b"x").unwrap();
        symlink("libfoo.so.1.2.3", d.join("usr/lib/libfoo.so.1")).unwrap();
        symlink("usr/lib", d.join("lib")).unwrap();
        let mut tree = Tree::new();
        let real = tree.add_host_path(&d.join("lib/libfoo.so.1")).unwrap();
        assert_eq!(real, d.join("usr/lib/libfoo.so.1.2.3"));
        assert_eq!(
            tree.get(&d.join("lib")),
            Some(&Node::Symlink {
                target: "usr/lib".into()
            })
        );
        assert_eq!(
            tree.get(&d.join("usr/lib/libfoo.so.1")),
            Some(&Node::Symlink {
                target: "libfoo.so.1.2.3".into()
            })
        );
        assert!(tree.resolves_to_file(&d.join("lib/libfoo.so.1")));
    }

    #[test]
    fn broken_links_cycles_and_specials_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir(d.join("a")).unwrap();
        symlink("nowhere", d.join("a/broken")).unwrap();
        let err = Tree::new()
            .copy_from_host(&d.join("a"), Path::new("/srv"))
            .unwrap_err();
        assert!(matches!(err, TreeError::BrokenSymlink { .. }), "{err}");

        std::fs::create_dir(d.join("b")).unwrap();
        symlink("y", d.join("b/x")).unwrap();
        symlink("x", d.join("b/y")).unwrap();
        let err = Tree::new()
            .copy_from_host(&d.join("b"), Path::new("/srv"))
            .unwrap_err();
        assert!(matches!(err, TreeError::SymlinkCycle { .. }), "{err}");
        let err = Tree::new().add_host_path(&d.join("b/x")).unwrap_err();
        assert!(matches!(err, TreeError::SymlinkCycle { .. }), "{err}");

        std::fs::create_dir(d.join("c")).unwrap();
        nix_mkfifo(&d.join("c/pipe"));
        let err = Tree::new()
            .copy_from_host(&d.join("c"), Path::new("/srv"))
            .unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");

        let err = Tree::new()
            .copy_from_host(&d.join("nope"), Path::new("/srv"))
            .unwrap_err();
        assert!(matches!(err, TreeError::Missing { .. }), "{err}");
    }

    fn nix_mkfifo(p: &Path) {
        let ok = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    #[test]
    fn escaping_relative_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("a/b/www")).unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        // Fine on the host (it reaches d/secret), but from /srv/leak it climbs above the root.
        symlink("../../../secret", d.join("a/b/www/leak")).unwrap();
        let mut tree = Tree::new();
        tree.copy_from_host(&d.join("a/b/www"), Path::new("/srv"))
            .unwrap();
        let err = tree.check_links().unwrap_err();
        assert!(matches!(err, TreeError::EscapingSymlink { .. }), "{err}");
        let mut ok = Tree::new();
        for (link, target) in [("/a/b", "../c"), ("/etc/l", "/etc/passwd")] {
            ok.insert(
                Path::new(link),
                Node::Symlink {
                    target: target.into(),
                },
            )
            .unwrap();
        }
        ok.check_links().unwrap();
    }

    #[test]
    fn conflicts_name_both_sources() {
        let mut tree = Tree::new();
        let a = Node::File {
            source: Source::Bytes(b"a".to_vec()),
            mode: 0o644,
        };
        let b = Node::Symlink { target: "x".into() };
        tree.insert(Path::new("/etc/x"), a.clone()).unwrap();
        tree.insert(Path::new("/etc/x"), a).unwrap();
        let err = tree.insert(Path::new("/etc/x"), b).unwrap_err();
        assert!(matches!(err, TreeError::Conflict { .. }), "{err}");
        let err = tree
            .insert(Path::new("/etc/x/y"), Node::Dir { mode: 0o755 })
            .unwrap_err();
        assert!(matches!(err, TreeError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn placing_under_an_image_symlink_follows_it() {
        let mut tree = Tree::new();
        tree.insert(
            Path::new("/lib"),
            Node::Symlink {
                target: "usr/lib".into(),
            },
        )
        .unwrap();
        let f = Node::File {
            source: Source::Bytes(vec![]),
            mode: 0o644,
        };
        tree.insert(Path::new("/lib/foo.so"), f.clone()).unwrap();
        assert_eq!(tree.get(Path::new("/usr/lib/foo.so")), Some(&f));
    }

    #[test]
    fn modes_are_normalised() {
        assert_eq!(normal_file_mode(0o100700, false), 0o755);
        assert_eq!(normal_file_mode(0o100600, false), 0o644);
        assert_eq!(normal_file_mode(0o104755, false), 0o755);
        assert_eq!(normal_file_mode(0o104755, true), 0o4755);
    }
}
