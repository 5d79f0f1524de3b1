//! The default seccomp filters: an allow-list. A syscall the appliance may
//! make is listed in [`ALLOWED`]; a known syscall it must not make is listed
//! in [`REFUSED`]; anything else (obsolete calls, calls newer than this list)
//! gets `ENOSYS`, as if the kernel did not have it, so libc falls back to an
//! older call where it has one (glibc's clone3 to clone).
//!
//! | group | syscalls | result |
//! |---|---|---|
//! | other ABIs | the x32 ABI (`nr` with bit 30 set, except `-1`) and i386 (`int 0x80`) on x86_64; any architecture but the native one | the process is killed (SIGSYS) |
//! | mounts | mount, umount2, pivot_root, fsopen, fsconfig, fsmount, fspick, move_mount, open_tree, open_tree_attr, mount_setattr | EPERM |
//! | namespaces | unshare, setns, clone with any CLONE_NEW* flag | EPERM |
//! | other processes | ptrace, process_vm_readv, process_vm_writev, kcmp, pidfd_getfd, process_madvise, perf_event_open | EPERM |
//! | kernel code | init_module, finit_module, delete_module, kexec_load, kexec_file_load, bpf | EPERM |
//! | io_uring | io_uring_setup, io_uring_enter, io_uring_register (the operations it runs are not seen by seccomp) | EPERM |
//! | keys | keyctl, add_key, request_key | EPERM |
//! | clock | settimeofday, clock_settime, clock_adjtime, adjtimex | EPERM |
//! | host | reboot, swapon, swapoff, acct, quotactl, quotactl_fd, syslog, vhangup, lookup_dcookie, sethostname, setdomainname, fanotify_init | EPERM |
//! | memory policy | mbind, set_mempolicy, get_mempolicy, set_mempolicy_home_node, migrate_pages, move_pages | EPERM |
//! | handles | open_by_handle_at, name_to_handle_at, userfaultfd | EPERM |
//! | x86 | iopl, ioperm, modify_ldt | EPERM |
//! | personality | personality with anything but `0`, `PER_LINUX32` (`8`), `UNAME26` (`0x20000`), `UNAME26 \| PER_LINUX32` and the query `0xffffffff` (docker's list) | EPERM |
//! | socket families | socket, socketpair with a family other than AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK; AF_NETLINK with a protocol other than NETLINK_ROUTE (what getifaddrs and getaddrinfo use) | EAFNOSUPPORT |
//! | not listed | clone3 (its flags cannot be inspected), obsolete calls (uselib, ustat, sysfs, _sysctl, nfsservctl...), calls this list does not know yet (statmount, listmount, lsm_*...) | ENOSYS |
//!
//! [`ALLOWED`] follows docker's default profile, less io_uring, ptrace,
//! process_vm_*, name_to_handle_at, adjtimex, clock_adjtime and modify_ldt,
//! plus chroot (the kernel still wants CAP_SYS_CHROOT for it) and calls newer
//! than that profile (fchmodat2, futex_wake/wait/requeue, cachestat,
//! map_shadow_stack, mseal, *xattrat). Most refused calls also need a
//! capability the appliance does not have; the filter is the second wall,
//! and the first for the calls that need none (io_uring, pidfd_getfd,
//! personality, AF_VSOCK and AF_ALG sockets, the x32 ABI).
//!
//! The filters, in the order they are installed (the kernel runs them all and
//! keeps the strictest answer): [`abi_filter`], then the allow-list (listed:
//! allow, else ENOSYS), the refusals (EPERM) and the socket families
//! (EAFNOSUPPORT), compiled by seccompiler. seccompiler checks the
//! architecture but cannot test bits of the syscall number, hence the
//! hand-written first filter.

use std::collections::BTreeMap;

use juice_init::SockFilter;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter: {0}")]
pub struct SeccompError(String);

/// Syscall numbers the `libc` crate does not have yet. Since 424 every
/// architecture uses the same numbers, so these hold on x86_64 and aarch64.
mod nr {
    pub const CACHESTAT: i64 = 451;
    pub const FCHMODAT2: i64 = 452;
    pub const MAP_SHADOW_STACK: i64 = 453;
    pub const FUTEX_WAKE: i64 = 454;
    pub const FUTEX_WAIT: i64 = 455;
    pub const FUTEX_REQUEUE: i64 = 456;
    pub const SETXATTRAT: i64 = 463;
    pub const GETXATTRAT: i64 = 464;
    pub const LISTXATTRAT: i64 = 465;
    pub const REMOVEXATTRAT: i64 = 466;
    pub const OPEN_TREE_ATTR: i64 = 467;
}

