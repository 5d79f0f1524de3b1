//! The sandbox an appliance asks for: the mapping from its manifest to a spec,
//! and its volumes.

use std::path::{Path, PathBuf};

use juice_image::appliance::ApplianceConfig;
use juice_sandbox::cgroup::Limits;
use juice_sandbox::{SandboxSpec, VolumeMount};

/// The sandbox an appliance's manifest asks for. Volumes live under `volume_dir`
/// (per group for the daemon, per instance for `juice run`).
pub fn sandbox_spec(
    a: &ApplianceConfig,
    rootfs: &Path,
    name: &str,
    volume_dir: &Path,
    host: &crate::limits::HostLimits,
) -> Result<SandboxSpec, String> {
    let run = &a.manifest.run;
    let mut spec = SandboxSpec::new(name, rootfs, run.command.args().to_vec());
    let mut env: Vec<String> = run.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !run.env.keys().any(|k| k.as_str() == "PATH") {
        env.push("PATH=/usr/local/bin:/usr/bin:/bin".into());
    }
    env.push(format!("HOSTNAME={name}"));
    spec.env = env;
    spec.uid = run.user.uid;
    spec.gid = run.user.gid;
    spec.workdir = run
        .workdir
        .as_ref()
        .map_or_else(|| PathBuf::from("/"), |w| w.as_path().to_owned());
    spec.capabilities = run.capabilities.iter().map(|c| c.to_string()).collect();
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
    Ok(spec)
}

/// Creates missing volume directories, owned by the appliance's user as the host sees
/// it (`id_shift` under a user namespace; left alone when not running as root).
pub fn prepare_volumes(spec: &SandboxSpec, id_shift: u32) -> Result<(), String> {
    for v in &spec.volumes {
        if v.source.exists() {
            continue;
        }
        std::fs::create_dir_all(&v.source)
            .map_err(|e| format!("cannot create volume {}: {e}", v.source.display()))?;
        if nix::unistd::geteuid().is_root() {
            let (uid, gid) = (spec.uid + id_shift, spec.gid + id_shift);
            std::os::unix::fs::chown(&v.source, Some(uid), Some(gid)).map_err(|e| {
                format!(
                    "cannot hand volume {} to {uid}:{gid}: {e}",
                    v.source.display()
                )
            })?;
        }
    }
    Ok(())
}
