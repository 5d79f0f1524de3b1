//! `juice import`: a container image becomes an appliance.
//!
//! Sources: a `docker save` archive, an OCI image layout directory
//! (`DIR` or `DIR:TAG`), an OCI archive (a tar of a layout), or a registry
//! reference (pulled into a scratch layout first).
//!
//! The layers are flattened in order with overlay semantics: an entry replaces
//! what was at its path (a directory in a later layer replaces a symlink, so
//! nothing is ever written through a link), `.wh.NAME` deletes `NAME`,
//! `.wh..wh..opq` empties its directory of what earlier layers put there.
//! Hostile entries are refused with the layer and path named: `..` or absolute
//! paths, whiteouts naming `.`/`..`, device nodes and FIFOs, hard links to
//! nothing, symlinks that climb out of the root. Setuid and setgid bits are
//! dropped (and listed); ownership becomes root's, as in every Juice image.
//!
//! `--prune` keeps only the entrypoint (through its `#!` interpreter if it is
//! a script), what `--keep` names, and the ELF closure of every kept program
//! and library, resolved inside the image by the resolver `juice build` uses
//! ([`juice_image::closure`]), reading the image instead of the host (DT_RPATH
//! and what the loading objects pass on, DT_RUNPATH with `$ORIGIN`, the image's
//! `/etc/ld.so.conf`, the default directories), with every symlink on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use juice_image::build::tree::{Node, Source, Tree, normal_file_mode};
use juice_image::build::{Assembled, BuildOutcome, build_assembled};
use juice_image::closure::{self, ClosureError, Files, Resolver};
use juice_image::confine;
use juice_image::digest::{Digest, HashingReader};
use juice_image::manifest::Manifest;
use juice_image::store::Store;
use serde::Serialize;
use serde_json::Value;

use crate::remote::RemoteOptions;
use crate::{RegistryError, io_err};

/// Refuse images bigger than this (entries, bytes): a decompression bomb stops here.
const MAX_ENTRIES: usize = 1_000_000;
const MAX_BYTES: u64 = 16 << 30;

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// `name:version` of the appliance.
    pub tag: String,
    pub prune: bool,
    /// Image paths (files or directories) kept when pruning.
    pub keep: Vec<PathBuf>,
    /// Replaces the image's entrypoint and command.
    pub command: Option<Vec<String>>,
    pub remote: RemoteOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub reference: String,
    pub digest: String,
    pub command: Vec<String>,
    pub user: String,
    pub layers: usize,
    pub files: usize,
    pub bytes: u64,
    pub kept_files: usize,
    pub kept_bytes: u64,
    /// The largest dropped directories (three levels deep) and their bytes.
    pub dropped: Vec<(String, u64)>,
    pub setid_dropped: Vec<String>,
    /// The appliance manifest Juice inferred (a starting point for `juice build`).
    pub manifest: String,
}

fn import_err(source: &str, reason: impl std::fmt::Display) -> RegistryError {
    RegistryError::Import {
        what: source.to_owned(),
        reason: reason.to_string(),
    }
}

/// A container image read from its source: config and layers in order.
struct Loaded {
    config: Value,
    /// Layer files, open, each verified against its digest if the format has one.
    layers: Vec<std::fs::File>,
}

pub fn import(
    store: &Store,
    source: &str,
    opts: &ImportOptions,
) -> Result<(ImportReport, BuildOutcome), RegistryError> {
    let scratch = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(store.tmp_dir())
        .map_err(io_err("create a directory in", &store.tmp_dir()))?;
    let loaded = load(source, scratch.path(), &opts.remote)?;
    let layer_count = loaded.layers.len();
    let staged = flatten(source, loaded.layers, &scratch.path().join("files"))?;
    let run = RunConfig::from_config(source, &loaded.config, &staged, opts)?;

    let total_files = staged.files();
    let total_bytes = staged.bytes();
    let (kept, closure, binaries) = if opts.prune {
        staged.prune(source, &run.command[0], &opts.keep)?
    } else {
        (staged.clone_all(), BTreeMap::new(), Vec::new())
    };
    let dropped = staged.dropped_by_dir(&kept);

    let manifest_text = run.manifest_toml(&opts.tag);
    let manifest_path = Path::new(source).join("juice.toml");
    let manifest = Manifest::parse(&manifest_text, &manifest_path).map_err(|e| {
        import_err(
            source,
            format!("the inferred manifest is not valid: {e}\n{manifest_text}"),
        )
    })?;
    let mut tree = Tree::new();
    for (path, node) in &kept.nodes {
        let n = match node {
            SNode::Dir { mode } => Node::Dir {
                mode: mode & 0o7777 & !0o6000,
            },
            SNode::File { mode, data, .. } => Node::File {
                source: Source::Host(data.clone()),
                mode: normal_file_mode(*mode, false),
            },
            SNode::Symlink { target } => Node::Symlink {
                target: target.clone(),
            },
        };
        tree.insert(path, n).map_err(|e| import_err(source, e))?;
    }
    let outcome = build_assembled(
        store,
        Assembled {
            tree,
            manifest,
            closure,
            binaries,
        },
        &opts.tag,
        Path::new(source),
    )?;
    let report = ImportReport {
        reference: outcome.reference.clone(),
        digest: outcome.digest.to_string(),
        command: run.command.clone(),
        user: format!("{}:{}", run.uid, run.gid),
        layers: layer_count,
        files: total_files,
        bytes: total_bytes,
        kept_files: kept.files(),
        kept_bytes: kept.bytes(),
        dropped,
        setid_dropped: staged.setid_dropped.clone(),
        manifest: manifest_text,
    };
    Ok((report, outcome))
}

/// Reads and flattens an image archive as `juice import` does, building
/// nothing: what a fuzzer or a check needs. Everything it writes is under
/// `scratch` (`archive/` and `files/`, numbered files only). Returns the
/// number of layers.
pub fn read_outer_archive(file: &Path, scratch: &Path) -> Result<usize, RegistryError> {
    let source = file.to_string_lossy();
    if !file.is_file() {
        return Err(import_err(&source, "not a file"));
    }
    let loaded = load(&source, scratch, &RemoteOptions::default())?;
    let layers = loaded.layers.len();
    flatten(&source, loaded.layers, &scratch.join("files"))?;
    Ok(layers)
}

