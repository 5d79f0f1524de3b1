//! The fleet's records in etcd: a connection with a deadline on every call, so an etcd
//! that is down or cut off is an answer ([`Error::Unreachable`]) and never a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};

use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::record::{HOSTS, HostRecord};

/// A connection to the fleet's etcd: one client per endpoint, and the one in use. A call
/// that finds its endpoint gone moves the store on to the next one, so the caller's next
/// try goes elsewhere. (etcd-client balances over all endpoints in one channel, but that
/// channel keeps sending requests to a member that is down: tonic's balancer takes an
/// endpoint it cannot connect to for ready, grpc/grpc-rust#2839.)
#[derive(Clone)]
pub struct Store {
    clients: Arc<Vec<Client>>,
    current: Arc<AtomicUsize>,
    endpoints: Endpoints,
    /// The longest any one call may take.
    timeout: Duration,
}

/// The hosts registered now, and the records under `hosts/` that could not be read (each
/// an error naming its key), so one bad record hides neither the others nor itself.
#[derive(Debug, Default)]
pub struct Listing {
    pub hosts: Vec<HostRecord>,
    pub malformed: Vec<Error>,
}

/// `options` with mutual TLS for `https://` endpoints, which must carry their TLS files.
fn tls(endpoints: &Endpoints, options: ConnectOptions) -> Result<ConnectOptions> {
    if !endpoints.secure() {
        return Ok(options);
    }
    match endpoints.tls() {
        Some(tls) => Ok(options.with_tls(tls.options())),
        None => Err(Error::Endpoint {
            endpoint: endpoints.to_string(),
            reason: "https:// endpoints need the fleet's TLS files (ca.pem, cert.pem, key.pem)"
                .into(),
        }),
    }
}

/// Whether `status` was made from a transport error rather than sent by etcd.
fn transport(status: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        if c.is::<tonic::transport::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether etcd refused for want of a permission (its roles, with auth enabled), or
/// because the client has no user at all (no certificate, no password).
fn denied(source: &etcd_client::Error) -> bool {
    match source {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::PermissionDenied
                || (s.code() == tonic::Code::InvalidArgument
                    && s.message().contains("user name is empty"))
        }
        _ => false,
    }
}

