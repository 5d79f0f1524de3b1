//! The default seccomp filter: everything is allowed except the syscalls that
//! reach the kernel's global state or other processes.
//!
//! | group | syscalls | result |
//! |---|---|---|
//! | mounts | mount, umount2, pivot_root, fsopen, fsconfig, fsmount, fspick, move_mount, open_tree, mount_setattr | EPERM |
//! | namespaces | unshare, setns, clone with any CLONE_NEW* flag | EPERM |
//! | clone3 | clone3 (its flags cannot be inspected) | ENOSYS, so libc falls back to clone |
//! | tracing | ptrace, process_vm_readv, process_vm_writev, kcmp, perf_event_open | EPERM |
//! | kernel code | init_module, finit_module, delete_module, kexec_load, kexec_file_load, bpf | EPERM |
//! | keys | keyctl, add_key, request_key | EPERM |
//! | clock | settimeofday, clock_settime, clock_adjtime, adjtimex | EPERM |
//! | host | reboot, swapon, swapoff, acct, quotactl, syslog, vhangup, iopl, ioperm, lookup_dcookie | EPERM |
//! | handles | open_by_handle_at, name_to_handle_at, userfaultfd | EPERM |
//!
//! Syscalls from another ABI (i386 on x86_64) kill the process: seccompiler's
//! architecture check. Most of these also need a capability that the
//! appliance does not have; the filter is the second wall.

use std::collections::BTreeMap;

use juice_init::SockFilter;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter: {0}")]
pub struct SeccompError(String);

/// The syscalls refused with EPERM.
pub const BLOCKED: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("userfaultfd", libc::SYS_userfaultfd),
];

const NAMESPACE_FLAGS: &[i32] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    TargetArch::x86_64
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: i32,
) -> Result<Vec<SockFilter>, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch(),
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))?;
    Ok(program
        .into_iter()
        .map(|f| SockFilter {
            code: f.code,
            jt: f.jt,
            jf: f.jf,
            k: f.k,
        })
        .collect())
}

/// The default filters, in the order init installs them.
pub fn default_filters() -> Result<Vec<Vec<SockFilter>>, SeccompError> {
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> =
        BLOCKED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag as u64),
                *flag as u64,
            )
            .map_err(|e| SeccompError(e.to_string()))?;
            SeccompRule::new(vec![cond]).map_err(|e| SeccompError(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    eperm.insert(libc::SYS_clone, clone_rules);
    let enosys: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    Ok(vec![
        compile(enosys, libc::ENOSYS)?,
        compile(eperm, libc::EPERM)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_filters_compile() {
        let filters = default_filters().unwrap();
        assert_eq!(filters.len(), 2);
        assert!(filters.iter().all(|f| !f.is_empty() && f.len() < 4096));
    }
}
