//! `juice debug`: a toolbox beside a running instance, through the daemon
//! (locally or over mutual TLS), with the session's frames carried on one
//! connection (`juice_init::session`). On a terminal the session gets one too,
//! in raw mode, with its size kept up to date; otherwise stdin, stdout and
//! stderr are passed through as they are, and the exit code is the program's.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use juice_agent::agent::DebugRequest;
use juice_init::session::{Kind, read_frame, write_frame};
use nix::sys::termios;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What `juice debug` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct DebugArgs {
    /// The instance to debug (see `juice get instances`).
    pub instance: String,
    /// The toolbox image (default: juice-toolbox, built by `juice build examples/toolbox`).
    #[arg(long)]
    pub image: Option<String>,
    /// Separate streams even on a terminal.
    #[arg(long)]
    pub no_tty: bool,
    /// The command to run in the toolbox (default: its own, a shell).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs the session; its exit code.
pub fn debug(args: DebugArgs) -> Result<i32> {
    let tty = !args.no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (rows, cols) = if tty { size() } else { (0, 0) };
    let request = DebugRequest {
        image: args.image.clone(),
        command: args.command.clone(),
        tty,
        rows,
        cols,
    };
    let client = juice_agent::client::Client::new(&crate::juice_home())?;
    let outcome = client.debug(&args.instance, &request, move |stream| run(stream, tty))?;
    outcome.map_err(Into::into)
}

/// The terminal's size, as (rows, columns).
fn size() -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ on our stdout writes one valid winsize.
    if unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return (24, 80);
    }
    (ws.ws_row, ws.ws_col)
}

/// Raw mode on stdin for the length of the session; restored when dropped.
struct Raw(termios::Termios);

impl Raw {
    fn enter() -> std::io::Result<Raw> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw)?;
        Ok(Raw(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), termios::SetArg::TCSANOW, &self.0);
    }
}

fn run(stream: UnixStream, tty: bool) -> std::result::Result<i32, String> {
    let raw = if tty {
        Some(Raw::enter().map_err(|e| format!("cannot put the terminal in raw mode: {e}"))?)
    } else {
        None
    };
    let writer = stream
        .try_clone()
        .map_err(|e| format!("cannot share the connection: {e}"))?;
    let lock = std::sync::Arc::new(std::sync::Mutex::new(writer));
    // Input: stdin into Stdin frames; its end into StdinEnd.
    {
        let lock = lock.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            let mut stdin = std::io::stdin().lock();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                let sent = if n == 0 {
                    write_frame(&mut *w, Kind::StdinEnd, &[])
                } else {
                    write_frame(&mut *w, Kind::Stdin, &buf[..n])
                };
                if n == 0 || sent.is_err() {
                    return;
                }
            }
        });
    }
    if tty {
        // The terminal's size follows the window (SIGWINCH), checked every 200 ms.
        let lock = lock.clone();
        std::thread::spawn(move || {
            let mut last = size();
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let now = size();
                if now != last {
                    last = now;
                    let mut p = [0u8; 4];
                    p[..2].copy_from_slice(&now.0.to_be_bytes());
                    p[2..].copy_from_slice(&now.1.to_be_bytes());
                    let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                    if write_frame(&mut *w, Kind::Resize, &p).is_err() {
                        return;
                    }
                }
            }
        });
    }
    let mut reader = stream;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let outcome = loop {
        match read_frame(&mut reader) {
            Ok(Some((Kind::Stdout, data))) => {
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
            }
            Ok(Some((Kind::Stderr, data))) => {
                let _ = stderr.write_all(&data);
            }
            Ok(Some((Kind::Exit, p))) => {
                break <[u8; 4]>::try_from(p.as_slice())
                    .map(i32::from_be_bytes)
                    .map_err(|_| "the session's exit frame is not valid".to_owned());
            }
            Ok(Some((Kind::Error, why))) => {
                break Err(format!(
                    "the debug session failed: {}",
                    String::from_utf8_lossy(&why)
                ));
            }
            Ok(Some(_)) => {}
            Ok(None) => break Err("the daemon ended the session without an exit code".into()),
            Err(e) => break Err(format!("the session's connection broke: {e}")),
        }
    };
    drop(raw);
    outcome
}
