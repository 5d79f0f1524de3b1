//! Tar streams for the fuzz targets: either the raw input, or entries built
//! from it byte by byte (names from a small hostile alphabet), so the fuzzer
//! spends its time on links, parents and kinds rather than on tar checksums.

use arbitrary::Arbitrary;

#[derive(Debug, Arbitrary)]
pub enum Input {
    Raw(Vec<u8>),
    Entries(Vec<Entry>),
}

#[derive(Debug, Arbitrary)]
pub struct Entry {
    pub path: Vec<Part>,
    pub kind: Kind,
    pub link: Vec<Part>,
    pub absolute_link: bool,
    pub data: Vec<u8>,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum Part {
    A,
    B,
    Dot,
    DotDot,
    Empty,
    Etc,
    Manifest,
    Layout,
    Index,
    Blobs,
    Wh,
    Opq,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Fifo,
    Char,
}

fn name(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| match p {
            Part::A => "a",
            Part::B => "b",
            Part::Dot => ".",
            Part::DotDot => "..",
            Part::Empty => "",
            Part::Etc => "etc",
            Part::Manifest => "manifest.json",
            Part::Layout => "oci-layout",
            Part::Index => "index.json",
            Part::Blobs => "blobs",
            Part::Wh => ".wh.a",
            Part::Opq => ".wh..wh..opq",
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Input {
    /// The tar stream: header fields written raw, as a hostile archive would.
    pub fn tar(&self) -> Vec<u8> {
        let entries = match self {
            Input::Raw(bytes) => return bytes.clone(),
            Input::Entries(e) => e,
        };
        let mut out = Vec::new();
        for e in entries.iter().take(64) {
            let mut h = tar::Header::new_gnu();
            let path = name(&e.path);
            let mut link = name(&e.link);
            if e.absolute_link {
                link.insert(0, '/');
            }
            let (kind, data): (tar::EntryType, &[u8]) = match e.kind {
                Kind::File => (tar::EntryType::Regular, &e.data),
                Kind::Dir => (tar::EntryType::Directory, &[]),
                Kind::Symlink => (tar::EntryType::Symlink, &[]),
                Kind::HardLink => (tar::EntryType::Link, &[]),
                Kind::Fifo => (tar::EntryType::Fifo, &[]),
                Kind::Char => (tar::EntryType::Char, &[]),
            };
            h.set_entry_type(kind);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            let name = path.as_bytes();
            let n = name.len().min(99);
            h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
            let l = link.as_bytes();
            let n = l.len().min(99);
            h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

/// Panics if anything but `inside` exists in `top`, or (with `links`: for a
/// tree that was accepted) if a link under `inside` leads above it when
/// followed through the tree's own links. A refused tree is removed whole by
/// its caller and was never followed while it was written.
pub fn assert_contained(top: &std::path::Path, inside: &str, extra_allowed: &[&str], links: bool) {
    for e in std::fs::read_dir(top).expect("read the scratch top") {
        let name = e.expect("an entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            name == inside || extra_allowed.contains(&name.as_ref()),
            "{name} was created outside {inside}"
        );
    }
    let root = top.join(inside);
    if !root.exists() {
        return;
    }
    let lookup = |p: &std::path::Path| {
        let real = root.join(p.strip_prefix("/").unwrap_or(p));
        let meta = std::fs::symlink_metadata(&real).ok()?;
        Some(if meta.file_type().is_symlink() {
            juice_image::confine::Kind::Symlink(std::fs::read_link(&real).ok()?)
        } else if meta.is_dir() {
            juice_image::confine::Kind::Dir
        } else {
            juice_image::confine::Kind::Other
        })
    };
    for e in walkdir::WalkDir::new(&root).follow_links(false) {
        let e = e.expect("walk");
        let t = e.file_type();
        assert!(t.is_dir() || t.is_file() || t.is_symlink(), "{:?} is special", e.path());
        if links && t.is_symlink() {
            let rel = std::path::Path::new("/").join(e.path().strip_prefix(&root).expect("under root"));
            assert!(
                juice_image::confine::check_link(&rel, lookup).is_ok(),
                "{} escapes",
                rel.display()
            );
        }
    }
}
