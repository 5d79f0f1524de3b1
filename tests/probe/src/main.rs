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
            outcome("mount", r as i64);
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
            outcome("clock_settime", r as i64);
        }
        "unshare" => {
            // SAFETY: unshare takes flags only.
            let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            outcome("unshare", r as i64);
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
                blocks.push(vec![i as u8; 1 << 20]);
                if i % 16 == 0 {
                    println!("allocated {i} MiB");
                    let _ = std::io::stdout().flush();
                }
            }
            println!("ok hog {mb} MiB, {}", blocks.len());
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
            // Orphans whose parent exits at once: PID 1 must reap them.
            for _ in 0..20 {
                // SAFETY: the child forks a grandchild and exits; the grandchild exits after a moment.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: as above.
                    unsafe {
                        if libc::fork() == 0 {
                            libc::usleep(50_000);
                        }
                        libc::_exit(0);
                    }
                }
                let mut st = 0;
                // SAFETY: reap our direct child.
                unsafe { libc::waitpid(pid, &mut st, 0) };
            }
            std::thread::sleep(Duration::from_millis(400));
            let zombies = std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            e.file_name()
                                .to_str()
                                .is_some_and(|n| n.parse::<u32>().is_ok())
                        })
                        .filter(|e| {
                            std::fs::read_to_string(e.path().join("stat"))
                                .is_ok_and(|s| s.contains(") Z "))
                        })
                        .count()
                })
                .unwrap_or(0);
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
