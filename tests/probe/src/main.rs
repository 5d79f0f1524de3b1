//! juice-probe: run inside a sandbox by the escape tests. Each subcommand
//! tries one thing and prints one line: `ok ...` if it worked, `denied ...`
//! with the errno if it did not. The tests decide what each line must be.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Prints the outcome of a libc call that returns -1 on failure.
fn outcome(what: &str, ret: i64) {
    if ret < 0 {
        println!("denied {what}: {}", errno())
    } else {
        println!("ok {what}")
    }
}

/// Runs `call` in a child process, since a seccomp kill takes the whole
/// process: `ok`, `denied` with the errno, or `denied` with the killing signal.
fn in_child(what: &str, call: impl FnOnce() -> i64) {
    // SAFETY: the probe is single-threaded; the child only makes the call and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        println!("failed fork: {}", errno());
        return;
    }
    if pid == 0 {
        let r = call();
        let code = if r < 0 {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(255)
        } else {
            0
        };
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reap our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let name = if sig == libc::SIGSYS { " (SIGSYS)" } else { "" };
        println!("denied {what}: killed by signal {sig}{name}");
    } else if libc::WEXITSTATUS(status) == 0 {
        println!("ok {what}");
    } else {
        let e = std::io::Error::from_raw_os_error(libc::WEXITSTATUS(status));
        println!("denied {what}: {e}");
    }
}

/// A number argument, decimal or 0x-hex; a bad one ends the probe with status 2.
fn number(s: &str) -> i64 {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.unwrap_or_else(|_| {
        eprintln!("not a number: {s:?}");
        std::process::exit(2)
    })
}

