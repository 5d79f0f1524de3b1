//! Progress bars on stderr, drawn from the events the registry library reports.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use juice_image::digest::Digest;
use juice_registry::progress::{Direction, Progress, ProgressEvent, Reporter};

/// What a transfer command reports to: bars on a terminal, nothing with `-q` or
/// when stderr is a file or a pipe (a log should not fill with redraws).
pub fn reporter(quiet: bool) -> Reporter {
    if quiet || !std::io::stderr().is_terminal() {
        return Reporter::silent();
    }
    Reporter::new(Bars::new(ProgressDrawTarget::stderr()))
}

/// One bar per blob in flight.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Bars {
    fn new(target: ProgressDrawTarget) -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn start(direction: Direction, blob: &Digest, size: u64) -> ProgressBar {
        let bar = ProgressBar::new(size);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:24} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
        ) {
            bar.set_style(style);
        }
        let verb = match direction {
            Direction::Push => "push",
            Direction::Pull => "pull",
        };
        bar.set_message(format!("{verb} {}", blob.short()));
        bar
    }
}

impl Progress for Bars {
    fn report(&self, event: &ProgressEvent) {
        // A panic elsewhere while drawing leaves nothing worth refusing to draw over.
        let mut bars = self.bars.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            ProgressEvent::BlobStarted {
                direction,
                blob,
                size,
            } => {
                let bar = self.multi.add(Bars::start(*direction, blob, *size));
                bars.insert(*blob, bar);
            }
            ProgressEvent::BlobAdvanced { blob, bytes } => {
                if let Some(bar) = bars.get(blob) {
                    bar.inc(*bytes);
                }
            }
            // Taken down either way: a failure is told in the error, not by a stuck bar.
            ProgressEvent::BlobEnded { blob, .. } => {
                if let Some(bar) = bars.remove(blob) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_follows_its_blob_and_is_taken_down_when_it_ends() {
        let bars = Bars::new(ProgressDrawTarget::hidden());
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        for (blob, size) in [(a, 10), (b, 20)] {
            bars.report(&ProgressEvent::BlobStarted {
                direction: Direction::Pull,
                blob,
                size,
            });
        }
        bars.report(&ProgressEvent::BlobAdvanced { blob: a, bytes: 7 });
        let position = |d: &Digest| bars.bars.lock().expect("unpoisoned")[d].position();
        assert_eq!((position(&a), position(&b)), (7, 0));

        bars.report(&ProgressEvent::BlobEnded {
            blob: a,
            completed: true,
        });
        bars.report(&ProgressEvent::BlobEnded {
            blob: b,
            completed: false,
        });
        assert!(bars.bars.lock().expect("unpoisoned").is_empty());
    }

    #[test]
    fn events_for_a_blob_never_started_are_ignored() {
        let bars = Bars::new(ProgressDrawTarget::hidden());
        let blob = Digest::of(b"stray");
        bars.report(&ProgressEvent::BlobAdvanced { blob, bytes: 1 });
        bars.report(&ProgressEvent::BlobEnded {
            blob,
            completed: true,
        });
        assert!(bars.bars.lock().expect("unpoisoned").is_empty());
    }

    #[test]
    fn quiet_commands_report_to_nobody() {
        assert_eq!(format!("{:?}", reporter(true)), "Reporter(silent)");
    }
}
