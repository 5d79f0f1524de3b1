//! The Juice fleet: hosts that register themselves in etcd, and the queries over them.
//!
//! Every record lives under `/juice/v1/` ([`record`]). A host started with
//! `juice daemon --fleet ENDPOINTS` writes `hosts/<host-id>`, its capabilities (CPUs,
//! memory, labels, the isolation backends it can run, versions), under a lease it
//! keeps alive ([`Registration`]): a host that dies disappears by itself when its lease
//! runs out, and a host that loses etcd goes on running what it has and registers
//! again when etcd is back. [`Store`] reads the records, with a deadline on every call.
//!
//! The fleet's declared state is a `fleet.toml` ([`spec`]); [`plan()`] places its groups on
//! the registered hosts, purely and deterministically; a [`Controller`] elected through
//! etcd among the daemons started with `--fleet-controller` is the only writer of the
//! hosts' assignments, every write fenced on its leadership ([`controller`]). Each host
//! watches its own assignments, applies them to its agent as groups named `fleet-NAME`,
//! and reports how they run under its lease ([`host`], [`report`]). A new revision of a
//! group rolls out in waves gated on those reports, and a failure rolls every touched
//! host back ([`rollout`]).
//!
//! With `https://` endpoints every client speaks mutual TLS to etcd ([`tls`]) with a
//! certificate of the fleet's own CA ([`certs`]), whose common name is its etcd user; etcd's
//! roles ([`auth`]) let a host write only its own records.
//! Hosts update their own daemon (and OS) a few at a time through slots held under their
//! leases ([`update`]).
//!
//! ```no_run
//! # async fn list() -> Result<(), juice_fleet::Error> {
//! use std::time::Duration;
//! let endpoints: juice_fleet::Endpoints = "http://127.0.0.1:2379".parse()?;
//! let store = juice_fleet::Store::connect(&endpoints, Duration::from_secs(3)).await?;
//! for host in store.hosts().await?.hosts {
//!     println!("{} {} cpus, labels {}", host.hostname, host.cpus, host.labels);
//! }
//! # Ok(()) }
//! ```

pub mod auth;
pub mod certs;
pub mod controller;
pub mod endpoints;
pub mod error;
pub mod facts;
pub mod host;
pub mod liveness;
pub mod plan;
pub mod record;
pub mod registration;
pub mod report;
pub mod rollout;
pub mod spec;
pub mod store;
pub mod tls;
pub mod update;

pub use controller::{Controller, Leader, Leadership};
pub use endpoints::Endpoints;
pub use error::{Error, Result};
pub use host::{HostWork, LocalHost};
pub use plan::{Assignment, HostCapacity, Plan, PlanError, plan, plan_from, plan_pinned};
pub use record::{Backend, HostId, HostRecord, Label, Labels};
pub use registration::{Registration, Status};
pub use report::{LocalGroup, Report};
pub use spec::{FleetSpec, GroupName, GroupSpec};
pub use store::{Connections, Listing, Store};
pub use tls::FleetTls;
