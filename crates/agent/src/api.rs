//! The HTTP/JSON API on `$JUICE_HOME/juice.sock` (mode 0600), and its client.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, AgentError};
use crate::site::Site;

/// The OpenAPI document the daemon serves at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// An API error: a status and one sentence.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        let status = match e {
            AgentError::NoGroup(_) => StatusCode::NOT_FOUND,
            AgentError::Group { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, e.to_string())
    }
}

type Shared = State<Arc<Agent>>;

/// A group or instance name from the URL, checked before any handler sees it:
/// every name may become a path under `$JUICE_HOME`, so `..`, `/`, `%2F` and
/// the like are refused here, for every route, with 400.
struct Name(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Name {
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let UrlPath(name) = UrlPath::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
        check_name(&name)?;
        Ok(Name(name))
    }
}

fn check_name(name: &str) -> Result<(), Failure> {
    if juice_sandbox::process::valid_name(name) {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::BAD_REQUEST,
            format!(
                "{:?} is not a group or instance name (lowercase letters, digits and '-', at most 48)",
                name.chars().take(64).collect::<String>()
            ),
        ))
    }
}

/// Runs agent work off the async threads (it takes locks and starts processes).
async fn blocking<T: Send + 'static>(
    agent: Arc<Agent>,
    f: impl FnOnce(&Agent) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(move || f(&agent))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(Failure::from)
}

#[derive(Deserialize)]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn apply(
    State(agent): Shared,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> Result<Response, Failure> {
    let site: Site = serde_json::from_slice(&body).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a site: {e}"),
        )
    })?;
    let changes = blocking(agent, move |a| a.apply(&site, !q.dry_run)).await?;
    Ok(axum::Json(changes).into_response())
}

async fn groups(State(agent): Shared) -> Result<Response, Failure> {
    Ok(axum::Json(blocking(agent, |a| a.groups()).await?).into_response())
}

async fn group(State(agent): Shared, Name(name): Name) -> Result<Response, Failure> {
    Ok(axum::Json(blocking(agent, move |a| a.describe(&name)).await?).into_response())
}

async fn delete_group(State(agent): Shared, Name(name): Name) -> Result<Response, Failure> {
    blocking(agent, move |a| a.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Serialize)]
pub struct RollbackRequest {
    pub to: Option<u64>,
}

async fn rollback(
    State(agent): Shared,
    Name(name): Name,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: RollbackRequest = serde_json::from_slice(&body).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("bad rollback request: {e}"),
        )
    })?;
    let to = blocking(agent, move |a| a.rollback(&name, req.to)).await?;
    Ok(axum::Json(serde_json::json!({ "revision": to })).into_response())
}

async fn instances(State(agent): Shared) -> Result<Response, Failure> {
    Ok(axum::Json(blocking(agent, |a| Ok(a.instances())).await?).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    group: Option<String>,
}

async fn events(State(agent): Shared, Query(q): Query<EventsQuery>) -> Result<Response, Failure> {
    if let Some(g) = &q.group {
        check_name(g)?;
    }
    let events = blocking(agent, move |a| {
        Ok(a.state().events(q.since, q.group.as_deref(), 1000)?)
    })
    .await?;
    Ok(axum::Json(events).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    offset: u64,
}

/// The instance's log from `offset`; the `x-juice-offset` header says where to continue.
async fn logs(
    State(agent): Shared,
    Name(name): Name,
    Query(q): Query<LogsQuery>,
) -> Result<Response, Failure> {
    let path = agent.log_path(&name).ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            format!("no logs for instance {name:?}"),
        )
    })?;
    let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        // The log directory is the appliance's to write: follow nothing in it.
        let (dir, file) = (
            path.parent().unwrap_or(Path::new("/")),
            path.file_name().unwrap_or_default(),
        );
        let root = juice_image::confine::open_root(dir)?;
        let mut f = juice_image::confine::open_beneath(&root, Path::new(file))?;
        let len = f.metadata()?.len();
        // A rotated (shorter) file starts again from 0.
        let from = if q.offset > len { 0 } else { q.offset };
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.take(4 << 20).read_to_end(&mut buf)?;
        Ok((buf.clone(), from + buf.len() as u64))
    })
    .await
    .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("read the log: {e}"),
        )
    })?;
    Ok(([("x-juice-offset", bytes.1.to_string())], bytes.0).into_response())
}

async fn metrics(State(agent): Shared) -> Result<Response, Failure> {
    let text = blocking(agent, |a| Ok(a.metrics_text())).await?;
    Ok((
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/apply", post(apply))
        .route("/v1/groups", get(groups))
        .route("/v1/groups/{name}", get(group))
        .route("/v1/groups/{name}", delete(delete_group))
        .route("/v1/groups/{name}/rollback", post(rollback))
        .route("/v1/instances", get(instances))
        .route("/v1/instances/{name}/logs", get(logs))
        .route("/v1/events", get(events))
        // A site file is small; anything bigger is refused before it is read.
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(agent)
}

/// Binds the socket, owner-only.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if path.exists() {
        // A socket nobody answers on is a leftover of a killed daemon.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon is answering on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created owner-only from the start: no window where others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A client of the API: over the unix socket, or over mutual TLS to a remote daemon
/// when `JUICE_REMOTE=HOST:PORT` is set (certificates from `JUICE_TLS`, default `$JUICE_HOME/tls`).
pub struct Client {
    socket: PathBuf,
    remote: Option<(String, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {socket}: {reason} (is `juice daemon` running, and is JUICE_HOME the same?)"
    )]
    Unreachable { socket: String, reason: String },
    #[error("{0}")]
    Api(String),
    #[error("the daemon's answer is not valid: {0}")]
    Protocol(String),
}

impl Client {
    pub fn new(home: &Path) -> Client {
        let remote = std::env::var("JUICE_REMOTE")
            .ok()
            .filter(|r| !r.is_empty())
            .map(|r| {
                let tls =
                    std::env::var_os("JUICE_TLS").map_or_else(|| home.join("tls"), PathBuf::from);
                (r, tls)
            });
        Client {
            socket: home.join("juice.sock"),
            remote,
        }
    }

    /// One request; returns the status, headers we care about and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Option<String>, Vec<u8>), ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let socket = self.socket.clone();
        let remote = self.remote.clone();
        rt.block_on(async move {
            let target = remote
                .as_ref()
                .map_or_else(|| socket.display().to_string(), |(r, _)| r.clone());
            let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable {
                socket: target.clone(),
                reason: e.to_string(),
            };
            let mut sender = match &remote {
                Some((addr, tls)) => {
                    let stream = crate::tls::connect(addr, tls)
                        .await
                        .map_err(|e| unreachable(&e))?;
                    let (sender, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                            .await
                            .map_err(|e| unreachable(&e))?;
                    tokio::spawn(conn);
                    sender
                }
                None => {
                    let stream = tokio::net::UnixStream::connect(&socket)
                        .await
                        .map_err(|e| unreachable(&e))?;
                    let (sender, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                            .await
                            .map_err(|e| unreachable(&e))?;
                    tokio::spawn(conn);
                    sender
                }
            };
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "juice")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(&e))?;
            let status = resp.status().as_u16();
            let offset = resp
                .headers()
                .get("x-juice-offset")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .to_bytes();
            Ok((status, offset, bytes.to_vec()))
        })
    }

    /// A JSON request whose answer is JSON; an error status becomes its one-sentence message.
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, _, bytes) = self.request(method, path, body)?;
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api(msg));
        }
        let bytes = if bytes.is_empty() {
            b"null".to_vec()
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