/// `("name", libc::SYS_name)` for each name.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name)),*]
    };
}

/// The syscalls an appliance may make, on every architecture (`SYS_` names).
/// `clone`, `personality`, `socket` and `socketpair` are further restricted by
/// their arguments.
pub const ALLOWED: &[(&str, i64)] = syscalls! {
    // Files and descriptors.
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64, SYS_preadv,
    SYS_pwritev, SYS_preadv2, SYS_pwritev2, SYS_openat, SYS_openat2, SYS_close,
    SYS_close_range, SYS_lseek, SYS_fstat, SYS_newfstatat, SYS_statx, SYS_statfs,
    SYS_fstatfs, SYS_faccessat, SYS_faccessat2, SYS_fchmod, SYS_fchmodat,
    SYS_fchown, SYS_fchownat, SYS_truncate, SYS_ftruncate, SYS_fallocate, SYS_fsync,
    SYS_fdatasync, SYS_sync, SYS_syncfs, SYS_sync_file_range, SYS_readahead, SYS_fadvise64,
    SYS_flock, SYS_fcntl, SYS_ioctl, SYS_getdents64, SYS_getcwd, SYS_chdir, SYS_fchdir,
    SYS_chroot, SYS_mkdirat, SYS_mknodat, SYS_unlinkat, SYS_renameat, SYS_renameat2,
    SYS_linkat, SYS_symlinkat, SYS_readlinkat, SYS_utimensat, SYS_umask, SYS_dup, SYS_dup3,
    SYS_pipe2, SYS_copy_file_range, SYS_splice, SYS_tee, SYS_vmsplice, SYS_sendfile,
    // Extended attributes.
    SYS_getxattr, SYS_lgetxattr, SYS_fgetxattr, SYS_setxattr, SYS_lsetxattr, SYS_fsetxattr,
    SYS_listxattr, SYS_llistxattr, SYS_flistxattr, SYS_removexattr, SYS_lremovexattr,
    SYS_fremovexattr,
    // Waiting for events.
    SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_ppoll,
    SYS_pselect6, SYS_eventfd2, SYS_signalfd4, SYS_timerfd_create, SYS_timerfd_settime,
    SYS_timerfd_gettime, SYS_inotify_init1, SYS_inotify_add_watch, SYS_inotify_rm_watch,
    SYS_fanotify_mark,
    // POSIX AIO (io_submit and friends; not io_uring).
    SYS_io_setup, SYS_io_destroy, SYS_io_submit, SYS_io_cancel, SYS_io_getevents,
    SYS_io_pgetevents,
    // Memory.
    SYS_brk, SYS_mmap, SYS_munmap, SYS_mremap, SYS_mprotect, SYS_madvise, SYS_mincore,
    SYS_msync, SYS_mlock, SYS_mlock2, SYS_munlock, SYS_mlockall, SYS_munlockall,
    SYS_membarrier, SYS_memfd_create, SYS_memfd_secret, SYS_pkey_alloc, SYS_pkey_free,
    SYS_pkey_mprotect, SYS_remap_file_pages, SYS_mseal,
    // Processes and threads.
    SYS_clone, SYS_execve, SYS_execveat, SYS_exit, SYS_exit_group, SYS_wait4, SYS_waitid,
    SYS_kill, SYS_tkill, SYS_tgkill, SYS_pidfd_open, SYS_pidfd_send_signal,
    SYS_process_mrelease, SYS_getpid, SYS_getppid, SYS_gettid, SYS_getpgid, SYS_setpgid,
    SYS_getsid, SYS_setsid, SYS_prctl, SYS_seccomp, SYS_landlock_create_ruleset,
    SYS_landlock_add_rule, SYS_landlock_restrict_self, SYS_personality, SYS_getrusage,
    SYS_getpriority, SYS_setpriority, SYS_ioprio_get, SYS_ioprio_set, SYS_sched_yield,
    SYS_sched_getaffinity, SYS_sched_setaffinity, SYS_sched_getparam, SYS_sched_setparam,
    SYS_sched_getscheduler, SYS_sched_setscheduler, SYS_sched_get_priority_max,
    SYS_sched_get_priority_min, SYS_sched_rr_get_interval, SYS_sched_getattr,
    SYS_sched_setattr, SYS_getcpu, SYS_set_tid_address, SYS_set_robust_list,
    SYS_get_robust_list, SYS_rseq, SYS_restart_syscall, SYS_prlimit64, SYS_getrlimit,
    SYS_setrlimit, SYS_times, SYS_sysinfo, SYS_uname, SYS_capget, SYS_capset,
    // Credentials (the kernel checks the capabilities).
    SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid, SYS_getresuid, SYS_getresgid,
    SYS_getgroups, SYS_setuid, SYS_setgid, SYS_setreuid, SYS_setregid, SYS_setresuid,
    SYS_setresgid, SYS_setfsuid, SYS_setfsgid, SYS_setgroups,
    // Signals.
    SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_rt_sigpending,
    SYS_rt_sigtimedwait, SYS_rt_sigqueueinfo, SYS_rt_tgsigqueueinfo, SYS_rt_sigsuspend,
    SYS_sigaltstack,
    // Time (reading it, sleeping, timers).
    SYS_clock_gettime, SYS_clock_getres, SYS_clock_nanosleep, SYS_nanosleep,
    SYS_gettimeofday, SYS_getitimer, SYS_setitimer, SYS_timer_create, SYS_timer_settime,
    SYS_timer_gettime, SYS_timer_getoverrun, SYS_timer_delete,
    // Futexes, randomness.
    SYS_futex, SYS_futex_waitv, SYS_getrandom,
    // Sockets.
    SYS_socket, SYS_socketpair, SYS_bind, SYS_listen, SYS_accept, SYS_accept4, SYS_connect,
    SYS_getsockname, SYS_getpeername, SYS_getsockopt, SYS_setsockopt, SYS_sendto,
    SYS_recvfrom, SYS_sendmsg, SYS_recvmsg, SYS_sendmmsg, SYS_recvmmsg, SYS_shutdown,
    // System V and POSIX IPC (private to the instance's IPC namespace).
    SYS_shmget, SYS_shmat, SYS_shmdt, SYS_shmctl, SYS_semget, SYS_semop, SYS_semtimedop,
    SYS_semctl, SYS_msgget, SYS_msgsnd, SYS_msgrcv, SYS_msgctl, SYS_mq_open, SYS_mq_unlink,
    SYS_mq_timedsend, SYS_mq_timedreceive, SYS_mq_notify, SYS_mq_getsetattr,
};

