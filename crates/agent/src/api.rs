//! The HTTP/JSON API on `$JUICE_HOME/juice.sock` (mode 0600); its client is [`crate::client`].
//!
//! The router and the OpenAPI document it serves at `/openapi.json` are built from one list
//! of handlers ([`routes`]): each handler carries its `#[utoipa::path]`, and
//! [`utoipa_axum::routes!`] will not take a handler without one, so a route cannot be added
//! without its place in the document. `openapi.json` beside this file is a checked-in copy of
//! the document, so a change to the API shows in review; a test fails when it is stale.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::openapi::OpenApi as Document;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::agent::{
    Agent, AgentError, Change, DebugRequest, GroupDescription, GroupView, InstanceView, Stats,
};
use crate::os::{Installed, OsError, TrialEnd};
use crate::site::Site;
use crate::state::Event;
use juice_os::slots::OsStatus;

/// The checked-in copy of the OpenAPI document (a test keeps it equal to [`document`]).
pub const OPENAPI: &str = include_str!("openapi.json");

/// An API error: a status and one sentence.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: String,
}

/// Why a request failed; [`Failure::status`] maps each variant to its status code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The URL's path did not parse.
    #[error("{0}")]
    BadPath(String),
    /// A group or instance name that could become a path outside `$JUICE_HOME`.
    #[error(
        "{0:?} is not a group or instance name (lowercase letters, digits and '-', at most 48)"
    )]
    BadName(String),
    #[error("the request body is not a site: {0}")]
    NotASite(serde_json::Error),
    #[error("bad rollback request: {0}")]
    BadRollback(serde_json::Error),
    #[error("no logs for instance {0:?}")]
    NoLogs(String),
    #[error("read the log: {0}")]
    ReadLog(std::io::Error),
    #[error("bad debug request: {0}")]
    BadDebug(String),
    #[error("bad OS request: {0}")]
    BadOs(serde_json::Error),
    /// The blocking task running agent work panicked or was cancelled.
    #[error("{0}")]
    Task(tokio::task::JoinError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::BadPath(_)
            | Failure::BadName(_)
            | Failure::NotASite(_)
            | Failure::BadRollback(_)
            | Failure::BadDebug(_)
            | Failure::BadOs(_) => StatusCode::BAD_REQUEST,
            Failure::NoLogs(_) => StatusCode::NOT_FOUND,
            Failure::ReadLog(_) | Failure::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Failure::Agent(e) => match e {
                AgentError::NoGroup(_) | AgentError::NoInstance(_) => StatusCode::NOT_FOUND,
                AgentError::DebugRefused { .. } => StatusCode::FORBIDDEN,
                AgentError::Debug { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                // The group's declaration cannot be carried out (an image that will not
                // build or pull, no earlier revision, a failing start): the client's to fix.
                AgentError::Group { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                // A backend this host cannot run (no QEMU, no guest kernel): the host's to fix.
                AgentError::Start {
                    source: juice_runtime::BackendError::Unavailable(_),
                    ..
                } => StatusCode::SERVICE_UNAVAILABLE,
                AgentError::Start { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                AgentError::State(_) | AgentError::Setup(_) => StatusCode::INTERNAL_SERVER_ERROR,
                AgentError::Os(e) => os_error_status(e),
            },
        }
    }
}

fn os_error_status(e: &OsError) -> StatusCode {
    use juice_os::slots::SlotsError;
    match e {
        OsError::NotJuiceOs | OsError::Slots(SlotsError::NoVersion(_)) => StatusCode::NOT_FOUND,
        OsError::TrialNeedsChoice
        | OsError::Slots(
            SlotsError::NotCommitted { .. }
            | SlotsError::NothingToRollBackTo
            | SlotsError::NotTrial(_)
            | SlotsError::AlreadyRunning(_)
            | SlotsError::NotJuiceOs,
        ) => StatusCode::CONFLICT,
        OsError::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        OsError::Slots(_) | OsError::Reboot(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status();
        (
            status,
            axum::Json(ApiError {
                error: self.to_string(),
            }),
        )
            .into_response()
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
            .map_err(|e| Failure::BadPath(e.body_text()))?;
        check_name(&name)?;
        Ok(Name(name))
    }
}

fn check_name(name: &str) -> Result<(), Failure> {
    if juice_runtime::process::valid_name(name) {
        Ok(())
    } else {
        Err(Failure::BadName(name.chars().take(64).collect()))
    }
}

/// Runs agent work off the async threads (it takes locks and starts processes).
async fn blocking<T: Send + 'static>(
    agent: Arc<Agent>,
    f: impl FnOnce(&Agent) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(move || f(&agent))
        .await
        .map_err(Failure::Task)?
        .map_err(Failure::from)
}

/// `POST /v1/apply`'s query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApplyQuery {
    /// Only plan: say what would change, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Apply a site (the host's whole desired state); `?dry_run=true` only plans.
#[utoipa::path(
    post,
    path = "/v1/apply",
    params(ApplyQuery),
    request_body = Site,
    responses(
        (status = 200, description = "The changes", body = Vec<Change>),
        (status = 400, description = "The body is not a site", body = ApiError),
        (status = 422, description = "A group cannot be applied", body = ApiError),
    )
)]
async fn apply(
    State(agent): Shared,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> Result<axum::Json<Vec<Change>>, Failure> {
    let site: Site = serde_json::from_slice(&body).map_err(Failure::NotASite)?;
    let changes = blocking(agent, move |a| a.apply(&site, !q.dry_run)).await?;
    Ok(axum::Json(changes))
}

/// Groups with their state.
#[utoipa::path(
    get,
    path = "/v1/groups",
    responses((status = 200, description = "Groups", body = Vec<GroupView>))
)]
async fn groups(State(agent): Shared) -> Result<axum::Json<Vec<GroupView>>, Failure> {
    Ok(axum::Json(blocking(agent, |a| a.groups()).await?))
}

