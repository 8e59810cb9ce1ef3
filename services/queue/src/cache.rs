//! Serving GetQueueStatus (and the first message of WatchQueueStatus) for WAITING fans from
//! memory.
//!
//! Polling is the bulk of the queue's traffic: 100,000 fans asking every few seconds. A
//! WAITING token's fields never change while it waits (token, fan, place), and its position
//! follows from the line's admission pointer, which the [`LineBoard`] already refreshes a few
//! times a second. So once a replica has read a WAITING token from Postgres (or issued it:
//! the issuing transaction read or wrote its row) it answers polls for it from memory, as
//! long as
//! - the entry was verified against Postgres within the trust window (a quarter of the idle
//!   TTL: a fan back after a long silence is read again and finds out if it expired), and
//! - the board is fresh and its admission pointer is still before the token's place (once the
//!   pointer reaches it, the fan was admitted or skipped, and only the row can say which).
//!
//! Polls answered from memory still keep the token alive through the heartbeat buffer.
//!
//! A token that ends through this replica (its fan called LeaveQueue here) is remembered as
//! ended for the trust window, so a poll that read the row just before the leave committed
//! cannot put it back as WAITING, and this replica's watchers of it are woken at once
//! ([`EndAlarm`]). Other replicas learn of it when their entry's trust runs out.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    board::LineBoard,
    domain::{Ticket, TokenStatus},
};

/// Entries kept at most; past it the cache starts over (every entry is re-readable).
const MAX_ENTRIES: usize = 1_000_000;
/// The board must have read the line this recently for its pointer to be trusted.
const BOARD_MAX_AGE: Duration = Duration::from_secs(1);

struct CachedTicket {
    concert_id: String,
    user_id: String,
    place: i64,
    create_time: DateTime<Utc>,
    /// The line's admission pointer as the row's read saw it: the board's may be older
    /// (up to `BOARD_MAX_AGE`), and a fan's position must not go back up after an answer.
    admitted_through: i64,
    verified_at: Instant,
    /// When the fan's presence was last noted for the heartbeat (or read as fresh).
    seen_at: Instant,
}

/// WAITING tickets this replica has read from Postgres.
pub struct WaitingCache {
    entries: Mutex<HashMap<Uuid, CachedTicket>>,
    /// Tokens that ended through this replica within the trust window: never cached as
    /// WAITING again meanwhile (a read that started before the end may still arrive).
    ended: Mutex<Tombstones>,
    /// This replica's open watches, by token (a fan may watch from two tabs).
    alarms: Alarms,
    trust: Duration,
    heartbeat_every: Duration,
}

type Alarms = Arc<Mutex<HashMap<Uuid, Vec<Arc<Notify>>>>>;

/// Tokens that ended here, by token and in the order they ended, so that those older than
/// the trust window leave from the front as new ones come in: the set holds one window's
/// worth of leaves, whatever the replica's lifetime total.
#[derive(Default)]
struct Tombstones {
    at: HashMap<Uuid, Instant>,
    order: std::collections::VecDeque<(Instant, Uuid)>,
}

impl Tombstones {
    fn insert(&mut self, token: Uuid, now: Instant, trust: Duration) {
        while let Some(&(at, old)) = self.order.front() {
            if now.duration_since(at) <= trust {
                break;
            }
            self.order.pop_front();
            // A token that ended twice keeps its newer stone.
            if self.at.get(&old) == Some(&at) {
                self.at.remove(&old);
            }
        }
        self.at.insert(token, now);
        self.order.push_back((now, token));
    }

    /// Whether `token` ended here within `trust`.
    fn holds(&self, token: &Uuid, trust: Duration) -> bool {
        self.at.get(token).is_some_and(|at| at.elapsed() <= trust)
    }
}

/// Rings when the watched token ends through this replica; unregisters itself when dropped.
pub struct EndAlarm {
    token: Uuid,
    bell: Arc<Notify>,
    alarms: Alarms,
}

impl EndAlarm {
    /// Resolves once the token has ended here since the alarm was set. A ring that comes
    /// while the watcher is busy elsewhere is kept for its next wait (`Notify`'s permit).
    pub async fn rung(&self) {
        self.bell.notified().await;
    }
}

impl Drop for EndAlarm {
    fn drop(&mut self) {
        let mut alarms = self
            .alarms
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(bells) = alarms.get_mut(&self.token) {
            bells.retain(|bell| !Arc::ptr_eq(bell, &self.bell));
            if bells.is_empty() {
                alarms.remove(&self.token);
            }
        }
    }
}

