//! Debug sessions: a toolbox program started beside a running appliance, its
//! terminal or streams carried to the operator over one byte stream.
//!
//! The same code runs on both backends: in `juice-init debug` (a sandbox; the
//! process has joined the instance's namespaces first) and in `juice-guest` (a
//! microVM; the session comes in on a virtio-serial port). The daemon relays
//! the stream to the client unchanged, so the framing below is the whole
//! protocol, end to end.
//!
//! A frame is a kind byte, a big-endian `u32` length and that many bytes (at
//! most [`MAX_FRAME`]). The client sends [`Kind::Request`] first (a
//! [`Request`] as JSON), then [`Kind::Stdin`], [`Kind::Resize`] (rows and
//! columns, two big-endian `u16`) and [`Kind::StdinEnd`]; the session answers
//! with [`Kind::Stdout`], [`Kind::Stderr`] (without a terminal) and ends with
//! one [`Kind::Exit`] (a big-endian `i32`: the exit code, or 128 + signal) or
//! [`Kind::Error`] (a sentence). Written for Juice: it is the contract between
//! Juice's own daemon, CLI, init and guest.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use serde::{Deserialize, Serialize};

use crate::InitConfig;
use crate::exec::{Failure, Step, Streams, prepare_and_exec};

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Stdin = 2,
    Stdout = 3,
    Stderr = 4,
    Resize = 5,
    StdinEnd = 6,
    Exit = 7,
    Error = 8,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Stdin,
            3 => Kind::Stdout,
            4 => Kind::Stderr,
            5 => Kind::Resize,
            6 => Kind::StdinEnd,
            7 => Kind::Exit,
            8 => Kind::Error,
            _ => return None,
        })
    }
}

/// What a session is asked to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The toolbox's root, the appliance's root read-only at [`APP_MOUNT`], and
    /// the program (with the capabilities the host's policy granted).
    pub config: InitConfig,
    /// A terminal (interactive) rather than three streams.
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
}

impl Request {
    /// A session running `program` from the toolbox at `rootfs` (empty: the
    /// guest's own disk), with `binds`; no seccomp filter (strace needs ptrace)
    /// and no log: its streams are the session's.
    pub fn toolbox(
        rootfs: std::path::PathBuf,
        hostname: &str,
        program: crate::Program,
        binds: Vec<crate::Bind>,
        terminal: Option<(u16, u16)>,
    ) -> Request {
        let (rows, cols) = terminal.unwrap_or((0, 0));
        Request {
            config: InitConfig {
                rootfs,
                hostname: hostname.to_owned(),
                program,
                seccomp: Vec::new(),
                binds,
                user_namespace: false,
                cgroup_namespace: false,
                log_max_bytes: 0,
                log_keep: 0,
            },
            tty: terminal.is_some(),
            rows,
            cols,
        }
    }
}

/// Where the appliance's root appears inside the toolbox.
pub const APP_MOUNT: &str = "/app";

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|n| usize::try_from(*n).is_ok_and(|n| n <= MAX_FRAME))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one frame; `None` at a clean end of the stream (between frames).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let kind = Kind::from_byte(head[0]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", head[0]),
        )
    })?;
    let len = usize::try_from(u32::from_be_bytes([head[1], head[2], head[3], head[4]]))
        .ok()
        .filter(|n| *n <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

/// The exit frame's payload: the code, or 128 + the signal.
pub fn exit_payload(status: WaitStatus) -> [u8; 4] {
    let code = match status {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        _ => 125,
    };
    code.to_be_bytes()
}

/// Decodes a resize payload into (rows, cols).
pub fn resize_payload(p: &[u8]) -> Option<(u16, u16)> {
    match p {
        [a, b, c, d] => Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        _ => None,
    }
}

/// The child's ends of its terminal or streams.
enum Ends {
    Tty {
        master: OwnedFd,
        slave: OwnedFd,
    },
    Pipes {
        ours: [OwnedFd; 3],
        theirs: [OwnedFd; 3],
    },
}

/// The session's ends: where input goes, where output comes from.
struct Side {
    /// The terminal's master (input and output), or the program's stdin.
    input: Option<OwnedFd>,
    /// With a terminal, none: output is read from `input`.
    outputs: Vec<(OwnedFd, Kind)>,
    tty: bool,
}

fn set_size(fd: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ on a terminal fd we own, reading one valid winsize.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// A new terminal pair from `ptmx` (the host's `/dev/ptmx`, or a private devpts
/// instance's in a guest); the peer is opened through the master (`TIOCGPTPEER`),
/// never by a path.
pub fn open_pty(ptmx: &std::path::Path) -> Result<(OwnedFd, OwnedFd), Failure> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(ptmx)
        .step(|| format!("open {}", ptmx.display()))?
        .into();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK on our master reads one valid int.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(Failure(format!(
            "unlock the terminal: {}",
            Errno::last().desc()
        )));
    }
    // SAFETY: TIOCGPTPEER on our master returns a new fd for its peer, or -1.
    let peer = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if peer < 0 {
        return Err(Failure(format!(
            "open the terminal's peer: {}",
            Errno::last().desc()
        )));
    }
    // SAFETY: the ioctl just returned this fd and nothing else owns it.
    Ok((master, unsafe { OwnedFd::from_raw_fd(peer) }))
}

