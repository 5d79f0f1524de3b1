//! hello-web: the example appliance. A small HTTP/1.1 server on the standard
//! library only, so its closure is just libc, libgcc_s and the loader.
//!
//! `GET /healthz` answers `ok`; `GET /` answers a greeting with the
//! appliance's hostname; `GET /visits` counts visits in `--data DIR`
//! (durably: the count survives a crash of the instance); other paths are
//! served from `--root` if given. With `--data`, every start appends a line
//! naming the kernel's boot id to `DIR/starts`, and `GET /starts` shows them:
//! a record of which boots of the host the volume has seen.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

struct Config {
    port: u16,
    root: Option<PathBuf>,
    data: Option<PathBuf>,
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config {
        port: 8080,
        root: None,
        data: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let v = args.next().ok_or("--port needs a value")?;
                config.port = v
                    .parse()
                    .map_err(|_| format!("--port: {v:?} is not a port"))?;
            }
            "--root" => config.root = Some(args.next().ok_or("--root needs a value")?.into()),
            "--data" => config.data = Some(args.next().ok_or("--data needs a value")?.into()),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (use --port N, --root DIR, --data DIR)"
                ));
            }
        }
    }
    Ok(config)
}

fn main() {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hello-web: {e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(("0.0.0.0", config.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello-web: cannot listen on port {}: {e}", config.port);
            std::process::exit(1);
        }
    };
    if let Some(dir) = &config.data
        && let Err(e) = record_start(dir)
    {
        eprintln!(
            "hello-web: cannot record this start in {}: {e}",
            dir.display()
        );
        std::process::exit(1);
    }
    println!("hello-web: listening on port {}", config.port);
    let dirs = std::sync::Arc::new((config.root, config.data));
    for stream in listener.incoming().flatten() {
        let dirs = dirs.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, dirs.0.as_deref(), dirs.1.as_deref()) {
                eprintln!("hello-web: {e}");
            }
        });
    }
}

fn serve(stream: TcpStream, root: Option<&Path>, data: Option<&Path>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers; this server ignores them.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let (status, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", b"ok\n".to_vec()),
        ("GET", "/") => {
            let host = std::fs::read_to_string("/etc/hostname")
                .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
                .unwrap_or_default();
            (
                "200 OK",
                format!("hello from juice ({})\n", host.trim()).into_bytes(),
            )
        }
        ("GET", "/visits") => match data.map(count_visit) {
            Some(Ok(n)) => ("200 OK", format!("{n}\n").into_bytes()),
            Some(Err(e)) => (
                "500 Internal Server Error",
                format!("cannot count: {e}\n").into_bytes(),
            ),
            None => ("404 Not Found", b"no --data directory\n".to_vec()),
        },
        ("GET", "/starts") => match data.map(|d| std::fs::read(d.join("starts"))) {
            Some(Ok(body)) => ("200 OK", body),
            Some(Err(e)) => (
                "500 Internal Server Error",
                format!("cannot read the starts: {e}\n").into_bytes(),
            ),
            None => ("404 Not Found", b"no --data directory\n".to_vec()),
        },
        ("GET", p) => match root.and_then(|r| static_file(r, p)) {
            Some(body) => ("200 OK", body),
            None => ("404 Not Found", b"not found\n".to_vec()),
        },
        _ => ("405 Method Not Allowed", b"method not allowed\n".to_vec()),
    };
    // One line per request, as a web server's access log; health probes are not logged.
    if path != "/healthz" {
        println!(
            "hello-web: {method} {path} {}",
            status.split(' ').next().unwrap_or("")
        );
    }
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(&body)
}

/// A file under `root`, refusing any path that would climb out of it.
fn static_file(root: &Path, url_path: &str) -> Option<Vec<u8>> {
    let rel = Path::new(url_path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    std::fs::read(root.join(rel)).ok()
}

/// Appends `start BOOT_ID` to `starts` in `dir`, durably, before serving.
fn record_start(dir: &Path) -> std::io::Result<()> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("starts"))?;
    file.lock()?;
    writeln!(file, "start {}", boot.trim())?;
    file.sync_all()
}

/// Adds one to `visits` in `dir` and returns the new count. The file is locked
/// (instances of a group share the directory) and synced before the answer.
fn count_visit(dir: &Path) -> std::io::Result<u64> {
    let path = dir.join("visits");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    file.lock()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)?;
    let n = text.trim().parse::<u64>().unwrap_or(0) + 1;
    file.set_len(0)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
    writeln!(file, "{n}")?;
    file.sync_all()?;
    Ok(n)
}