/// `number(s)` as the integer type a syscall takes; out of its range is a usage error.
fn number_as<T: TryFrom<i64>>(s: &str) -> T {
    T::try_from(number(s)).unwrap_or_else(|_| {
        eprintln!("out of range: {s:?}");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "pids" => {
            let mut pids: Vec<u32> = std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            pids.sort();
            println!("pids {pids:?}");
        }
        "write" => match std::fs::write(arg(1), "x") {
            Ok(()) => println!("ok write {}", arg(1)),
            Err(e) => println!("denied write {}: {e}", arg(1)),
        },
        "mount" => {
            // SAFETY: mount with valid NUL-terminated strings.
            let r = unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            outcome("mount", i64::from(r));
        }
        "ptrace" => {
            // SAFETY: PTRACE_ATTACH to pid 1 with null addr/data.
            let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
            outcome("ptrace", r);
        }
        "module" => {
            // SAFETY: finit_module on an invalid fd; we only look at the errno.
            let r = unsafe { libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0) };
            outcome("finit_module", r);
        }
        "settime" => {
            let ts = libc::timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec.
            let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
            outcome("clock_settime", i64::from(r));
        }
        "unshare" => {
            // SAFETY: unshare takes flags only.
            let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            outcome("unshare", i64::from(r));
        }
        "connect" => {
            let addr: SocketAddr = format!("{}:{}", arg(1), arg(2)).parse().expect("ADDR PORT");
            match TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) {
                Ok(_) => println!("ok connect {addr}"),
                Err(e) => println!("denied connect {addr}: {e}"),
            }
        }
        "forkbomb" => {
            let mut n = 0;
            loop {
                // SAFETY: the child only sleeps and exits.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    println!("denied fork after {n}: {}", errno());
                    break;
                }
                if pid == 0 {
                    std::thread::sleep(Duration::from_secs(3));
                    // SAFETY: leave the child without running the parent's destructors.
                    unsafe { libc::_exit(0) };
                }
                n += 1;
                if n > 100_000 {
                    println!("ok fork {n}");
                    break;
                }
            }
        }
        "hog" => {
            let mb: usize = arg(1).parse().unwrap_or(512);
            let mut blocks = Vec::new();
            for i in 0..mb {
                // Any fill byte will do; wrapping i to a byte is intended.
                #[allow(clippy::cast_possible_truncation)]
                blocks.push(vec![i as u8; 1 << 20]);
                if i % 16 == 0 {
                    println!("allocated {i} MiB");
                    let _ = std::io::stdout().flush();
                }
            }
            println!("ok hog {mb} MiB, {}", blocks.len());
        }
        // Allocates MB MiB, writes every page so it is resident, and holds it
        // (for `juice top`: a known amount of memory to find in the cgroup).
        "hold" => {
            let mb: usize = arg(1).parse().unwrap_or(64);
            let mut block = vec![0u8; mb << 20];
            for page in block.chunks_mut(4096) {
                page[0] = 1;
            }
            println!("holding {mb} MiB");
            let _ = std::io::stdout().flush();
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                std::hint::black_box(&block);
            }
        }
        "spin" => {
            let secs: f64 = arg(1).parse().unwrap_or(2.0);
            let threads: usize = arg(2).parse().unwrap_or(2);
            let start = Instant::now();
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut x = 0u64;
                        while start.elapsed().as_secs_f64() < secs {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                        x
                    })
                })
                .collect();
            for w in workers {
                let _ = w.join();
            }
            // SAFETY: rusage is a plain C struct of integers and timevals, for which all-zero
            // bytes are a valid value.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage fills a valid rusage.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
            let cpu = usage.ru_utime.tv_sec as f64
                + usage.ru_utime.tv_usec as f64 / 1e6
                + usage.ru_stime.tv_sec as f64
                + usage.ru_stime.tv_usec as f64 / 1e6;
            println!(
                "cpu {:.3} of {:.3} s wall = {:.2} cores",
                cpu,
                start.elapsed().as_secs_f64(),
                cpu / start.elapsed().as_secs_f64()
            );
        }
        "whoami" => {
            // SAFETY: plain getters.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let caps: Vec<&str> = status
                .lines()
                .filter(|l| {
                    l.starts_with("Cap") || l.starts_with("NoNewPrivs") || l.starts_with("Seccomp:")
                })
                .collect();
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            println!(
                "uid {uid} gid {gid} host {} {}",
                host.trim(),
                caps.join(" ")
            );
        }
        "zombies" => {
            // Orphans whose parent exits at once: PID 1 must reap them. Every fork
            // must work and /proc must be readable, or the count proves nothing.
            let mut orphans = 0;
            for _ in 0..20 {
                // SAFETY: the child forks a grandchild and exits; the grandchild exits after a moment.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    println!("failed fork: {}", errno());
                    return;
                }
                if pid == 0 {
                    // SAFETY: as above; the child reports a failed fork by its exit code.
                    unsafe {
                        let grandchild = libc::fork();
                        if grandchild == 0 {
                            libc::usleep(50_000);
                        }
                        libc::_exit(if grandchild < 0 { 1 } else { 0 });
                    }
                }
                let mut st = 0;
                // SAFETY: reap our direct child.
                unsafe { libc::waitpid(pid, &mut st, 0) };
                if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
                    orphans += 1;
                }
            }
            if orphans != 20 {
                println!("failed only {orphans} of 20 orphans were made");
                return;
            }
            std::thread::sleep(Duration::from_millis(400));
            let mut zombies = 0;
            let mut seen = 0;
            match std::fs::read_dir("/proc") {
                Ok(d) => {
                    for e in d.flatten() {
                        if e.file_name()
                            .to_str()
                            .is_none_or(|n| n.parse::<u32>().is_err())
                        {
                            continue;
                        }
                        match std::fs::read_to_string(e.path().join("stat")) {
                            Ok(s) => {
                                seen += 1;
                                if s.contains(") Z ") {
                                    zombies += 1;
                                }
                            }
                            // A process that ended meanwhile is gone, not unreadable.
                            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                            Err(err) => {
                                println!("failed read {}: {err}", e.path().display());
                                return;
                            }
                        }
                    }
                }
                Err(e) => {
                    println!("failed read /proc: {e}");
                    return;
                }
            }
            // At least PID 1 and this probe must have been seen.
            if seen < 2 {
                println!("failed saw only {seen} processes");
                return;
            }
            println!("zombies {zombies}");
        }
        "spam" => {
            let n: usize = arg(1).parse().unwrap_or(1000);
            let mut out = std::io::stdout().lock();
            for i in 0..n {
                let _ = writeln!(out, "line {i:08} {}", "x".repeat(80));
            }
            let _ = writeln!(out, "ok spam {n}");
        }
        "io_uring" => {
            // struct io_uring_params is 120 bytes; zeroed asks for the defaults.
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup writes at most 120 bytes into params.
            let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            outcome("io_uring_setup", r);
        }
        "pidfd_getfd" => {
            // Our own stdout through a pidfd of ourselves: the kernel allows it, only a filter refuses.
            // SAFETY: pidfd_open and pidfd_getfd take integers only.
            let r = unsafe {
                let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0);
                if pidfd < 0 {
                    pidfd
                } else {
                    libc::syscall(libc::SYS_pidfd_getfd, pidfd, 1, 0)
                }
            };
            outcome("pidfd_getfd", r);
        }
        "personality" => {
            let persona: libc::c_ulong = number_as(&arg(1));
            // SAFETY: personality takes an integer; the probe exits right after.
            let r = unsafe { libc::personality(persona) };
            outcome(&format!("personality {}", arg(1)), i64::from(r));
        }
        "socket" => {
            let (family, ty, protocol): (i32, i32, i32) =
                (number_as(&arg(1)), number_as(&arg(2)), number_as(&arg(3)));
            // SAFETY: socket takes integers; the fd is left to the exit.
            let r = unsafe { libc::socket(family, ty, protocol) };
            outcome(&format!("socket {family}"), i64::from(r));
        }
        "x32" => {
            // The x32 ABI: the x86_64 number with bit 30 (__X32_SYSCALL_BIT) set.
            let nr = number(&arg(1));
            let a = number(if arg(2).is_empty() { "0" } else { &args[2] });
            // SAFETY: the numbers tried (getpid, unshare) take integers only.
            in_child(&format!("x32 {nr}"), || unsafe {
                libc::syscall(0x4000_0000 | nr, a)
            });
        }
        #[cfg(target_arch = "x86_64")]
        "i386" => {
            // getpid (20 in the i386 table) through int 0x80, the 32-bit entry.
            in_child("i386 getpid", || {
                let r: i32;
                // SAFETY: int 0x80 with eax = 20 is i386 getpid, which reads nothing from
                // memory; the kernel returns in eax, and r8-r11 are declared clobbered.
                unsafe {
                    std::arch::asm!(
                        "int 0x80",
                        inlateout("eax") 20i32 => r,
                        out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                        options(nostack)
                    );
                }
                if r < 0 {
                    // SAFETY: errno is thread-local; set it so in_child reports the raw error.
                    unsafe { *libc::__errno_location() = -r };
                    -1
                } else {
                    i64::from(r)
                }
            });
        }
        "sleep" => std::thread::sleep(Duration::from_secs_f64(arg(1).parse().unwrap_or(3600.0))),
        "true" => {}
        // Escape attempts through what PID 1 holds or what CAP_MKNOD makes.
        "ls" => match std::fs::read_dir(arg(1)) {
            Ok(d) => {
                let mut names: Vec<String> = d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                println!("ok ls {}: {}", arg(1), names.join(" "));
            }
            Err(e) => println!("denied ls {}: {e}", arg(1)),
        },
        "links" => match std::fs::read_dir(arg(1)) {
            Ok(d) => {
                let mut links: Vec<String> = d
                    .flatten()
                    .map(|e| {
                        let to = std::fs::read_link(e.path())
                            .map(|t| t.display().to_string())
                            .unwrap_or_else(|e| format!("({e})"));
                        format!("{}={to}", e.file_name().to_string_lossy())
                    })
                    .collect();
                links.sort();
                println!("ok links {}: {}", arg(1), links.join(" "));
            }
            Err(e) => println!("denied links {}: {e}", arg(1)),
        },
        "mknod" => {
            // A block device node for the host's first disk, then an open of it.
            let path = std::ffi::CString::new(arg(1)).unwrap_or_default();
            // SAFETY: mknod reads the NUL-terminated path; the mode and device are plain integers.
            let made =
                unsafe { libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(8, 0)) };
            if made < 0 {
                println!("denied mknod: {}", errno());
            } else {
                match std::fs::File::open(arg(1)) {
                    Ok(_) => println!("ok open device {}", arg(1)),
                    Err(e) => println!("denied open device {}: {e}", arg(1)),
                }
            }
        }
        other => {
            eprintln!("unknown probe {other:?}");
            std::process::exit(2);
        }
    }
}
