//! Hollow hosts, as kubemark and nomad-nodesim make them: the real host-side fleet code
//! ([`Registration`] with its lease, [`HostWork`] with its watch of `assign/<id>/` and its
//! reports) driven by a local backend that lives in memory ([`Hollow`]) instead of an
//! agent. Many hollow hosts run as tokio tasks in one process, sharing a few etcd
//! connections ([`Connections`]); each keeps its own lease, watch and keep-alive streams.
//!
//! The measurements (`settle`, `kill`, `bare`, `rollout`, `fail`) read etcd itself, through
//! a watch or a range of their own: they see what any reader of the fleet sees.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use juice_fleet::host::Event;
use juice_fleet::report::{REPORTS, Report};
use juice_fleet::{
    Assignment, Backend, Connections, Endpoints, FleetSpec, GroupName, HostId, HostRecord,
    HostWork, Label, Labels, LocalGroup, LocalHost, Registration, Status, Store,
};

/// What goes wrong in the bench; each says what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Fleet(#[from] juice_fleet::Error),
    #[error("etcd, for {what}: {source}")]
    Etcd {
        what: &'static str,
        source: etcd_client::Error,
    },
    #[error("{0}")]
    Bench(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn etcd(what: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd { what, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The status a hollow host reports for a revision it was told to fail.
pub const FAILING: &str = "crash-loop (3 failures)";

/// A host's local backend in memory: applying an assignment makes its group ready after
/// `ready_after` (at once when zero); an image in `failing` never gets ready.
pub struct Hollow {
    pub ready_after: Duration,
    groups: Mutex<BTreeMap<GroupName, (Assignment, Instant)>>,
    failing: Mutex<BTreeSet<String>>,
}

impl Hollow {
    pub fn new(ready_after: Duration) -> Hollow {
        Hollow {
            ready_after,
            groups: Mutex::default(),
            failing: Mutex::default(),
        }
    }

    /// From now on, every group of `image` on this host fails (or no longer does).
    pub fn fail_image(&self, image: &str, fail: bool) {
        let mut f = lock(&self.failing);
        if fail {
            f.insert(image.to_owned());
        } else {
            f.remove(image);
        }
    }
}

impl LocalHost for Hollow {
    fn apply(
        &self,
        assignments: &BTreeMap<GroupName, Assignment>,
    ) -> juice_fleet::Result<BTreeMap<GroupName, String>> {
        let mut groups = lock(&self.groups);
        groups.retain(|g, _| assignments.contains_key(g));
        for (g, a) in assignments {
            if groups.get(g).is_none_or(|(had, _)| had != a) {
                groups.insert(g.clone(), (a.clone(), Instant::now()));
            }
        }
        Ok(BTreeMap::new())
    }

    fn groups(&self) -> juice_fleet::Result<BTreeMap<GroupName, LocalGroup>> {
        let failing = lock(&self.failing).clone();
        Ok(lock(&self.groups)
            .iter()
            .map(|(g, (a, since))| {
                let local = if failing.contains(&a.image) {
                    LocalGroup {
                        size: a.size,
                        ready: 0,
                        status: FAILING.into(),
                        restarts: 3,
                    }
                } else if since.elapsed() >= self.ready_after {
                    LocalGroup {
                        size: a.size,
                        ready: a.size,
                        status: "ok".into(),
                        restarts: 0,
                    }
                } else {
                    LocalGroup {
                        size: a.size,
                        ready: 0,
                        status: "rolling-out".into(),
                        restarts: 0,
                    }
                };
                (g.clone(), local)
            })
            .collect())
    }
}

/// Counts of what the hollow hosts' fleet code reported, over all hosts.
#[derive(Default)]
pub struct Counters {
    pub registered: AtomicU64,
    pub registration_lost: AtomicU64,
    pub applied: AtomicU64,
    pub reported: AtomicU64,
    pub watch_lost: AtomicU64,
    pub malformed: AtomicU64,
}

/// One hollow host: its backend and the two tasks of its fleet code.
pub struct HollowHost {
    pub id: HostId,
    pub labels: Labels,
    pub local: Arc<Hollow>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl HollowHost {
    /// Stops the host abruptly: its tasks are dropped, its lease is not revoked (as when a
    /// machine dies), so etcd deletes its records when the lease runs out.
    pub fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for HollowHost {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a fleet of hollow hosts is made.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoints: Endpoints,
    /// The lease's time to live, seconds (the daemon's `--fleet-lease`).
    pub ttl_secs: u64,
    /// Connections of each kind shared by all the hosts.
    pub pool: usize,
    pub ready_after: Duration,
    /// Hosts `0..rollout_hosts` carry the label `rollout=yes`.
    pub rollout_hosts: usize,
    /// Hosts started per second.
    pub rate: usize,
}

/// Many hollow hosts in this process.
pub struct HollowFleet {
    pub config: Config,
    pub hosts: BTreeMap<HostId, HollowHost>,
    pub counters: Arc<Counters>,
    connections: Connections,
}

/// The id of hollow host `i`.
pub fn hollow_id(i: usize) -> HostId {
    // Only lowercase letters, digits and '-': always a valid id.
    format!("hollow-{i:05}")
        .parse()
        .unwrap_or_else(|_| unreachable!("hollow ids are valid host ids"))
}

fn label(k: &str, v: &str) -> Result<Label> {
    format!("{k}={v}").parse().map_err(Error::Fleet)
}

impl HollowFleet {
    pub async fn new(config: Config) -> Result<HollowFleet> {
        let beat = Duration::from_secs(config.ttl_secs) / 3;
        let connections = Connections::connect(&config.endpoints, beat, config.pool).await?;
        Ok(HollowFleet {
            config,
            hosts: BTreeMap::new(),
            counters: Arc::default(),
            connections,
        })
    }

    /// Starts hosts `from..to`, at the configured rate.
    pub async fn start(&mut self, from: usize, to: usize) -> Result<()> {
        let started = Instant::now();
        let rate = self.config.rate.max(1);
        for (n, i) in (from..to).enumerate() {
            let host = self.start_one(i)?;
            self.hosts.insert(host.id.clone(), host);
            let due = started + Duration::from_secs_f64((n + 1) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        Ok(())
    }

    fn start_one(&self, i: usize) -> Result<HollowHost> {
        let id = hollow_id(i);
        let zone = format!("z{}", i % 3);
        let mut labels = vec![label("zone", &zone)?, label("hollow", "yes")?];
        if i < self.config.rollout_hosts {
            labels.push(label("rollout", "yes")?);
        }
        let labels = Labels::new(labels)?;
        let record = HostRecord {
            id: id.clone(),
            hostname: id.to_string(),
            cpus: 64,
            memory_bytes: 256 << 30,
            labels: labels.clone(),
            backends: vec![Backend::Sandbox],
            juice_version: "hollow".into(),
            os: "hollow".into(),
            kernel: "hollow".into(),
            started_ms: 0,
            binary_sha256: String::new(),
        };
        let registration =
            Registration::new(self.config.endpoints.clone(), record, self.config.ttl_secs)?;
        let local = Arc::new(Hollow::new(self.config.ready_after));
        let (lease_now, lease) = tokio::sync::watch::channel(None);
        let work = HostWork {
            endpoints: self.config.endpoints.clone(),
            host: id.clone(),
            ttl: registration.ttl(),
            local: local.clone(),
            lease,
        };
        let (c1, c2) = (self.counters.clone(), self.counters.clone());
        let shared = self.connections.clone();
        let keep = tokio::spawn(registration.run_on(Some(shared), move |s| match s {
            Status::Registered { lease, .. } => {
                c1.registered.fetch_add(1, Ordering::Relaxed);
                lease_now.send_replace(Some(lease));
            }
            Status::Lost { .. } => {
                c1.registration_lost.fetch_add(1, Ordering::Relaxed);
                lease_now.send_replace(None);
            }
        }));
        let shared = self.connections.clone();
        let working = tokio::spawn(work.run_on(Some(shared), move |e| {
            let c = match e {
                Event::Applied { .. } => &c2.applied,
                Event::Reported { .. } => &c2.reported,
                Event::Malformed { .. } => &c2.malformed,
                Event::Compacted { .. } | Event::Lost { .. } => &c2.watch_lost,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }));
        Ok(HollowHost {
            id,
            labels,
            local,
            tasks: [keep, working],
        })
    }

    /// The hosts carrying `rollout=yes`.
    pub fn rollout_hosts(&self) -> BTreeSet<HostId> {
        self.hosts
            .values()
            .filter(|h| h.labels.get("rollout") == Some("yes"))
            .map(|h| h.id.clone())
            .collect()
    }
}

/// A connection of the bench's own, for its measurements.
pub async fn client(endpoints: &Endpoints) -> Result<Client> {
    Client::connect(endpoints.urls(), None)
        .await
        .map_err(etcd("a connection"))
}

/// Hosts under `hosts/`, counted by etcd.
pub async fn registered(c: &mut Client) -> Result<i64> {
    let r = c
        .get(
            juice_fleet::record::HOSTS,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .map_err(etcd("the count of hosts"))?;
    Ok(r.count())
}

/// How many of the hollow hosts' assignments are reported ready at their revision, of
/// how many there are.
pub async fn settled(store: &Store) -> Result<(usize, usize)> {
    let assigned = store.assignments().await?;
    let reports = store.reports().await?;
    let (mut total, mut ok) = (0, 0);
    for (host, groups) in &assigned.hosts {
        if !host.as_str().starts_with("hollow-") {
            continue;
        }
        for (g, a) in groups {
            total += 1;
            let r = reports.hosts.get(host).and_then(|rs| rs.get(g));
            if r.is_some_and(|r| r.revision == a.revision && r.ready == a.size) {
                ok += 1;
            }
        }
    }
    Ok((ok, total))
}

/// Percentiles (nearest rank) of durations, in milliseconds.
pub fn percentile(sorted_ms: &[u64], p: f64) -> u64 {
    if sorted_ms.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted_ms.len() as f64).ceil().max(1.0);
    // rank is in 1..=len.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = (rank as usize).min(sorted_ms.len()) - 1;
    sorted_ms[i]
}

/// A seeded generator (splitmix64): the bench prints its seed, so a run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).unwrap_or(u64::MAX).max(1);
        usize::try_from(self.next_u64() % n64).unwrap_or(0)
    }
}

/// Times from `start` until each key in `wanted` is deleted, seen through `watch` (which
/// must have been created before `start`); keys still there after `limit` are missing.
async fn deletions(
    stream: &mut etcd_client::WatchStream,
    wanted: &HashMap<String, ()>,
    start: Instant,
    limit: Duration,
) -> Result<BTreeMap<String, Duration>> {
    let mut seen = BTreeMap::new();
    let deadline = tokio::time::Instant::from(start + limit);
    while seen.len() < wanted.len() {
        let message = match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => break,
            Ok(m) => m.map_err(etcd("the watch of deletions"))?,
        };
        let Some(answer) = message else {
            return Err(Error::Bench("etcd closed the watch of deletions".into()));
        };
        let at = start.elapsed();
        for e in answer.events() {
            if e.event_type() != EventType::Delete {
                continue;
            }
            let Some(kv) = e.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if wanted.contains_key(&key) {
                seen.entry(key).or_insert(at);
            }
        }
    }
    Ok(seen)
}

/// Watches `prefix` from now; returns the stream once etcd has created the watch.
async fn watch_from_now(c: &mut Client, prefix: &str) -> Result<etcd_client::WatchStream> {
    let mut stream = c
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .map_err(etcd("a watch"))?;
    // The first message says the watch is created.
    match stream.message().await.map_err(etcd("a watch"))? {
        Some(a) if a.created() => Ok(stream),
        _ => Err(Error::Bench(format!(
            "the watch of {prefix} was not created"
        ))),
    }
}

/// Per-key times, in sorted milliseconds, and how many keys were never seen.
pub struct Latencies {
    pub ms: Vec<u64>,
    pub missing: usize,
}

impl Latencies {
    fn of(seen: &BTreeMap<String, Duration>, wanted: usize) -> Latencies {
        let mut ms: Vec<u64> = seen
            .values()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .collect();
        ms.sort_unstable();
        Latencies {
            missing: wanted.saturating_sub(ms.len()),
            ms,
        }
    }

    /// `NAME.p50_ms`, `.p99_ms`, `.max_ms`, `.n` and `.missing` lines.
    pub fn lines(&self, name: &str) -> String {
        format!(
            "{name}.n {}\n{name}.missing {}\n{name}.p50_ms {}\n{name}.p99_ms {}\n{name}.max_ms {}",
            self.ms.len(),
            self.missing,
            percentile(&self.ms, 50.0),
            percentile(&self.ms, 99.0),
            self.ms.last().copied().unwrap_or(0)
        )
    }
}

/// Kills `victims` at once (no revoke) and times each one's record disappearing from
/// `hosts/`, seen through a watch.
pub async fn kill(
    fleet: &mut HollowFleet,
    victims: &[HostId],
    limit: Duration,
) -> Result<Latencies> {
    let mut c = client(&fleet.config.endpoints).await?;
    let mut stream = watch_from_now(&mut c, juice_fleet::record::HOSTS).await?;
    let wanted: HashMap<String, ()> = victims.iter().map(|v| (v.key(), ())).collect();
    let start = Instant::now();
    for v in victims {
        if let Some(h) = fleet.hosts.remove(v) {
            h.kill();
        }
    }
    let seen = deletions(&mut stream, &wanted, start, limit).await?;
    Ok(Latencies::of(&seen, wanted.len()))
}

/// etcd's own lease expiry, no Juice code: `n` bare leases of `ttl`, each holding one
/// key and renewed every third of `ttl` (as a host renews its lease) from a random
/// moment, are all stopped at once; the time from then until each key is deleted.
pub async fn bare(
    endpoints: &Endpoints,
    n: usize,
    ttl_secs: u64,
    rng: &mut Rng,
    limit: Duration,
) -> Result<Latencies> {
    let mut c = client(endpoints).await?;
    let ttl = i64::try_from(ttl_secs).unwrap_or(10);
    let beat = Duration::from_secs(ttl_secs) / 3;
    let mut renewing = Vec::new();
    let mut wanted = HashMap::new();
    for i in 0..n {
        let lease = c
            .lease_grant(ttl, None)
            .await
            .map_err(etcd("a bare lease"))?
            .id();
        let key = format!("/juice-bench/bare/{i}");
        c.put(key.as_str(), "x", Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(etcd("a bare lease's key"))?;
        wanted.insert(key, ());
        let phase = beat.mul_f64((rng.below(1000) as f64) / 1000.0);
        let mut lc = c.clone();
        renewing.push(tokio::spawn(async move {
            tokio::time::sleep(phase).await;
            let Ok((mut keeper, mut answers)) = lc.lease_keep_alive(lease).await else {
                return;
            };
            loop {
                if keeper.keep_alive().await.is_err() || answers.message().await.is_err() {
                    return;
                }
                tokio::time::sleep(beat).await;
            }
        }));
    }
    // Every lease renewed at least once on its schedule.
    tokio::time::sleep(Duration::from_secs(ttl_secs) + beat).await;
    let mut stream = watch_from_now(&mut c, "/juice-bench/bare/").await?;
    let start = Instant::now();
    for r in &renewing {
        r.abort();
    }
    let seen = deletions(&mut stream, &wanted, start, limit).await?;
    Ok(Latencies::of(&seen, wanted.len()))
}

/// The latest report of `group` by each of `hosts`, kept current by a watch on `reports/`.
struct Follow {
    stream: etcd_client::WatchStream,
    group: GroupName,
    latest: BTreeMap<HostId, Report>,
}

impl Follow {
    async fn new(c: &mut Client, group: &GroupName) -> Result<Follow> {
        let stream = watch_from_now(c, REPORTS).await?;
        Ok(Follow {
            stream,
            group: group.clone(),
            latest: BTreeMap::new(),
        })
    }

    /// Waits for the next batch of events until `deadline`; false when it passed.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Result<bool> {
        let message = match tokio::time::timeout_at(deadline, self.stream.message()).await {
            Err(_) => return Ok(false),
            Ok(m) => m.map_err(etcd("the watch of reports"))?,
        };
        let Some(answer) = message else {
            return Err(Error::Bench("etcd closed the watch of reports".into()));
        };
        for e in answer.events() {
            let Some(kv) = e.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some((h, g)) = key.strip_prefix(REPORTS).and_then(|r| r.split_once('/')) else {
                continue;
            };
            if g != self.group.as_str() {
                continue;
            }
            let Ok(h) = h.parse::<HostId>() else { continue };
            match e.event_type() {
                EventType::Delete => {
                    self.latest.remove(&h);
                }
                EventType::Put => {
                    if let Ok(r) = serde_json::from_slice::<Report>(kv.value()) {
                        self.latest.insert(h, r);
                    }
                }
            }
        }
        Ok(true)
    }

    fn ready_at(&self, h: &HostId, revision: &str) -> bool {
        self.latest
            .get(h)
            .is_some_and(|r| r.revision == revision && r.size > 0 && r.ready == r.size)
    }
}

/// The group `group` of `spec` and its revision.
pub fn revision_of(spec: &FleetSpec, group: &GroupName) -> Result<(String, String)> {
    let g = spec
        .group
        .get(group)
        .ok_or_else(|| Error::Bench(format!("the fleet file has no group {group}")))?;
    Ok((juice_fleet::plan::revision(g), g.image.clone()))
}

/// What a rollout took: until every target reported the new revision ready.
pub struct Rollout {
    pub revision: String,
    /// From the apply to each host's first ready report of the new revision.
    pub per_host: Latencies,
    /// From the apply to the last host's.
    pub end_to_end: Option<Duration>,
}

/// Applies `spec` and times `group` reaching its new revision, ready, on every one of
/// `targets`.
pub async fn rollout(
    fleet: &HollowFleet,
    store: &Store,
    spec: &FleetSpec,
    group: &GroupName,
    targets: &BTreeSet<HostId>,
    limit: Duration,
) -> Result<Rollout> {
    let (revision, _) = revision_of(spec, group)?;
    let mut c = client(&fleet.config.endpoints).await?;
    let mut follow = Follow::new(&mut c, group).await?;
    let start = Instant::now();
    store.apply_spec(spec).await?;
    let deadline = tokio::time::Instant::from(start + limit);
    let mut seen: BTreeMap<String, Duration> = BTreeMap::new();
    let mut end = None;
    loop {
        for h in targets {
            if !seen.contains_key(h.as_str()) && follow.ready_at(h, &revision) {
                seen.insert(h.to_string(), start.elapsed());
            }
        }
        if seen.len() == targets.len() {
            end = Some(start.elapsed());
            break;
        }
        if !follow.next(deadline).await? {
            break;
        }
    }
    Ok(Rollout {
        revision,
        per_host: Latencies::of(&seen, targets.len()),
        end_to_end: end,
    })
}

/// What a bad revision did.
pub struct Failure {
    /// From the apply to the first report of the bad revision failing.
    pub first_failure: Option<Duration>,
    /// Hosts that were given the bad revision (reported it).
    pub touched: usize,
    /// From the first failure report to every touched host reporting the old revision
    /// ready again; `None` if that did not happen within the limit.
    pub back: Option<Duration>,
}

/// Makes every target fail `spec`'s image of `group`, applies `spec`, and times the
/// fleet's answer: from the first failure report to every host that was given the bad
/// revision reporting `old` ready again. With `later_wave`, the first host given the bad
/// revision runs it well (it passes the first wave) and every other target fails it: the
/// failure comes in a later wave.
#[allow(clippy::too_many_arguments)]
pub async fn fail(
    fleet: &HollowFleet,
    store: &Store,
    spec: &FleetSpec,
    group: &GroupName,
    old: &str,
    targets: &BTreeSet<HostId>,
    limit: Duration,
    later_wave: bool,
) -> Result<Failure> {
    let (bad, image) = revision_of(spec, group)?;
    let set_failing = |spare: Option<&HostId>| {
        for h in targets.iter().filter(|h| Some(*h) != spare) {
            if let Some(host) = fleet.hosts.get(h) {
                host.local.fail_image(&image, true);
            }
        }
    };
    if !later_wave {
        set_failing(None);
    }
    let mut spared = false;
    let mut c = client(&fleet.config.endpoints).await?;
    let mut follow = Follow::new(&mut c, group).await?;
    let start = Instant::now();
    store.apply_spec(spec).await?;
    let deadline = tokio::time::Instant::from(start + limit);
    let mut first = None;
    let mut touched = BTreeSet::new();
    let mut back = None;
    loop {
        for (h, r) in &follow.latest {
            if r.revision == bad {
                if later_wave && !spared {
                    set_failing(Some(h));
                    spared = true;
                }
                touched.insert(h.clone());
                if first.is_none() && r.status == FAILING {
                    first = Some(start.elapsed());
                }
            }
        }
        if let Some(f) = first
            && touched.iter().all(|h| follow.ready_at(h, old))
        {
            back = Some(start.elapsed().saturating_sub(f));
            break;
        }
        if !follow.next(deadline).await? {
            break;
        }
    }
    for h in targets {
        if let Some(host) = fleet.hosts.get(h) {
            host.local.fail_image(&image, false);
        }
    }
    Ok(Failure {
        first_failure: first,
        touched: touched.len(),
        back,
    })
}
