//! The API's typed client: over the unix socket, or over mutual TLS to a remote daemon
//! when `JUICE_REMOTE=HOST:PORT` is set (certificates from `JUICE_TLS`, default `$JUICE_HOME/tls`).
//!
//! One method per route, with the request and answer types the server uses ([`crate::api`]),
//! so the two cannot drift apart. A [`Client`] owns one single-threaded runtime for all its
//! requests; names in paths and values in queries are percent-encoded.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = juice_agent::client::Client::new("/var/lib/juice".as_ref())?;
//! for group in client.groups()? {
//!     println!("{} {}/{}", group.name, group.ready, group.size);
//! }
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::agent::{Change, DebugRequest, GroupDescription, GroupView, InstanceView, Stats};
use crate::api::{
    ApiError, ApplyQuery, DEBUG_PROTOCOL, EventsQuery, LogsQuery, OFFSET_HEADER, RollbackAnswer,
    RollbackRequest,
};
use crate::site::Site;
use crate::state::Event;

/// Where the daemon answers.
enum Target {
    Socket(PathBuf),
    /// `HOST:PORT`, and the directory with the client's certificates.
    Remote {
        addr: String,
        tls: PathBuf,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(path) => write!(f, "{}", path.display()),
            Target::Remote { addr, .. } => f.write_str(addr),
        }
    }
}

/// A client of the daemon's API.
pub struct Client {
    target: Target,
    /// Made once: the CLI's commands send many requests (`--follow` polls).
    runtime: tokio::runtime::Runtime,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {socket}: {reason} (is `juice daemon` running, and is JUICE_HOME the same?)"
    )]
    Unreachable { socket: String, reason: String },
    /// The daemon refused the request; `message` is its one sentence.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("the daemon's answer is not valid: {0}")]
    Protocol(String),
    #[error("cannot start the client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

/// A piece of an instance's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub bytes: Vec<u8>,
    /// The offset to ask for next.
    pub next: u64,
}

/// What a path segment keeps as is: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A name as one path segment: `a/b` cannot become two.
fn segment(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

/// `path?query`, the query's values form-encoded.
fn with_query(path: &str, query: &impl Serialize) -> Result<String, ClientError> {
    let query =
        serde_urlencoded::to_string(query).map_err(|e| ClientError::Encode(e.to_string()))?;
    Ok(if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    })
}

