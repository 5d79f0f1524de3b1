//! Debug sessions: a toolbox brought in beside a running instance for the
//! length of a session, without changing the instance's image (see
//! `docs/debug.md`). The agent checks the toolbox against the trust policy,
//! unpacks it, asks the instance's backend to start the session, and records
//! who opened it and how it ended as events.

use std::path::Path;
use std::time::Instant;

use juice_runtime::{BackendError, DebugSession, DebugSpec, HostLimits, InstanceSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Agent, AgentError};

/// The toolbox a session uses unless it names another: built by Juice from
/// `examples/toolbox` (`juice build examples/toolbox`).
pub const DEFAULT_TOOLBOX: &str = "juice-toolbox";

/// `POST /v1/instances/{name}/debug`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DebugRequest {
    /// The toolbox image; `juice-toolbox` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The command to run; the toolbox's own command when empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// An interactive terminal rather than separate streams.
    #[serde(default)]
    pub tty: bool,
    /// The terminal's size.
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// A session the agent has opened; [`Agent::close_debug`] records its end.
pub struct OpenSession {
    pub instance: String,
    group: String,
    who: String,
    opened: Instant,
    /// Capabilities the toolbox asked for that this host's policy withholds.
    pub withheld: Vec<String>,
}

impl Agent {
    /// Opens a debug session into `instance` for `who` (the client, as the API knows it).
    pub fn open_debug(
        &self,
        instance: &str,
        req: &DebugRequest,
        who: &str,
    ) -> Result<(DebugSession, OpenSession), AgentError> {
        let record = self
            .state
            .instances()?
            .into_iter()
            .find(|r| r.name == instance)
            .ok_or_else(|| AgentError::NoInstance(instance.to_owned()))?;
        let refused = |reason: String| AgentError::Debug {
            instance: instance.to_owned(),
            reason,
        };
        let image = req.image.as_deref().unwrap_or(DEFAULT_TOOLBOX);
        let admitted =
            juice_registry::policy::admit_toolbox(&self.store, image).map_err(|e| match e {
                juice_registry::RegistryError::Store(
                    juice_image::store::StoreError::NotFound { .. },
                ) if req.image.is_none() => refused(format!(
                    "there is no toolbox image {DEFAULT_TOOLBOX:?} here; build it with `juice build examples/toolbox`, or name one with --image"
                )),
                e @ juice_registry::RegistryError::Untrusted(_) => AgentError::DebugRefused {
                    instance: instance.to_owned(),
                    reason: e.to_string(),
                },
                e => refused(e.to_string()),
            })?;
        let digest = admitted.admitted.digest.to_string();
        let rootfs = juice_image::unpack::materialise(&self.store, &digest)
            .map_err(|e| refused(format!("cannot unpack the toolbox {image}: {e}")))?;
        let appliance = rootfs.appliance.as_ref().ok_or_else(|| {
            refused(format!(
                "{image} is not a Juice appliance, so it cannot be a toolbox"
            ))
        })?;
        let host = HostLimits::load(&self.home).map_err(|e| refused(e.to_string()))?;
        let shape = InstanceSpec::for_appliance(
            appliance,
            &rootfs.path,
            instance,
            Path::new("/nonexistent"),
            &host,
        );
        let mut program = shape.program;
        if !req.command.is_empty() {
            program.argv.clone_from(&req.command);
        }
        program.capabilities.clone_from(&admitted.granted);
        let spec = DebugSpec {
            toolbox: rootfs.path.clone(),
            program,
            tty: req.tty,
            rows: if req.rows == 0 { 24 } else { req.rows },
            cols: if req.cols == 0 { 80 } else { req.cols },
            limits: shape.limits,
        };
        let session = self
            .backend(record.isolation)?
            .debug(instance, &spec)
            .map_err(|e| match e {
                BackendError::NotFound(_) => AgentError::NoInstance(instance.to_owned()),
                e => refused(e.to_string()),
            })?;
        let withheld = admitted.withheld;
        let note = if withheld.is_empty() {
            String::new()
        } else {
            format!(" (without {}: no grant)", withheld.join(", "))
        };
        self.event(
            Some(record.group.as_str()),
            Some(instance),
            &format!(
                "debug session by {who}: {} ({}) running {:?}{note}",
                admitted.admitted.reference,
                &digest[..digest.len().min(19)],
                spec.program.argv,
            ),
        );
        Ok((
            session,
            OpenSession {
                instance: instance.to_owned(),
                group: record.group.to_string(),
                who: who.to_owned(),
                opened: Instant::now(),
                withheld,
            },
        ))
    }

    /// The default toolbox, unpacked, for a microVM to carry as a disk from its
    /// boot: only when the store has one and the trust policy admits it.
    pub(super) fn vm_toolbox(&self) -> Option<std::path::PathBuf> {
        let admitted = juice_registry::policy::admit_toolbox(&self.store, DEFAULT_TOOLBOX).ok()?;
        juice_image::unpack::materialise(&self.store, &admitted.admitted.digest.to_string())
            .ok()
            .map(|r| r.path)
    }

    /// Records the end of a session (`code`: its exit code, if it reported one).
    pub fn close_debug(&self, open: &OpenSession, code: Option<i32>) {
        let how = code.map_or("without an exit code (the client left)".to_owned(), |c| {
            format!("with exit code {c}")
        });
        self.event(
            Some(&open.group),
            Some(&open.instance),
            &format!(
                "debug session by {} ended {how} after {:.1} s",
                open.who,
                open.opened.elapsed().as_secs_f64()
            ),
        );
    }
}