/// A group: revisions, rollout, instances, recent events.
#[utoipa::path(
    get,
    path = "/v1/groups/{name}",
    params(("name" = String, Path, description = "The group")),
    responses(
        (status = 200, description = "The group", body = GroupDescription),
        (status = 400, description = "Not a group name", body = ApiError),
        (status = 404, description = "No such group", body = ApiError),
    )
)]
async fn group(
    State(agent): Shared,
    Name(name): Name,
) -> Result<axum::Json<GroupDescription>, Failure> {
    Ok(axum::Json(
        blocking(agent, move |a| a.describe(&name)).await?,
    ))
}

/// Delete a group and stop its instances.
#[utoipa::path(
    delete,
    path = "/v1/groups/{name}",
    params(("name" = String, Path, description = "The group")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a group name", body = ApiError),
        (status = 404, description = "No such group", body = ApiError),
    )
)]
async fn delete_group(State(agent): Shared, Name(name): Name) -> Result<StatusCode, Failure> {
    blocking(agent, move |a| a.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/groups/{name}/rollback`'s body.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct RollbackRequest {
    /// The revision to go back to; the previous one when absent.
    pub to: Option<u64>,
}

/// `POST /v1/groups/{name}/rollback`'s answer.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct RollbackAnswer {
    /// The revision now current.
    pub revision: u64,
}

/// Roll back to a kept revision (default: the previous one).
#[utoipa::path(
    post,
    path = "/v1/groups/{name}/rollback",
    params(("name" = String, Path, description = "The group")),
    request_body = RollbackRequest,
    responses(
        (status = 200, description = "The revision now current", body = RollbackAnswer),
        (status = 400, description = "Not a group name, or not a rollback request", body = ApiError),
        (status = 404, description = "No such group", body = ApiError),
        (status = 422, description = "No such revision to go back to", body = ApiError),
    )
)]
async fn rollback(
    State(agent): Shared,
    Name(name): Name,
    body: Bytes,
) -> Result<axum::Json<RollbackAnswer>, Failure> {
    let req: RollbackRequest = serde_json::from_slice(&body).map_err(Failure::BadRollback)?;
    let revision = blocking(agent, move |a| a.rollback(&name, req.to)).await?;
    Ok(axum::Json(RollbackAnswer { revision }))
}

fn os_of(a: &Agent) -> Result<&crate::os::OsControl, AgentError> {
    a.os()
        .map(|o| &**o)
        .ok_or(AgentError::Os(OsError::NotJuiceOs))
}

/// The host's OS versions: kept, booted, committed, trial, the next boot, the last failure.
#[utoipa::path(
    get,
    path = "/v1/os",
    responses(
        (status = 200, description = "The OS versions", body = OsStatus),
        (status = 404, description = "This host does not run Juice OS", body = ApiError),
    )
)]
async fn os_status(State(agent): Shared) -> Result<axum::Json<OsStatus>, Failure> {
    Ok(axum::Json(
        blocking(agent, |a| Ok(os_of(a)?.status()?)).await?,
    ))
}

/// `POST /v1/os/update`'s body.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsUpdateRequest {
    /// A local OS version (name or digest) or a registry reference, pulled first.
    pub reference: String,
    /// How many versions to keep, this one included (default 3).
    #[serde(default)]
    pub keep: Option<usize>,
}

/// Pull, verify (signature and policy) and write an OS version beside the kept ones,
/// as the next boot's trial.
#[utoipa::path(
    post,
    path = "/v1/os/update",
    request_body = OsUpdateRequest,
    responses(
        (status = 200, description = "Written; the next boot is its trial", body = Installed),
        (status = 400, description = "Not an update request", body = ApiError),
        (status = 404, description = "This host does not run Juice OS", body = ApiError),
        (status = 422, description = "Refused: unsigned, untrusted, damaged or not an OS version", body = ApiError),
    )
)]
async fn os_update(State(agent): Shared, body: Bytes) -> Result<axum::Json<Installed>, Failure> {
    let req: OsUpdateRequest = serde_json::from_slice(&body).map_err(Failure::BadOs)?;
    let keep = req.keep.unwrap_or(juice_os::slots::KEEP).max(2);
    Ok(axum::Json(
        blocking(agent, move |a| Ok(os_of(a)?.update(&req.reference, keep)?)).await?,
    ))
}

/// `POST /v1/os/rollback`'s body.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsRollbackRequest {
    /// The kept, committed version to boot next; the one before the current by default.
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /v1/os/rollback`'s answer.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct OsRollbackAnswer {
    /// The slot that boots next.
    pub slot: String,
}

/// Make a kept, committed OS version the one the next boot starts.
#[utoipa::path(
    post,
    path = "/v1/os/rollback",
    request_body = OsRollbackRequest,
    responses(
        (status = 200, description = "The slot that boots next", body = OsRollbackAnswer),
        (status = 404, description = "Not Juice OS, or no such kept version", body = ApiError),
        (status = 409, description = "That version never committed, or nothing to go back to", body = ApiError),
    )
)]
async fn os_rollback(
    State(agent): Shared,
    body: Bytes,
) -> Result<axum::Json<OsRollbackAnswer>, Failure> {
    let req: OsRollbackRequest = serde_json::from_slice(&body).map_err(Failure::BadOs)?;
    let slot = blocking(agent, move |a| Ok(os_of(a)?.rollback(req.to.as_deref())?)).await?;
    Ok(axum::Json(OsRollbackAnswer { slot }))
}

