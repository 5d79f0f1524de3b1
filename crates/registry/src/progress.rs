//! How far a transfer has got, reported to whoever asked.
//!
//! The library never draws: a push or pull reports [`ProgressEvent`]s to the
//! [`Reporter`] in its options, and the caller decides what they become (bars
//! on a terminal for `juice pull`, nothing for the daemon). Every blob that
//! starts moving ends with exactly one [`ProgressEvent::BlobEnded`], whether
//! it completed or not, so a drawing can always be taken down.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use juice_registry::progress::{ProgressEvent, Reporter};
//!
//! let moved = Arc::new(Mutex::new(0u64));
//! let counter = moved.clone();
//! let reporter = Reporter::new(move |e: &ProgressEvent| {
//!     if let ProgressEvent::BlobAdvanced { bytes, .. } = e {
//!         *counter.lock().unwrap() += bytes;
//!     }
//! });
//! # let _ = reporter;
//! ```

use std::sync::Arc;

use juice_image::digest::Digest;

/// Which way a blob moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local store to a registry.
    Push,
    /// From a registry into the local store.
    Pull,
}

/// One step of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgressEvent {
    /// A blob begins to move; `size` is what its descriptor declares.
    BlobStarted {
        direction: Direction,
        blob: Digest,
        size: u64,
    },
    /// `bytes` more of the blob moved since its last event.
    BlobAdvanced { blob: Digest, bytes: u64 },
    /// The blob is done: `completed` if every byte moved and was accepted,
    /// not if the transfer failed or was abandoned.
    BlobEnded { blob: Digest, completed: bool },
}

/// Receives a transfer's events. Any `Fn(&ProgressEvent)` is one.
///
/// Events come from the thread doing the transfer, so a receiver that draws
/// or logs should be quick about it.
pub trait Progress: Send + Sync {
    fn report(&self, event: &ProgressEvent);
}

impl<F> Progress for F
where
    F: Fn(&ProgressEvent) + Send + Sync,
{
    fn report(&self, event: &ProgressEvent) {
        self(event)
    }
}

/// A shared handle on a [`Progress`], for an options struct: cheap to clone,
/// and silent by default.
#[derive(Clone)]
pub struct Reporter(Option<Arc<dyn Progress>>);

impl Reporter {
    pub fn new(progress: impl Progress + 'static) -> Reporter {
        Reporter(Some(Arc::new(progress)))
    }

    /// Reports nothing: for callers with nobody to show progress to (the daemon).
    pub fn silent() -> Reporter {
        Reporter(None)
    }

    pub fn report(&self, event: &ProgressEvent) {
        if let Some(p) = &self.0 {
            p.report(event);
        }
    }

    /// Starts reporting on one blob; it ends (as not completed) when the
    /// returned tracker is dropped unless [`BlobTracker::complete`] was called.
    pub(crate) fn blob(&self, direction: Direction, blob: Digest, size: u64) -> BlobTracker {
        self.report(&ProgressEvent::BlobStarted {
            direction,
            blob,
            size,
        });
        BlobTracker {
            reporter: self.clone(),
            blob,
            completed: false,
        }
    }
}

impl Default for Reporter {
    fn default() -> Reporter {
        Reporter::silent()
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Reporter(..)"
        } else {
            "Reporter(silent)"
        })
    }
}

/// One blob's reporting, which always ends with [`ProgressEvent::BlobEnded`].
pub(crate) struct BlobTracker {
    reporter: Reporter,
    blob: Digest,
    completed: bool,
}

impl BlobTracker {
    pub(crate) fn advance(&self, bytes: u64) {
        self.reporter.report(&ProgressEvent::BlobAdvanced {
            blob: self.blob,
            bytes,
        });
    }

    /// A handle that reports this blob's advances from elsewhere (a stream of chunks).
    pub(crate) fn advancer(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let (reporter, blob) = (self.reporter.clone(), self.blob);
        move |bytes| reporter.report(&ProgressEvent::BlobAdvanced { blob, bytes })
    }

    pub(crate) fn complete(mut self) {
        self.completed = true;
    }
}

impl Drop for BlobTracker {
    fn drop(&mut self) {
        self.reporter.report(&ProgressEvent::BlobEnded {
            blob: self.blob,
            completed: self.completed,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A reporter that keeps every event, and the events it kept.
    fn recording() -> (Reporter, Arc<Mutex<Vec<ProgressEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let reporter = Reporter::new(move |e: &ProgressEvent| {
            sink.lock().expect("the test's lock").push(e.clone())
        });
        (reporter, events)
    }

    #[test]
    fn a_completed_blob_reports_start_advances_and_a_completed_end() {
        let (reporter, events) = recording();
        let blob = Digest::of(b"layer");
        let t = reporter.blob(Direction::Pull, blob, 10);
        t.advance(4);
        t.advancer()(6);
        t.complete();
        assert_eq!(
            *events.lock().expect("the test's lock"),
            vec![
                ProgressEvent::BlobStarted {
                    direction: Direction::Pull,
                    blob,
                    size: 10
                },
                ProgressEvent::BlobAdvanced { blob, bytes: 4 },
                ProgressEvent::BlobAdvanced { blob, bytes: 6 },
                ProgressEvent::BlobEnded {
                    blob,
                    completed: true
                },
            ]
        );
    }

    #[test]
    fn a_blob_abandoned_by_an_error_still_ends_once_not_completed() {
        let (reporter, events) = recording();
        let blob = Digest::of(b"layer");
        let failed = || -> Result<(), ()> {
            let t = reporter.blob(Direction::Push, blob, 10);
            t.advance(3);
            Err(())?;
            t.complete();
            Ok(())
        };
        assert!(failed().is_err());
        let events = events.lock().expect("the test's lock");
        assert_eq!(
            events.last(),
            Some(&ProgressEvent::BlobEnded {
                blob,
                completed: false
            })
        );
        let ends = events
            .iter()
            .filter(|e| matches!(e, ProgressEvent::BlobEnded { .. }))
            .count();
        assert_eq!(ends, 1);
    }

    #[test]
    fn the_default_reporter_is_silent_and_says_so() {
        let r = Reporter::default();
        assert_eq!(format!("{r:?}"), "Reporter(silent)");
        // Nothing receives the events; reporting must simply not fail.
        r.blob(Direction::Pull, Digest::of(b""), 0).complete();
    }
}