impl Store {
    /// A connection to `endpoints`; with several, it starts on the first that answers a
    /// status request within `timeout` (the first listed if none does).
    pub async fn connect(endpoints: &Endpoints, timeout: Duration) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        Store::open(endpoints, timeout, tls(endpoints, options)?).await
    }

    /// A connection for streams (a watch) that live as long as they may: only connecting
    /// has a deadline; each call made through [`Store::call`] still has `timeout`.
    pub async fn connect_streaming(endpoints: &Endpoints, timeout: Duration) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(timeout, timeout);
        Store::open(endpoints, timeout, tls(endpoints, options)?).await
    }

    async fn open(
        endpoints: &Endpoints,
        timeout: Duration,
        options: ConnectOptions,
    ) -> Result<Store> {
        let mut clients = Vec::new();
        for url in endpoints.urls() {
            let client = Client::connect([url], Some(options.clone()))
                .await
                .map_err(|source| Error::Etcd {
                    endpoints: endpoints.to_string(),
                    what: "a connection",
                    source,
                })?;
            clients.push(client);
        }
        let first = if clients.len() > 1 {
            first_answering(&clients, timeout).await
        } else {
            0
        };
        Ok(Store {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(first)),
            endpoints: endpoints.clone(),
            timeout,
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// `call` with the store's deadline; a timeout or an unavailable etcd is
    /// [`Error::Unreachable`], a permission etcd's roles deny [`Error::Denied`], any other
    /// refusal [`Error::Etcd`] naming `what` was asked.
    pub(crate) async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        self.call_as(what, None, call).await
    }

    /// [`Store::call`], where a refused permission names `action` ("write KEY").
    pub(crate) async fn call_as<T>(
        &self,
        what: &'static str,
        action: Option<String>,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(self.error_as(what, action, source)),
            Err(_) => {
                Err(self.unreachable(format!("no answer within {} ms", self.timeout.as_millis())))
            }
        }
    }

    /// An unreachable etcd, naming `cause`; the next call goes to the next endpoint.
    pub(crate) fn unreachable(&self, cause: String) -> Error {
        self.current.fetch_add(1, Ordering::Relaxed);
        Error::Unreachable {
            endpoints: self.endpoints.to_string(),
            cause,
        }
    }

    pub(crate) fn error(&self, what: &'static str, source: etcd_client::Error) -> Error {
        self.error_as(what, None, source)
    }

    /// [`Store::error`], where a refused permission names `action` ("write KEY") rather
    /// than "access `what`".
    fn error_as(
        &self,
        what: &'static str,
        action: Option<String>,
        source: etcd_client::Error,
    ) -> Error {
        if denied(&source) {
            return Error::Denied {
                user: self.endpoints.user(),
                action: action.unwrap_or_else(|| format!("access {what}")),
            };
        }
        let gone = match &source {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => {
                // A status made from a transport error (the connection closed under the
                // call, as when etcd refuses a client's certificate in the TLS handshake)
                // says nothing etcd answered.
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) || transport(s)
            }
            _ => false,
        };
        if gone {
            // The innermost cause says it best ("Connection refused (os error 111)").
            let mut cause: &dyn std::error::Error = &source;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            match self.endpoints.tls() {
                Some(tls) => self.unreachable(format!(
                    "{cause}; over TLS, also check that etcd trusts the certificate {:?} in {} (from the fleet's CA) and that its own is from the CA there",
                    tls.user(),
                    tls.dir.display()
                )),
                None => self.unreachable(cause.to_string()),
            }
        } else {
            Error::Etcd {
                endpoints: self.endpoints.to_string(),
                what,
                source,
            }
        }
    }

    /// The client of the endpoint in use.
    pub(crate) fn client(&self) -> Client {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len().max(1);
        self.clients[i].clone()
    }

    /// Every host registered now, ordered by hostname then id.
    pub async fn hosts(&self) -> Result<Listing> {
        let mut client = self.client();
        let answer = self
            .call(
                "the list of hosts",
                client.get(HOSTS, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut listing = Listing::default();
        for kv in answer.kvs() {
            match HostRecord::decode(kv.key(), kv.value()) {
                Ok(h) => listing.hosts.push(h),
                Err(e) => listing.malformed.push(e),
            }
        }
        listing
            .hosts
            .sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
        Ok(listing)
    }

    /// Writes `record` under `lease`, so it goes when the lease does.
    pub(crate) async fn put_host(&self, record: &HostRecord, lease: i64) -> Result<()> {
        let mut client = self.client();
        self.call_as(
            "the host's record",
            Some(format!("write {}", record.key())),
            client.put(
                record.key(),
                record.encode(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await
        .map(drop)
    }
}

/// The index of the first of `clients` to answer a status request within `timeout`; 0
/// if none does.
async fn first_answering(clients: &[Client], timeout: Duration) -> usize {
    let mut asking = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        asking.spawn(async move { c.status().await.map(|_| i) });
    }
    let first = tokio::time::timeout(timeout, async {
        while let Some(answer) = asking.join_next().await {
            if let Ok(Ok(i)) = answer {
                return Some(i);
            }
        }
        None
    })
    .await;
    first.ok().flatten().unwrap_or(0)
}

/// A few connections to etcd shared by many hosts run in one process (the hollow hosts of
/// the fleet's benchmark): each host otherwise opens its own, and ten thousand hosts would
/// need tens of thousands of sockets. Each host still has its own lease, watch and
/// keep-alive streams; they are multiplexed (HTTP/2) over the shared connections, handed
/// out in turn. A daemon never uses this: it is one host with connections of its own.
#[derive(Clone)]
pub struct Connections {
    calls: std::sync::Arc<[Store]>,
    streams: std::sync::Arc<[Store]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Connections {
    /// `n` connections of each kind ([`Store::connect`], [`Store::connect_streaming`]) to
    /// `endpoints`, each call on them with a deadline of `timeout` (a host's is a third of
    /// its lease).
    pub async fn connect(
        endpoints: &Endpoints,
        timeout: Duration,
        n: usize,
    ) -> Result<Connections> {
        let mut calls = Vec::with_capacity(n.max(1));
        let mut streams = Vec::with_capacity(n.max(1));
        for _ in 0..n.max(1) {
            calls.push(Store::connect(endpoints, timeout).await?);
            streams.push(Store::connect_streaming(endpoints, timeout).await?);
        }
        Ok(Connections {
            calls: calls.into(),
            streams: streams.into(),
            next: Default::default(),
        })
    }

    /// The next connection for calls and the next for streams, in turn.
    pub(crate) fn pick(&self) -> (Store, Store) {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (
            self.calls[i % self.calls.len()].clone(),
            self.streams[i % self.streams.len()].clone(),
        )
    }
}