/// Reads the image at `source`; an archive's files go into `scratch`.
fn load(source: &str, scratch: &Path, remote: &RemoteOptions) -> Result<Loaded, RegistryError> {
    let path = Path::new(source);
    if path.is_file() {
        let tree = SourceTree::read_archive(source, path, &scratch.join("archive"))?;
        if tree.is_file("manifest.json") {
            return load_docker(source, &tree);
        }
        if tree.is_file("oci-layout") {
            return load_layout(source, &tree, None);
        }
        return Err(import_err(
            source,
            "neither a docker save archive (no manifest.json) nor an OCI archive (no oci-layout)",
        ));
    }
    if path.is_dir() {
        return load_layout(source, &SourceTree::dir(source, path)?, None);
    }
    if let Some((dir, tag)) = source.rsplit_once(':')
        && Path::new(dir).is_dir()
    {
        return load_layout(source, &SourceTree::dir(source, Path::new(dir))?, Some(tag));
    }
    if crate::reference::looks_remote(source) {
        let (layout, tag) = crate::remote::pull_to_layout(remote, source, &scratch.join("pulled"))?;
        return load_layout(source, &SourceTree::dir(source, &layout)?, Some(&tag));
    }
    Err(import_err(
        source,
        "no such file or directory, and not a registry reference",
    ))
}

/// Where an image's outer files (manifests, configs, layer blobs) are read
/// from. Nothing the source contains ever becomes a host path that is then
/// followed: an archive's names are only keys of a map and its links are
/// resolved in that map ([`juice_image::confine`]); a directory is read with
/// `openat2(RESOLVE_BENEATH)`, so the kernel refuses any way out of it.
enum SourceTree {
    /// An archive read once, in order. File bodies are numbered files in scratch.
    Archive {
        nodes: BTreeMap<PathBuf, ArchiveNode>,
    },
    Dir {
        root: std::os::fd::OwnedFd,
    },
}

#[derive(Debug, Clone)]
enum ArchiveNode {
    Dir,
    File(PathBuf),
    Symlink(PathBuf),
}

/// The most entries and bytes an outer archive may hold.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;

impl SourceTree {
    fn dir(source: &str, path: &Path) -> Result<SourceTree, RegistryError> {
        let root = confine::open_root(path).map_err(io_err("open", path))?;
        let _ = source;
        Ok(SourceTree::Dir { root })
    }

    /// Reads the outer archive (not an image layer): directories, regular
    /// files, and links (docker links identical layers). Hard links name an
    /// earlier file; anything else is refused.
    fn read_archive(
        source: &str,
        file: &Path,
        scratch: &Path,
    ) -> Result<SourceTree, RegistryError> {
        std::fs::create_dir_all(scratch).map_err(io_err("create", scratch))?;
        let f = std::fs::File::open(file).map_err(io_err("open", file))?;
        let mut archive = tar::Archive::new(f);
        let entries = archive
            .entries()
            .map_err(|e| import_err(source, format!("not a tar archive: {e}")))?;
        let mut nodes: BTreeMap<PathBuf, ArchiveNode> = BTreeMap::new();
        let mut bytes = 0u64;
        for (count, entry) in entries.enumerate() {
            if count >= MAX_ARCHIVE_ENTRIES {
                return Err(import_err(source, "too many entries for an image archive"));
            }
            let mut entry =
                entry.map_err(|e| import_err(source, format!("a damaged tar archive: {e}")))?;
            let name = entry
                .path()
                .map_err(|e| import_err(source, e))?
                .into_owned();
            let rel = normalise(&name).ok_or_else(|| {
                import_err(
                    source,
                    format!("archive entry {} climbs out of the archive", name.display()),
                )
            })?;
            if rel.as_os_str().is_empty() {
                continue;
            }
            let key = Path::new("/").join(&rel);
            let kind = entry.header().entry_type();
            let node = if kind.is_dir() {
                ArchiveNode::Dir
            } else if kind.is_file() {
                bytes += entry.header().size().unwrap_or(0);
                if bytes > MAX_BYTES {
                    return Err(import_err(
                        source,
                        format!("the archive holds more than {MAX_BYTES} bytes"),
                    ));
                }
                // The body's name on disk is ours, never the entry's.
                let data = scratch.join(count.to_string());
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&data)
                    .map_err(io_err("create", &data))?;
                std::io::copy(&mut entry, &mut out).map_err(|e| {
                    import_err(source, format!("archive entry {}: {e}", rel.display()))
                })?;
                ArchiveNode::File(data)
            } else if kind.is_symlink() {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.as_os_str().is_empty())
                    .ok_or_else(|| {
                        import_err(
                            source,
                            format!("archive entry {} is a link to nothing", rel.display()),
                        )
                    })?;
                ArchiveNode::Symlink(target)
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .and_then(|t| normalise(&t))
                    .map(|t| Path::new("/").join(t));
                match target.as_ref().and_then(|t| nodes.get(t)) {
                    Some(f @ ArchiveNode::File(_)) => f.clone(),
                    _ => {
                        return Err(import_err(
                            source,
                            format!(
                                "archive entry {} is a hard link to no earlier file",
                                rel.display()
                            ),
                        ));
                    }
                }
            } else {
                return Err(import_err(
                    source,
                    format!(
                        "archive entry {} is not a file, directory or link",
                        rel.display()
                    ),
                ));
            };
            nodes.insert(key, node);
        }
        Ok(SourceTree::Archive { nodes })
    }

    /// Opens the regular file `rel` of the source, following links only inside it.
    fn open(&self, source: &str, rel: &str) -> Result<std::fs::File, RegistryError> {
        let norm = normalise(Path::new(rel))
            .ok_or_else(|| import_err(source, format!("{rel:?} climbs out of the archive")))?;
        match self {
            SourceTree::Dir { root } => confine::open_beneath(root, &norm)
                .map_err(|e| import_err(source, format!("{rel}: {e}"))),
            SourceTree::Archive { nodes } => {
                let lookup = |p: &Path| {
                    nodes.get(p).map(|n| match n {
                        ArchiveNode::Dir => confine::Kind::Dir,
                        ArchiveNode::File(_) => confine::Kind::Other,
                        ArchiveNode::Symlink(t) => confine::Kind::Symlink(t.clone()),
                    })
                };
                let real = confine::resolve(&Path::new("/").join(&norm), lookup).map_err(|e| {
                    import_err(source, format!("{rel} leads outside the archive: {e}"))
                })?;
                match nodes.get(&real) {
                    Some(ArchiveNode::File(data)) => {
                        std::fs::File::open(data).map_err(io_err("open", data))
                    }
                    _ => Err(import_err(
                        source,
                        format!("{rel} is not a file in the archive"),
                    )),
                }
            }
        }
    }

    fn is_file(&self, rel: &str) -> bool {
        self.open("", rel).is_ok()
    }

    fn read(&self, source: &str, rel: &str) -> Result<Vec<u8>, RegistryError> {
        let mut bytes = Vec::new();
        self.open(source, rel)?
            .read_to_end(&mut bytes)
            .map_err(|e| import_err(source, format!("{rel}: {e}")))?;
        Ok(bytes)
    }

    fn read_json(&self, source: &str, rel: &str) -> Result<Value, RegistryError> {
        serde_json::from_slice(&self.read(source, rel)?)
            .map_err(|e| import_err(source, format!("{rel} is not valid JSON: {e}")))
    }
}