/// Allowed calls newer than the `libc` crate.
const ALLOWED_NEW: &[(&str, i64)] = &[
    ("SYS_cachestat", nr::CACHESTAT),
    ("SYS_fchmodat2", nr::FCHMODAT2),
    ("SYS_map_shadow_stack", nr::MAP_SHADOW_STACK),
    ("SYS_futex_wake", nr::FUTEX_WAKE),
    ("SYS_futex_wait", nr::FUTEX_WAIT),
    ("SYS_futex_requeue", nr::FUTEX_REQUEUE),
    ("SYS_setxattrat", nr::SETXATTRAT),
    ("SYS_getxattrat", nr::GETXATTRAT),
    ("SYS_listxattrat", nr::LISTXATTRAT),
    ("SYS_removexattrat", nr::REMOVEXATTRAT),
];

/// x86_64's older calls (newer architectures have only the `*at` forms), and
/// its TLS setup.
#[cfg(target_arch = "x86_64")]
pub const ALLOWED_ARCH: &[(&str, i64)] = syscalls! {
    SYS_access, SYS_alarm, SYS_arch_prctl, SYS_chmod, SYS_chown, SYS_creat, SYS_dup2,
    SYS_epoll_create, SYS_epoll_wait, SYS_eventfd, SYS_fork, SYS_futimesat,
    SYS_get_thread_area, SYS_set_thread_area, SYS_getdents, SYS_getpgrp, SYS_inotify_init,
    SYS_lchown, SYS_link, SYS_lstat, SYS_mkdir, SYS_mknod, SYS_open, SYS_pause, SYS_pipe,
    SYS_poll, SYS_readlink, SYS_rename, SYS_rmdir, SYS_select, SYS_signalfd, SYS_stat,
    SYS_symlink, SYS_time, SYS_unlink, SYS_utime, SYS_utimes, SYS_vfork,
};
#[cfg(not(target_arch = "x86_64"))]
pub const ALLOWED_ARCH: &[(&str, i64)] = &[];

