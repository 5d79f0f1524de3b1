//! `juice build`: from a directory with a `juice.toml` to an image in the store.
//!
//! The steps: read the manifest; resolve the ELF closure of the declared
//! binaries and libraries; lay out the root tree (binaries, closure, declared
//! files, a minimal FHS skeleton); hash the inputs and reuse a previous build
//! with the same inputs; otherwise write the layer, the config and the
//! manifest as blobs and tag the result.

pub mod layer;
pub mod tree;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, ConfigBuilder, ImageConfigurationBuilder, Os, RootFsBuilder};

use crate::appliance::{ApplianceConfig, LABEL, SizeBreakdown};
use crate::closure::{ClosureError, Resolver};
use crate::digest::Digest;
use crate::manifest::{Binary, Manifest, ManifestError};
use crate::store::{Store, StoreError, canonical_json};
use tree::{Node, Source, Tree, TreeError};

/// Bumped whenever the layout of a built image changes, so old build caches are not reused.
const BUILDER_VERSION: &str = "juice-build-1";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Closure(#[from] ClosureError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{manifest}: {field}: {message}")]
    Invalid {
        manifest: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("cannot write the layer: {0}")]
    Layer(std::io::Error),
}

/// Options of one build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// `name:version` to tag the image with; defaults to the manifest's.
    pub tag: Option<String>,
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildOutcome {
    pub reference: String,
    pub digest: Digest,
    /// True when an identical earlier build was reused.
    pub cached: bool,
    /// Files, directories and symlinks in the image.
    pub entries: usize,
    pub sizes: SizeBreakdown,
}

/// Builds the appliance described by `dir/juice.toml` into `store`.
pub fn build(
    store: &Store,
    dir: &Path,
    options: &BuildOptions,
) -> Result<BuildOutcome, BuildError> {
    let manifest_path = dir.join("juice.toml");
    let manifest = Manifest::load(&manifest_path)?;
    let reference = options.tag.clone().unwrap_or_else(|| manifest.reference());
    let plan = Plan::new(&manifest, &manifest_path, dir)?;
    let config = plan
        .config_json(&manifest)
        .map_err(|message| BuildError::Invalid {
            manifest: manifest_path.clone(),
            field: "run",
            message,
        })?;

    commit(store, &plan, config, reference)
}

/// An image tree put together elsewhere (by `juice import`), with the manifest
/// it runs with and the closure report that explains it.
pub struct Assembled {
    pub tree: Tree,
    pub manifest: Manifest,
    /// Object -> the libraries it needs, as image paths.
    pub closure: BTreeMap<String, Vec<String>>,
    /// The programs the closure started from (counted as binaries in the sizes).
    pub binaries: Vec<PathBuf>,
}

/// Writes an assembled tree as an image, as `build` writes a planned one: the
/// skeleton is added, the layer is reproducible, the image is tagged `reference`.
/// `source` names where the tree came from, for errors.
pub fn build_assembled(
    store: &Store,
    assembled: Assembled,
    reference: &str,
    source: &Path,
) -> Result<BuildOutcome, BuildError> {
    let Assembled {
        mut tree,
        manifest,
        closure,
        binaries,
    } = assembled;
    let invalid = |field: &'static str, message: String| BuildError::Invalid {
        manifest: source.to_owned(),
        field,
        message,
    };
    let libraries: std::collections::BTreeSet<String> =
        closure.values().flatten().cloned().collect();
    let mut origin: BTreeMap<PathBuf, Origin> = tree
        .nodes()
        .map(|(p, _)| {
            let kind = if binaries.contains(p) {
                Origin::Binary
            } else if libraries.contains(&p.display().to_string()) {
                Origin::Library
            } else {
                Origin::File
            };
            (p.clone(), kind)
        })
        .collect();
    skeleton(&mut tree, &manifest, &mut origin)?;
    tree.check_links()?;
    let program = manifest.run.command.program();
    if !tree.resolves_to_file(Path::new(program)) {
        return Err(invalid(
            "run.command",
            format!("the program {program} is not in the image"),
        ));
    }
    let sizes = sizes_of(&tree, &origin);
    let plan = Plan {
        tree,
        closure,
        sizes,
        setuid: Vec::new(),
    };
    let config = plan
        .config_json(&manifest)
        .map_err(|message| invalid("run", message))?;
    commit(store, &plan, config, reference.to_owned())
}

