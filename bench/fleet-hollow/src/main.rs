//! `fleet-hollow`: thousands of hollow fleet hosts in one process, driven line by line
//! on stdin by bench/fleet.sh; each command's figures go to stdout as `NAME VALUE` lines,
//! then `done COMMAND`. Not part of the product (never installed).
//!
//! ```text
//! fleet-hollow --endpoints URL --hosts N [--ttl 10] [--pool 32] [--rate 500]
//!              [--ready-after-ms 0] [--rollout-hosts 100] [--seed S]
//! commands:  settle SECS | kill K SECS | bare K SECS | apply FILE
//!            | rollout FILE GROUP SECS | fail FILE GROUP OLD_FILE SECS [later] | status | quit
//! ```

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use juice_bench_fleet_hollow::{
    Config, Error, HollowFleet, Result, Rng, bare, client, fail, kill, registered, revision_of,
    rollout, settled,
};
use juice_fleet::{FleetSpec, GroupName, HostId, Store};

struct Args {
    config: Config,
    hosts: usize,
    seed: u64,
}

fn args() -> Result<Args> {
    let mut a = std::env::args().skip(1);
    let mut endpoints = None;
    let (mut hosts, mut ttl, mut pool, mut rate, mut ready, mut rollout_hosts) =
        (200usize, 10u64, 32usize, 500usize, 0u64, 100usize);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    while let Some(flag) = a.next() {
        let value = a
            .next()
            .ok_or_else(|| Error::Bench(format!("{flag} needs a value")))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|e| Error::Bench(format!("{flag} {v}: {e}")))
        };
        let size = |v: &str| usize::try_from(number(v)?).map_err(|e| Error::Bench(e.to_string()));
        match flag.as_str() {
            "--endpoints" => endpoints = Some(value.parse()?),
            "--hosts" => hosts = size(&value)?,
            "--ttl" => ttl = number(&value)?,
            "--pool" => pool = size(&value)?,
            "--rate" => rate = size(&value)?,
            "--ready-after-ms" => ready = number(&value)?,
            "--rollout-hosts" => rollout_hosts = size(&value)?,
            "--seed" => seed = number(&value)?,
            _ => return Err(Error::Bench(format!("unknown flag {flag}"))),
        }
    }
    let endpoints = endpoints.ok_or_else(|| Error::Bench("--endpoints is needed".into()))?;
    Ok(Args {
        config: Config {
            endpoints,
            ttl_secs: ttl,
            pool,
            ready_after: Duration::from_millis(ready),
            rollout_hosts,
            rate,
        },
        hosts,
        seed,
    })
}

fn secs(v: Option<&str>) -> Result<Duration> {
    let v = v.ok_or_else(|| Error::Bench("a time limit in seconds is needed".into()))?;
    v.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| Error::Bench(format!("{v}: {e}")))
}

fn spec(v: Option<&str>) -> Result<FleetSpec> {
    let v = v.ok_or_else(|| Error::Bench("a fleet file is needed".into()))?;
    FleetSpec::load(Path::new(v)).map_err(|e| Error::Bench(e.to_string()))
}