impl WaitingCache {
    /// A cache trusting entries for `trust`, asking for a heartbeat every `heartbeat_every`.
    pub fn new(trust: Duration, heartbeat_every: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ended: Mutex::new(Tombstones::default()),
            alarms: Alarms::default(),
            trust,
            heartbeat_every,
        }
    }

    /// Remembers a ticket just read from Postgres if it is WAITING, forgets it otherwise.
    pub fn remember(&self, ticket: &Ticket) {
        if ticket.status != TokenStatus::Waiting {
            self.entries
                .lock()
                .expect("cache poisoned")
                .remove(&ticket.token);
            return;
        }
        // Lock order: `ended`, then `entries` (as in `ended_here`).
        let ended = self.ended.lock().expect("cache poisoned");
        if ended.holds(&ticket.token, self.trust) {
            return; // read before it ended here: stale
        }
        let mut entries = self.entries.lock().expect("cache poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        let now = Instant::now();
        entries.insert(
            ticket.token,
            CachedTicket {
                concert_id: ticket.concert_id.clone(),
                user_id: ticket.user_id.clone(),
                place: ticket.place,
                create_time: ticket.create_time,
                admitted_through: ticket.admitted_through,
                verified_at: now,
                // The caller notes a heartbeat now when one was due; otherwise the row's own
                // `last_seen` is the last one written, and the next is due a heartbeat period
                // after it. (Counting from this read instead let the written heartbeat fall up
                // to two periods behind a fan's last poll, and the sweeper take a fan who had
                // polled in time for a ghost.)
                seen_at: if ticket.heartbeat_due {
                    now
                } else {
                    now.checked_sub(ticket.seen_ago).unwrap_or(now)
                },
            },
        );
    }

    /// Notes that `token` has just ended through this replica: it is forgotten, kept from
    /// being cached again as WAITING for the trust window, and its watchers here are woken.
    pub fn ended_here(&self, token: Uuid) {
        {
            let mut ended = self.ended.lock().expect("cache poisoned");
            ended.insert(token, Instant::now(), self.trust);
            self.entries.lock().expect("cache poisoned").remove(&token);
        }
        let alarms = self.alarms.lock().expect("cache poisoned");
        for bell in alarms.get(&token).into_iter().flatten() {
            bell.notify_one();
        }
    }

    /// An alarm that rings when `token` ends through this replica (for a watch).
    pub fn alarm(&self, token: Uuid) -> EndAlarm {
        let bell = Arc::new(Notify::new());
        self.alarms
            .lock()
            .expect("cache poisoned")
            .entry(token)
            .or_default()
            .push(bell.clone());
        EndAlarm {
            token,
            bell,
            alarms: self.alarms.clone(),
        }
    }

    /// The ticket, if it can be answered from memory (see the module notes).
    pub fn lookup(&self, token: Uuid, board: &LineBoard) -> Option<Ticket> {
        let mut entries = self.entries.lock().expect("cache poisoned");
        let entry = entries.get_mut(&token)?;
        if entry.verified_at.elapsed() > self.trust {
            entries.remove(&token);
            return None;
        }
        let counters = board.fresh_counters(&entry.concert_id, BOARD_MAX_AGE)?;
        let admitted_through = counters.admitted_through.max(entry.admitted_through);
        if admitted_through >= entry.place {
            entries.remove(&token);
            return None;
        }
        let heartbeat_due = entry.seen_at.elapsed() >= self.heartbeat_every;
        if heartbeat_due {
            entry.seen_at = Instant::now();
        }
        Some(Ticket {
            token,
            concert_id: entry.concert_id.clone(),
            user_id: entry.user_id.clone(),
            place: entry.place,
            status: TokenStatus::Waiting,
            create_time: entry.create_time,
            admit_time: None,
            expire_time: None,
            admitted_through,
            heartbeat_due,
            seen_ago: entry.seen_at.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LineCounters;

    fn waiting_ticket(place: i64) -> Ticket {
        Ticket {
            token: Uuid::new_v4(),
            concert_id: "c".into(),
            user_id: "fan".into(),
            place,
            status: TokenStatus::Waiting,
            create_time: Utc::now(),
            admit_time: None,
            expire_time: None,
            admitted_through: 0,
            heartbeat_due: false,
            seen_ago: Duration::ZERO,
        }
    }

    fn board_at(admitted_through: i64) -> LineBoard {
        let board = LineBoard::default();
        board.observe_for_tests(
            "c",
            LineCounters {
                admitted_through,
                admitted_total: admitted_through,
                active_count: 0,
            },
        );
        board
    }

    /// The row's read saw the pointer further on than the board, whose read may be up to
    /// a second older: the answer from memory must not put the fan further back than the
    /// answer the fan just had (IssueToken's, or the poll that read the row).
    #[test]
    fn a_board_behind_the_rows_read_does_not_move_the_fan_back() {
        let cache = WaitingCache::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut ticket = waiting_ticket(10);
        ticket.admitted_through = 6;
        assert_eq!(ticket.position(), 3);
        cache.remember(&ticket);
        let hit = cache
            .lookup(ticket.token, &board_at(4))
            .expect("answered from memory");
        assert_eq!(hit.position(), 3);
        let later = cache.lookup(ticket.token, &board_at(8)).unwrap();
        assert_eq!(later.position(), 1, "and moves on with the board");
    }

    #[test]
    fn answers_while_the_pointer_is_behind_and_forgets_once_passed() {
        let cache = WaitingCache::new(Duration::from_secs(60), Duration::from_secs(60));
        let ticket = waiting_ticket(10);
        cache.remember(&ticket);

        let hit = cache
            .lookup(ticket.token, &board_at(4))
            .expect("answered from memory");
        assert_eq!(hit.position(), 5);
        // The pointer reached the place: only the row can tell admitted from skipped.
        assert!(cache.lookup(ticket.token, &board_at(10)).is_none());
        assert!(
            cache.lookup(ticket.token, &board_at(4)).is_none(),
            "entry was dropped"
        );
    }

    #[test]
    fn never_answers_without_a_fresh_board_or_after_the_trust_window() {
        let cache = WaitingCache::new(Duration::ZERO, Duration::from_secs(60));
        let ticket = waiting_ticket(10);
        cache.remember(&ticket);
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            cache.lookup(ticket.token, &board_at(0)).is_none(),
            "trust window passed"
        );

        let cache = WaitingCache::new(Duration::from_secs(60), Duration::from_secs(60));
        cache.remember(&ticket);
        assert!(
            cache.lookup(ticket.token, &LineBoard::default()).is_none(),
            "line unknown"
        );
    }

    /// A poll that read the row just before the fan left through this replica must not
    /// put the token back as WAITING; a watch of it is woken.
    #[tokio::test]
    async fn a_token_that_ended_here_is_not_cached_again_and_wakes_its_watchers() {
        let cache = WaitingCache::new(Duration::from_secs(60), Duration::from_secs(60));
        let ticket = waiting_ticket(10);
        cache.remember(&ticket);
        let alarm = cache.alarm(ticket.token);
        let other = cache.alarm(Uuid::new_v4());

        cache.ended_here(ticket.token);
        cache.remember(&ticket); // the stale read arrives after the leave
        assert!(cache.lookup(ticket.token, &board_at(0)).is_none());
        tokio::time::timeout(Duration::from_secs(1), alarm.rung())
            .await
            .expect("the watch of the token that ended is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.rung())
                .await
                .is_err(),
            "other watches are not"
        );
        drop((alarm, other));
        assert!(cache.alarms.lock().unwrap().is_empty(), "alarms unregister");
    }

    /// Tombstones older than the trust window leave as new ones come in; a token that ended
    /// twice keeps its newer one.
    #[test]
    fn tombstones_hold_one_trust_window() {
        let trust = Duration::from_secs(30);
        let start = Instant::now();
        let (first, again, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut stones = Tombstones::default();
        stones.insert(first, start, trust);
        stones.insert(again, start, trust);
        stones.insert(again, start + Duration::from_secs(20), trust);
        stones.insert(later, start + Duration::from_secs(40), trust);
        assert!(!stones.at.contains_key(&first), "past the window: gone");
        assert!(
            stones.at.contains_key(&again),
            "its newer stone is within the window"
        );
        assert_eq!(stones.order.len(), 2);
    }

    /// The next heartbeat is due a period after the last one written, not after the read
    /// that found it: counted from the read, a poll answered from memory could go two
    /// periods without noting the fan, and the sweeper take a fan who polled in time for a
    /// ghost.
    #[test]
    fn a_heartbeat_falls_due_a_period_after_the_rows_last_seen() {
        let period = Duration::from_secs(1);
        let cache = WaitingCache::new(Duration::from_secs(60), period);
        let mut ticket = waiting_ticket(10);
        // Read from the row: last seen 500 ms ago, not due yet.
        ticket.seen_ago = Duration::from_millis(500);
        cache.remember(&ticket);
        let first = cache.lookup(ticket.token, &board_at(0)).unwrap();
        assert!(!first.heartbeat_due, "500 ms after the last heartbeat");

        std::thread::sleep(Duration::from_millis(600));
        let second = cache.lookup(ticket.token, &board_at(0)).unwrap();
        assert!(second.heartbeat_due, "1.1 s after the last heartbeat");
        let third = cache.lookup(ticket.token, &board_at(0)).unwrap();
        assert!(!third.heartbeat_due, "noted just now");
    }

    #[test]
    fn only_waiting_tickets_are_kept() {
        let cache = WaitingCache::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut ticket = waiting_ticket(10);
        cache.remember(&ticket);
        ticket.status = TokenStatus::Active;
        cache.remember(&ticket);
        assert!(cache.lookup(ticket.token, &board_at(0)).is_none());
    }
}
