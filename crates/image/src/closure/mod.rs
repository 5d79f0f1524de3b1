//! The shared-library closure of ELF programs, read from their headers.
//!
//! This mirrors what glibc's `ld.so` does at load time (DT_RPATH, inherited by
//! the objects an object loads unless they have DT_RUNPATH; DT_RUNPATH;
//! `$ORIGIN`; `ld.so.conf`; the default directories; skipping objects of the
//! wrong class or machine) without running anything: `ldd` executes the
//! program's interpreter, which is unsafe on untrusted binaries and wrong when
//! cross-building. Parsing is `goblin`'s; the search order is Juice's own.
//!
//! One resolver serves `juice build`, which reads the host ([`Host`]), and
//! `juice import`, which reads the image it imports (its own [`Files`]), so
//! both find the same libraries for the same objects.
//!
//! ```no_run
//! use juice_image::closure::Resolver;
//! # fn main() -> Result<(), juice_image::closure::ClosureError> {
//! let closure = Resolver::system().closure(&["/usr/bin/curl".into()])?;
//! for library in closure.libraries() {
//!     println!("{}", library.display());
//! }
//! # Ok(()) }
//! ```

mod files;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

pub use files::{Files, Host};

/// Objects bigger than this are refused, not read into memory.
pub const MAX_OBJECT_BYTES: u64 = 2 << 30;

/// A loader configuration file bigger than this is ignored.
const MAX_CONF_BYTES: u64 = 1 << 20;

/// Why a closure could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {limit} bytes, more than Juice reads as an ELF object")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error(
        "{path} is not an ELF file (only ELF programs and libraries can be declared as binaries or libraries; put scripts and data in `files`)"
    )]
    NotElf { path: PathBuf },
    #[error("{path} is a damaged ELF file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{library} (needed by {needed_by}) was not found; searched {}", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Missing {
        library: String,
        needed_by: PathBuf,
        searched: Vec<PathBuf>,
    },
}

/// The facts about one ELF object that loading depends on.
#[derive(Debug, Clone)]
pub struct ElfObject {
    pub is_64: bool,
    pub machine: u16,
    pub interpreter: Option<PathBuf>,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
}

impl ElfObject {
    /// Reads and parses `path` from `files`.
    pub fn read(files: &impl Files, path: &Path) -> Result<ElfObject, ClosureError> {
        let bytes = read_at_most(files, path, MAX_OBJECT_BYTES)?;
        ElfObject::parse(&bytes, path)
    }