fn load_docker(source: &str, tree: &SourceTree) -> Result<Loaded, RegistryError> {
    let bad = |e: String| import_err(source, format!("manifest.json is not valid: {e}"));
    let text = tree.read(source, "manifest.json")?;
    let list: Vec<DockerEntry> = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let entry = list
        .into_iter()
        .next()
        .ok_or_else(|| bad("it lists no image".into()))?;
    let mut config_file = tree.open(source, &entry.config)?;
    let mut config_bytes = Vec::new();
    config_file
        .read_to_end(&mut config_bytes)
        .map_err(|e| import_err(source, format!("{}: {e}", entry.config)))?;
    let config: Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| import_err(source, format!("the image config {}: {e}", entry.config)))?;
    // Docker names the config by its digest: check it when it does.
    if let Some(hex) = Path::new(&entry.config)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json"))
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        let actual = Digest::of(&config_bytes);
        if actual.hex() != hex {
            return Err(import_err(
                source,
                format!(
                    "the image config {} does not match its digest",
                    entry.config
                ),
            ));
        }
    }
    let layers = entry
        .layers
        .iter()
        .map(|l| tree.open(source, l))
        .collect::<Result<Vec<_>, _>>()?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
        return Err(bad(format!(
            "{} layers, but the config lists {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    Ok(Loaded { config, layers })
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// A blob of an OCI layout, opened beneath it and checked against its digest.
fn layout_blob(
    source: &str,
    tree: &SourceTree,
    digest: &str,
) -> Result<std::fs::File, RegistryError> {
    let d: Digest = digest
        .parse()
        .map_err(|_| import_err(source, format!("{digest:?} is not a sha256 digest")))?;
    let rel = format!("blobs/sha256/{}", d.hex());
    let mut file = tree.open(source, &rel)?;
    let mut r = HashingReader::new(&mut file);
    let read = |e: std::io::Error| import_err(source, format!("{rel}: {e}"));
    std::io::copy(&mut r, &mut std::io::sink()).map_err(read)?;
    let (actual, _) = r.finish().map_err(read)?;
    if actual != d {
        return Err(import_err(
            source,
            format!("blob {digest} is corrupt (its content hashes to {actual})"),
        ));
    }
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0)).map_err(read)?;
    Ok(file)
}

fn blob_json(source: &str, tree: &SourceTree, digest: &str) -> Result<Value, RegistryError> {
    let mut bytes = Vec::new();
    layout_blob(source, tree, digest)?
        .read_to_end(&mut bytes)
        .map_err(|e| import_err(source, format!("blob {digest}: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| import_err(source, format!("blob {digest} is not valid JSON: {e}")))
}

fn load_layout(
    source: &str,
    tree: &SourceTree,
    tag: Option<&str>,
) -> Result<Loaded, RegistryError> {
    if !tree.is_file("oci-layout") {
        return Err(import_err(
            source,
            "not an OCI image layout (no oci-layout file)",
        ));
    }
    let index = tree.read_json(source, "index.json")?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let ref_name = |m: &Value| {
        m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(str::to_owned)
    };
    let chosen = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| ref_name(m).as_deref() == Some(t))
            .ok_or_else(|| import_err(source, format!("the layout has no image tagged {t:?}")))?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            let names: Vec<String> = manifests.iter().filter_map(ref_name).collect();
            return Err(import_err(
                source,
                format!(
                    "the layout holds {} images; name one as DIR:TAG ({})",
                    manifests.len(),
                    names.join(", ")
                ),
            ));
        }
    };
    let mut digest = chosen["digest"].as_str().unwrap_or_default().to_owned();
    let mut manifest = blob_json(source, tree, &digest)?;
    if manifest["manifests"].is_array() {
        // An index: its linux/amd64 image.
        let pick = manifest["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .ok_or_else(|| import_err(source, "the index has no linux/amd64 image"))?;
        digest = pick["digest"].as_str().unwrap_or_default().to_owned();
        manifest = blob_json(source, tree, &digest)?;
    }
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| import_err(source, "the manifest names no config"))?;
    let config = blob_json(source, tree, config_digest)?;
    let layers = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| layout_blob(source, tree, l["digest"].as_str().unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded { config, layers })
}

/// `a/./b/` -> `a/b`; `None` for `..`, absolute paths and other escapes.
fn normalise(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[derive(Debug, Clone)]
enum SNode {
    Dir { mode: u32 },
    File { mode: u32, data: PathBuf, size: u64 },
    Symlink { target: PathBuf },
}

impl SNode {
    fn kind(&self) -> confine::Kind {
        match self {
            SNode::Dir { .. } => confine::Kind::Dir,
            SNode::File { .. } => confine::Kind::Other,
            SNode::Symlink { target } => confine::Kind::Symlink(target.clone()),
        }
    }
}

/// The flattened image: absolute image paths to nodes, each with the layer that put it there.
#[derive(Debug, Clone, Default)]
struct Staged {
    nodes: BTreeMap<PathBuf, SNode>,
    layer_of: BTreeMap<PathBuf, usize>,
    setid_dropped: Vec<String>,
}

fn flatten(
    source: &str,
    layers: Vec<std::fs::File>,
    files: &Path,
) -> Result<Staged, RegistryError> {
    std::fs::create_dir_all(files).map_err(io_err("create", files))?;
    let mut staged = Staged::default();
    staged.nodes.insert("/".into(), SNode::Dir { mode: 0o755 });
    let mut entries = 0usize;
    let mut bytes = 0u64;
    for (i, layer) in layers.into_iter().enumerate() {
        let n = i + 1;
        let hostile = |what: String| import_err(source, format!("layer {n}: {what}; refused"));
        let reader = open_layer(layer).map_err(|e| hostile(e.to_string()))?;
        let mut archive = tar::Archive::new(reader);
        let iter = archive
            .entries()
            .map_err(|e| hostile(format!("not a tar stream: {e}")))?;
        for entry in iter {
            let mut entry = entry.map_err(|e| hostile(format!("a damaged tar stream: {e}")))?;
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(hostile(format!("more than {MAX_ENTRIES} entries")));
            }
            let raw = entry
                .path()
                .map_err(|e| hostile(e.to_string()))?
                .into_owned();
            let rel = normalise(&raw).ok_or_else(|| {
                hostile(format!("entry {} climbs out of the root", raw.display()))
            })?;
            if rel.as_os_str().is_empty() {
                continue;
            }
            let path = Path::new("/").join(&rel);
            let name = rel
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = path.parent().unwrap_or(Path::new("/")).to_owned();
            if name == ".wh..wh..opq" {
                staged.clear_dir(&parent, n);
                continue;
            }
            if let Some(victim) = name.strip_prefix(".wh.") {
                if victim.is_empty() || victim == "." || victim == ".." || victim.contains('/') {
                    return Err(hostile(format!(
                        "whiteout {} escapes its directory",
                        raw.display()
                    )));
                }
                staged.remove(&parent.join(victim));
                continue;
            }
            let header = entry.header();
            let mode = header.mode().unwrap_or(0o644);
            let kind = header.entry_type();
            if mode & 0o6000 != 0 && kind.is_file() {
                staged.setid_dropped.push(path.display().to_string());
            }
            let node = if kind.is_dir() {
                SNode::Dir { mode }
            } else if kind.is_file() {
                let size = header.size().unwrap_or(0);
                bytes += size;
                if bytes > MAX_BYTES {
                    return Err(hostile(format!("more than {MAX_BYTES} bytes of files")));
                }
                let data = files.join(format!("{entries}"));
                let mut out = std::fs::File::create(&data).map_err(io_err("create", &data))?;
                let copied = std::io::copy(&mut entry, &mut out)
                    .map_err(|e| hostile(format!("{}: {e}", raw.display())))?;
                out.flush().map_err(io_err("write", &data))?;
                SNode::File {
                    mode,
                    data,
                    size: copied,
                }
            } else if kind.is_symlink() {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| hostile(format!("symlink {} has no target", raw.display())))?;
                SNode::Symlink { target }
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .and_then(|t| normalise(&t))
                    .map(|t| Path::new("/").join(t))
                    .ok_or_else(|| {
                        hostile(format!("hard link {} has a bad target", raw.display()))
                    })?;
                match staged.nodes.get(&target) {
                    Some(f @ SNode::File { .. }) => f.clone(),
                    _ => {
                        return Err(hostile(format!(
                            "hard link {} -> {} names no file",
                            raw.display(),
                            target.display()
                        )));
                    }
                }
            } else {
                return Err(hostile(format!(
                    "{} is a device node, FIFO or other special file, which an appliance cannot carry",
                    raw.display()
                )));
            };
            staged.put(&path, node, n);
        }
    }
    // Links are judged on the flattened tree: a later layer can change where an earlier link leads.
    let lookup = |p: &Path| staged.nodes.get(p).map(SNode::kind);
    for (path, node) in &staged.nodes {
        if let SNode::Symlink { target } = node {
            confine::check_link(path, lookup).map_err(|e| {
                let n = staged.layer_of.get(path).copied().unwrap_or(0);
                import_err(
                    source,
                    format!(
                        "layer {n}: symlink {} -> {} climbs out of the root ({e}); refused",
                        path.display(),
                        target.display()
                    ),
                )
            })?;
        }
    }
    Ok(staged)
}