/// `POST /v1/os/reboot`'s body.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsRebootRequest {
    /// During a trial: whether the reboot commits it or abandons it.
    #[serde(default)]
    pub trial: Option<TrialEnd>,
}

/// Reboot the host through its PID 1 (during a trial, saying how the trial ends).
#[utoipa::path(
    post,
    path = "/v1/os/reboot",
    request_body = OsRebootRequest,
    responses(
        (status = 202, description = "PID 1 is rebooting the host"),
        (status = 404, description = "This host does not run Juice OS", body = ApiError),
        (status = 409, description = "A trial is undecided: say commit or abort", body = ApiError),
    )
)]
async fn os_reboot(State(agent): Shared, body: Bytes) -> Result<StatusCode, Failure> {
    let req: OsRebootRequest = serde_json::from_slice(&body).map_err(Failure::BadOs)?;
    blocking(agent, move |a| Ok(os_of(a)?.prepare_reboot(req.trial)?)).await?;
    // PID 1 stops the daemon first thing: ask it once this answer is on its way.
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if let Err(e) = crate::os::request_reboot() {
            eprintln!("juice: {e}");
        }
    });
    Ok(StatusCode::ACCEPTED)
}

/// Instances with their health.
#[utoipa::path(
    get,
    path = "/v1/instances",
    responses((status = 200, description = "Instances", body = Vec<InstanceView>))
)]
async fn instances(State(agent): Shared) -> Result<axum::Json<Vec<InstanceView>>, Failure> {
    Ok(axum::Json(blocking(agent, |a| Ok(a.instances())).await?))
}

