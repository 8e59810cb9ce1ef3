//! Each replica's view of the busy lines, refreshed from Postgres a few times a second.
//!
//! It serves two things that must not cost a query per fan: the admission rate behind
//! `estimated_wait` (sampled from `admitted_total` over the last half minute), and the
//! change notifications that drive WatchQueueStatus streams (a WAITING watcher computes its
//! position from the line's admission pointer and reads its own row only once it is passed).
//! A watcher far back pauses seconds between updates; so that it still hears of its own
//! admission at once, the board also wakes each watcher whose place the pointer reaches.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use stagedoor_runtime::Shutdown;
use tokio::sync::{oneshot, watch};

use crate::store::{self, LineCounters};

/// Span of the admission-rate estimate.
const RATE_WINDOW: Duration = Duration::from_secs(30);
/// Shortest span over which a rate is trusted.
const RATE_MIN_SPAN: Duration = Duration::from_secs(1);

struct LineEntry {
    counters: watch::Sender<LineCounters>,
    /// When the query that last read the counters from Postgres started (`None`: never,
    /// only subscribed).
    refreshed_at: Option<Instant>,
    /// (when, admitted_total) samples within RATE_WINDOW, oldest first.
    samples: VecDeque<(Instant, i64)>,
    /// Watchers to wake when the admission pointer reaches their place, by place. Only the
    /// places passed are woken, so a line that moves does not wake everyone behind.
    reach_wakers: BTreeMap<i64, Vec<oneshot::Sender<()>>>,
    /// How many senders `reach_wakers` holds, some of them perhaps of watchers gone.
    reach_waker_count: usize,
}

impl LineEntry {
    fn new(counters: LineCounters) -> Self {
        Self {
            counters: watch::channel(counters).0,
            refreshed_at: None,
            samples: VecDeque::new(),
            reach_wakers: BTreeMap::new(),
            reach_waker_count: 0,
        }
    }

    /// Wakes the watchers whose place the admission pointer has reached.
    fn wake_reached(&mut self) {
        let through = self.counters.borrow().admitted_through;
        let behind = self.reach_wakers.split_off(&(through + 1));
        for wakers in std::mem::replace(&mut self.reach_wakers, behind).into_values() {
            self.reach_waker_count -= wakers.len();
            for waker in wakers {
                let _ = waker.send(()); // a watcher that left has dropped its receiver
            }
        }
    }

    /// Drops the wakers of watchers that left before their place was reached (a fan who
    /// reopens a stream leaves one behind each time), once they could outnumber the live
    /// ones: each live watcher holds one receiver of `counters` and at most one waker. Run
    /// on every registration and refresh; the threshold keeps the cost per call constant.
    fn forget_gone_watchers(&mut self) {
        if self.reach_waker_count <= 2 * self.counters.receiver_count() + 1_024 {
            return;
        }
        self.reach_wakers.retain(|_, wakers| {
            wakers.retain(|waker| !waker.is_closed());
            !wakers.is_empty()
        });
        self.reach_waker_count = self.reach_wakers.values().map(Vec::len).sum();
    }
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
            .or_insert_with(|| LineEntry::new(LineCounters::default()))
            .counters
            .subscribe()
    }

    /// Resolves once this replica sees the line's admission pointer at `place` or beyond:
    /// the fan there was admitted, or skipped. Keep the receiver for the whole wait: each
    /// call registers a waker, which stays until the pointer passes or it is pruned.
    pub fn reached(&self, concert_id: &str, place: i64) -> oneshot::Receiver<()> {
        let (waker, reached) = oneshot::channel();
        let mut lines = self.lines.lock().expect("board poisoned");
        let entry = lines
            .entry(concert_id.to_owned())
            .or_insert_with(|| LineEntry::new(LineCounters::default()));
        if entry.counters.borrow().admitted_through >= place {
            let _ = waker.send(());
        } else {
            entry.forget_gone_watchers();
            entry.reach_wakers.entry(place).or_default().push(waker);
            entry.reach_waker_count += 1;
        }
        reached
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

    /// Takes in counters read from Postgres by a query started at `read_at`.
    fn apply(&self, read_at: Instant, rows: Vec<(String, LineCounters)>) {
        let mut lines = self.lines.lock().expect("board poisoned");
        let mut present = HashSet::with_capacity(rows.len());
        for (concert_id, counters) in rows {
            let entry = lines
                .entry(concert_id.clone())
                .or_insert_with(|| LineEntry::new(counters));
            entry.refreshed_at = Some(read_at);
            entry.counters.send_if_modified(|current| {
                let changed = *current != counters;
                *current = counters;
                changed
            });
            // After the counters: a woken watcher reads the new pointer.
            entry.wake_reached();
            entry.forget_gone_watchers();
            entry.samples.push_back((read_at, counters.admitted_total));
            while entry
                .samples
                .front()
                .is_some_and(|(at, _)| read_at.duration_since(*at) > RATE_WINDOW)
            {
                entry.samples.pop_front();
            }
            present.insert(concert_id);
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
                // Stamped when asked, not when answered: the counters are as old as the
                // query's snapshot, and a slow refresh must not pass for a fresh one in
                // `fresh_counters` (nor skew the rate samples by its own duration).
                let asked = Instant::now();
                match store::line_counters(&pool, &self.watched()).await {
                    Ok(rows) => self.apply(asked, rows),
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
    fn a_reach_waker_fires_when_the_pointer_passes_its_place_and_not_before() {
        let board = LineBoard::default();
        let _watching = board.subscribe("c");
        let now = Instant::now();
        board.apply(now, vec![("c".into(), counters(3))]);
        let mut passed_already = board.reached("c", 3);
        let mut next = board.reached("c", 5);
        let mut far = board.reached("c", 900);
        assert_eq!(passed_already.try_recv(), Ok(()));
        assert!(next.try_recv().is_err() && far.try_recv().is_err());

        board.apply(now, vec![("c".into(), counters(4))]);
        assert!(next.try_recv().is_err(), "place 5 is not reached by 4");
        board.apply(now, vec![("c".into(), counters(10))]);
        assert_eq!(next.try_recv(), Ok(()));
        assert!(
            far.try_recv().is_err(),
            "a move of the line wakes only the places passed"
        );
        assert_eq!(board.lines.lock().unwrap()["c"].reach_waker_count, 1);
    }

    #[test]
    fn wakers_of_watchers_gone_are_pruned() {
        let board = LineBoard::default();
        let _watching = board.subscribe("c");
        // A fan who reopens a stream again and again leaves a waker behind each time.
        for _ in 0..5_000 {
            drop(board.reached("c", 100));
        }
        let kept = board.reached("c", 100);
        let count = board.lines.lock().unwrap()["c"].reach_waker_count;
        // Pruned whenever they outnumber twice the live watchers (one here) plus 1,024.
        assert!(count <= 2 + 1_024 + 1, "{count} wakers kept");
        board.apply(Instant::now(), vec![("c".into(), counters(100))]);
        assert_eq!(
            kept.blocking_recv(),
            Ok(()),
            "the live watcher is still woken"
        );
        assert_eq!(board.lines.lock().unwrap()["c"].reach_waker_count, 0);
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