fn open_layer(mut f: std::fs::File) -> std::io::Result<Box<dyn Read>> {
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))?;
    match &magic[..n] {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::GzDecoder::new(
            std::io::BufReader::new(f),
        ))),
        [0x28, 0xb5, 0x2f, 0xfd] => Err(std::io::Error::other(
            "zstd layers are not supported (re-save the image with gzip)",
        )),
        _ => Ok(Box::new(std::io::BufReader::new(f))),
    }
}

impl Staged {
    /// Puts a node at `path`; its ancestors become directories (replacing whatever was there).
    fn put(&mut self, path: &Path, node: SNode, layer: usize) {
        // From the root down: replacing an ancestor removes what is under it,
        // so a directory made for a deeper ancestor first would be lost.
        let ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
        for a in ancestors.into_iter().rev() {
            match self.nodes.get(a) {
                Some(SNode::Dir { .. }) => {}
                _ => {
                    self.remove(a);
                    self.nodes.insert(a.to_owned(), SNode::Dir { mode: 0o755 });
                    self.layer_of.insert(a.to_owned(), layer);
                }
            }
        }
        match (self.nodes.get(path), &node) {
            // A directory over a directory: contents merge, the new mode wins.
            (Some(SNode::Dir { .. }), SNode::Dir { .. }) => {}
            (Some(_), _) => self.remove(path),
            _ => {}
        }
        self.nodes.insert(path.to_owned(), node);
        self.layer_of.insert(path.to_owned(), layer);
    }

    /// Removes `path` and everything under it.
    fn remove(&mut self, path: &Path) {
        if path == Path::new("/") {
            return;
        }
        let doomed: Vec<PathBuf> = self
            .nodes
            .range(path.to_owned()..)
            .take_while(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.nodes.remove(&p);
            self.layer_of.remove(&p);
        }
    }

    /// An opaque whiteout: what earlier layers put under `dir` goes.
    fn clear_dir(&mut self, dir: &Path, layer: usize) {
        let doomed: Vec<PathBuf> = self
            .nodes
            .range(dir.to_owned()..)
            .take_while(|(p, _)| p.starts_with(dir))
            .filter(|(p, _)| {
                p.as_path() != dir && self.layer_of.get(*p).is_some_and(|l| *l < layer)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.nodes.remove(&p);
            self.layer_of.remove(&p);
        }
    }

    fn files(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| matches!(n, SNode::File { .. }))
            .count()
    }