/// One sample of every instance's resource use (cpu as a counter, memory, pids,
/// network, its group's restarts) and the sums per group, for `juice top`.
#[utoipa::path(
    get,
    path = "/v1/stats",
    responses((status = 200, description = "One sample", body = Stats))
)]
async fn stats(State(agent): Shared) -> Result<axum::Json<Stats>, Failure> {
    Ok(axum::Json(blocking(agent, |a| a.stats()).await?))
}

/// The most events one request returns.
pub const EVENTS_LIMIT: u32 = 1000;

/// `GET /v1/events`' query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this sequence number.
    #[serde(default)]
    pub since: u64,
    /// Only this group's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// At most this many (and never more than 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Events after a sequence number.
#[utoipa::path(
    get,
    path = "/v1/events",
    params(EventsQuery),
    responses(
        (status = 200, description = "Events, oldest first", body = Vec<Event>),
        (status = 400, description = "Not a group name", body = ApiError),
    )
)]
async fn events(
    State(agent): Shared,
    Query(q): Query<EventsQuery>,
) -> Result<axum::Json<Vec<Event>>, Failure> {
    if let Some(g) = &q.group {
        check_name(g)?;
    }
    let limit = q.limit.map_or(EVENTS_LIMIT, |l| l.min(EVENTS_LIMIT)) as usize;
    let events = blocking(agent, move |a| {
        Ok(a.state().events(q.since, q.group.as_deref(), limit)?)
    })
    .await?;
    Ok(axum::Json(events))
}

/// Who is on the other end of a connection, for the events a debug session
/// records: the peer's uid on the local socket, a client certificate's
/// subject over mutual TLS.
#[derive(Debug, Clone)]
pub struct Peer(pub String);

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Peer {
        Peer(match stream.io().peer_cred() {
            Ok(c) => format!("uid {} on the local socket", c.uid()),
            Err(_) => "the local socket".into(),
        })
    }
}

/// The `Upgrade` protocol of a debug session.
pub const DEBUG_PROTOCOL: &str = "juice-debug";

/// Open a debug session beside a running instance. The connection is upgraded
/// (`Upgrade: juice-debug`) and then carries `juice_init::session`'s frames:
/// the client's input and terminal size in, the program's output and its exit
/// code out.
#[utoipa::path(
    post,
    path = "/v1/instances/{name}/debug",
    params(("name" = String, Path, description = "The instance")),
    request_body = DebugRequest,
    responses(
        (status = 101, description = "The session has begun; frames follow"),
        (status = 400, description = "Not an instance name, not a debug request, or no upgrade asked for", body = ApiError),
        (status = 403, description = "The trust policy refuses the toolbox", body = ApiError),
        (status = 404, description = "No such instance", body = ApiError),
        (status = 422, description = "The session cannot start", body = ApiError),
    )
)]
async fn debug(
    State(agent): Shared,
    Name(name): Name,
    mut request: axum::extract::Request,
) -> Result<Response, Failure> {
    let upgrade_asked = request
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(DEBUG_PROTOCOL.as_bytes()));
    if !upgrade_asked {
        return Err(Failure::BadDebug(format!(
            "a debug session needs `Upgrade: {DEBUG_PROTOCOL}`"
        )));
    }
    let who = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map_or_else(|| "an unknown client".to_owned(), |c| c.0.0.clone());
    let on_upgrade = hyper::upgrade::on(&mut request);
    let body = axum::body::to_bytes(request.into_body(), 1 << 16)
        .await
        .map_err(|e| Failure::BadDebug(e.to_string()))?;
    let req: DebugRequest =
        serde_json::from_slice(&body).map_err(|e| Failure::BadDebug(e.to_string()))?;
    let opener = agent.clone();
    let (session, open) = blocking(opener, move |a| a.open_debug(&name, &req, &who)).await?;
    tokio::spawn(async move {
        let juice_runtime::DebugSession { conn, finish } = session;
        let code = match on_upgrade.await {
            Ok(upgraded) => relay_session(upgraded, conn).await,
            Err(_) => None,
        };
        // Our end is closed by now, which tells the session to end what is left of it.
        let _ = tokio::task::spawn_blocking(move || {
            finish();
            agent.close_debug(&open, code);
        })
        .await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, DEBUG_PROTOCOL)
        .body(axum::body::Body::empty())
        .map_err(|e| Failure::BadDebug(e.to_string()))
}

