//! Group commit for the calls that must lock a concert's line row: IssueToken (every new
//! token takes the line's next place) and CompleteToken (every completion frees a slot and
//! admits the next fan).
//!
//! One transaction per call would cap a rush at what one hot row allows: a few hundred to a
//! few thousand lock-commit cycles per second, with every other caller of the line queued
//! behind the lock and holding a pooled connection while it waits. Instead each replica
//! funnels these calls through one worker per kind that takes whatever has queued up since
//! its last transaction and does it all under a single lock of each line. Under light load a
//! batch is one call and adds no delay; under a rush batches grow by themselves.

use std::{future::Future, pin::Pin, sync::Arc};

use sqlx::PgPool;
use stagedoor_runtime::ApiError;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    domain::{Ticket, TokenStatus},
    store,
    store::AdmissionPolicy,
};

/// Most calls done in one transaction.
const MAX_BATCH: usize = 1_000;
/// Calls that may wait for the worker before callers are slowed down.
const QUEUE_DEPTH: usize = 20_000;

/// What one batch of one line does: the answers in the order of `inputs`.
type BatchFuture<O> = Pin<Box<dyn Future<Output = Result<Vec<O>, ApiError>> + Send>>;
type BatchFn<I, O> = Arc<dyn Fn(String, Vec<I>) -> BatchFuture<O> + Send + Sync>;

struct Call<I, O> {
    concert_id: String,
    input: I,
    reply: oneshot::Sender<Result<O, ApiError>>,
}

/// Handle to one group-commit worker; cheap to clone.
pub struct LineBatcher<I, O> {
    calls: mpsc::Sender<Call<I, O>>,
}

impl<I, O> Clone for LineBatcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
        }
    }
}

/// IssueToken's worker: a user id in, the fan's ticket out.
pub type IssueBatcher = LineBatcher<String, Ticket>;
/// CompleteToken's worker: an ACTIVE token in, its final status out.
pub type CompleteBatcher = LineBatcher<Uuid, TokenStatus>;

impl<I: Send + 'static, O: Send + 'static> LineBatcher<I, O> {
    /// Starts the worker. It runs until every handle is dropped (the server stopped), so
    /// calls in flight during a graceful shutdown still get their answers.
    fn spawn(batch: BatchFn<I, O>) -> (Self, tokio::task::JoinHandle<()>) {
        let (calls, receiver) = mpsc::channel(QUEUE_DEPTH);
        let worker = tokio::spawn(run(receiver, batch));
        (Self { calls }, worker)
    }

    /// Queues one call for the line of `concert_id` and waits for its answer. The caller
    /// going away does not cancel it: the work is done all the same and a retry sees it.
    async fn call(&self, concert_id: &str, input: I) -> Result<O, ApiError> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            concert_id: concert_id.to_owned(),
            input,
            reply,
        };
        let stopped = || {
            ApiError::new(
                tonic::Code::Unavailable,
                "SHUTTING_DOWN",
                "the queue service is shutting down; retry",
            )
        };
        self.calls.send(call).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl IssueBatcher {
    pub fn spawn_issue(
        pool: PgPool,
        policy: AdmissionPolicy,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn(Arc::new(move |concert_id, user_ids: Vec<String>| {
            let (pool, policy) = (pool.clone(), policy.clone());
            Box::pin(async move {
                let tickets = store::issue_batch(&pool, &policy, &concert_id, &user_ids).await?;
                let mut by_user: std::collections::HashMap<&str, &Ticket> =
                    tickets.iter().map(|t| (t.user_id.as_str(), t)).collect();
                user_ids
                    .iter()
                    .map(|user_id| {
                        by_user.remove(user_id.as_str()).cloned().ok_or_else(|| {
                            ApiError::internal(format!(
                                "issued batch of {concert_id} lacks user {user_id}"
                            ))
                        })
                    })
                    .collect()
            })
        }))
    }

    /// Issues (or finds) the fan's token.
    pub async fn issue(&self, concert_id: &str, user_id: &str) -> Result<Ticket, ApiError> {
        self.call(concert_id, user_id.to_owned()).await
    }
}

impl CompleteBatcher {
    pub fn spawn_complete(
        pool: PgPool,
        policy: AdmissionPolicy,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn(Arc::new(move |concert_id, tokens: Vec<Uuid>| {
            let (pool, policy) = (pool.clone(), policy.clone());
            Box::pin(async move {
                Ok(store::complete_batch(&pool, &policy, &concert_id, &tokens).await?)
            })
        }))
    }

    /// Completes an ACTIVE token of `concert_id`; the token's status afterwards.
    pub async fn complete(&self, concert_id: &str, token: Uuid) -> Result<TokenStatus, ApiError> {
        self.call(concert_id, token).await
    }
}

async fn run<I, O>(mut receiver: mpsc::Receiver<Call<I, O>>, batch: BatchFn<I, O>) {
    let mut calls = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut calls, MAX_BATCH).await > 0 {
        // One transaction per concert present in the batch; arrival order is kept within
        // each concert, which is what FIFO means for IssueToken.
        let mut by_concert: Vec<(String, Vec<Call<I, O>>)> = Vec::new();
        for call in calls.drain(..) {
            match by_concert
                .iter_mut()
                .find(|(concert, _)| *concert == call.concert_id)
            {
                Some((_, calls)) => calls.push(call),
                None => by_concert.push((call.concert_id.clone(), vec![call])),
            }
        }
        for (concert_id, calls) in by_concert {
            let (inputs, replies): (Vec<I>, Vec<_>) = calls
                .into_iter()
                .map(|call| (call.input, call.reply))
                .unzip();
            match batch(concert_id, inputs).await {
                Ok(answers) => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        // The caller may have gone away; the work is done all the same.
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}
