//! Group commit for the calls that must lock a concert's line row: IssueToken (every new
//! token takes the line's next place), CompleteToken and LeaveQueue (every ending frees a
//! slot and admits the next fan), and group reads of token rows.
//!
//! One transaction per call would cap a rush at what one hot row allows: a few hundred to a
//! few thousand lock-commit cycles per second, with every other caller of the line queued
//! behind the lock and holding a pooled connection while it waits. Instead each replica
//! runs one transaction at a time per line and kind (`stagedoor_runtime::batch::KeyedBatcher`),
//! which takes whatever has queued up for that line since its last transaction and does it
//! all under a single lock of the line. Under light load a batch is one call and adds no
//! delay; under a rush batches grow by themselves.

use std::future::Future;

use sqlx::PgPool;
use stagedoor_runtime::{
    batch::{self, BatchFuture, BatchLimits, Batcher, KeyedBatcher},
    ApiError,
};
use uuid::Uuid;

use crate::{
    domain::{Ending, QueueError, Ticket, TokenStatus},
    store,
    store::AdmissionPolicy,
};

/// Line batches of IssueToken and CompleteToken: one transaction at a time per line (each
/// takes the line's lock), at most four lines at once per replica and kind (a quarter of
/// the pool each, see `app.rs`), however many lines are busy (or made up), and 20,000 calls
/// may wait for one line before more are refused.
pub const LINE_LIMITS: BatchLimits = BatchLimits {
    max_batch: 1_000,
    concurrent: 4,
    queue_depth: 20_000,
};

/// LeaveQueue's line batches: as [`LINE_LIMITS`], with two lines at once (an eighth of the
/// pool). With the token reads' four, the batches of a default pool of 16 hold at most 14
/// connections at once, and the background work (admission ticks, the board, heartbeat
/// flushes) queues for the rest in the worst moment of a rush.
pub const LEAVE_LIMITS: BatchLimits = BatchLimits {
    concurrent: 2,
    ..LINE_LIMITS
};

/// A batcher whose calls each belong to one concert's line: one transaction at a time per
/// line, since each takes the line's lock (a second one would only wait for the first inside
/// Postgres, holding a connection), and lines independent of each other, so a rush on one
/// concert does not hold up the fans of another.
pub struct LineBatcher<I, O> {
    calls: KeyedBatcher<String, I, O>,
}

impl<I, O> Clone for LineBatcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
        }
    }
}

/// IssueToken's batcher: a user id in, the fan's ticket out.
pub type IssueBatcher = LineBatcher<String, Ticket>;
/// The batcher of CompleteToken or of LeaveQueue: a live token and how it ends in, its
/// ticket afterwards out. Both free a slot under the line lock with the same transaction
/// (`store::end_batch`); each RPC has a batcher of its own, so neither queues behind the other.
pub type EndBatcher = LineBatcher<(Uuid, Ending), Ticket>;

impl<I: Send + 'static, O: Send + 'static> LineBatcher<I, O> {
    /// Starts the batcher; `line_batch(concert_id, inputs)` does one batch of a line in one
    /// transaction and answers each input in order (arrival order, which is what FIFO means
    /// for IssueToken).
    fn spawn<F, Fut>(limits: BatchLimits, line_batch: F) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: Fn(String, Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, ApiError>> + Send + 'static,
    {
        let (calls, finished) = KeyedBatcher::spawn(limits, move |concert_id, inputs: Vec<I>| {
            let count = inputs.len();
            let batch = line_batch(concert_id, inputs);
            Box::pin(async move {
                match batch.await {
                    Ok(outputs) => outputs.into_iter().map(Ok).collect(),
                    Err(error) => batch::fail_all(count, error),
                }
            }) as BatchFuture<O>
        });
        (Self { calls }, finished)
    }

    async fn call(&self, concert_id: &str, input: I) -> Result<O, ApiError> {
        self.calls.call(concert_id.to_owned(), input).await
    }
}

impl IssueBatcher {
    pub fn spawn_issue(
        pool: PgPool,
        policy: AdmissionPolicy,
        limits: BatchLimits,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn(limits, move |concert_id, user_ids: Vec<String>| {
            let (pool, policy) = (pool.clone(), policy.clone());
            async move {
                let tickets = store::issue_batch(&pool, &policy, &concert_id, &user_ids)
                    .await?
                    .ok_or_else(|| {
                        ApiError::from(QueueError::ConcertNotFound(concert_id.clone()))
                    })?;
                // A fan may be in one batch more than once (a double click, a retry, two
                // tabs): every copy of the call gets the fan's one ticket.
                let by_user: std::collections::HashMap<&str, &Ticket> =
                    tickets.iter().map(|t| (t.user_id.as_str(), t)).collect();
                user_ids
                    .iter()
                    .map(|user_id| {
                        by_user
                            .get(user_id.as_str())
                            .map(|&ticket| ticket.clone())
                            .ok_or_else(|| {
                                ApiError::internal(format!(
                                    "issued batch of {concert_id} lacks user {user_id}"
                                ))
                            })
                    })
                    .collect()
            }
        })
    }

