//! Where the resolver reads objects and loader configuration from.
//!
//! The build resolves against the host's own files ([`Host`]); the import
//! resolves against an image that is not unpacked anywhere, and whose links
//! must be followed inside the image, never on the host. The resolver only
//! asks these four questions, so both get the same loader rules.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A tree of files as the dynamic loader would see it, `/` being its root.
///
/// Paths are absolute loader paths (a DT_NEEDED name joined to a search
/// directory, a PT_INTERP); an implementation follows symlinks within its own
/// tree only. How much is read is bounded by the resolver, not here.
pub trait Files {
    /// Whether `path` leads to a regular file, through any symlinks.
    fn is_file(&self, path: &Path) -> bool;
    /// One name for the file `path` leads to, so that an object reached
    /// through two paths (a link and its target) is loaded once.
    fn identity(&self, path: &Path) -> PathBuf;
    /// Opens the regular file `path` leads to.
    fn open(&self, path: &Path) -> io::Result<Box<dyn Read + '_>>;
    /// The paths matching the shell pattern `pattern` (an `ld.so.conf`
    /// `include`), sorted.
    fn glob(&self, pattern: &str) -> Vec<PathBuf>;
}

impl<F: Files + ?Sized> Files for &F {
    fn is_file(&self, path: &Path) -> bool {
        (**self).is_file(path)
    }

    fn identity(&self, path: &Path) -> PathBuf {
        (**self).identity(path)
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn Read + '_>> {
        (**self).open(path)
    }

    fn glob(&self, pattern: &str) -> Vec<PathBuf> {
        (**self).glob(pattern)
    }
}

/// The host's filesystem, which `juice build` copies programs and libraries from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Files for Host {
    fn is_file(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file())
    }

    fn identity(&self, path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(std::fs::File::open(path)?))
    }

    fn glob(&self, pattern: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = glob::glob(pattern)
            .map(|g| g.flatten().collect())
            .unwrap_or_default();
        found.sort();
        found
    }
}
