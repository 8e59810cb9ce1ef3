//! Keeping polled WAITING tokens alive without a write per poll.
//!
//! A WAITING token that nobody polls or watches for QUEUE_IDLE_TTL is a ghost and gets
//! expired. Writing `last_seen` on every poll would turn 20,000 reads a second into 20,000
//! writes, so a poll only notes the token in memory when its `last_seen` is older than a
//! quarter of the TTL, and a flusher writes the noted tokens in one statement per period.
//! The sweeper allows a heartbeat period on top of the TTL for that coarseness, and four
//! flush periods for the write to land (`QueueConfig::ghost_after`).

use std::{collections::HashSet, sync::Mutex, time::Duration};

use sqlx::PgPool;
use stagedoor_runtime::Shutdown;
use uuid::Uuid;

use crate::store;

/// Tokens seen since the last flush.
#[derive(Default)]
pub struct Heartbeats {
    pending: Mutex<HashSet<Uuid>>,
}

/// Most tokens written by one statement.
const FLUSH_CHUNK: usize = 10_000;

impl Heartbeats {
    /// Notes that a WAITING token's fan is still there.
    pub fn seen(&self, token: Uuid) {
        self.note([token]);
    }

    fn note(&self, tokens: impl IntoIterator<Item = Uuid>) {
        self.pending
            .lock()
            .expect("heartbeat set poisoned")
            .extend(tokens);
    }

    fn take(&self) -> Vec<Uuid> {
        let mut pending = self.pending.lock().expect("heartbeat set poisoned");
        pending.drain().collect()
    }

    /// Writes the noted tokens every `period` until shutdown, and once more on the way out.
    pub async fn run_flusher(&self, pool: PgPool, period: Duration, shutdown: Shutdown) {
        shutdown.every(period, || self.flush(&pool)).await;
        self.flush(&pool).await;
    }

    async fn flush(&self, pool: &PgPool) {
        let tokens = self.take();
        for chunk in tokens.chunks(FLUSH_CHUNK) {
            if let Err(error) = store::touch(pool, chunk).await {
                // Noted again for the next flush: the fans' polls will not note them again
                // for a whole heartbeat period (their cache entries were just marked seen),
                // and the sweeper's grace is only a few flush periods.
                tracing::warn!(%error, tokens = chunk.len(), "heartbeat flush failed");
                self.note(chunk.iter().copied());
            }
        }
    }
}