/// An answer: its status, the offset header when there is one, and the body.
struct Answer {
    status: StatusCode,
    offset: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    /// The body of a success; an error status becomes its one-sentence message.
    fn success(self) -> Result<Answer, ClientError> {
        if self.status.is_success() {
            return Ok(self);
        }
        let message = serde_json::from_slice::<ApiError>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).into_owned());
        Err(ClientError::Api {
            status: self.status.as_u16(),
            message,
        })
    }

    fn json<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        let answer = self.success()?;
        serde_json::from_slice(&answer.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl Client {
    /// A client of the daemon of `home`, or of `JUICE_REMOTE`'s when that is set.
    pub fn new(home: &Path) -> Result<Client, ClientError> {
        let target = match std::env::var("JUICE_REMOTE") {
            Ok(addr) if !addr.is_empty() => Target::Remote {
                addr,
                tls: std::env::var_os("JUICE_TLS").map_or_else(|| home.join("tls"), PathBuf::from),
            },
            _ => Target::Socket(home.join("juice.sock")),
        };
        Client::to(target)
    }

    /// A client of the daemon answering on `socket`, whatever the environment says.
    pub fn unix(socket: &Path) -> Result<Client, ClientError> {
        Client::to(Target::Socket(socket.to_owned()))
    }

    fn to(target: Target) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client { target, runtime })
    }

    /// Plans (`dry_run`) or applies a site; the changes either way.
    pub fn apply(&self, site: &Site, dry_run: bool) -> Result<Vec<Change>, ClientError> {
        let path = if dry_run {
            with_query("/v1/apply", &ApplyQuery { dry_run })?
        } else {
            "/v1/apply".to_owned()
        };
        self.send(Method::POST, &path, Some(encode(site)?))?.json()
    }

    pub fn groups(&self) -> Result<Vec<GroupView>, ClientError> {
        self.send(Method::GET, "/v1/groups", None)?.json()
    }

    pub fn group(&self, name: &str) -> Result<GroupDescription, ClientError> {
        self.send(Method::GET, &format!("/v1/groups/{}", segment(name)), None)?
            .json()
    }

    pub fn delete_group(&self, name: &str) -> Result<(), ClientError> {
        self.send(
            Method::DELETE,
            &format!("/v1/groups/{}", segment(name)),
            None,
        )?
        .success()
        .map(drop)
    }

    /// Rolls back to `to` (the previous revision when `None`); the revision now current.
    pub fn rollback(&self, name: &str, to: Option<u64>) -> Result<u64, ClientError> {
        let path = format!("/v1/groups/{}/rollback", segment(name));
        let answer: RollbackAnswer = self
            .send(Method::POST, &path, Some(encode(&RollbackRequest { to })?))?
            .json()?;
        Ok(answer.revision)
    }

    /// The host's OS versions (`GET /v1/os`).
    pub fn os_status(&self) -> Result<juice_os::slots::OsStatus, ClientError> {
        self.send(Method::GET, "/v1/os", None)?.json()
    }

    /// Pulls, verifies and writes an OS version as the next boot's trial.
    pub fn os_update(
        &self,
        reference: &str,
        keep: Option<usize>,
    ) -> Result<crate::os::Installed, ClientError> {
        let body = crate::api::OsUpdateRequest {
            reference: reference.to_owned(),
            keep,
        };
        self.send(Method::POST, "/v1/os/update", Some(encode(&body)?))?
            .json()
    }

    /// Makes a kept committed version boot next; the slot that will.
    pub fn os_rollback(&self, to: Option<&str>) -> Result<String, ClientError> {
        let body = crate::api::OsRollbackRequest {
            to: to.map(str::to_owned),
        };
        let answer: crate::api::OsRollbackAnswer = self
            .send(Method::POST, "/v1/os/rollback", Some(encode(&body)?))?
            .json()?;
        Ok(answer.slot)
    }

    /// Asks the host to reboot, saying how an undecided trial ends.
    pub fn os_reboot(&self, trial: Option<crate::os::TrialEnd>) -> Result<(), ClientError> {
        let body = crate::api::OsRebootRequest { trial };
        self.send(Method::POST, "/v1/os/reboot", Some(encode(&body)?))?
            .success()
            .map(drop)
    }

    pub fn instances(&self) -> Result<Vec<InstanceView>, ClientError> {
        self.send(Method::GET, "/v1/instances", None)?.json()
    }

    /// One sample of every instance's resource use (`GET /v1/stats`); CPU is a
    /// counter, so a rate needs two samples.
    pub fn stats(&self) -> Result<Stats, ClientError> {
        self.send(Method::GET, "/v1/stats", None)?.json()
    }

    /// Events after `since`, of one group or all, at most `limit` (the daemon caps it).
    pub fn events(
        &self,
        since: u64,
        group: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<Event>, ClientError> {
        let query = EventsQuery {
            since,
            group: group.map(str::to_owned),
            limit,
        };
        self.send(Method::GET, &with_query("/v1/events", &query)?, None)?
            .json()
    }

    /// An instance's log from `offset`.
    pub fn logs(&self, instance: &str, offset: u64) -> Result<LogChunk, ClientError> {
        let path = format!("/v1/instances/{}/logs", segment(instance));
        let answer = self
            .send(
                Method::GET,
                &with_query(&path, &LogsQuery { offset })?,
                None,
            )?
            .success()?;
        let next = match answer.offset.as_deref().map(str::parse) {
            Some(Ok(next)) => next,
            // An older daemon without the header: continue after what came.
            _ => offset + answer.body.len() as u64,
        };
        Ok(LogChunk {
            bytes: answer.body,
            next,
        })
    }

    fn unreachable(&self, e: &dyn std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            socket: self.target.to_string(),
            reason: e.to_string(),
        }
    }

    /// A fresh connection to the daemon.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let sender = match &self.target {
            Target::Remote { addr, tls } => {
                let stream = crate::tls::connect(addr, tls).await;
                handshake(stream.map_err(|e| self.unreachable(&e))?).await
            }
            Target::Socket(socket) => {
                let stream = tokio::net::UnixStream::connect(socket).await;
                handshake(stream.map_err(|e| self.unreachable(&e))?).await
            }
        };
        sender.map_err(|e| self.unreachable(&e))
    }

    /// Opens a debug session into `instance` and runs `session` with a stream that
    /// carries the session's frames (`juice_init::session`), on a thread of its
    /// own while this client's runtime relays; `session`'s result is returned.
    pub fn debug<R: Send + 'static>(
        &self,
        instance: &str,
        request: &DebugRequest,
        session: impl FnOnce(std::os::unix::net::UnixStream) -> R + Send + 'static,
    ) -> Result<R, ClientError> {
        let body = encode(request)?;
        self.runtime.block_on(async {
            let mut sender = self.connect().await?;
            let req = hyper::Request::builder()
                .method(Method::POST)
                .uri(format!("/v1/instances/{}/debug", segment(instance)))
                .header("host", "juice")
                .header("content-type", "application/json")
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, DEBUG_PROTOCOL)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ClientError::Encode(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| self.unreachable(&e))?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = resp.status();
                answer(resp).await?.success()?;
                return Err(ClientError::Protocol(format!(
                    "the daemon answered {status} instead of starting the session"
                )));
            }
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(ClientError::Runtime)?;
            ours.set_nonblocking(true).map_err(ClientError::Runtime)?;
            let mut ours = tokio::net::UnixStream::from_std(ours).map_err(ClientError::Runtime)?;
            let relay = tokio::spawn(async move {
                let mut daemon = hyper_util::rt::TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut daemon, &mut ours).await;
            });
            let out = tokio::task::spawn_blocking(move || session(theirs))
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()));
            relay.abort();
            out
        })
    }

    /// One request on a fresh connection.
    fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        self.runtime.block_on(async {
            let unreachable = |e: &dyn std::fmt::Display| self.unreachable(e);
            let mut sender = self.connect().await?;
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "juice")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Encode(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(&e))?;
            answer(resp).await
        })
    }
}

