//! The fleet's records in etcd: a connection with a deadline on every call, so an etcd
//! that is down or cut off is an answer ([`Error::Unreachable`]) and never a hang.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};

use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::record::{HOSTS, HostRecord};

/// A connection to the fleet's etcd.
#[derive(Clone)]
pub struct Store {
    client: Client,
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

impl Store {
    /// A connection to `endpoints`; nothing is sent until the first call.
    pub async fn connect(endpoints: &Endpoints, timeout: Duration) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let client = Client::connect(endpoints.urls(), Some(options))
            .await
            .map_err(|source| Error::Etcd {
                endpoints: endpoints.to_string(),
                what: "a connection",
                source,
            })?;
        Ok(Store {
            client,
            endpoints: endpoints.clone(),
            timeout,
        })
    }

    /// A connection for streams (a watch) that live as long as they may: only connecting
    /// has a deadline; each call made through [`Store::call`] still has `timeout`.
    pub async fn connect_streaming(endpoints: &Endpoints, timeout: Duration) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(timeout, timeout);
        let client = Client::connect(endpoints.urls(), Some(options))
            .await
            .map_err(|source| Error::Etcd {
                endpoints: endpoints.to_string(),
                what: "a connection",
                source,
            })?;
        Ok(Store {
            client,
            endpoints: endpoints.clone(),
            timeout,
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// `call` with the store's deadline; a timeout or an unavailable etcd is
    /// [`Error::Unreachable`], any other refusal [`Error::Etcd`] naming `what` was asked.
    pub(crate) async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(self.error(what, source)),
            Err(_) => {
                Err(self.unreachable(format!("no answer within {} ms", self.timeout.as_millis())))
            }
        }
    }

    pub(crate) fn unreachable(&self, cause: String) -> Error {
        Error::Unreachable {
            endpoints: self.endpoints.to_string(),
            cause,
        }
    }

    pub(crate) fn error(&self, what: &'static str, source: etcd_client::Error) -> Error {
        let gone = match &source {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                )
            }
            _ => false,
        };
        if gone {
            // The innermost cause says it best ("Connection refused (os error 111)").
            let mut cause: &dyn std::error::Error = &source;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            self.unreachable(cause.to_string())
        } else {
            Error::Etcd {
                endpoints: self.endpoints.to_string(),
                what,
                source,
            }
        }
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
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
        self.call(
            "the host's record",
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
