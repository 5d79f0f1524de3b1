//! Writes a [`Tree`] as a reproducible gzip'd tar layer.
//!
//! Reproducible means: entries in sorted order, mtime 0, uid/gid 0 with no
//! user or group names, normalised modes, and a gzip header with no name and
//! no timestamp. The same tree gives the same bytes on any host, at any time.

use std::io::{self, Write};
use std::path::Path;

use flate2::{Compression, GzBuilder};

use super::tree::{Node, Source, Tree};
use crate::digest::{Digest, HashingWriter};

/// What writing a layer produced.
#[derive(Debug, Clone, Copy)]
pub struct LayerDigests {
    /// The sha256 of the uncompressed tar: the OCI `diff_id`.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
}

/// Writes `tree` as tar+gzip into `out`.
pub fn write_layer<W: Write>(tree: &Tree, out: W) -> io::Result<(W, LayerDigests)> {
    let gz = GzBuilder::new().mtime(0).write(out, Compression::default());
    let mut tar = tar::Builder::new(HashingWriter::new(gz));
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, node) in tree.nodes() {
        let Ok(rel) = path.strip_prefix("/") else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        append(&mut tar, rel, node)?;
    }
    let hashing = tar.into_inner()?;
    let (gz, diff_id, tar_size) = hashing.finish();
    let out = gz.finish()?;
    Ok((out, LayerDigests { diff_id, tar_size }))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append<W: Write>(tar: &mut tar::Builder<W>, rel: &Path, node: &Node) -> io::Result<()> {
    match node {
        Node::Dir { mode } => {
            let mut h = header(tar::EntryType::Directory, *mode, 0);
            tar.append_data(&mut h, rel, io::empty())
        }
        Node::Symlink { target } => {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            tar.append_link(&mut h, rel, target)
        }
        Node::File {
            source: Source::Bytes(bytes),
            mode,
        } => {
            let mut h = header(tar::EntryType::Regular, *mode, bytes.len() as u64);
            tar.append_data(&mut h, rel, &bytes[..])
        }
        Node::File {
            source: Source::Host(host),
            mode,
        } => {
            let file = std::fs::File::open(host).map_err(|e| annotate(e, host))?;
            let len = file.metadata().map_err(|e| annotate(e, host))?.len();
            let mut h = header(tar::EntryType::Regular, *mode, len);
            // A file that changes size while we read it would corrupt the archive: take exactly `len`.
            let reader = io::Read::take(file, len);
            tar.append_data(&mut h, rel, reader)
                .map_err(|e| annotate(e, host))
        }
    }
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