/// Serves one session on `conn` (the request already read): opens its terminal
/// or pipes (terminals from `ptmx`), runs `prepare` (the session's root, its
/// namespaces), forks the toolbox program, which runs `enter` (what must be
/// done in the namespaces it was forked into) before it becomes the program,
/// and relays until it ends.
/// Returns when the program has ended and its output is drained, or the other
/// end has gone (then the program's process group is killed).
/// A failure is told to the other end as an [`Kind::Error`] frame too.
pub fn serve(
    conn: OwnedFd,
    request: &Request,
    ptmx: &std::path::Path,
    prepare: impl FnOnce(&InitConfig) -> Result<(), Failure>,
    enter: impl FnOnce(&InitConfig) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut report = std::fs::File::from(conn.try_clone().step(|| "dup the connection".into())?);
    let outcome = (move || -> Result<(), Failure> {
        let ends = if request.tty {
            let (master, slave) = open_pty(ptmx)?;
            set_size(&master, request.rows, request.cols);
            Ends::Tty { master, slave }
        } else {
            let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into());
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            Ends::Pipes {
                ours: [in_w, out_r, err_r],
                theirs: [in_r, out_w, err_w],
            }
        };
        prepare(&request.config)?;
        let (fail_r, fail_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into())?;
        // SAFETY: the session process is single-threaded (a fresh exec, or juice-guest's
        // forked session leader), so the child may allocate.
        let child = match unsafe { fork() }.step(|| "fork the toolbox".into())? {
            ForkResult::Child => {
                drop(fail_r);
                let streams = match &ends {
                    Ends::Tty { slave, .. } => Streams::Given {
                        stdin: slave,
                        stdout: slave,
                        stderr: slave,
                        tty: true,
                    },
                    Ends::Pipes { theirs, .. } => Streams::Given {
                        stdin: &theirs[0],
                        stdout: &theirs[1],
                        stderr: &theirs[2],
                        tty: false,
                    },
                };
                let Failure(why) = match enter(&request.config)
                    .and_then(|()| prepare_and_exec(&request.config, streams))
                {
                    Ok(never) => match never {},
                    Err(f) => f,
                };
                let _ = nix::unistd::write(&fail_w, why.as_bytes());
                // SAFETY: _exit in the forked child skips the parent's destructors.
                unsafe { libc::_exit(127) }
            }
            ForkResult::Parent { child } => child,
        };
        drop(fail_w);
        let side = match ends {
            Ends::Tty { master, slave } => {
                drop(slave);
                Side {
                    input: Some(master),
                    outputs: Vec::new(),
                    tty: true,
                }
            }
            Ends::Pipes { ours, theirs } => {
                drop(theirs);
                let [stdin, stdout, stderr] = ours;
                Side {
                    input: Some(stdin),
                    outputs: vec![(stdout, Kind::Stdout), (stderr, Kind::Stderr)],
                    tty: false,
                }
            }
        };
        let mut conn = std::fs::File::from(conn);
        let mut why = Vec::new();
        let _ = std::fs::File::from(fail_r).read_to_end(&mut why);
        if !why.is_empty() {
            let _ = waitpid(child, None);
            return Err(Failure(String::from_utf8_lossy(&why).into_owned()));
        }
        relay(&mut conn, child, side)
    })();
    outcome.inspect_err(|Failure(why)| {
        let _ = write_frame(&mut report, Kind::Error, why.as_bytes());
    })
}