    fn bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match n {
                SNode::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    fn clone_all(&self) -> Staged {
        self.clone()
    }

    /// Follows symlinks inside the image; the final path and every link on the way.
    fn resolve(&self, path: &Path, links: &mut BTreeSet<PathBuf>) -> Option<PathBuf> {
        let mut pending: Vec<std::ffi::OsString> = path
            .components()
            .rev()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        let mut out = PathBuf::from("/");
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            if c == ".." {
                out.pop();
                continue;
            }
            let next = out.join(&c);
            match self.nodes.get(&next)? {
                SNode::Symlink { target } => {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    links.insert(next.clone());
                    if target.is_absolute() {
                        out = PathBuf::from("/");
                    }
                    pending.extend(target.components().rev().filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    }));
                }
                _ => out = next,
            }
        }
        Some(out)
    }

    fn file_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        match self.nodes.get(path)? {
            SNode::File { data, .. } => std::fs::read(data).ok(),
            _ => None,
        }
    }

    /// The staged copy of the regular file `path` leads to.
    fn staged_file(&self, path: &Path) -> Option<&Path> {
        let real = self.resolve(path, &mut BTreeSet::new())?;
        match self.nodes.get(&real)? {
            SNode::File { data, .. } => Some(data),
            _ => None,
        }
    }

    /// The pruned image: roots, kept paths and their closure; the closure report; the programs.
    #[allow(clippy::type_complexity)]
    fn prune(
        &self,
        source: &str,
        program: &str,
        keep: &[PathBuf],
    ) -> Result<(Staged, BTreeMap<String, Vec<String>>, Vec<PathBuf>), RegistryError> {
        let mut kept: BTreeSet<PathBuf> = BTreeSet::new();
        let mut roots: Vec<PathBuf> = Vec::new();
        let mut links = BTreeSet::new();
        let program_path = self
            .resolve(Path::new(program), &mut links)
            .filter(|p| matches!(self.nodes.get(p), Some(SNode::File { .. })))
            .ok_or_else(|| {
                import_err(
                    source,
                    format!("the program {program} is not a file in the image"),
                )
            })?;
        roots.push(program_path.clone());
        // A script: its interpreter too.
        if let Some(interp) = self.script_interpreter(&program_path) {
            let real = self
                .resolve(Path::new(&interp), &mut links)
                .ok_or_else(|| {
                    import_err(
                        source,
                        format!("{program}'s interpreter {interp} is not in the image"),
                    )
                })?;
            roots.push(real);
        }
        for k in keep {
            let k = Path::new("/").join(k.strip_prefix("/").unwrap_or(k));
            let real = self.resolve(&k, &mut links).ok_or_else(|| {
                import_err(source, format!("--keep {}: not in the image", k.display()))
            })?;
            for (p, n) in self
                .nodes
                .range(real.clone()..)
                .take_while(|(p, _)| p.starts_with(&real))
            {
                kept.insert(p.clone());
                if let SNode::File { .. } = n {
                    roots.push(p.clone());
                }
            }
        }
        kept.extend(links);
        kept.extend(roots.iter().cloned());
        // Kept scripts and data have no closure; every ELF object kept has one.
        roots.retain(|r| closure::is_elf(self, r));
        let resolved = Resolver::new(self).closure(&roots).map_err(|e| match e {
            ClosureError::Missing {
                library, needed_by, ..
            } => import_err(
                source,
                format!(
                    "{} needs {library}, which the image does not have",
                    needed_by.display()
                ),
            ),
            e => import_err(source, e),
        })?;
        // The loader opens each object by the name it was found under: keep
        // the links on the way and the file, and report the files.
        let mut keep_file = |found: &Path| -> String {
            let mut on_the_way = BTreeSet::new();
            let real = self
                .resolve(found, &mut on_the_way)
                .unwrap_or_else(|| found.to_owned());
            kept.extend(on_the_way);
            kept.insert(real.clone());
            real.display().to_string()
        };
        for interpreter in &resolved.interpreters {
            keep_file(interpreter);
        }
        let mut report: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (object, needs) in &resolved.needs {
            let needs = needs.iter().map(|n| keep_file(n)).collect();
            report.insert(keep_file(object), needs);
        }
        let mut out = Staged::default();
        for p in &kept {
            for a in p.ancestors() {
                if let Some(n) = self.nodes.get(a) {
                    out.nodes.entry(a.to_owned()).or_insert_with(|| n.clone());
                }
            }
        }
        Ok((out, report, vec![program_path]))
    }

    /// The interpreter a `#!` script names; only the first line is read.
    fn script_interpreter(&self, path: &Path) -> Option<String> {
        let mut head = Vec::new();
        Files::open(self, path)
            .ok()?
            .take(256)
            .read_to_end(&mut head)
            .ok()?;
        let line = head.strip_prefix(b"#!")?;
        let line = String::from_utf8_lossy(line);
        line.lines()
            .next()
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
    }

    /// Bytes dropped by pruning, by directory three levels deep, largest first (at most 12).
    fn dropped_by_dir(&self, kept: &Staged) -> Vec<(String, u64)> {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for (p, n) in &self.nodes {
            if let SNode::File { size, .. } = n
                && !kept.nodes.contains_key(p)
            {
                let dir: PathBuf = p
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .components()
                    .take(4)
                    .collect();
                *by.entry(dir.display().to_string()).or_default() += size;
            }
        }
        let mut v: Vec<(String, u64)> = by.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.truncate(12);
        v
    }
}

/// The image being imported, as the closure resolver reads it: paths and
/// links are followed inside the flattened image only, and contents come from
/// the staged copies, never from a host path an entry names.
impl Files for Staged {
    fn is_file(&self, path: &Path) -> bool {
        self.staged_file(path).is_some()
    }

    fn identity(&self, path: &Path) -> PathBuf {
        self.resolve(path, &mut BTreeSet::new())
            .unwrap_or_else(|| path.to_owned())
    }

    fn open(&self, path: &Path) -> std::io::Result<Box<dyn Read + '_>> {
        let data = self
            .staged_file(path)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(Box::new(std::fs::File::open(data)?))
    }

    fn glob(&self, pattern: &str) -> Vec<PathBuf> {
        let Ok(pattern) = glob::Pattern::new(pattern) else {
            return Vec::new();
        };
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..glob::MatchOptions::new()
        };
        self.nodes
            .keys()
            .filter(|p| pattern.matches_path_with(p, options))
            .cloned()
            .collect()
    }
}

/// How the container image runs, mapped to an appliance.
struct RunConfig {
    command: Vec<String>,
    env: Vec<(String, String)>,
    uid: u32,
    gid: u32,
    workdir: Option<String>,
    ports: Vec<u16>,
    /// The config's `Volumes`, as (name, path).
    volumes: Vec<(String, String)>,
}

