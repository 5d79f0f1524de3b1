//! The one shape in which every Juice crate reports a failed file operation:
//! what was being done, to which path, and the system's reason
//! ("cannot read /var/lib/juice/site.toml: No such file or directory").

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct PathError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathError {
    /// For `map_err`: `fs::read(&p).map_err(PathError::at("read", &p))`.
    pub fn at(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PathError + use<> {
        let path = path.to_owned();
        move |source| PathError {
            action,
            path,
            source,
        }
    }

    /// Whether the path was not there.
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_action_the_path_and_the_reason() {
        let e = PathError::at("read", Path::new("/x/site.toml"))(io::ErrorKind::NotFound.into());
        assert_eq!(e.to_string(), "cannot read /x/site.toml: entity not found");
        assert!(e.is_not_found());
    }
}