/// Carries a session's frames between the client and the backend until the
/// session ends (its exit code, if it sent one) or the client goes. Frames from
/// the session are read one by one (a microVM's guest is untrusted: a length
/// past the limit ends the relay), bytes from the client are passed on as they
/// come: the session reads them as frames itself.
async fn relay_session(
    upgraded: hyper::upgrade::Upgraded,
    conn: std::os::fd::OwnedFd,
) -> Option<i32> {
    use juice_init::session::{Kind, MAX_FRAME};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = hyper_util::rt::TokioIo::new(upgraded);
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let std_conn = std::os::unix::net::UnixStream::from(conn);
    std_conn.set_nonblocking(true).ok()?;
    let conn = tokio::net::UnixStream::from_std(std_conn).ok()?;
    let (mut session_r, mut session_w) = conn.into_split();
    let down = async {
        let mut code = None;
        loop {
            let mut head = [0u8; 5];
            if session_r.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            let Some(len) = usize::try_from(len).ok().filter(|n| *n <= MAX_FRAME) else {
                break;
            };
            let mut payload = vec![0u8; len];
            if session_r.read_exact(&mut payload).await.is_err() {
                break;
            }
            if head[0] == Kind::Exit as u8
                && let Ok(b) = <[u8; 4]>::try_from(payload.as_slice())
            {
                code = Some(i32::from_be_bytes(b));
            }
            if client_w.write_all(&head).await.is_err()
                || client_w.write_all(&payload).await.is_err()
                || client_w.flush().await.is_err()
            {
                break;
            }
            if head[0] == Kind::Exit as u8 || head[0] == Kind::Error as u8 {
                break;
            }
        }
        let _ = client_w.shutdown().await;
        code
    };
    let up = async {
        let _ = tokio::io::copy(&mut client_r, &mut session_w).await;
        // The client has gone (or stopped sending): the session ends what it runs.
        let _ = session_w.shutdown().await;
    };
    tokio::pin!(down);
    tokio::select! {
        code = &mut down => code,
        () = up => down.await,
    }
}

/// The header that says where the next read of a log continues.
pub const OFFSET_HEADER: &str = "x-juice-offset";

/// `GET /v1/instances/{name}/logs`' query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// The byte to read from (a log rotated since starts again from 0).
    #[serde(default)]
    pub offset: u64,
}

/// An instance's log from `offset`; the `x-juice-offset` header says where to continue.
#[utoipa::path(
    get,
    path = "/v1/instances/{name}/logs",
    params(("name" = String, Path, description = "The instance"), LogsQuery),
    responses(
        (status = 200, description = "Log bytes (at most 4 MiB)", body = Vec<u8>,
         content_type = "application/octet-stream",
         headers(("x-juice-offset" = u64, description = "Where the next read continues"))),
        (status = 400, description = "Not an instance name", body = ApiError),
        (status = 404, description = "No such instance", body = ApiError),
    )
)]
async fn logs(
    State(agent): Shared,
    Name(name): Name,
    Query(q): Query<LogsQuery>,
) -> Result<Response, Failure> {
    let path = agent.log_path(&name).ok_or(Failure::NoLogs(name))?;
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
    .map_err(Failure::Task)?
    .map_err(Failure::ReadLog)?;
    Ok(([(OFFSET_HEADER, bytes.1.to_string())], bytes.0).into_response())
}

/// Prometheus metrics: instances by health, restarts, start and probe durations, rollout outcomes.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "OpenMetrics text", body = String,
               content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"))
)]
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