impl RunConfig {
    fn from_config(
        source: &str,
        config: &Value,
        staged: &Staged,
        opts: &ImportOptions,
    ) -> Result<RunConfig, RegistryError> {
        let c = &config["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let env: Vec<(String, String)> = strings(&c["Env"])
            .into_iter()
            .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let mut command = match &opts.command {
            Some(c) => c.clone(),
            None => {
                let mut c2 = strings(&c["Entrypoint"]);
                c2.extend(strings(&c["Cmd"]));
                c2
            }
        };
        if command.is_empty() {
            return Err(import_err(
                source,
                "the image has neither an Entrypoint nor a Cmd; give --command",
            ));
        }
        if !command[0].starts_with('/') {
            let path = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| {
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                });
            let found = path.split(':').find_map(|d| {
                let candidate = Path::new(d).join(&command[0]);
                let mut l = BTreeSet::new();
                staged
                    .resolve(&candidate, &mut l)
                    .filter(|r| matches!(staged.nodes.get(r), Some(SNode::File { .. })))
                    .map(|_| candidate)
            });
            command[0] = found
                .ok_or_else(|| {
                    import_err(
                        source,
                        format!("the program {:?} is not on the image's PATH", command[0]),
                    )
                })?
                .display()
                .to_string();
        }
        let (uid, gid) = user_ids(source, c["User"].as_str().unwrap_or(""), staged)?;
        let workdir = c["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty() && *w != "/")
            .map(str::to_owned);
        let ports = c["ExposedPorts"]
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| k.ends_with("/tcp") || !k.contains('/'))
                    .filter_map(|k| k.split('/').next().and_then(|p| p.parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        let mut volumes: Vec<(String, String)> = Vec::new();
        for path in c["Volumes"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if !path.starts_with('/') || path == "/" {
                continue;
            }
            let base: String = path
                .rsplit('/')
                .find(|s| !s.is_empty())
                .unwrap_or("data")
                .chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() {
                        ch.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect();
            let base = base.trim_matches('-').to_owned();
            let base = if base.is_empty() {
                "data".to_owned()
            } else {
                base
            };
            let mut name = base.clone();
            let mut n = 2;
            while volumes.iter().any(|(v, _)| *v == name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            volumes.push((name, path));
        }
        Ok(RunConfig {
            command,
            env,
            uid,
            gid,
            workdir,
            ports,
            volumes,
        })
    }

    /// The inferred `juice.toml`, made as a TOML table and written by the toml
    /// crate: every string from the image (command, env, paths) is escaped by it.
    fn manifest_toml(&self, tag: &str) -> String {
        use toml::{Table, Value};
        let (name, version) = tag.rsplit_once(':').unwrap_or((tag, "imported"));
        let name = name.rsplit('/').next().unwrap_or(name);
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut appliance = Table::new();
        appliance.insert("name".into(), Value::String(name.to_owned()));
        appliance.insert("version".into(), Value::String(version.to_owned()));
        let mut run = Table::new();
        run.insert("command".into(), strings(&self.command));
        run.insert(
            "user".into(),
            Value::String(format!("{}:{}", self.uid, self.gid)),
        );
        if !self.env.is_empty() {
            let env: Table = self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            run.insert("env".into(), Value::Table(env));
        }
        if let Some(w) = &self.workdir {
            run.insert("workdir".into(), Value::String(w.clone()));
        }
        if !self.ports.is_empty() {
            let ports = self.ports.iter().map(|p| Value::Integer(i64::from(*p)));
            run.insert("ports".into(), Value::Array(ports.collect()));
        }
        let mut doc = Table::new();
        doc.insert("appliance".into(), Value::Table(appliance));
        doc.insert("run".into(), Value::Table(run));
        if !self.volumes.is_empty() {
            let volumes = self.volumes.iter().map(|(name, path)| {
                let mut v = Table::new();
                v.insert("name".into(), Value::String(name.clone()));
                v.insert("path".into(), Value::String(path.clone()));
                Value::Table(v)
            });
            doc.insert("volumes".into(), Value::Array(volumes.collect()));
        }
        format!("# Inferred by `juice import`.\n{doc}")
    }
}

/// `User` of a container config as numeric ids, names looked up in the image's passwd and group.
fn user_ids(source: &str, user: &str, staged: &Staged) -> Result<(u32, u32), RegistryError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let table = |file: &str| -> Vec<Vec<String>> {
        let mut l = BTreeSet::new();
        staged
            .resolve(Path::new(file), &mut l)
            .and_then(|p| staged.file_bytes(&p))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .map(|l| l.split(':').map(str::to_owned).collect())
                    .collect()
            })
            .unwrap_or_default()
    };
    let passwd = table("/etc/passwd");
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, default_gid) = match u.parse::<u32>() {
        Ok(n) => (
            n,
            passwd
                .iter()
                .find(|f| f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(n))
                .and_then(|f| f.get(3).and_then(|s| s.parse().ok()))
                .unwrap_or(0),
        ),
        Err(_) => {
            let f = passwd
                .iter()
                .find(|f| f.first().map(String::as_str) == Some(u))
                .ok_or_else(|| {
                    import_err(
                        source,
                        format!("user {u:?} is not in the image's /etc/passwd"),
                    )
                })?;
            let id = |i: usize| f.get(i).and_then(|s| s.parse::<u32>().ok());
            (
                id(2).ok_or_else(|| {
                    import_err(source, format!("user {u:?} has a bad passwd line"))
                })?,
                id(3).unwrap_or(0),
            )
        }
    };
    let gid = match g {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => table("/etc/group")
                .iter()
                .find(|f| f.first().map(String::as_str) == Some(g))
                .and_then(|f| f.get(2).and_then(|s| s.parse().ok()))
                .ok_or_else(|| {
                    import_err(
                        source,
                        format!("group {g:?} is not in the image's /etc/group"),
                    )
                })?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_inferred_manifest_carries_hostile_strings_unchanged() {
        let hostile = "a \" ] [run] x = \"\\ \n\t\u{7f} é ${HOME}";
        let run = RunConfig {
            command: vec!["/bin/app".into(), hostile.into(), "\"".into()],
            env: vec![("A_B".into(), hostile.into())],
            uid: 1000,
            gid: 1001,
            workdir: Some("/srv/a \"b\"".into()),
            ports: vec![80, 8443],
            volumes: vec![("data".into(), "/var/lib/x \\".into())],
        };
        let text = run.manifest_toml("reg.example/app:1.0");
        let m = Manifest::parse(&text, Path::new("juice.toml")).unwrap();
        assert_eq!(m.appliance.name.as_str(), "app", "{text}");
        assert_eq!(m.run.command.args()[1], hostile, "{text}");
        assert_eq!(m.run.command.args()[2], "\"");
        assert_eq!(m.run.env.values().next().map(String::as_str), Some(hostile));
        assert_eq!(m.volumes.len(), 1, "{text}");
        assert_eq!(m.run.ports.len(), 2);
        assert!(text.starts_with("# Inferred by `juice import`."), "{text}");
    }

    use super::*;
    use juice_image::closure::testing::InheritedRpath;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o4755
            });
            h.set_size(data.len() as u64);
            // Raw names: the tar crate's own checks would stop the hostile ones we test.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            if !link.is_empty() {
                let l = link.as_bytes();
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Flattens `layers`; the staging directory lives as long as the returned guard.
    fn flat(layers: Vec<Vec<u8>>) -> (Result<Staged, RegistryError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<std::fs::File> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = dir.path().join(format!("l{i}"));
                std::fs::write(&p, l).unwrap();
                std::fs::File::open(p).unwrap()
            })
            .collect();
        let s = flatten("test", files, &dir.path().join("files"));
        (s, dir)
    }

    use tar::EntryType::{Block, Directory, Fifo, Link, Regular, Symlink};

    #[test]
    fn whiteouts_and_opaque_directories_follow_overlay_rules() {
        let (s, _dir) = flat(vec![
            layer(&[
                ("etc/", Directory, b"", ""),
                ("etc/a", Regular, b"a", ""),
                ("etc/b", Regular, b"b", ""),
                ("var/lib/x/", Directory, b"", ""),
                ("var/lib/x/old", Regular, b"o", ""),
                ("lib", Symlink, b"", "usr/lib"),
            ]),
            layer(&[
                ("etc/.wh.a", Regular, b"", ""),
                ("var/lib/x/.wh..wh..opq", Regular, b"", ""),
                ("var/lib/x/new", Regular, b"n", ""),
                ("lib/z", Regular, b"z", ""),
            ]),
        ]);
        let s = s.unwrap();
        let has = |p: &str| s.nodes.contains_key(Path::new(p));
        assert!(!has("/etc/a") && has("/etc/b"));
        assert!(!has("/var/lib/x/old") && has("/var/lib/x/new"));
        // A later layer's directory replaced the symlink: nothing went through it.
        assert!(matches!(
            s.nodes.get(Path::new("/lib")),
            Some(SNode::Dir { .. })
        ));
        assert!(has("/lib/z") && !has("/usr/lib/z"));
        assert_eq!(s.setid_dropped.len(), 5, "{:?}", s.setid_dropped);
    }

    #[test]
    fn entries_without_their_directories_get_them() {
        let (s, _dir) = flat(vec![
            layer(&[("a", Symlink, b"", "b"), ("b/", Directory, b"", "")]),
            layer(&[("a/c/d", Regular, b"d", ""), ("e/f/g", Regular, b"g", "")]),
        ]);
        let s = s.unwrap();
        for dir in ["/a", "/a/c", "/e", "/e/f"] {
            assert!(
                matches!(s.nodes.get(Path::new(dir)), Some(SNode::Dir { .. })),
                "{dir}: {:?}",
                s.nodes
            );
        }
        let mut links = BTreeSet::new();
        assert_eq!(
            s.resolve(Path::new("/e/f/g"), &mut links),
            Some(PathBuf::from("/e/f/g"))
        );
    }

    #[test]
    fn hostile_layers_are_refused_with_the_layer_and_entry_named() {
        for (entries, want) in [
            (vec![("../evil", Regular, &b"x"[..], "")], "climbs out"),
            (vec![("/etc/passwd", Regular, &b"x"[..], "")], "climbs out"),
            (vec![("a/../../b", Regular, &b"x"[..], "")], "climbs out"),
            (vec![("dev/sda", Block, &b""[..], "")], "device node"),
            (vec![("p", Fifo, &b""[..], "")], "device node"),
            (vec![("etc/.wh...", Regular, &b""[..], "")], "whiteout"),
            (vec![("l", Symlink, &b""[..], "../../etc")], "climbs out"),
            (vec![("h", Link, &b""[..], "nothing")], "names no file"),
        ] {
            let e = flat(vec![layer(&[]), layer(&entries)])
                .0
                .unwrap_err()
                .to_string();
            assert!(e.contains("layer 2") && e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn users_map_through_the_image_passwd() {
        let (s, _dir) = flat(vec![layer(&[
            (
                "etc/passwd",
                Regular,
                b"root:x:0:0::/:/bin/sh\nwww-data:x:33:33::/:/bin/false\n",
                "",
            ),
            ("etc/group", Regular, b"root:x:0:\nweb:x:44:\n", ""),
        ])]);
        let s = s.unwrap();
        assert_eq!(user_ids("t", "", &s).unwrap(), (0, 0));
        assert_eq!(user_ids("t", "www-data", &s).unwrap(), (33, 33));
        assert_eq!(user_ids("t", "www-data:web", &s).unwrap(), (33, 44));
        assert_eq!(user_ids("t", "33", &s).unwrap(), (33, 33));
        assert_eq!(user_ids("t", "1000:1000", &s).unwrap(), (1000, 1000));
        assert!(
            user_ids("t", "nobody", &s)
                .unwrap_err()
                .to_string()
                .contains("passwd")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Random layers of hostile-looking names and kinds: the flattener never panics, and
        /// whatever it accepts is a tree of plain absolute paths whose links stay inside.
        #[test]
        fn random_layers_never_escape(entries in proptest::collection::vec(
            (proptest::sample::select(vec!["a", "b", "..", ".", ".wh.a", ".wh..wh..opq", ".wh...", "etc", "/"]),
             proptest::sample::select(vec!["a", "b", "..", "c", ".wh.b", ""]),
             0u8..6,
             proptest::sample::select(vec!["a", "../a", "../../x", "/etc", "b/c", ""])),
            0..12)) {
            let mut layers = Vec::new();
            for chunk in entries.chunks(4) {
                let built: Vec<(String, tar::EntryType, Vec<u8>, String)> = chunk
                    .iter()
                    .map(|(d, f, k, l)| {
                        let name = if f.is_empty() { (*d).to_owned() } else { format!("{d}/{f}") };
                        let kind = [Regular, Directory, Symlink, Link, Fifo, Block][*k as usize];
                        (name, kind, b"data".to_vec(), (*l).to_owned())
                    })
                    .collect();
                let refs: Vec<(&str, tar::EntryType, &[u8], &str)> = built
                    .iter()
                    .map(|(n, k, d, l)| (n.as_str(), *k, d.as_slice(), l.as_str()))
                    .collect();
                layers.push(layer(&refs));
            }
            if let (Ok(s), _dir) = flat(layers) {
                for (p, n) in &s.nodes {
                    proptest::prop_assert!(p.is_absolute());
                    proptest::prop_assert!(!p.components().any(|c| matches!(c, Component::ParentDir)), "{}", p.display());
                    if let SNode::Symlink { .. } = n {
                        let lookup = |q: &Path| s.nodes.get(q).map(SNode::kind);
                        proptest::prop_assert!(confine::check_link(p, lookup).is_ok());
                    }
                }
            }
        }
    }

    /// An outer archive whose links chain out of it, then entries that write
    /// and read through them (the attack that wrote host files as root).
    #[test]
    fn an_outer_archive_cannot_write_or_read_through_its_links() {
        let host = tempfile::tempdir().unwrap();
        let victim = host.path().join("victim");
        std::fs::write(&victim, b"host data").unwrap();
        let deep = host.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        let scratch = deep.join("scratch");
        // Each link counts as inside; together they lead to `host`, above the scratch.
        let up = "../../../../..";
        let archive = layer(&[
            ("x/", Directory, b"", ""),
            ("x/l1", Symlink, b"", ".."),
            ("l2", Symlink, b"", &format!("x/l1/{up}")),
            ("l2/victim", Regular, b"overwritten", ""),
            (
                "manifest.json",
                Regular,
                br#"[{"Config":"l2/victim","Layers":[]}]"#,
                "",
            ),
        ]);
        let file = host.path().join("evil.tar");
        std::fs::write(&file, archive).unwrap();
        let tree = SourceTree::read_archive("evil.tar", &file, &scratch);
        assert_eq!(std::fs::read(&victim).unwrap(), b"host data");
        // Nothing but numbered bodies was created, all inside the scratch directory.
        for e in std::fs::read_dir(&scratch).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(name.parse::<u64>().is_ok(), "{name}");
        }
        let tree = tree.unwrap();
        let err = load_docker("evil.tar", &tree).err().unwrap().to_string();
        assert!(err.contains("leads outside the archive"), "{err}");
        // A link that stays inside is followed (docker links identical layers).
        assert!(tree.is_file("manifest.json"));
    }

    #[test]
    fn a_layout_directory_is_read_beneath_itself() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), b"{}").unwrap();
        let layout = host.path().join("layout");
        std::fs::create_dir(&layout).unwrap();
        std::fs::write(layout.join("oci-layout"), b"{}").unwrap();
        std::os::unix::fs::symlink("../secret", layout.join("index.json")).unwrap();
        let tree = SourceTree::dir("layout", &layout).unwrap();
        let err = load_layout("layout", &tree, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("index.json"), "{err}");
    }

    /// The same gcc-built chain (prog with DT_RPATH `$ORIGIN/../x` -> liba ->
    /// libb, found only through the DT_RPATH liba inherits), resolved from the
    /// host and pruned inside an image: both find the same libraries.
    #[test]
    fn an_inherited_dt_rpath_finds_the_same_libraries_in_an_image_as_on_the_host() {
        let t = tempfile::tempdir().unwrap();
        let app = t.path().join("app");
        let chain = InheritedRpath::build(&app);
        let on_host = Resolver::system()
            .closure(std::slice::from_ref(&chain.program))
            .unwrap();

        // The image: the chain under /app, and the host's libc and loader where the host found them.
        let mut files: Vec<(String, Vec<u8>)> = [&chain.program, &chain.liba, &chain.libb]
            .iter()
            .map(|p| {
                let rel = p.strip_prefix(t.path()).unwrap().display().to_string();
                (rel, std::fs::read(p).unwrap())
            })
            .collect();
        let mut dirs = BTreeSet::new();
        for lib in on_host.libraries() {
            if !lib.starts_with(t.path()) {
                let rel = lib.strip_prefix("/").unwrap().display().to_string();
                files.push((rel, std::fs::read(&lib).unwrap()));
                dirs.insert(lib.parent().unwrap().display().to_string());
            }
        }
        let conf = dirs.into_iter().collect::<Vec<_>>().join("\n");
        files.push((
            "etc/ld.so.conf".into(),
            b"include /etc/ld.so.conf.d/*.conf\n".to_vec(),
        ));
        files.push(("etc/ld.so.conf.d/host.conf".into(), conf.into_bytes()));
        let entries: Vec<(&str, tar::EntryType, &[u8], &str)> = files
            .iter()
            .map(|(p, d)| (p.as_str(), Regular, d.as_slice(), ""))
            .collect();
        let (staged, _dir) = flat(vec![layer(&entries)]);
        let staged = staged.unwrap();
        let (kept, in_image, _) = staged.prune("test", "/app/bin/prog", &[]).unwrap();

        let by_name = |closure: Vec<(String, Vec<String>)>| -> BTreeMap<String, Vec<String>> {
            let name = |p: &str| {
                Path::new(p)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            };
            closure
                .into_iter()
                .map(|(o, needs)| (name(&o), needs.iter().map(|n| name(n)).collect()))
                .collect()
        };
        let host_names = by_name(
            on_host
                .needs
                .iter()
                .map(|(o, n)| {
                    let n = n.iter().map(|p| p.display().to_string()).collect();
                    (o.display().to_string(), n)
                })
                .collect(),
        );
        let image_names = by_name(in_image.clone().into_iter().collect());
        assert!(
            host_names["liba.so"].contains(&"libb.so".to_owned()),
            "{host_names:?}"
        );
        assert_eq!(host_names, image_names);
        assert!(
            in_image["/app/x/liba.so"].contains(&"/app/x/libb.so".to_owned()),
            "{in_image:?}"
        );
        assert!(kept.nodes.contains_key(Path::new("/app/x/libb.so")));
    }

    #[test]
    fn archive_paths_cannot_escape() {
        assert!(normalise(Path::new("a/./b")).is_some());
        assert!(normalise(Path::new("../a")).is_none());
    }
}