/// The known syscalls refused with EPERM.
pub const REFUSED: &[(&str, i64)] = syscalls! {
    // Mounts.
    SYS_mount, SYS_umount2, SYS_pivot_root, SYS_fsopen, SYS_fsconfig, SYS_fsmount,
    SYS_fspick, SYS_move_mount, SYS_open_tree, SYS_mount_setattr,
    // Namespaces (and clone with CLONE_NEW*, below).
    SYS_unshare, SYS_setns,
    // Other processes' memory and descriptors.
    SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp, SYS_pidfd_getfd,
    SYS_process_madvise, SYS_perf_event_open,
    // Kernel code.
    SYS_init_module, SYS_finit_module, SYS_delete_module, SYS_kexec_load, SYS_bpf,
    // io_uring: the operations it performs are not seen by seccomp.
    SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
    // Keys.
    SYS_keyctl, SYS_add_key, SYS_request_key,
    // The clock.
    SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex,
    // The host.
    SYS_reboot, SYS_swapon, SYS_swapoff, SYS_acct, SYS_quotactl, SYS_quotactl_fd,
    SYS_syslog, SYS_vhangup, SYS_lookup_dcookie, SYS_sethostname, SYS_setdomainname,
    SYS_fanotify_init,
    // Memory policy (NUMA).
    SYS_mbind, SYS_set_mempolicy, SYS_get_mempolicy, SYS_set_mempolicy_home_node,
    SYS_migrate_pages, SYS_move_pages,
    // File handles, userfaultfd.
    SYS_open_by_handle_at, SYS_name_to_handle_at, SYS_userfaultfd,
};

/// Refused calls newer than the `libc` crate.
const REFUSED_NEW: &[(&str, i64)] = &[("SYS_open_tree_attr", nr::OPEN_TREE_ATTR)];

/// kexec_file_load (its number differs between architectures, and `libc` has it
/// for x86_64 only), and x86_64's I/O port and LDT calls.
#[cfg(target_arch = "x86_64")]
pub const REFUSED_ARCH: &[(&str, i64)] =
    syscalls![SYS_kexec_file_load, SYS_iopl, SYS_ioperm, SYS_modify_ldt];
#[cfg(target_arch = "aarch64")]
pub const REFUSED_ARCH: &[(&str, i64)] = &[("SYS_kexec_file_load", 294)];

/// Every syscall with a listed outcome (allowed, or refused with EPERM).
pub fn known() -> impl Iterator<Item = &'static (&'static str, i64)> {
    allowed().chain(refused())
}

/// Every allowed syscall.
pub fn allowed() -> impl Iterator<Item = &'static (&'static str, i64)> {
    ALLOWED.iter().chain(ALLOWED_NEW).chain(ALLOWED_ARCH)
}

/// Every syscall refused with EPERM whatever its arguments.
pub fn refused() -> impl Iterator<Item = &'static (&'static str, i64)> {
    REFUSED.iter().chain(REFUSED_NEW).chain(REFUSED_ARCH)
}

const NAMESPACE_FLAGS: &[i32] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// The personalities an appliance may set, as docker allows them: `PER_LINUX`,
/// `PER_LINUX32`, `UNAME26`, `UNAME26 | PER_LINUX32`, and `0xffffffff`, which
/// only reads the current one. `READ_IMPLIES_EXEC`, `ADDR_NO_RANDOMIZE` and the
/// other flags are refused.
pub const PERSONALITIES: &[u32] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The socket families an appliance may open.
pub const SOCKET_FAMILIES: &[i32] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// `AUDIT_ARCH_*` of the architecture the filters are built for.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

/// x86_64's `__X32_SYSCALL_BIT`: an x32 syscall is its number with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    TargetArch::x86_64
}

