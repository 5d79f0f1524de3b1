//! Juice's microVM backend: the same appliance image, booted as a virtual
//! appliance with its own kernel under QEMU's `microvm` machine.
//!
//! - [`kernel`]: the guest kernel (Debian's `linux-image-cloud-amd64` by
//!   default) and the exact module closure the guest needs, read from
//!   `modules.dep`.
//! - [`artefacts`]: the initramfs (`juice-guest` plus those modules) and the
//!   image's root as an erofs disk, each made once, recorded by digest and
//!   verified before every boot.
//! - [`vm`]: the VMM driver. QEMU is started detached with a QMP socket, so a
//!   restarted daemon re-adopts running VMs; a tap on the Juice bridge gives
//!   the guest the same network (and the same default-deny rules) as a
//!   sandbox; volumes are ext4 data disks.
//!
//! The driver is written for Juice because it is the glue between Juice's
//! image store, network and agent; QEMU, erofs-utils and e2fsprogs do the
//! commodity work, and cpio/serde_json/sha2 come from crates.

pub mod artefacts;
pub mod kernel;
pub mod qmp;
pub mod vm;

use std::path::PathBuf;

pub use vm::{Accel, Runtime, Vm, VmState};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error("{0}")]
    Syscall(String),
    #[error(transparent)]
    Network(#[from] juice_net::NetworkError),
    #[error(transparent)]
    Record(#[from] juice_runtime::process::record::RecordError),
    #[error(
        "no guest kernel: install linux-image-cloud-amd64 (apt-get install linux-image-cloud-amd64) or set JUICE_KERNEL"
    )]
    NoKernel,
    #[error("the guest kernel {0} does not exist (JUICE_KERNEL)")]
    KernelMissing(PathBuf),
    #[error("the guest kernel needs module {module}, which is neither in {dep_file} nor built in")]
    ModuleMissing { module: String, dep_file: PathBuf },
    #[error("cannot find juice-guest (looked at {0}); build the workspace or set JUICE_GUEST")]
    NoGuestInit(PathBuf),
    #[error("cannot find qemu-system-x86_64: apt-get install qemu-system-x86, or set JUICE_QEMU")]
    NoQemu,
    #[error("{0}")]
    Tool(String),
    #[error("{0}")]
    Artefact(String),
    #[error(
        "{path} does not match its recorded digest (sha256:{expected}, now sha256:{actual}); refusing to boot from it. Remove it to have it made again"
    )]
    Corrupt {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("microVM {name:?} could not start: {reason}")]
    Start { name: String, reason: String },
    #[error("microVM {0:?} already exists and is running")]
    Exists(String),
    #[error("no microVM {0:?}")]
    NotFound(String),
    #[error("{0:?} is not a valid instance name (lowercase letters, digits and '-', at most 48)")]
    BadName(String),
    #[error("cannot debug microVM {name:?}: {reason}")]
    Debug { name: String, reason: String },
    #[error("the state of microVM {name:?} is damaged: {reason}")]
    Damaged { name: String, reason: String },
}

impl From<VmError> for juice_runtime::BackendError {
    fn from(e: VmError) -> juice_runtime::BackendError {
        use juice_runtime::BackendError;
        match e {
            VmError::BadName(n) => BackendError::BadName(n),
            VmError::Exists(n) => BackendError::Exists(n),
            VmError::NotFound(n) => BackendError::NotFound(n),
            e @ VmError::Debug { .. } => BackendError::Refused(Box::new(e)),
            e @ (VmError::NoKernel
            | VmError::KernelMissing(_)
            | VmError::NoGuestInit(_)
            | VmError::NoQemu) => BackendError::Unavailable(Box::new(e)),
            e => BackendError::Failed(Box::new(e)),
        }
    }
}
