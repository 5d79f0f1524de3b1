//! The host's limits: defaults for appliances that declare none, and ceilings
//! that no appliance passes, from `$JUICE_HOME/limits.toml`.
//!
//! ```toml
//! [default]          # for an image without [resources] (or without one of them)
//! cpus = 1.0
//! memory = "512MiB"
//! pids = 256
//!
//! [max]              # what any image gets at most
//! cpus = 2.0
//! memory = "4GiB"
//! pids = 4096
//! ```
//!
//! An instance gets, for each resource, the smaller of the image's value (or
//! the host default) and the host ceiling: an image never runs unbounded
//! because its author left `[resources]` out. Without the file, the defaults
//! below apply. Both `juice daemon` and `juice run` read it.

use std::path::{Path, PathBuf};

use crate::spec::Limits;
use juice_image::manifest::{Size, parse_toml};
use serde::Deserialize;

/// Applied when neither the image nor `limits.toml` says otherwise.
pub const DEFAULT_CPUS: f64 = 1.0;
pub const DEFAULT_MEMORY: u64 = 512 << 20;
pub const DEFAULT_PIDS: u32 = 256;
pub const MAX_PIDS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] juice_image::manifest::ManifestError),
    #[error("{path}: {field} must be positive")]
    NotPositive { path: PathBuf, field: &'static str },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    default: Section,
    #[serde(default)]
    max: Section,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    cpus: Option<f64>,
    memory: Option<Size>,
    pids: Option<u32>,
}

/// The host's defaults and ceilings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLimits {
    pub default: Limits,
    pub max: Limits,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            default: Limits {
                cpus: Some(DEFAULT_CPUS),
                memory: Some(DEFAULT_MEMORY),
                pids: Some(DEFAULT_PIDS),
            },
            max: Limits {
                cpus: None,
                memory: None,
                pids: Some(MAX_PIDS),
            },
        }
    }
}

pub fn limits_path(home: &Path) -> PathBuf {
    home.join("limits.toml")
}

impl HostLimits {
    /// The limits of the host at `home` (built-in defaults without a file).
    pub fn load(home: &Path) -> Result<HostLimits, LimitsError> {
        let path = limits_path(home);
        match std::fs::read_to_string(&path) {
            Ok(text) => HostLimits::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostLimits::default()),
            Err(source) => Err(LimitsError::Read { path, source }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<HostLimits, LimitsError> {
        let file: LimitsFile = parse_toml(text, path)?;
        let builtin = HostLimits::default();
        let section = |s: &Section, base: Limits, name: &'static [&'static str; 3]| {
            let positive = |ok: bool, field: &'static str| {
                if ok {
                    Ok(())
                } else {
                    Err(LimitsError::NotPositive {
                        path: path.to_owned(),
                        field,
                    })
                }
            };
            positive(s.cpus.is_none_or(|c| c > 0.0 && c.is_finite()), name[0])?;
            positive(s.memory.is_none_or(|m| m.0 > 0), name[1])?;
            positive(s.pids.is_none_or(|p| p > 0), name[2])?;
            Ok::<_, LimitsError>(Limits {
                cpus: s.cpus.or(base.cpus),
                memory: s.memory.map(|m| m.0).or(base.memory),
                pids: s.pids.or(base.pids),
            })
        };
        Ok(HostLimits {
            default: section(
                &file.default,
                builtin.default,
                &["default.cpus", "default.memory", "default.pids"],
            )?,
            max: section(
                &file.max,
                builtin.max,
                &["max.cpus", "max.memory", "max.pids"],
            )?,
        })
    }

    /// What an instance of an image asking for `image` gets on this host.
    pub fn apply(&self, image: Limits) -> Limits {
        fn pick<T: PartialOrd + Copy>(
            image: Option<T>,
            default: Option<T>,
            max: Option<T>,
        ) -> Option<T> {
            match (image.or(default), max) {
                (Some(v), Some(m)) if v > m => Some(m),
                (None, m) => m,
                (v, _) => v,
            }
        }
        Limits {
            cpus: pick(image.cpus, self.default.cpus, self.max.cpus),
            memory: pick(image.memory, self.default.memory, self.max.memory),
            pids: pick(image.pids, self.default.pids, self.max.pids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_without_resources_gets_the_host_defaults_and_none_passes_the_ceiling() {
        let host = HostLimits::default();
        let none = host.apply(Limits::default());
        assert_eq!(none.pids, Some(DEFAULT_PIDS));
        assert_eq!(none.memory, Some(DEFAULT_MEMORY));
        assert_eq!(none.cpus, Some(DEFAULT_CPUS));
        let greedy = host.apply(Limits {
            cpus: Some(8.0),
            memory: Some(1 << 40),
            pids: Some(1_000_000),
        });
        assert_eq!(greedy.pids, Some(MAX_PIDS));
        assert_eq!(
            greedy.memory,
            Some(1 << 40),
            "no memory ceiling unless the host sets one"
        );

        let path = Path::new("/var/lib/juice/limits.toml");
        let strict = HostLimits::parse("[max]\nmemory = \"64MiB\"\ncpus = 0.5\n", path).unwrap();
        let l = strict.apply(Limits {
            cpus: Some(2.0),
            memory: Some(1 << 30),
            pids: Some(10),
        });
        assert_eq!(
            (l.cpus, l.memory, l.pids),
            (Some(0.5), Some(64 << 20), Some(10))
        );
        // A default above the ceiling is held to it too.
        assert_eq!(strict.apply(Limits::default()).memory, Some(64 << 20));
    }

    #[test]
    fn mistakes_name_the_file_and_field() {
        let path = Path::new("/var/lib/juice/limits.toml");
        let e = HostLimits::parse("[default]\npid = 3\n", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.toml:2") && e.contains("pid"), "{e}");
        let e = HostLimits::parse("[max]\npids = 0\n", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max.pids"), "{e}");
    }
}
