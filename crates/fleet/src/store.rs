//! The fleet's records in etcd: a connection with a deadline on every call, so an etcd
//! that is down or cut off is an answer ([`Error::Unreachable`]) and never a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue, PutOptions};

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

    /// Every key under `prefix`, read in pages so that no answer nears gRPC's 4 MiB limit
    /// however many records there are: each page starts after the last key of the one
    /// before, and every page is read at the revision of the first, so the whole is one
    /// consistent snapshot. Returns the records and that revision. `what` names the read
    /// in errors.
    pub(crate) async fn get_prefix(
        &self,
        what: &'static str,
        prefix: &str,
    ) -> Result<(Vec<KeyValue>, i64)> {
        paged(prefix.as_bytes(), |page| {
            let mut client = self.client();
            async move {
                let mut options = GetOptions::new()
                    .with_range(page.end.clone())
                    .with_limit(page.limit);
                if page.revision > 0 {
                    options = options.with_revision(page.revision);
                }
                let mut answer = self
                    .call(what, client.get(page.start, Some(options)))
                    .await?;
                Ok(Page {
                    revision: answer.header().map_or(0, |h| h.revision()),
                    more: answer.more(),
                    kvs: answer.take_kvs(),
                })
            }
        })
        .await
    }

    /// Every host registered now, ordered by hostname then id.
    pub async fn hosts(&self) -> Result<Listing> {
        let (kvs, _) = self.get_prefix("the list of hosts", HOSTS).await?;
        let mut listing = Listing::default();
        for kv in &kvs {
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

/// The most keys a page asks for; fewer when the records are large (see [`next_limit`]).
pub(crate) const PAGE_KEYS: i64 = 1000;

/// The keys the first page asks for, before any record's size is known: 100 host records
/// are about 50 KB.
const FIRST_PAGE_KEYS: i64 = 100;

/// Whether etcd's answer was refused for its size (over gRPC's 4 MiB limit).
fn too_large(e: &Error) -> bool {
    matches!(e, Error::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
        if s.code() == tonic::Code::OutOfRange && s.message().contains("too large"))
}

/// The bytes a page aims at: half of gRPC's 4 MiB limit, leaving room for a record larger
/// than those before it.
const PAGE_BYTES: usize = 2 << 20;

/// What one page asks for: the keys from `start` (inclusive) to `end` (exclusive), at
/// most `limit`, as of `revision` (0: now).
pub(crate) struct PageAsk {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub limit: i64,
    pub revision: i64,
}

/// One page's answer: its records, the revision it is as of, and whether more follow.
pub(crate) struct Page<T> {
    pub kvs: Vec<T>,
    pub revision: i64,
    pub more: bool,
}

/// A record as paging sees it: its key, and its size in an answer.
pub(crate) trait Record {
    fn key(&self) -> &[u8];
    fn size(&self) -> usize;
}

impl Record for KeyValue {
    fn key(&self) -> &[u8] {
        KeyValue::key(self)
    }
    fn size(&self) -> usize {
        KeyValue::key(self).len() + self.value().len()
    }
}

/// The end of the range of keys that start with `prefix`: the prefix with its last byte
/// below 0xff incremented and what follows dropped; `\0` (every key) if it is all 0xff.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The next page's size: as many keys as fit in [`PAGE_BYTES`] at the largest record
/// size seen so far, between 16 and [`PAGE_KEYS`].
fn next_limit(largest: usize) -> i64 {
    let fit = PAGE_BYTES / largest.max(1);
    i64::try_from(fit).unwrap_or(PAGE_KEYS).clamp(16, PAGE_KEYS)
}

/// Reads the range under `prefix` page by page with `fetch`, each page after the last key
/// of the one before (that key + `\0`), all at the first page's revision.
pub(crate) async fn paged<T: Record, F, Fut>(prefix: &[u8], mut fetch: F) -> Result<(Vec<T>, i64)>
where
    F: FnMut(PageAsk) -> Fut,
    Fut: Future<Output = Result<Page<T>>>,
{
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    let mut revision = 0;
    let mut limit = FIRST_PAGE_KEYS;
    let mut largest = 0;
    let mut out = Vec::new();
    loop {
        let page = match fetch(PageAsk {
            start: start.clone(),
            end: end.clone(),
            limit,
            revision,
        })
        .await
        {
            Ok(page) => page,
            // Records larger than those seen so far: the same page, half as long.
            Err(e) if too_large(&e) && limit > 1 => {
                limit /= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        if revision == 0 {
            revision = page.revision;
        }
        let Some(last) = page.kvs.last() else {
            return Ok((out, revision));
        };
        start = last.key().to_vec();
        start.push(0);
        largest = page.kvs.iter().map(Record::size).fold(largest, usize::max);
        limit = next_limit(largest);
        let more = page.more;
        out.extend(page.kvs);
        if !more {
            return Ok((out, revision));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    impl Record for (Vec<u8>, Vec<u8>) {
        fn key(&self) -> &[u8] {
            &self.0
        }
        fn size(&self) -> usize {
            self.0.len() + self.1.len()
        }
    }

    /// A store of versions: key -> (revision written, value), None when deleted. Reads
    /// at a revision see each key as of that revision.
    struct History(Vec<(i64, Vec<u8>, Option<Vec<u8>>)>);

    impl History {
        fn head(&self) -> i64 {
            self.0.last().map_or(1, |w| w.0)
        }
        fn write(&mut self, key: &str, value: Option<&str>) {
            let rev = self.head() + 1;
            self.0.push((
                rev,
                key.as_bytes().to_vec(),
                value.map(|v| v.as_bytes().to_vec()),
            ));
        }
        fn at(&self, rev: i64) -> BTreeMap<Vec<u8>, Vec<u8>> {
            let mut m = BTreeMap::new();
            for (r, k, v) in &self.0 {
                if *r > rev {
                    break;
                }
                match v {
                    Some(v) => m.insert(k.clone(), v.clone()),
                    None => m.remove(k),
                };
            }
            m
        }
        fn page(&self, ask: &PageAsk) -> Page<(Vec<u8>, Vec<u8>)> {
            let revision = if ask.revision > 0 {
                ask.revision
            } else {
                self.head()
            };
            let all: Vec<_> = self
                .at(revision)
                .into_iter()
                .filter(|(k, _)| *k >= ask.start && *k < ask.end)
                .collect();
            let n = usize::try_from(ask.limit).unwrap();
            Page {
                more: all.len() > n,
                kvs: all.into_iter().take(n).collect(),
                revision,
            }
        }
    }

    #[test]
    fn a_prefix_ends_after_its_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"/juice/v1/hosts/"), b"/juice/v1/hosts0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn pages_shrink_for_large_records() {
        assert_eq!(next_limit(0), PAGE_KEYS);
        assert_eq!(next_limit(100), PAGE_KEYS);
        assert_eq!(next_limit(8192), 256);
        assert_eq!(next_limit(10 << 20), 16);
    }

    /// Thousands of keys under a prefix, beside keys just outside it, written over and
    /// deleted between pages: the pages put together are exactly the prefix as of the
    /// first page's revision, in order, with no key twice.
    #[test]
    fn pages_make_one_snapshot_while_keys_change() {
        let seed: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            .into();
        println!("seed {seed}");
        let mut x = seed | 1;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut h = History(Vec::new());
        h.write("/p", Some("before"));
        h.write("/q/0", Some("after"));
        for i in 0..3500 {
            let size = (rnd() % 5000) as usize;
            h.write(&format!("/p/{i:05}"), Some(&"v".repeat(size)));
        }
        let first = h.head();
        let expected: Vec<_> = h
            .at(first)
            .into_iter()
            .filter(|(k, _)| k.starts_with(b"/p/"))
            .collect();
        let h = std::cell::RefCell::new(h);
        let pages = std::cell::Cell::new(0);
        let (got, revision) = futures_lite_block_on(paged(b"/p/", |ask| {
            let page = h.borrow().page(&ask);
            // Between pages, the keys change: some rewritten, some deleted, some added.
            for _ in 0..50 {
                let i = rnd() % 4000;
                let v = if rnd() % 2 == 0 { None } else { Some("new") };
                h.borrow_mut().write(&format!("/p/{i:05}"), v);
            }
            pages.set(pages.get() + 1);
            async move { Ok(page) }
        }))
        .unwrap();
        assert_eq!(revision, first);
        assert!(pages.get() > 3, "{} pages", pages.get());
        assert_eq!(got, expected);
    }

    /// A page refused for its size is asked again, half as long, until it fits.
    #[test]
    fn a_page_too_large_is_asked_again_shorter() {
        let mut h = History(Vec::new());
        for i in 0..300 {
            h.write(&format!("/p/{i:03}"), Some("x"));
        }
        let asked = std::cell::RefCell::new(Vec::new());
        let (got, _) = futures_lite_block_on(paged(b"/p/", |ask| {
            asked.borrow_mut().push(ask.limit);
            let answer = if ask.limit > 30 {
                Err(Error::Etcd {
                    endpoints: "test".into(),
                    what: "a page",
                    source: etcd_client::Error::GRpcStatus(tonic::Status::out_of_range(
                        "Error, decoded message length too large: found 5359229 bytes",
                    )),
                })
            } else {
                Ok(h.page(&ask))
            };
            std::future::ready(answer)
        }))
        .unwrap();
        assert_eq!(got.len(), 300);
        assert_eq!(asked.borrow()[..3], [100, 50, 25]);
    }

    #[test]
    fn an_empty_prefix_is_one_page() {
        let h = History(vec![(2, b"/a".to_vec(), Some(b"x".to_vec()))]);
        let (got, revision) =
            futures_lite_block_on(paged(b"/p/", |ask| std::future::ready(Ok(h.page(&ask)))))
                .unwrap();
        assert!(got.is_empty());
        assert_eq!(revision, 2);
    }

    fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}
