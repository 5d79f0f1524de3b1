//! What an instance is to run and how it is confined, whichever backend runs
//! it: the spec, and the mapping from an appliance's manifest to one (with
//! its volumes).

use std::path::{Path, PathBuf};

use juice_image::appliance::ApplianceConfig;
pub use juice_init::Program;
use juice_net::NetworkSpec;
use serde::{Deserialize, Serialize};

use crate::limits::HostLimits;

/// The limits of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU share: 0.5 is half a core.
    pub cpus: Option<f64>,
    /// Bytes of memory, swap excluded (no swap is allowed).
    pub memory: Option<u64>,
    pub pids: Option<u32>,
}

/// A volume to mount read-write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// Root in the instance is `host_uid`/`host_gid` on the host, for `size` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_uid: u32,
    pub host_gid: u32,
    pub size: u32,
}

impl IdMap {
    /// 65536 ids from `host_id` (uid and gid), for a runtime running as root.
    pub fn range(host_id: u32) -> IdMap {
        IdMap {
            host_uid: host_id,
            host_gid: host_id,
            size: 65536,
        }
    }

    /// Rootless: the caller's own uid and gid, the only ids an unprivileged process may map.
    pub fn caller() -> IdMap {
        IdMap {
            host_uid: nix::unistd::geteuid().as_raw(),
            host_gid: nix::unistd::getegid().as_raw(),
            size: 1,
        }
    }

    /// Whether supplementary groups are disabled in the namespace (they must be for an
    /// unprivileged map).
    pub fn denies_setgroups(&self) -> bool {
        !nix::unistd::geteuid().is_root()
    }
}

/// What to run and how to confine it. A sandbox reads all of it; a microVM
/// reads what a guest can have (no user namespace, its own kernel for seccomp).
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Instance name; also the hostname.
    pub name: String,
    /// The unpacked image (see `juice_image::unpack::materialise`).
    pub rootfs: PathBuf,
    pub program: Program,
    pub limits: Limits,
    /// Create a cgroup even without limits (to count and kill the instance's processes).
    pub cgroup: bool,
    pub volumes: Vec<VolumeMount>,
    /// `None`: a network namespace with loopback only.
    pub network: Option<NetworkSpec>,
    /// Map root in the instance to an unprivileged host uid range.
    pub user_namespace: Option<IdMap>,
    pub seccomp: bool,
    /// Kill the instance if the process that started it dies (`juice run` in the foreground).
    pub die_with_parent: bool,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// A debug toolbox (unpacked) that a microVM carries as a disk from its boot,
    /// since its machine takes no disk later; a sandbox needs none.
    pub toolbox: Option<PathBuf>,
}

impl InstanceSpec {
    /// A spec with Juice's defaults: cgroup, seccomp, no network, 10 MiB x 3 logs.
    pub fn new(name: &str, rootfs: &Path, argv: Vec<String>) -> InstanceSpec {
        InstanceSpec {
            name: name.to_owned(),
            rootfs: rootfs.to_owned(),
            program: Program::new(argv),
            limits: Limits::default(),
            cgroup: true,
            volumes: Vec::new(),
            network: None,
            user_namespace: None,
            seccomp: true,
            die_with_parent: false,
            log_max_bytes: 10 << 20,
            log_keep: 3,
            toolbox: None,
        }
    }

    /// The instance an appliance's manifest asks for, within the host's limits.
    /// Volumes live under `volume_dir` (per group for the daemon, per instance
    /// for `juice run`).
    pub fn for_appliance(
        a: &ApplianceConfig,
        rootfs: &Path,
        name: &str,
        volume_dir: &Path,
        host: &HostLimits,
    ) -> InstanceSpec {
        let run = &a.manifest.run;
        let mut spec = InstanceSpec::new(name, rootfs, run.command.args().to_vec());
        let mut env: Vec<String> = run.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !run.env.keys().any(|k| k.as_str() == "PATH") {
            env.push("PATH=/usr/local/bin:/usr/bin:/bin".into());
        }
        env.push(format!("HOSTNAME={name}"));
        spec.program = Program {
            argv: spec.program.argv,
            env,
            uid: run.user.uid,
            gid: run.user.gid,
            workdir: run
                .workdir
                .as_ref()
                .map_or_else(|| PathBuf::from("/"), |w| w.as_path().to_owned()),
            capabilities: run.capabilities.iter().map(|c| c.to_string()).collect(),
        };
        let r = &a.manifest.resources;
        spec.limits = host.apply(Limits {
            cpus: r.cpus.map(|c| c.get()),
            memory: r.memory.map(|m| m.0),
            pids: r.pids,
        });
        spec.volumes = a
            .manifest
            .volumes
            .iter()
            .map(|v| VolumeMount {
                source: volume_dir.join(v.name.as_str()),
                target: v.path.as_path().to_owned(),
            })
            .collect();
        spec
    }

    /// Creates missing volume directories, owned by the appliance's user as the host
    /// sees it (`id_shift` under a user namespace; left alone when not running as root).
    pub fn prepare_volumes(&self, id_shift: u32) -> Result<(), VolumeError> {
        for v in &self.volumes {
            if v.source.exists() {
                continue;
            }
            std::fs::create_dir_all(&v.source).map_err(|source| VolumeError::Create {
                path: v.source.clone(),
                source,
            })?;
            if nix::unistd::geteuid().is_root() {
                let (uid, gid) = (self.program.uid + id_shift, self.program.gid + id_shift);
                std::os::unix::fs::chown(&v.source, Some(uid), Some(gid)).map_err(|source| {
                    VolumeError::Chown {
                        path: v.source.clone(),
                        uid,
                        gid,
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot create volume {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hand volume {path} to {uid}:{gid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
}