/// An answer read whole: its status, offset header and body.
async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> Result<Answer, ClientError> {
    let status = resp.status();
    let offset = resp
        .headers()
        .get(OFFSET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .to_bytes()
        .to_vec();
    Ok(Answer {
        status,
        offset,
        body,
    })
}

/// An HTTP/1 connection over `stream`, driven by a task on the client's runtime.
async fn handshake<T>(stream: T) -> Result<SendRequest<Full<Bytes>>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value).map_err(|e| ClientError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_and_path_names_are_escaped() {
        let query = EventsQuery {
            since: 7,
            group: Some("a&limit=1 b".into()),
            limit: None,
        };
        assert_eq!(
            with_query("/v1/events", &query).unwrap(),
            "/v1/events?since=7&group=a%26limit%3D1+b"
        );
        assert_eq!(segment("../x/y"), "..%2Fx%2Fy");
        assert_eq!(segment("web-1"), "web-1");
    }

    /// The client's requests decode with the server's own query types, and an error
    /// answer comes back as its status and sentence.
    #[test]
    fn the_server_reads_what_the_client_sends() {
        use axum::extract::{Path as UrlPath, Query};
        use axum::routing::get;

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("juice.sock");
        let server = tokio::runtime::Runtime::new().unwrap();
        let listener = {
            let _in = server.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        let app = axum::Router::new()
            .route(
                "/v1/events",
                get(|Query(q): Query<EventsQuery>| async move {
                    axum::Json(vec![Event {
                        seq: q.since + 1,
                        time_ms: 0,
                        group: q.group,
                        instance: None,
                        message: format!("limit {:?}", q.limit),
                    }])
                }),
            )
            .route(
                "/v1/groups/{name}",
                get(|UrlPath(name): UrlPath<String>| async move {
                    let error = format!("no group {name:?}");
                    (StatusCode::NOT_FOUND, axum::Json(ApiError { error }))
                }),
            );
        server.spawn(async move { axum::serve(listener, app).await });

        let client = Client::unix(&socket).unwrap();
        let events = client.events(41, Some("a&limit=1 b"), Some(5)).unwrap();
        assert_eq!(events[0].seq, 42);
        assert_eq!(events[0].group.as_deref(), Some("a&limit=1 b"));
        assert_eq!(events[0].message, "limit Some(5)");
        match client.group("a/b c") {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, 404);
                assert_eq!(message, "no group \"a/b c\"");
            }
            other => panic!("{other:?}"),
        }
    }
}