/// The document's parts that are not paths.
#[derive(OpenApi)]
#[openapi(info(
    title = "Juice host agent",
    version = "1",
    description = "The host agent's API, on `$JUICE_HOME/juice.sock`."
))]
struct ApiDoc;

/// The document, built once: it never changes while the daemon runs.
static DOCUMENT: LazyLock<Document> = LazyLock::new(document);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "OpenAPI", body = Object))
)]
async fn openapi() -> axum::Json<&'static Document> {
    axum::Json(&DOCUMENT)
}

/// Every route with its path spec: the one list the router and the document are built from.
fn routes() -> OpenApiRouter<Arc<Agent>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi))
        .routes(routes!(metrics))
        .routes(routes!(apply))
        .routes(routes!(groups))
        .routes(routes!(group, delete_group))
        .routes(routes!(rollback))
        .routes(routes!(instances))
        .routes(routes!(stats))
        .routes(routes!(logs))
        .routes(routes!(events))
        .routes(routes!(debug))
        .routes(routes!(os_status))
        .routes(routes!(os_update))
        .routes(routes!(os_rollback))
        .routes(routes!(os_reboot))
}

/// The OpenAPI document of [`router`]'s routes.
pub fn document() -> Document {
    routes().into_openapi()
}

/// The router, waiting for its agent: every route is added in [`routes`], never here.
fn app() -> Router<Arc<Agent>> {
    let (router, _) = routes().split_for_parts();
    // A site file is small; anything bigger is refused before it is read.
    router.layer(DefaultBodyLimit::max(1 << 20))
}