/// Copies between the connection and the program until it ends.
fn relay(conn: &mut std::fs::File, child: Pid, mut side: Side) -> Result<(), Failure> {
    let conn_fd = conn.try_clone().step(|| "dup the connection".into())?;
    // A terminal's master is both its input and its output.
    let master = if side.tty {
        match &side.input {
            Some(m) => Some(m.try_clone().step(|| "dup the terminal".into())?),
            None => None,
        }
    } else {
        None
    };
    if let Some(m) = master {
        side.outputs.push((m, Kind::Stdout));
    }
    let mut open: Vec<bool> = vec![true; side.outputs.len()];
    let mut status: Option<WaitStatus> = None;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if status.is_none()
            && let Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) =
                waitpid(child, Some(WaitPidFlag::WNOHANG))
        {
            status = Some(s);
        }
        if let Some(s) = status {
            // Pipes end when their last writer does; a terminal's output is taken
            // as it stands (a background process may keep it open).
            if side.tty || !open.iter().any(|o| *o) {
                drain(&side.outputs, &mut open, conn, &mut buf);
                let _ = write_frame(conn, Kind::Exit, &exit_payload(s));
                return Ok(());
            }
        }
        let mut fds = vec![PollFd::new(conn_fd.as_fd(), PollFlags::POLLIN)];
        for ((fd, _), o) in side.outputs.iter().zip(&open) {
            let events = if *o {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            };
            fds.push(PollFd::new(fd.as_fd(), events));
        }
        // The child's end is seen by polling again: at most 100 ms late.
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Err(Errno::EINTR) | Ok(0) => continue,
            Err(e) => return Err(Failure(format!("poll: {}", e.desc()))),
            Ok(_) => {}
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| {
                f.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            })
            .collect();
        let mut conn_open = true;
        for (i, (fd, kind)) in side.outputs.iter().enumerate() {
            if !(ready[i + 1] && open[i]) {
                continue;
            }
            match nix::unistd::read(fd, &mut buf) {
                // EIO: a terminal whose every other end has closed.
                Ok(0) | Err(Errno::EIO) => open[i] = false,
                Ok(n) => conn_open &= write_frame(conn, *kind, &buf[..n]).is_ok(),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => open[i] = false,
            }
        }
        if ready[0] {
            match read_frame(conn) {
                Ok(Some((Kind::Stdin, data))) => {
                    if let Some(fd) = &side.input
                        && write_all(fd, &data).is_err()
                        && !side.tty
                    {
                        side.input = None;
                    }
                }
                Ok(Some((Kind::StdinEnd, _))) => {
                    if side.tty {
                        // On a terminal, the end of input is its EOF character.
                        if let Some(fd) = &side.input {
                            let _ = write_all(fd, &[4]);
                        }
                    } else {
                        // Closing the pipe's last writer is the program's EOF.
                        side.input = None;
                    }
                }
                Ok(Some((Kind::Resize, p))) => {
                    if let (true, Some(fd), Some((rows, cols))) =
                        (side.tty, &side.input, resize_payload(&p))
                    {
                        set_size(fd, rows, cols);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => conn_open = false,
            }
        }
        if !conn_open {
            // The operator has gone: end the toolbox and everything it started.
            let _ = killpg(child, Signal::SIGKILL);
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            return Ok(());
        }
    }
}

/// Reads whatever the outputs still hold, briefly.
fn drain(outputs: &[(OwnedFd, Kind)], open: &mut [bool], conn: &mut std::fs::File, buf: &mut [u8]) {
    for (i, (fd, kind)) in outputs.iter().enumerate() {
        while open[i] {
            let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut p, PollTimeout::from(20u16)), Ok(n) if n > 0) {
                break;
            }
            match nix::unistd::read(fd, buf) {
                Ok(n) if n > 0 => {
                    let _ = write_frame(conn, *kind, &buf[..n]);
                }
                _ => open[i] = false,
            }
        }
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_hostile_lengths_are_refused() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Stdin, b"ps\n").unwrap();
        write_frame(&mut wire, Kind::Resize, &[0, 24, 0, 80]).unwrap();
        let mut r = &wire[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Stdin, b"ps\n".to_vec()))
        );
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((k, resize_payload(&p)), (Kind::Resize, Some((24, 80))));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        // A length past the limit is refused before anything is allocated.
        let mut huge = vec![Kind::Stdout as u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(read_frame(&mut &huge[..]).is_err());
        // An unknown kind, and a frame cut short.
        assert!(read_frame(&mut &[99u8, 0, 0, 0, 0][..]).is_err());
        assert!(read_frame(&mut &[2u8, 0, 0, 0, 9, 1][..]).is_err());
        assert!(write_frame(&mut Vec::new(), Kind::Stdout, &vec![0; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn exit_codes_carry_signals_as_the_shell_does() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_payload(WaitStatus::Exited(pid, 3)), 3i32.to_be_bytes());
        assert_eq!(
            exit_payload(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            137i32.to_be_bytes()
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_never_panic_the_reader(bytes in proptest::collection::vec(0u8..=255, 0..64)) {
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_frame(&mut r) {}
        }
    }
}