// Classic BPF opcodes (linux/bpf_common.h) and the offsets in `struct seccomp_data`
// (linux/seccomp.h: `int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];`).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The first filter, written by hand: a syscall from another ABI kills the
/// process before any other rule looks at its number.
///
/// On x86_64 the x32 ABI shares `AUDIT_ARCH_X86_64` and differs only by bit 30
/// of the number: an x32 `unshare` is `0x40000000 | 272` and would not match a
/// rule for 272. i386 (`int 0x80`) has its own arch value. `-1` (all bits set)
/// is not x32: it is "no syscall", which the kernel answers with ENOSYS, and
/// libseccomp lets it through too; the allow-list gives it ENOSYS.
pub fn abi_filter() -> Vec<SockFilter> {
    // Jump offsets count from the next instruction.
    let mut program = vec![
        // 0: A = arch
        insn(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        // 1: native? skip the kill
        insn(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
        // 2: another architecture (i386 on x86_64, arm on aarch64)
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        // 3: A = nr
        insn(BPF_LD_W_ABS, 0, 0, DATA_NR),
    ];
    if cfg!(target_arch = "x86_64") {
        program.extend([
            // 4: bit 30 clear: a native syscall, go to 7 (allow); set: go on to 5
            insn(BPF_JMP_JSET_K, 0, 2, X32_SYSCALL_BIT),
            // 5: -1 is not x32: go to 7 (allow); anything else: 6
            insn(BPF_JMP_JEQ_K, 1, 0, u32::MAX),
            // 6: x32
            insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        ]);
    }
    // 7 (x86_64) or 4: the later filters decide.
    program.push(insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW));
    program
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<Vec<SockFilter>, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch())
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

fn condition(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(|e| SeccompError(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|e| SeccompError(e.to_string()))
}

fn errno(e: i32) -> Result<SeccompAction, SeccompError> {
    u32::try_from(e)
        .map(SeccompAction::Errno)
        .map_err(|_| SeccompError(format!("errno {e} is negative")))
}

/// The allow-list: a known syscall passes (to the next filters), any other gets ENOSYS.
fn known_filter() -> Result<Vec<SockFilter>, SeccompError> {
    let rules = known().map(|(_, nr)| (*nr, Vec::new())).collect();
    compile(rules, errno(libc::ENOSYS)?, SeccompAction::Allow)
}

/// EPERM for the refused syscalls, clone with a namespace flag, and the
/// personalities not in [`PERSONALITIES`].
fn refused_filter() -> Result<Vec<SockFilter>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        refused().map(|(_, nr)| (*nr, Vec::new())).collect();
    // clone's flags are an unsigned long: compare all 64 bits.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let flag = u64::try_from(*flag)
                .map_err(|_| SeccompError(format!("clone flag {flag:#x} is negative")))?;
            rule(vec![condition(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // personality takes an unsigned int: the kernel ignores the upper half, so does the rule.
    let other_personality = PERSONALITIES
        .iter()
        .map(|p| condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, u64::from(*p)))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_personality, vec![rule(other_personality)?]);
    compile(rules, SeccompAction::Allow, errno(libc::EPERM)?)
}

/// EAFNOSUPPORT for socket and socketpair with a family not in
/// [`SOCKET_FAMILIES`], or AF_NETLINK with a protocol other than NETLINK_ROUTE.
fn socket_filter() -> Result<Vec<SockFilter>, SeccompError> {
    // The family and protocol are ints: the kernel ignores the upper half, so do the rules.
    let other_family = SOCKET_FAMILIES
        .iter()
        .map(|f| {
            let family = u64::try_from(*f)
                .map_err(|_| SeccompError(format!("socket family {f} is negative")))?;
            condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, family)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let other_netlink = vec![
        condition(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_NETLINK as u64,
        )?,
        condition(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            libc::NETLINK_ROUTE as u64,
        )?,
    ];
    let rules = [libc::SYS_socket, libc::SYS_socketpair]
        .into_iter()
        .map(|nr| {
            Ok((
                nr,
                vec![rule(other_family.clone())?, rule(other_netlink.clone())?],
            ))
        })
        .collect::<Result<BTreeMap<_, _>, SeccompError>>()?;
    compile(rules, SeccompAction::Allow, errno(libc::EAFNOSUPPORT)?)
}

/// The default filters, in the order init installs them. Compiled once per
/// process: the allow-list costs about a millisecond to compile, and the daemon
/// starts many instances.
pub fn default_filters() -> Result<Vec<Vec<SockFilter>>, SeccompError> {
    static COMPILED: std::sync::OnceLock<Vec<Vec<SockFilter>>> = std::sync::OnceLock::new();
    if let Some(f) = COMPILED.get() {
        return Ok(f.clone());
    }
    let filters = vec![
        abi_filter(),
        known_filter()?,
        refused_filter()?,
        socket_filter()?,
    ];
    Ok(COMPILED.get_or_init(|| filters).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct seccomp_data` as the kernel hands it to a filter.
    struct Data {
        nr: i32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn new(nr: i64, args: &[u64]) -> Self {
            let mut a = [0; 6];
            a[..args.len()].copy_from_slice(args);
            Data {
                nr: i32::try_from(nr).expect("a syscall number is an int"),
                arch: AUDIT_ARCH,
                args: a,
            }
        }

        /// The 32-bit word at `offset`, as `BPF_LD | BPF_W | BPF_ABS` reads it (little-endian host).
        fn word(&self, offset: u32) -> u32 {
            let mut bytes = Vec::with_capacity(64);
            bytes.extend_from_slice(&self.nr.to_ne_bytes());
            bytes.extend_from_slice(&self.arch.to_ne_bytes());
            bytes.extend_from_slice(&0u64.to_ne_bytes()); // instruction_pointer
            for a in self.args {
                bytes.extend_from_slice(&a.to_ne_bytes());
            }
            let o = offset as usize;
            assert!(
                o.is_multiple_of(4) && o + 4 <= bytes.len(),
                "load at {offset}"
            );
            u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
        }
    }

    /// A classic BPF interpreter for the instructions seccomp filters use.
    fn run(program: &[SockFilter], data: &Data) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            let jump = |cond: bool| if cond { i.jt as usize } else { i.jf as usize };
            match i.code {
                0x20 => a = data.word(i.k),       // ld [k]
                0x54 => a &= i.k,                 // and #k
                0x05 => pc += i.k as usize,       // ja
                0x15 => pc += jump(a == i.k),     // jeq #k
                0x25 => pc += jump(a > i.k),      // jgt #k
                0x35 => pc += jump(a >= i.k),     // jge #k
                0x45 => pc += jump(a & i.k != 0), // jset #k
                0x06 => return i.k,               // ret #k
                other => panic!("instruction {other:#x} at {} not interpreted", pc - 1),
            }
        }
    }

    /// The kernel's answer for a set of filters: every filter runs, the
    /// strictest action wins (kill < ... < errno < allow as signed action
    /// values), and among equal actions the most recently installed filter's.
    fn verdict(filters: &[Vec<SockFilter>], data: &Data) -> u32 {
        let action = |r: u32| (r & libc::SECCOMP_RET_ACTION_FULL).cast_signed();
        let mut result = libc::SECCOMP_RET_ALLOW;
        for f in filters.iter().rev() {
            let r = run(f, data);
            if action(r) < action(result) {
                result = r;
            }
        }
        result
    }

    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    fn errno_ret(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | u32::try_from(e).expect("an errno is positive")
    }

    /// A non-negative C int (a flag, family or protocol) as the 64-bit register holds it.
    fn int(v: i32) -> u64 {
        u64::try_from(v).expect("a non-negative int")
    }

    #[test]
    fn the_abi_filter_passes_native_calls_and_kills_the_others() {
        let f = abi_filter();
        assert_eq!(run(&f, &Data::new(libc::SYS_getpid, &[])), ALLOW);
        assert_eq!(run(&f, &Data::new(libc::SYS_unshare, &[])), ALLOW);
        assert_eq!(run(&f, &Data::new(-1, &[])), ALLOW, "-1 is not x32");
        let mut i386 = Data::new(20, &[]); // getpid through int 0x80
        i386.arch = 0x4000_0003; // AUDIT_ARCH_I386
        assert_eq!(run(&f, &i386), KILL);
        #[cfg(target_arch = "x86_64")]
        for nr in [
            libc::SYS_getpid,
            libc::SYS_unshare,
            libc::SYS_io_uring_setup,
            512,
        ] {
            let x32 = Data::new(nr | i64::from(X32_SYSCALL_BIT), &[]);
            assert_eq!(run(&f, &x32), KILL, "x32 {nr}");
        }
    }

    #[test]
    fn the_default_filters_answer_as_documented() {
        let filters = default_filters().unwrap();
        assert_eq!(filters.len(), 4);
        assert!(filters.iter().all(|f| !f.is_empty() && f.len() < 4096));
        let call = |nr: i64, args: &[u64]| verdict(&filters, &Data::new(nr, args));

        for (name, nr) in allowed() {
            if ![libc::SYS_clone, libc::SYS_socket, libc::SYS_socketpair].contains(nr) {
                assert_eq!(call(*nr, &[]), ALLOW, "{name}");
            }
        }
        for (name, nr) in refused() {
            assert_eq!(call(*nr, &[]), errno_ret(libc::EPERM), "{name}");
        }
        for nr in [libc::SYS_clone3, libc::SYS_uselib, 999, -1] {
            assert_eq!(call(nr, &[]), errno_ret(libc::ENOSYS), "{nr}");
        }

        // clone: threads and fork pass, namespaces do not.
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(call(libc::SYS_clone, &[thread]), ALLOW);
        assert_eq!(call(libc::SYS_clone, &[libc::SIGCHLD as u64]), ALLOW);
        for flag in NAMESPACE_FLAGS {
            let flags = libc::SIGCHLD as u64 | int(*flag);
            assert_eq!(
                call(libc::SYS_clone, &[flags]),
                errno_ret(libc::EPERM),
                "{flag:#x}"
            );
        }

        // personality: docker's values only; the upper half of the register does not matter.
        for p in PERSONALITIES {
            assert_eq!(
                call(libc::SYS_personality, &[u64::from(*p)]),
                ALLOW,
                "{p:#x}"
            );
        }
        assert_eq!(call(libc::SYS_personality, &[0x1_0000_0000]), ALLOW);
        for p in [0x0040_0000u64, 0x0004_0000, 0x6, 0xffff_fffe] {
            // READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, PER_BSD
            assert_eq!(
                call(libc::SYS_personality, &[p]),
                errno_ret(libc::EPERM),
                "{p:#x}"
            );
        }

        // socket and socketpair: the allowed families, netlink for routes only.
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
                assert_eq!(call(nr, &[int(family), libc::SOCK_STREAM as u64, 0]), ALLOW);
            }
            let netlink = |protocol: i32| call(nr, &[libc::AF_NETLINK as u64, 3, int(protocol)]);
            assert_eq!(netlink(libc::NETLINK_ROUTE), ALLOW);
            for protocol in [
                libc::NETLINK_AUDIT,
                libc::NETLINK_GENERIC,
                libc::NETLINK_KOBJECT_UEVENT,
            ] {
                assert_eq!(
                    netlink(protocol),
                    errno_ret(libc::EAFNOSUPPORT),
                    "{protocol}"
                );
            }
            for family in [
                libc::AF_ALG,
                libc::AF_VSOCK,
                libc::AF_KEY,
                libc::AF_PACKET,
                libc::AF_BLUETOOTH,
                0,
            ] {
                assert_eq!(
                    call(nr, &[int(family), 1, 0]),
                    errno_ret(libc::EAFNOSUPPORT),
                    "{family}"
                );
            }
            // The kernel reads an int: AF_VSOCK with junk in the upper half is still refused.
            let junk = 0x1_0000_0000 | libc::AF_VSOCK as u64;
            assert_eq!(call(nr, &[junk, 1, 0]), errno_ret(libc::EAFNOSUPPORT));
            let junk = 0x1_0000_0000 | libc::AF_INET as u64;
            assert_eq!(call(nr, &[junk, 1, 0]), ALLOW, "the kernel reads AF_INET");
        }

        #[cfg(target_arch = "x86_64")]
        {
            let x32 = |nr: i64| call(nr | i64::from(X32_SYSCALL_BIT), &[]);
            assert_eq!(x32(libc::SYS_getpid), KILL);
            assert_eq!(x32(libc::SYS_unshare), KILL);
            let mut i386 = Data::new(20, &[]);
            i386.arch = 0x4000_0003;
            assert_eq!(verdict(&filters, &i386), KILL);
        }
    }

    #[test]
    fn each_syscall_has_one_outcome() {
        let mut seen = std::collections::BTreeMap::new();
        for (name, nr) in known() {
            if let Some(other) = seen.insert(*nr, *name) {
                panic!("{name} and {other} are both {nr}");
            }
        }
        assert!(!seen.contains_key(&libc::SYS_clone3));
    }
}
