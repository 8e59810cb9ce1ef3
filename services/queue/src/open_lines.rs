//! Which concerts have an open line, as this replica last read them.
//!
//! IssueToken for a concert with no line is refused from here, before the line batches: each
//! line batch is a transaction through a few slots shared by every line (`batcher`), and a
//! client inventing concert ids would otherwise queue a transaction per invented id in front
//! of real fans' batches. An id this replica does not know is looked up again by one read of
//! every line id, shared by all the callers that missed at the same moment and started after
//! they arrived, so a line another replica opened a moment ago is found, and a flood of
//! invented ids costs one read at a time.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use sqlx::PgPool;
use stagedoor_runtime::{batch::SharedReads, ApiError};

use crate::store;

/// The open lines this replica knows of; cheap to share.
pub struct OpenLines {
    known: Mutex<Arc<HashSet<String>>>,
    /// One read of every line id at a time, whatever the number of callers.
    reads: SharedReads<(), HashSet<String>>,
}

impl OpenLines {
    pub fn new(pool: PgPool) -> Self {
        Self {
            known: Mutex::default(),
            reads: SharedReads::new(move |()| {
                let pool = pool.clone();
                async move { store::line_ids(&pool).await }
            }),
        }
    }

    /// Whether `concert_id` has a line: from memory when this replica has seen it open (a
    /// line is never closed), else from a read that starts after this call.
    pub async fn is_open(&self, concert_id: &str) -> Result<bool, ApiError> {
        if self.known().contains(concert_id) {
            return Ok(true);
        }
        let read = self.reads.call(()).await?;
        let open = read.contains(concert_id);
        *self
            .known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = read;
        Ok(open)
    }

    fn known(&self) -> Arc<HashSet<String>> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