/// Writes the layer, config and manifest of a plan (or reuses an identical earlier build) and tags it.
fn commit(
    store: &Store,
    plan: &Plan,
    config: ConfigJson,
    reference: String,
) -> Result<BuildOutcome, BuildError> {
    let _writing = store.lock_for_writing()?;
    let inputs = plan.input_digest(&config)?;
    if let Some((digest, size)) = store.recall_build(&inputs) {
        store.tag(&reference, &digest, size)?;
        return Ok(plan.outcome(reference, digest, true));
    }

    let mut blob = store.blob_writer()?;
    let (_, layer) = layer::write_layer(&plan.tree, &mut blob).map_err(BuildError::Layer)?;
    let (layer_digest, layer_size) = blob.commit()?;

    let config_bytes = config.with_rootfs(&layer.diff_id)?;
    let (digest, _) = store.put_image(&reference, &config_bytes, (&layer_digest, layer_size))?;
    store.remember_build(&inputs, &digest)?;
    Ok(plan.outcome(reference, digest, false))
}

/// The resolved contents of an image, before anything is written.
struct Plan {
    tree: Tree,
    closure: BTreeMap<String, Vec<String>>,
    sizes: SizeBreakdown,
    setuid: Vec<crate::manifest::ImagePath>,
}

/// The config document, waiting for its layer's diff_id.
struct ConfigJson {
    value: serde_json::Value,
}

impl ConfigJson {
    fn with_rootfs(mut self, diff_id: &Digest) -> Result<Vec<u8>, BuildError> {
        self.value["rootfs"] =
            serde_json::json!({ "type": "layers", "diff_ids": [diff_id.to_string()] });
        serde_json::to_vec(&self.value).map_err(|e| BuildError::Layer(e.into()))
    }
}

impl Plan {
    fn new(manifest: &Manifest, manifest_path: &Path, dir: &Path) -> Result<Plan, BuildError> {
        let invalid = |field: &'static str, message: String| BuildError::Invalid {
            manifest: manifest_path.to_owned(),
            field,
            message,
        };
        let mut tree = Tree::new();
        let mut origin: BTreeMap<PathBuf, Origin> = BTreeMap::new();

        // Binaries: (host path, image path).
        let mut placed = Vec::new();
        for b in &manifest.build.binaries {
            let (from, to) = match b {
                Binary::Path(p) if p.is_absolute() => (p.clone(), p.clone()),
                Binary::Path(p) => {
                    let name = p.file_name().ok_or_else(|| {
                        invalid(
                            "build.binaries",
                            format!("{} does not name a file", p.display()),
                        )
                    })?;
                    (dir.join(p), Path::new("/usr/bin").join(name))
                }
                Binary::Placed { from, to } => (dir.join(from), to.as_path().to_owned()),
            };
            let meta = std::fs::metadata(&from)
                .map_err(|e| invalid("build.binaries", format!("{}: {e}", from.display())))?;
            if !meta.is_file() {
                return Err(invalid(
                    "build.binaries",
                    format!("{} is not a file", from.display()),
                ));
            }
            placed.push((from, to));
        }
        let libraries: Vec<PathBuf> = manifest
            .build
            .libraries
            .iter()
            .map(|l| {
                if l.is_absolute() {
                    l.clone()
                } else {
                    dir.join(l)
                }
            })
            .collect();

        let roots: Vec<PathBuf> = placed
            .iter()
            .map(|(from, _)| from.clone())
            .chain(libraries.iter().cloned())
            .collect();
        let resolved = Resolver::system().closure(&roots)?;

