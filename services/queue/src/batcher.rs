//! Group commit for IssueToken.
//!
//! Every new token takes the next place of its concert's line, so every IssueToken must lock
//! the same `lines` row. One transaction per fan would cap the rush at what one hot row
//! allows (a few thousand commits per second on this class of machine). Instead each replica
//! funnels new fans through one worker that takes whatever has queued up since its last
//! transaction and issues it all under a single lock. Under light load a batch is one fan and
//! adds no delay; under a rush batches grow by themselves.

use std::collections::HashMap;

use sqlx::PgPool;
use stagedoor_runtime::ApiError;
use tokio::sync::{mpsc, oneshot};

use crate::{domain::Ticket, store, store::AdmissionPolicy};

/// Most fans issued in one transaction.
const MAX_BATCH: usize = 1_000;
/// IssueToken calls that may wait for the worker before callers are slowed down.
const QUEUE_DEPTH: usize = 20_000;

struct IssueRequest {
    concert_id: String,
    user_id: String,
    reply: oneshot::Sender<Result<Ticket, ApiError>>,
}

/// Handle to the replica's IssueToken worker; cheap to clone.
#[derive(Clone)]
pub struct IssueBatcher {
    requests: mpsc::Sender<IssueRequest>,
}

impl IssueBatcher {
    /// Starts the worker. It runs until every handle is dropped (the server stopped), so calls
    /// in flight during a graceful shutdown still get their tokens.
    pub fn spawn(pool: PgPool, policy: AdmissionPolicy) -> (Self, tokio::task::JoinHandle<()>) {
        let (requests, receiver) = mpsc::channel(QUEUE_DEPTH);
        let worker = tokio::spawn(run(receiver, pool, policy));
        (Self { requests }, worker)
    }

    /// Issues (or finds) the fan's token. The caller going away does not cancel it: the token
    /// is still issued and a retry gets it back.
    pub async fn issue(&self, concert_id: &str, user_id: &str) -> Result<Ticket, ApiError> {
        let (reply, answer) = oneshot::channel();
        let request = IssueRequest {
            concert_id: concert_id.to_owned(),
            user_id: user_id.to_owned(),
            reply,
        };
        let stopped = || {
            ApiError::new(
                tonic::Code::Unavailable,
                "SHUTTING_DOWN",
                "the queue service is shutting down; retry",
            )
        };
        self.requests.send(request).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(mut receiver: mpsc::Receiver<IssueRequest>, pool: PgPool, policy: AdmissionPolicy) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One transaction per concert present in the batch; arrival order is kept within
        // each concert, which is what FIFO means.
        let mut by_concert: Vec<(String, Vec<IssueRequest>)> = Vec::new();
        for request in batch.drain(..) {
            match by_concert
                .iter_mut()
                .find(|(concert, _)| *concert == request.concert_id)
            {
                Some((_, requests)) => requests.push(request),
                None => by_concert.push((request.concert_id.clone(), vec![request])),
            }
        }
        for (concert_id, requests) in by_concert {
            let user_ids: Vec<String> = requests.iter().map(|r| r.user_id.clone()).collect();
            match store::issue_batch(&pool, &policy, &concert_id, &user_ids).await {
                Ok(tickets) => {
                    let by_user: HashMap<&str, &Ticket> =
                        tickets.iter().map(|t| (t.user_id.as_str(), t)).collect();
                    for request in requests {
                        let answer = by_user
                            .get(request.user_id.as_str())
                            .map(|ticket| (*ticket).clone())
                            .ok_or_else(|| {
                                ApiError::internal(format!(
                                    "issued batch of {concert_id} lacks user {}",
                                    request.user_id
                                ))
                            });
                        // The caller may have gone away; its token exists all the same.
                        let _ = request.reply.send(answer);
                    }
                }
                Err(error) => {
                    let error = ApiError::from(error);
                    for request in requests {
                        let _ = request.reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}
