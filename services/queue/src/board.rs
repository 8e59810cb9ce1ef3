//! Each replica's view of the busy lines, refreshed from Postgres a few times a second.
//!
//! It serves two things that must not cost a query per fan: the admission rate behind
//! `estimated_wait` (sampled from `admitted_total` over the last half minute), and the
//! change notifications that drive WatchQueueStatus streams (a WAITING watcher computes its
//! position from the line's admission pointer and reads its own row only once it is passed).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use stagedoor_runtime::Shutdown;
use tokio::sync::watch;

use crate::store::{self, LineCounters};

/// Span of the admission-rate estimate.
const RATE_WINDOW: Duration = Duration::from_secs(30);
/// Shortest span over which a rate is trusted.
const RATE_MIN_SPAN: Duration = Duration::from_secs(1);

struct LineEntry {
    counters: watch::Sender<LineCounters>,
    /// When the counters were last read from Postgres (`None`: never, only subscribed).
    refreshed_at: Option<Instant>,
    /// (when, admitted_total) samples within RATE_WINDOW, oldest first.
    samples: VecDeque<(Instant, i64)>,
}

/// The busy lines as this replica last saw them.
#[derive(Default)]
pub struct LineBoard {
    lines: Mutex<HashMap<String, LineEntry>>,
}

impl LineBoard {
    /// Changes of a line's counters, starting from the last seen value.
    pub fn subscribe(&self, concert_id: &str) -> watch::Receiver<LineCounters> {
        let mut lines = self.lines.lock().expect("board poisoned");
        lines
            .entry(concert_id.to_owned())
            .or_insert_with(|| LineEntry {
                counters: watch::channel(LineCounters::default()).0,
                refreshed_at: None,
                samples: VecDeque::new(),
            })
            .counters
            .subscribe()
    }

    /// Fans admitted per second over the last half minute; `None` until at least a second of
    /// observation exists.
    pub fn admission_rate(&self, concert_id: &str) -> Option<f64> {
        let lines = self.lines.lock().expect("board poisoned");
        let samples = &lines.get(concert_id)?.samples;
        let (first_at, first_total) = *samples.front()?;
        let (last_at, last_total) = *samples.back()?;
        let span = last_at.duration_since(first_at);
        (span >= RATE_MIN_SPAN).then(|| (last_total - first_total) as f64 / span.as_secs_f64())
    }

    /// The line's counters if they were read from Postgres within `max_age`; `None` when the
    /// board has not seen the line lately (quiet line, or refreshes failing).
    pub fn fresh_counters(&self, concert_id: &str, max_age: Duration) -> Option<LineCounters> {
        let lines = self.lines.lock().expect("board poisoned");
        let entry = lines.get(concert_id)?;
        let fresh = entry.refreshed_at?.elapsed() <= max_age;
        fresh.then(|| *entry.counters.borrow())
    }

    /// Records counters as if just read from Postgres (unit tests of the board's users).
    #[cfg(test)]
    pub(crate) fn observe_for_tests(&self, concert_id: &str, counters: LineCounters) {
        self.apply(Instant::now(), vec![(concert_id.to_owned(), counters)]);
    }

    /// Lines someone is watching: refreshed even when idle, so a watcher sees the last change.
    fn watched(&self) -> Vec<String> {
        let lines = self.lines.lock().expect("board poisoned");
        lines
            .iter()
            .filter(|(_, entry)| entry.counters.receiver_count() > 0)
            .map(|(concert_id, _)| concert_id.clone())
            .collect()
    }

    fn apply(&self, now: Instant, rows: Vec<(String, LineCounters)>) {
        let mut lines = self.lines.lock().expect("board poisoned");
        let mut present = Vec::with_capacity(rows.len());
        for (concert_id, counters) in rows {
            let entry = lines
                .entry(concert_id.clone())
                .or_insert_with(|| LineEntry {
                    counters: watch::channel(counters).0,
                    refreshed_at: None,
                    samples: VecDeque::new(),
                });
            entry.refreshed_at = Some(now);
            entry.counters.send_if_modified(|current| {
                let changed = *current != counters;
                *current = counters;
                changed
            });
            entry.samples.push_back((now, counters.admitted_total));
            while entry
                .samples
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
            {
                entry.samples.pop_front();
            }
            present.push(concert_id);
        }
        // Forget quiet lines nobody watches; they come back when they get busy again.
        lines.retain(|concert_id, entry| {
            entry.counters.receiver_count() > 0 || present.contains(concert_id)
        });
    }

    /// Refreshes the board every `period` until shutdown.
    pub async fn run_refresher(&self, pool: PgPool, period: Duration, shutdown: Shutdown) {
        shutdown
            .every(period, || async {
                match store::line_counters(&pool, &self.watched()).await {
                    Ok(rows) => self.apply(Instant::now(), rows),
                    Err(error) => tracing::warn!(%error, "line board refresh failed"),
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(admitted_total: i64) -> LineCounters {
        LineCounters {
            admitted_through: admitted_total,
            admitted_total,
            active_count: 0,
        }
    }

    #[test]
    fn rate_needs_a_second_of_samples() {
        let board = LineBoard::default();
        let start = Instant::now();
        board.apply(start, vec![("c".into(), counters(0))]);
        assert_eq!(board.admission_rate("c"), None);
        board.apply(
            start + Duration::from_secs(2),
            vec![("c".into(), counters(100))],
        );
        assert_eq!(board.admission_rate("c"), Some(50.0));
    }

    #[test]
    fn watchers_see_changes_and_keep_quiet_lines() {
        let board = LineBoard::default();
        let mut watcher = board.subscribe("c");
        let now = Instant::now();
        board.apply(now, vec![("c".into(), counters(3))]);
        assert!(watcher.has_changed().unwrap());
        assert_eq!(watcher.borrow_and_update().admitted_total, 3);
        // The line went quiet but is still watched: it stays on the board.
        board.apply(now, vec![]);
        assert_eq!(board.watched(), vec!["c".to_owned()]);
        drop(watcher);
        board.apply(now, vec![]);
        assert!(board.watched().is_empty());
    }
}