        // Host path -> image path, for the closure report.
        let mut image_of: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
        for (from, to) in &placed {
            let meta = std::fs::metadata(from)
                .map_err(|e| invalid("build.binaries", format!("{}: {e}", from.display())))?;
            use std::os::unix::fs::PermissionsExt;
            tree.insert(
                to,
                Node::File {
                    source: Source::Host(from.clone()),
                    mode: tree::normal_file_mode(meta.permissions().mode() | 0o111, false),
                },
            )?;
            origin.insert(to.clone(), Origin::Binary);
            image_of.insert(from.clone(), to.clone());
        }
        for lib in resolved
            .libraries()
            .into_iter()
            .chain(libraries.iter().cloned())
        {
            let real = tree.add_host_path(&lib)?;
            origin.entry(real).or_insert(Origin::Library);
            image_of.entry(lib.clone()).or_insert(lib);
        }
        let closure = resolved
            .needs
            .iter()
            .map(|(obj, libs)| {
                let name = image_of.get(obj).unwrap_or(obj).display().to_string();
                (name, libs.iter().map(|l| l.display().to_string()).collect())
            })
            .collect();

        for f in &manifest.build.files {
            let from = if f.from.is_absolute() {
                f.from.clone()
            } else {
                dir.join(&f.from)
            };
            let before: Vec<PathBuf> = tree.nodes().map(|(p, _)| p.clone()).collect();
            tree.copy_from_host(&from, f.to.as_path())?;
            for (p, _) in tree.nodes() {
                if !before.contains(p) {
                    origin.entry(p.clone()).or_insert(Origin::File);
                }
            }
        }

        skeleton(&mut tree, manifest, &mut origin)?;

        for p in &manifest.build.setuid {
            if !tree.allow_setid(p.as_path())? {
                return Err(invalid(
                    "build.setuid",
                    format!("{p} is not a file from the host in the image"),
                ));
            }
        }
        let program = manifest.run.command.program();
        if !tree.resolves_to_file(Path::new(program)) {
            return Err(invalid(
                "run.command",
                format!(
                    "the program {program} is not in the image (declare it in build.binaries or build.files)"
                ),
            ));
        }

        let sizes = sizes_of(&tree, &origin);
        Ok(Plan {
            tree,
            closure,
            sizes,
            setuid: manifest.build.setuid.clone(),
        })
    }

    /// The OCI config: standard fields for other tools, and Juice's label.
    fn config_json(&self, manifest: &Manifest) -> Result<ConfigJson, String> {
        let appliance = ApplianceConfig {
            manifest: manifest.clone(),
            setuid: self.setuid.clone(),
            closure: self.closure.clone(),
            sizes: self.sizes,
        };
        let label = String::from_utf8(canonical_json(&appliance)?).map_err(|e| e.to_string())?;
        let run = &manifest.run;
        let mut config = ConfigBuilder::default()
            .entrypoint(run.command.args().to_vec())
            .env(
                run.env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>(),
            )
            .user(run.user.to_string())
            .labels(
                [(LABEL.to_owned(), label)]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
        if let Some(w) = &run.workdir {
            config = config.working_dir(w.to_string());
        }
        if !run.ports.is_empty() {
            config = config.exposed_ports(
                run.ports
                    .iter()
                    .map(|p| format!("{}/tcp", p.get()))
                    .collect::<Vec<_>>(),
            );
        }
        let image = ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(config.build().map_err(|e| e.to_string())?)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(Vec::<String>::new())
                    .build()
                    .map_err(|e| e.to_string())?,
            )
            .build()
            .map_err(|e| e.to_string())?;
        let value = serde_json::to_value(&image).map_err(|e| e.to_string())?;
        Ok(ConfigJson { value })
    }

    /// A digest of everything that decides the image's bytes: the config and every node with its content.
    fn input_digest(&self, config: &ConfigJson) -> Result<Digest, BuildError> {
        let mut h = crate::digest::HashingWriter::new(std::io::sink());
        let mut put = |bytes: &[u8]| -> Result<(), BuildError> {
            h.write_all(&(bytes.len() as u64).to_le_bytes())
                .map_err(BuildError::Layer)?;
            h.write_all(bytes).map_err(BuildError::Layer)
        };
        put(BUILDER_VERSION.as_bytes())?;
        put(&serde_json::to_vec(&config.value).map_err(|e| BuildError::Layer(e.into()))?)?;
        for (path, node) in self.tree.nodes() {
            put(path.as_os_str().as_encoded_bytes())?;
            match node {
                Node::Dir { mode } => put(format!("dir {mode:o}").as_bytes())?,
                Node::Symlink { target } => put(format!("link {}", target.display()).as_bytes())?,
                Node::File {
                    source: Source::Bytes(b),
                    mode,
                } => {
                    put(format!("file {mode:o}").as_bytes())?;
                    put(b)?;
                }
                Node::File {
                    source: Source::Host(host),
                    mode,
                } => {
                    put(format!("file {mode:o}").as_bytes())?;
                    let mut f = std::fs::File::open(host).map_err(|source| TreeError::Read {
                        path: host.clone(),
                        source,
                    })?;
                    let mut content = crate::digest::HashingWriter::new(std::io::sink());
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = f.read(&mut buf).map_err(|source| TreeError::Read {
                            path: host.clone(),
                            source,
                        })?;
                        if n == 0 {
                            break;
                        }
                        content.write_all(&buf[..n]).map_err(BuildError::Layer)?;
                    }
                    let (_, d, _) = content.finish();
                    put(d.to_string().as_bytes())?;
                }
            }
        }
        let (_, digest, _) = h.finish();
        Ok(digest)
    }

    fn outcome(&self, reference: String, digest: Digest, cached: bool) -> BuildOutcome {
        BuildOutcome {
            reference,
            digest,
            cached,
            entries: self.tree.nodes().count(),
            sizes: self.sizes,
        }
    }
}

