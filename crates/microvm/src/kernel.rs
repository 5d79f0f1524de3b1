//! The guest kernel and the modules its initramfs must carry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::VmError;

/// The drivers a Juice guest needs: the virtio-mmio transport, disks, the
/// network, the serial ports for logs and status, and erofs for the root.
/// Their dependencies are added from `modules.dep`.
pub const NEEDED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "erofs",
];

/// A kernel image and where its modules are.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub version: String,
    /// `/lib/modules/<version>`; absent for a kernel with everything built in.
    pub modules: Option<PathBuf>,
}

impl Kernel {
    /// `JUICE_KERNEL` (and `JUICE_KERNEL_MODULES`) if set, else the newest
    /// `/boot/vmlinuz-*-cloud-amd64` (Debian's `linux-image-cloud-amd64`).
    pub fn find() -> Result<Kernel, VmError> {
        Kernel::find_in(Path::new("/boot"))
    }

    /// As [`Kernel::find`], looking in `boot` instead of `/boot`.
    pub fn find_in(boot: &Path) -> Result<Kernel, VmError> {
        let image = match std::env::var_os("JUICE_KERNEL") {
            Some(p) => PathBuf::from(p),
            None => newest_cloud_kernel(boot).ok_or(VmError::NoKernel)?,
        };
        if !image.is_file() {
            return Err(VmError::KernelMissing(image));
        }
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let version = name.strip_prefix("vmlinuz-").unwrap_or(&name).to_owned();
        let modules = match std::env::var_os("JUICE_KERNEL_MODULES") {
            Some(p) => Some(PathBuf::from(p)),
            None => Some(Path::new("/lib/modules").join(&version)),
        }
        .filter(|p| p.join("modules.dep").is_file());
        Ok(Kernel {
            image,
            version,
            modules,
        })
    }

    /// The modules a Juice guest loads ([`NEEDED_MODULES`]), dependencies first, as (name, file).
    pub fn module_closure(&self) -> Result<Vec<(String, PathBuf)>, VmError> {
        self.module_closure_of(NEEDED_MODULES)
    }

    /// `wanted` and their dependencies from `modules.dep`, dependencies first, as
    /// (name, file). A module built into the kernel is skipped; one that is neither a
    /// module nor built in is an error.
    pub fn module_closure_of(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, VmError> {
        let Some(dir) = &self.modules else {
            return Ok(Vec::new());
        };
        let dep_file = dir.join("modules.dep");
        let text = std::fs::read_to_string(&dep_file)
            .map_err(|e| VmError::Io(juice_image::PathError::at("read", &dep_file)(e)))?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let deps = parse_modules_dep(&text);
        let mut order = Vec::new();
        for m in wanted {
            if deps.contains_key(*m) {
                visit(m, &deps, &mut order, 0)?;
            } else if !builtin.lines().any(|l| module_name(l) == *m) {
                return Err(VmError::ModuleMissing {
                    module: (*m).to_owned(),
                    dep_file: dep_file.clone(),
                });
            }
        }
        Ok(order
            .into_iter()
            .map(|name| {
                let rel = &deps[&name].0;
                (name, dir.join(rel))
            })
            .collect())
    }
}

fn newest_cloud_kernel(boot: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(boot)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort_by_key(|p| version_key(p));
    found.pop()
}

/// Numbers in a file name, for ordering kernel versions (6.1.0-9 before 6.1.0-56).
fn version_key(p: &Path) -> Vec<u64> {
    p.to_string_lossy()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `kernel/fs/erofs/erofs.ko` -> `erofs`; dashes become underscores, as the kernel names them.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// name -> (path relative to the modules directory, direct and indirect dependencies).
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            let module = module.trim();
            Some((
                module_name(module),
                (
                    module.to_owned(),
                    deps.split_whitespace().map(module_name).collect(),
                ),
            ))
        })
        .collect()
}

fn visit(
    name: &str,
    deps: &BTreeMap<String, (String, Vec<String>)>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<(), VmError> {
    if order.iter().any(|o| o == name) {
        return Ok(());
    }
    if depth > 64 {
        return Err(VmError::Artefact(format!(
            "modules.dep has a dependency cycle through {name}"
        )));
    }
    if let Some((_, ds)) = deps.get(name) {
        for d in ds {
            visit(d, deps, order, depth + 1)?;
        }
    }
    if deps.contains_key(name) && !order.iter().any(|o| o == name) {
        order.push(name.to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/sound/unrelated.ko: kernel/drivers/virtio/virtio.ko
";

    #[test]
    fn the_closure_loads_dependencies_first_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), DEP).unwrap();
        let k = Kernel {
            image: "/dev/null".into(),
            version: "test".into(),
            modules: Some(dir.path().to_owned()),
        };
        let names: Vec<String> = k
            .module_closure()
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_console",
                "libcrc32c",
                "erofs"
            ]
        );
        for (i, n) in names.iter().enumerate() {
            let deps = &parse_modules_dep(DEP)[n].1;
            assert!(deps.iter().all(|d| names[..i].contains(d)), "{n}");
        }
    }

    #[test]
    fn a_missing_driver_is_named_unless_built_in() {
        let dir = tempfile::tempdir().unwrap();
        let dep: String = DEP
            .lines()
            .filter(|l| !l.contains("erofs"))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.path().join("modules.dep"), &dep).unwrap();
        let k = Kernel {
            image: "/dev/null".into(),
            version: "test".into(),
            modules: Some(dir.path().to_owned()),
        };
        let e = k.module_closure().unwrap_err().to_string();
        assert!(e.contains("erofs"), "{e}");
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/erofs/erofs.ko\n",
        )
        .unwrap();
        assert!(k.module_closure().is_ok());
    }

    #[test]
    fn newer_kernels_sort_last() {
        let mut v = [
            Path::new("/boot/vmlinuz-6.1.0-56-cloud-amd64"),
            Path::new("/boot/vmlinuz-6.1.0-9-cloud-amd64"),
        ];
        v.sort_by_key(|p| version_key(p));
        assert!(v[1].to_string_lossy().contains("-56-"));
    }
}