    pub fn parse(bytes: &[u8], path: &Path) -> Result<ElfObject, ClosureError> {
        if !bytes.starts_with(b"\x7fELF") {
            return Err(ClosureError::NotElf {
                path: path.to_owned(),
            });
        }
        let elf = Elf::parse(bytes).map_err(|e| ClosureError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let split = |list: &[&str]| -> Vec<String> {
            list.iter()
                .flat_map(|s| s.split(':'))
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Ok(ElfObject {
            is_64: elf.is_64,
            machine: elf.header.e_machine,
            interpreter: elf.interpreter.map(PathBuf::from),
            needed: elf.libraries.iter().map(|s| (*s).to_owned()).collect(),
            rpath: split(&elf.rpaths),
            runpath: split(&elf.runpaths),
        })
    }

    fn compatible(&self, other: &ElfObject) -> bool {
        self.is_64 == other.is_64 && self.machine == other.machine
    }
}

/// Whether `path` in `files` starts as an ELF object does (scripts and data do not).
pub fn is_elf(files: &impl Files, path: &Path) -> bool {
    let mut magic = [0u8; 4];
    files
        .open(path)
        .and_then(|mut r| r.read_exact(&mut magic))
        .is_ok()
        && &magic == b"\x7fELF"
}

/// The contents of `path`, refused when longer than `limit`: the files may be an untrusted image's.
fn read_at_most(files: &impl Files, path: &Path, limit: u64) -> Result<Vec<u8>, ClosureError> {
    let read_error = |source| ClosureError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    files
        .open(path)
        .map_err(read_error)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if u64::try_from(bytes.len()).map_or(true, |n| n > limit) {
        return Err(ClosureError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// The result: every object reached, and what each one needs, by path.
#[derive(Debug, Default, Clone)]
pub struct Closure {
    /// Object path (as found) -> the paths its DT_NEEDED entries resolved to, in order.
    pub needs: BTreeMap<PathBuf, Vec<PathBuf>>,
    /// The program interpreters (`ld.so`) the roots ask for.
    pub interpreters: BTreeSet<PathBuf>,
}

impl Closure {
    /// Every library and interpreter path, not counting the roots.
    pub fn libraries(&self) -> BTreeSet<PathBuf> {
        let mut all: BTreeSet<PathBuf> = self.needs.values().flatten().cloned().collect();
        all.extend(self.interpreters.iter().cloned());
        all
    }
}

/// Finds libraries in `files` the way the dynamic loader would.
#[derive(Debug, Clone)]
pub struct Resolver<F> {
    files: F,
    /// `ld.so.conf` directories, then the built-in default directories.
    system_dirs: Vec<PathBuf>,
}

pub const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

impl Resolver<Host> {
    /// The host's loader, configured by the host's `/etc/ld.so.conf`.
    pub fn system() -> Resolver<Host> {
        Resolver::new(Host)
    }
}

impl<F: Files> Resolver<F> {
    /// The loader of `files`, configured by their `/etc/ld.so.conf` (with its includes) and the defaults.
    pub fn new(files: F) -> Resolver<F> {
        let mut dirs = Vec::new();
        read_ld_so_conf(&files, Path::new("/etc/ld.so.conf"), &mut dirs, 0);
        Resolver::with_dirs(files, dirs)
    }

    /// A loader of `files` that searches `dirs`, then the defaults.
    pub fn with_dirs(files: F, dirs: Vec<PathBuf>) -> Resolver<F> {
        let mut system_dirs = Vec::new();
        for d in dirs
            .into_iter()
            .chain(DEFAULT_DIRS.iter().map(PathBuf::from))
        {
            if !system_dirs.contains(&d) {
                system_dirs.push(d);
            }
        }
        Resolver { files, system_dirs }
    }

    /// Resolves the closure of `roots` (programs or `dlopen`ed libraries).
    pub fn closure(&self, roots: &[PathBuf]) -> Result<Closure, ClosureError> {
        let mut closure = Closure::default();
        // Each queued object carries the DT_RPATH list it inherits from the objects that loaded it.
        let mut queue: VecDeque<(PathBuf, ElfObject, Vec<PathBuf>)> = VecDeque::new();
        let mut seen = BTreeSet::new();
        for root in roots {
            let obj = ElfObject::read(&self.files, root)?;
            if let Some(interp) = &obj.interpreter {
                if !self.files.is_file(interp) {
                    return Err(ClosureError::Missing {
                        library: interp.display().to_string(),
                        needed_by: root.clone(),
                        searched: vec![interp.clone()],
                    });
                }
                closure.interpreters.insert(interp.clone());
            }
            if seen.insert(self.files.identity(root)) {
                queue.push_back((root.clone(), obj, Vec::new()));
            }
        }
        while let Some((path, obj, inherited)) = queue.pop_front() {
            let origin = path.parent().unwrap_or(Path::new("/")).to_owned();
            let expand = |list: &[String]| -> Vec<PathBuf> {
                list.iter()
                    .map(|d| expand_origin(d, &origin, obj.is_64))
                    .collect()
            };
            // glibc: DT_RPATH (own, then the loaders') only when there is no DT_RUNPATH.
            let mut rpath_chain = Vec::new();
            if obj.runpath.is_empty() {
                rpath_chain.extend(expand(&obj.rpath));
                rpath_chain.extend(inherited);
            }
            let mut search = rpath_chain.clone();
            search.extend(expand(&obj.runpath));
            search.extend(self.system_dirs.iter().cloned());

            let mut resolved = Vec::new();
            for name in &obj.needed {
                let (lib_path, lib) =
                    self.find(name, &obj, &search)
                        .ok_or_else(|| ClosureError::Missing {
                            library: name.clone(),
                            needed_by: path.clone(),
                            searched: search.clone(),
                        })??;
                if seen.insert(self.files.identity(&lib_path)) {
                    // Expanded already: `$ORIGIN` in a passed-on DT_RPATH is the loader's origin.
                    queue.push_back((lib_path.clone(), lib, rpath_chain.clone()));
                }
                resolved.push(lib_path);
            }
            closure.needs.insert(path, resolved);
        }
        Ok(closure)
    }

    /// The first compatible object called `name` along `search`.
    #[allow(clippy::type_complexity)]
    fn find(
        &self,
        name: &str,
        wanted_by: &ElfObject,
        search: &[PathBuf],
    ) -> Option<Result<(PathBuf, ElfObject), ClosureError>> {
        let candidates: Vec<PathBuf> = if name.contains('/') {
            vec![PathBuf::from(name)]
        } else {
            search.iter().map(|d| d.join(name)).collect()
        };
        for candidate in candidates {
            if !self.files.is_file(&candidate) {
                continue;
            }
            match ElfObject::read(&self.files, &candidate) {
                Ok(obj) if obj.compatible(wanted_by) => return Some(Ok((candidate, obj))),
                // The loader skips objects of the wrong class or machine, and so do we.
                Ok(_) | Err(ClosureError::NotElf { .. }) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

/// Expands `$ORIGIN`, `$LIB` and `$PLATFORM` (with or without braces).
pub fn expand_origin(dir: &str, origin: &Path, is_64: bool) -> PathBuf {
    let origin = origin.display().to_string();
    let lib = if is_64 { "lib64" } else { "lib" };
    let out = dir
        .replace("${ORIGIN}", &origin)
        .replace("$ORIGIN", &origin)
        .replace("${LIB}", lib)
        .replace("$LIB", lib)
        .replace("${PLATFORM}", std::env::consts::ARCH)
        .replace("$PLATFORM", std::env::consts::ARCH);
    PathBuf::from(out)
}

/// Reads an `ld.so.conf` in `files`, following `include` globs (depth-limited against include cycles).
fn read_ld_so_conf(files: &impl Files, path: &Path, dirs: &mut Vec<PathBuf>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(bytes) = read_at_most(files, path, MAX_CONF_BYTES) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(pattern) = line.strip_prefix("include").map(str::trim) {
            let pattern = if pattern.starts_with('/') {
                pattern.to_owned()
            } else {
                path.parent()
                    .unwrap_or(Path::new("/"))
                    .join(pattern)
                    .display()
                    .to_string()
            };
            for inc in files.glob(&pattern) {
                read_ld_so_conf(files, &inc, dirs, depth + 1);
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{InheritedRpath, cc};
    use super::*;

    #[test]
    fn resolves_rpath_runpath_origin_and_chains() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("lib")).unwrap();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        cc(
            &d.join("lib"),
            "int leaf(void){return 1;}",
            "libleaf.so",
            &["-shared", "-fPIC"],
        );
        let mid = cc(
            &d.join("lib"),
            "int leaf(void); int mid(void){return leaf();}",
            "libmid.so",
            &[
                "-shared",
                "-fPIC",
                "-L",
                d.join("lib").to_str().unwrap(),
                "-lleaf",
                "-Wl,--enable-new-dtags,-rpath,$ORIGIN",
            ],
        );
        let prog = cc(
            &d.join("bin"),
            "int mid(void); int main(void){return mid();}",
            "prog",
            &[
                "-L",
                d.join("lib").to_str().unwrap(),
                "-lmid",
                "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib",
            ],
        );
        let closure = Resolver::system()
            .closure(std::slice::from_ref(&prog))
            .unwrap();
        let libs = closure.libraries();
        let mid_found = d.join("bin/../lib/libmid.so");
        assert!(libs.contains(&mid_found), "{libs:?}");
        assert!(libs.contains(&d.join("bin/../lib/libleaf.so")), "{libs:?}");
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
        assert_eq!(closure.interpreters.len(), 1);
        assert!(closure.needs[&prog].contains(&mid_found));
        assert_eq!(Host.identity(&mid_found), Host.identity(&mid));
    }

    #[test]
    fn a_missing_library_names_who_needed_it() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        cc(
            d,
            "int gone(void){return 1;}",
            "libgone.so",
            &["-shared", "-fPIC"],
        );
        let prog = cc(
            d,
            "int gone(void); int main(void){return gone();}",
            "prog",
            &["-L", d.to_str().unwrap(), "-lgone"],
        );
        std::fs::remove_file(d.join("libgone.so")).unwrap();
        let err = Resolver::system()
            .closure(std::slice::from_ref(&prog))
            .unwrap_err()
            .to_string();
        assert!(err.contains("libgone.so (needed by"), "{err}");
        assert!(err.contains("prog"), "{err}");
    }

    #[test]
    fn non_elf_and_damaged_elf_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let err = Resolver::system().closure(&[script]).unwrap_err();
        assert!(matches!(err, ClosureError::NotElf { .. }), "{err}");
        let broken = t.path().join("broken");
        std::fs::write(&broken, b"\x7fELF\x02\x01\x01garbage").unwrap();
        let err = Resolver::system().closure(&[broken]).unwrap_err();
        assert!(matches!(err, ClosureError::Malformed { .. }), "{err}");
    }

    #[test]
    fn libraries_that_need_each_other_terminate() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let l = d.to_str().unwrap();
        // liba needs libb and libb needs liba: build b without a first, then a, then b again.
        cc(
            d,
            "int b(void){return 2;}",
            "libb.so",
            &["-shared", "-fPIC"],
        );
        cc(
            d,
            "int b(void); int a(void){return b();}",
            "liba.so",
            &["-shared", "-fPIC", "-L", l, "-lb", "-Wl,-rpath,$ORIGIN"],
        );
        cc(
            d,
            "int a(void); int b(void){return 2;}",
            "libb.so",
            &["-shared", "-fPIC", "-L", l, "-la", "-Wl,-rpath,$ORIGIN"],
        );
        let prog = cc(
            d,
            "int a(void); int main(void){return a();}",
            "prog",
            &["-L", l, "-la", "-Wl,-rpath,$ORIGIN"],
        );
        let closure = Resolver::system().closure(&[prog]).unwrap();
        assert!(closure.libraries().contains(&d.join("libb.so")));
    }

    #[test]
    fn ld_so_conf_includes_are_followed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        std::fs::write(
            d.join("ld.so.conf"),
            "include conf.d/*.conf\n/opt/one # comment\n",
        )
        .unwrap();
        std::fs::write(d.join("conf.d/a.conf"), "/opt/two\ninclude ../ld.so.conf\n").unwrap();
        let mut dirs = Vec::new();
        read_ld_so_conf(&Host, &d.join("ld.so.conf"), &mut dirs, 0);
        assert_eq!(dirs.first(), Some(&PathBuf::from("/opt/two")));
        assert!(dirs.contains(&PathBuf::from("/opt/one")));
    }

    #[test]
    fn a_dt_rpath_is_inherited_by_the_libraries_it_loads() {
        let t = tempfile::tempdir().unwrap();
        let chain = InheritedRpath::build(t.path());
        let prog = ElfObject::read(&Host, &chain.program).unwrap();
        assert!(
            !prog.rpath.is_empty() && prog.runpath.is_empty(),
            "{prog:?}"
        );
        let closure = Resolver::system()
            .closure(std::slice::from_ref(&chain.program))
            .unwrap();
        let (liba, needs) = closure
            .needs
            .iter()
            .find(|(p, _)| p.ends_with("liba.so"))
            .expect("liba is in the closure");
        assert_eq!(Host.identity(liba), Host.identity(&chain.liba));
        assert!(
            needs
                .iter()
                .any(|l| Host.identity(l) == Host.identity(&chain.libb)),
            "{closure:?}"
        );
    }

    #[test]
    fn a_dt_runpath_is_not_inherited() {
        let t = tempfile::tempdir().unwrap();
        let chain = InheritedRpath::build(t.path());
        let x = t.path().join("x");
        let link = format!("-Wl,-rpath-link,{}", x.display());
        let prog = cc(
            &t.path().join("bin"),
            "int a(void); int main(void){return a();}",
            "prog",
            &[
                "-L",
                x.to_str().unwrap(),
                "-la",
                &link,
                "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../x",
            ],
        );
        let err = Resolver::system().closure(&[prog]).unwrap_err();
        match err {
            ClosureError::Missing {
                library, needed_by, ..
            } => {
                assert_eq!(library, "libb.so");
                assert_eq!(Host.identity(&needed_by), Host.identity(&chain.liba));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn an_object_past_the_limit_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let big = t.path().join("big");
        std::fs::write(&big, [0u8; 64]).unwrap();
        assert!(read_at_most(&Host, &big, 64).is_ok());
        let err = read_at_most(&Host, &big, 63).unwrap_err();
        assert!(
            matches!(err, ClosureError::TooLarge { limit: 63, .. }),
            "{err}"
        );
    }
}