fn sizes_of(tree: &Tree, origin: &BTreeMap<PathBuf, Origin>) -> SizeBreakdown {
    let mut sizes = SizeBreakdown::default();
    for (path, node) in tree.nodes() {
        let len = match node {
            Node::File {
                source: Source::Bytes(b),
                ..
            } => b.len() as u64,
            Node::File {
                source: Source::Host(h),
                ..
            } => std::fs::metadata(h).map(|m| m.len()).unwrap_or(0),
            _ => continue,
        };
        match origin.get(path).copied().unwrap_or(Origin::Generated) {
            Origin::Binary => sizes.binaries += len,
            Origin::Library => sizes.libraries += len,
            Origin::File => sizes.files += len,
            Origin::Generated => sizes.generated += len,
        }
    }
    sizes
}

#[derive(Debug, Clone, Copy)]
enum Origin {
    Binary,
    Library,
    File,
    Generated,
}

/// The minimal FHS skeleton every appliance gets. Existing declared files win.
fn skeleton(
    tree: &mut Tree,
    manifest: &Manifest,
    origin: &mut BTreeMap<PathBuf, Origin>,
) -> Result<(), TreeError> {
    for dir in ["/proc", "/sys", "/dev", "/etc", "/run", "/var", "/usr/bin"] {
        tree.insert(Path::new(dir), Node::Dir { mode: 0o755 })?;
    }
    tree.insert(Path::new("/tmp"), Node::Dir { mode: 0o1777 })?;
    let user = manifest.run.user;
    let mut passwd = String::from("root:x:0:0:root:/:/nonexistent\n");
    let mut group = String::from("root:x:0:\n");
    if user.uid != 0 {
        passwd.push_str(&format!(
            "app:x:{}:{}:{}:/:/nonexistent\n",
            user.uid, user.gid, manifest.appliance.name
        ));
    }
    if user.gid != 0 {
        group.push_str(&format!("app:x:{}:\n", user.gid));
    }
    passwd.push_str("nobody:x:65534:65534:nobody:/:/nonexistent\n");
    group.push_str("nogroup:x:65534:\n");
    let files: [(&str, String); 5] = [
        ("/etc/passwd", passwd),
        ("/etc/group", group),
        (
            "/etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n".to_owned(),
        ),
        // Replaced at run time by the runtime's resolver configuration.
        ("/etc/resolv.conf", String::new()),
        (
            "/etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n".to_owned(),
        ),
    ];
    for (path, content) in files {
        let path = Path::new(path);
        if tree.get(path).is_none() {
            tree.insert(
                path,
                Node::File {
                    source: Source::Bytes(content.into_bytes()),
                    mode: 0o644,
                },
            )?;
            origin.insert(path.to_owned(), Origin::Generated);
        }
    }
    for v in &manifest.volumes {
        tree.insert(v.path.as_path(), Node::Dir { mode: 0o755 })?;
    }
    if let Some(w) = &manifest.run.workdir {
        tree.insert(w.as_path(), Node::Dir { mode: 0o755 })?;
    }
    Ok(())
}