pub fn router(agent: Arc<Agent>) -> Router {
    app().with_state(agent)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// (METHOD, path) of every route the router has, read from its `Debug` form: axum has
    /// no other way to list them, and this sees routes added by any means, not only through
    /// [`routes`].
    fn routed() -> BTreeSet<(String, String)> {
        let whole = format!("{:?}", app());
        // The fallback router's catch-all routes are axum's own, not the API's.
        let text = whole
            .split_once("path_router: ")
            .and_then(|(_, rest)| rest.split_once(", fallback_router: "))
            .map_or(whole.as_str(), |(paths, _)| paths);
        let mut methods = std::collections::BTreeMap::<u32, Vec<String>>::new();
        let mut paths = std::collections::BTreeMap::<u32, String>::new();
        for chunk in text.split("RouteId(").skip(1) {
            let Some((id, rest)) = chunk.split_once("): ") else {
                continue;
            };
            let Ok(id) = id.parse::<u32>() else {
                continue;
            };
            if let Some(path) = rest.strip_prefix('"') {
                let path = path.split('"').next().unwrap_or_default();
                paths.insert(id, path.to_owned());
            } else if rest.starts_with("MethodRouter(") {
                let on = [
                    "get", "head", "delete", "options", "patch", "post", "put", "trace",
                ]
                .into_iter()
                .filter(|m| {
                    rest.split_once(&format!(" {m}: "))
                        .is_some_and(|(_, v)| !v.starts_with("None"))
                })
                .map(str::to_owned)
                .collect();
                methods.insert(id, on);
            }
        }
        assert!(
            !paths.is_empty() && paths.len() == methods.len(),
            "cannot read the routes from the router's Debug form (has axum changed it?): {text}"
        );
        paths
            .into_iter()
            .flat_map(|(id, path)| {
                methods
                    .get(&id)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |m| (m, path.clone()))
            })
            .collect()
    }

    /// (METHOD, path) of every operation in the document.
    fn documented(doc: &serde_json::Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                out.insert((method.clone(), path.clone()));
            }
        }
        out
    }

    fn generated() -> serde_json::Value {
        serde_json::to_value(document()).unwrap()
    }

    #[test]
    fn every_route_has_its_path_in_the_document_and_nothing_else_is_there() {
        let routed = routed();
        let documented = documented(&generated());
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "routes without a path spec: {undocumented:?}"
        );
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            unrouted.is_empty(),
            "documented but not routed: {unrouted:?}"
        );
        // Today's routes, so a lost one shows here too.
        for (method, path) in [
            ("get", "/openapi.json"),
            ("get", "/metrics"),
            ("post", "/v1/apply"),
            ("get", "/v1/groups"),
            ("get", "/v1/groups/{name}"),
            ("delete", "/v1/groups/{name}"),
            ("post", "/v1/groups/{name}/rollback"),
            ("get", "/v1/instances"),
            ("get", "/v1/instances/{name}/logs"),
            ("get", "/v1/stats"),
            ("get", "/v1/events"),
        ] {
            assert!(
                routed.contains(&(method.into(), path.into())),
                "{method} {path}"
            );
        }
    }

    /// Every JSON body in the document has a schema, and every `$ref` names one that exists.
    #[test]
    fn every_json_body_has_a_schema_that_exists() {
        let doc = generated();
        let schemas = &doc["components"]["schemas"];
        let mut refs = Vec::new();
        fn walk(v: &serde_json::Value, at: &str, refs: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(json) = map.get("application/json") {
                        assert!(
                            json.get("schema").is_some(),
                            "{at}: a JSON body without a schema"
                        );
                    }
                    if let Some(r) = map.get("$ref").and_then(|r| r.as_str()) {
                        refs.push(r.to_owned());
                    }
                    for (k, v) in map {
                        walk(v, &format!("{at}/{k}"), refs);
                    }
                }
                serde_json::Value::Array(items) => {
                    items.iter().for_each(|v| walk(v, at, refs));
                }
                _ => {}
            }
        }
        walk(&doc, "", &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(schemas.get(name).is_some(), "{r} is not in the document");
        }
    }

    /// `openapi.json` is the document the daemon serves. `JUICE_WRITE_OPENAPI=1` rewrites it.
    #[test]
    fn the_checked_in_document_is_the_generated_one() {
        let generated = generated();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/openapi.json");
        if std::env::var_os("JUICE_WRITE_OPENAPI").is_some() {
            let text = serde_json::to_string_pretty(&generated).unwrap();
            std::fs::write(&path, text + "\n").unwrap();
            return;
        }
        let checked_in: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(
            checked_in == generated,
            "{} is stale: run `JUICE_WRITE_OPENAPI=1 cargo test -p juice-agent the_checked_in_document` and commit it",
            path.display()
        );
    }

    #[test]
    fn each_failure_has_its_status() {
        let json_error = || serde_json::from_str::<Site>("{").unwrap_err();
        for (failure, status) in [
            (Failure::BadName("..".into()), 400),
            (Failure::BadPath("bad".into()), 400),
            (Failure::NotASite(json_error()), 400),
            (Failure::BadRollback(json_error()), 400),
            (Failure::NoLogs("web-1".into()), 404),
            (Failure::ReadLog(std::io::ErrorKind::NotFound.into()), 500),
            (Failure::Agent(AgentError::NoGroup("web".into())), 404),
            (
                Failure::Agent(AgentError::Group {
                    group: "web".into(),
                    reason: "no earlier revision".into(),
                }),
                422,
            ),
            (Failure::Agent(AgentError::Setup("eventfd".into())), 500),
            (Failure::Agent(AgentError::NoInstance("web-1".into())), 404),
            (
                Failure::Agent(AgentError::DebugRefused {
                    instance: "web-1".into(),
                    reason: "image juice-toolbox is not trusted".into(),
                }),
                403,
            ),
            (
                Failure::Agent(AgentError::Debug {
                    instance: "web-1".into(),
                    reason: "it is not running".into(),
                }),
                422,
            ),
            (Failure::BadDebug("no upgrade".into()), 400),
            (
                Failure::Agent(AgentError::Start {
                    group: "web".into(),
                    revision: 2,
                    source: juice_runtime::BackendError::Unavailable("no QEMU".into()),
                }),
                503,
            ),
            (
                Failure::Agent(AgentError::Start {
                    group: "web".into(),
                    revision: 2,
                    source: juice_runtime::BackendError::Exists("web-r2-0001".into()),
                }),
                422,
            ),
        ] {
            assert_eq!(failure.status().as_u16(), status, "{failure}");
        }
        assert_eq!(
            Failure::BadName("../x".into()).to_string(),
            "\"../x\" is not a group or instance name (lowercase letters, digits and '-', at most 48)"
        );
    }
}