fn group(v: Option<&str>) -> Result<GroupName> {
    let v = v.ok_or_else(|| Error::Bench("a group name is needed".into()))?;
    v.parse().map_err(Error::Bench)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

async fn command(
    line: &str,
    fleet: &mut HollowFleet,
    store: &Store,
    rng: &mut Rng,
) -> Result<bool> {
    let mut words = line.split_whitespace();
    let Some(verb) = words.next() else {
        return Ok(true);
    };
    match verb {
        "status" => {
            let c = &fleet.counters;
            let mut etcd = client(&fleet.config.endpoints).await?;
            println!("hosts.running {}", fleet.hosts.len());
            println!("hosts.registered_in_etcd {}", registered(&mut etcd).await?);
            for (name, n) in [
                ("registered", &c.registered),
                ("registration_lost", &c.registration_lost),
                ("applied", &c.applied),
                ("reported", &c.reported),
                ("watch_lost", &c.watch_lost),
                ("malformed", &c.malformed),
            ] {
                println!("events.{name} {}", n.load(Ordering::Relaxed));
            }
        }
        "settle" => {
            let limit = secs(words.next())?;
            let start = Instant::now();
            loop {
                let (ok, total) = settled(store).await?;
                if total > 0 && ok == total {
                    println!("settle.ms {}", ms(start.elapsed()));
                    println!("settle.assignments {total}");
                    break;
                }
                if start.elapsed() > limit {
                    println!("settle.ms none");
                    println!("settle.ready {ok}");
                    println!("settle.assignments {total}");
                    break;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        "kill" => {
            let k: usize = words
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| Error::Bench("kill K SECS".into()))?;
            let limit = secs(words.next())?;
            // Any hosts but the rollout's, chosen by the seeded generator.
            let rollout = fleet.rollout_hosts();
            let mut pool: Vec<HostId> = fleet
                .hosts
                .keys()
                .filter(|h| !rollout.contains(*h))
                .cloned()
                .collect();
            let mut victims = Vec::new();
            while victims.len() < k && !pool.is_empty() {
                let i = rng.below(pool.len());
                victims.push(pool.swap_remove(i));
            }
            let l = kill(fleet, &victims, limit).await?;
            println!("{}", l.lines("kill"));
        }
        "bare" => {
            let k: usize = words
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| Error::Bench("bare K SECS".into()))?;
            let limit = secs(words.next())?;
            let l = bare(
                &fleet.config.endpoints,
                k,
                fleet.config.ttl_secs,
                rng,
                limit,
            )
            .await?;
            println!("{}", l.lines("bare"));
        }
        "apply" => {
            let s = spec(words.next())?;
            let revision = store.apply_spec(&s).await?;
            println!("apply.revision {revision}");
        }
        "rollout" => {
            let s = spec(words.next())?;
            let g = group(words.next())?;
            let limit = secs(words.next())?;
            let targets = fleet.rollout_hosts();
            let r = rollout(fleet, store, &s, &g, &targets, limit).await?;
            println!("rollout.hosts {}", targets.len());
            println!("rollout.revision {}", r.revision);
            println!("{}", r.per_host.lines("rollout.host"));
            match r.end_to_end {
                Some(d) => println!("rollout.end_to_end_ms {}", ms(d)),
                None => println!("rollout.end_to_end_ms none"),
            }
        }
        "fail" => {
            let s = spec(words.next())?;
            let g = group(words.next())?;
            let old = spec(words.next())?;
            let limit = secs(words.next())?;
            let later_wave = words.next() == Some("later");
            let (old_revision, _) = revision_of(&old, &g)?;
            let targets = fleet.rollout_hosts();
            let f = fail(
                fleet,
                store,
                &s,
                &g,
                &old_revision,
                &targets,
                limit,
                later_wave,
            )
            .await?;
            match f.first_failure {
                Some(d) => println!("fail.first_failure_ms {}", ms(d)),
                None => println!("fail.first_failure_ms none"),
            }
            println!("fail.touched {}", f.touched);
            match f.back {
                Some(d) => println!("fail.back_ms {}", ms(d)),
                None => println!("fail.back_ms none"),
            }
        }
        "quit" => return Ok(false),
        _ => return Err(Error::Bench(format!("unknown command {verb}"))),
    }
    Ok(true)
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("fleet-hollow: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let args = args()?;
    println!("seed {}", args.seed);
    let mut rng = Rng::new(args.seed);
    let store = Store::connect(&args.config.endpoints, Duration::from_secs(30)).await?;
    let mut fleet = HollowFleet::new(args.config).await?;
    let start = Instant::now();
    fleet.start(0, args.hosts).await?;
    println!("start.spawned_ms {}", ms(start.elapsed()));
    let mut etcd = client(&fleet.config.endpoints).await?;
    let want = i64::try_from(args.hosts).unwrap_or(i64::MAX);
    loop {
        if registered(&mut etcd).await? >= want {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(Error::Bench(format!(
                "{} hosts not all registered after 600 s",
                args.hosts
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("start.registered_ms {}", ms(start.elapsed()));
    println!("done start");
    // Commands are read on a thread of their own (stdin blocks).
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let verb = line.split_whitespace().next().unwrap_or("").to_owned();
        match command(&line, &mut fleet, &store, &mut rng).await {
            Ok(true) => println!("done {verb}"),
            Ok(false) => break,
            Err(e) => println!("error {verb}: {e}"),
        }
    }
    Ok(())
}