    /// Issues (or finds) the fan's token.
    pub async fn issue(&self, concert_id: &str, user_id: &str) -> Result<Ticket, ApiError> {
        self.call(concert_id, user_id.to_owned()).await
    }
}

impl EndBatcher {
    /// Starts an ending batcher with `limits` (CompleteToken and LeaveQueue have one each).
    pub fn spawn_end(
        pool: PgPool,
        policy: AdmissionPolicy,
        limits: BatchLimits,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn(limits, move |concert_id, endings: Vec<(Uuid, Ending)>| {
            let (pool, policy) = (pool.clone(), policy.clone());
            async move { Ok(store::end_batch(&pool, &policy, &concert_id, &endings).await?) }
        })
    }

    /// Completes an ACTIVE token of `concert_id` (its fan paid); the token's status afterwards.
    pub async fn complete(&self, concert_id: &str, token: Uuid) -> Result<TokenStatus, ApiError> {
        Ok(self.call(concert_id, (token, Ending::Paid)).await?.status)
    }

    /// Ends a WAITING or ACTIVE token of `concert_id` (its fan left); its ticket afterwards.
    pub async fn leave(&self, concert_id: &str, token: Uuid) -> Result<Ticket, ApiError> {
        self.call(concert_id, (token, Ending::Left)).await
    }
}

/// Reads token rows, whatever arrived together in one `token = ANY($1)`. Every read starts
/// after its call arrived, so it sees every write committed before the call (a fresh read,
/// not a replica's view). ValidateToken, CompleteToken, first polls and watch refreshes go
/// through it: under a rush they are the queue's most frequent statements.
#[derive(Clone)]
pub struct TicketReader {
    reads: Batcher<Uuid, Option<Ticket>>,
    pool: PgPool,
    policy: AdmissionPolicy,
}

impl TicketReader {
    pub fn spawn(
        pool: PgPool,
        policy: AdmissionPolicy,
        limits: BatchLimits,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (reads, worker) = Batcher::spawn(limits, {
            let (pool, policy) = (pool.clone(), policy.clone());
            move |tokens: Vec<Uuid>| {
                let (pool, policy) = (pool.clone(), policy.clone());
                Box::pin(async move { read_by_token(&pool, &policy, &tokens).await })
                    as BatchFuture<Option<Ticket>>
            }
        });
        (
            Self {
                reads,
                pool,
                policy,
            },
            worker,
        )
    }

    /// The token's row as the database has it now, or `None` if there is no such token.
    pub async fn read(&self, token: Uuid) -> Result<Option<Ticket>, ApiError> {
        self.reads.call(token).await
    }

    /// Like [`TicketReader::read`] for tokens that arrived together in one call
    /// (ValidateTokens): already a batch, so read at once, in one statement.
    pub async fn read_many(&self, tokens: &[Uuid]) -> Result<Vec<Option<Ticket>>, ApiError> {
        read_by_token(&self.pool, &self.policy, tokens)
            .await
            .into_iter()
            .collect()
    }
}

/// The row of each token, in the order asked (`None` for a token never issued).
async fn read_by_token(
    pool: &PgPool,
    policy: &AdmissionPolicy,
    tokens: &[Uuid],
) -> Vec<Result<Option<Ticket>, ApiError>> {
    let tickets = store::read_tickets(pool, policy, tokens).await;
    batch::rows_by_key(tokens, tickets, |ticket: &Ticket| ticket.token)
}
