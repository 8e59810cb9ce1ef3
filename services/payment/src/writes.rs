//! The two writes every Pay makes to its payment row, in batches.
//!
//! A smooth payment writes its row twice: the INSERT before the first peer is asked, and the
//! UPDATE that records its end. Under a rush that is hundreds of one-row statements a second,
//! each waiting for one of a few pooled connections and then for its own commit. Made in
//! batches (`runtime::batch`), the writes that arrive together share one statement and one
//! commit; under light load a batch is one write that goes straight through.

use std::{collections::HashSet, time::Duration};

use sqlx::PgPool;
use stagedoor_runtime::{
    background::NamedTask,
    batch::{self, BatchFuture, BatchLimits, Batcher},
    ApiError,
};
use uuid::Uuid;

use crate::{
    domain::Step,
    store::{self, Advance, AdvanceCall, InsertRefused, NewPayment, PaymentRow},
};

/// Up to 500 rows per statement, two statements at once per replica: the rows of different
/// payments do not contend, so a second batch need not wait for the first one's commit.
const WRITE_LIMITS: BatchLimits = BatchLimits {
    max_batch: 500,
    concurrent: 2,
    queue_depth: 20_000,
};

/// Handles to the insert and update workers of one replica; cheap to clone.
#[derive(Clone)]
pub struct PaymentWrites {
    inserts: Batcher<NewPayment, Result<PaymentRow, InsertRefused>>,
    advances: Batcher<AdvanceCall, Option<PaymentRow>>,
}

impl PaymentWrites {
    /// Starts the workers. Rows are leased for `lease`.
    pub fn spawn(pool: PgPool, lease: Duration) -> (Self, Vec<NamedTask>) {
        let (inserts, insert_worker) = Batcher::spawn(WRITE_LIMITS, {
            let pool = pool.clone();
            move |payments: Vec<NewPayment>| {
                let pool = pool.clone();
                Box::pin(async move { insert_all(&pool, payments, lease).await })
                    as BatchFuture<Result<PaymentRow, InsertRefused>>
            }
        });
        let (advances, advance_worker) = Batcher::spawn(WRITE_LIMITS, move |calls| {
            let pool = pool.clone();
            Box::pin(async move { advance_all(&pool, calls, lease).await })
                as BatchFuture<Option<PaymentRow>>
        });
        (
            Self { inserts, advances },
            vec![
                ("payment inserts", insert_worker),
                ("payment advances", advance_worker),
            ],
        )
    }

    /// Records a new payment at step SPEND, under a new lease (the row's `lease_owner`) for the
    /// drive that follows, or says which unique rule refused it.
    pub async fn insert(
        &self,
        payment: NewPayment,
    ) -> Result<Result<PaymentRow, InsertRefused>, ApiError> {
        self.inserts.call(payment).await
    }

    /// Records that `payment_id` is done with step `from` (see `store::advance`); `None`
    /// when the lease `lease_owner` no longer drives it at that step.
    pub async fn advance(
        &self,
        payment_id: Uuid,
        lease_owner: Uuid,
        from: Step,
        change: Advance,
    ) -> Result<Option<PaymentRow>, ApiError> {
        self.advances
            .call(AdvanceCall {
                payment_id,
                lease_owner,
                from,
                change,
            })
            .await
    }
}

/// One batch of inserts. A payment the batched statement did not write collided with a
/// unique rule, so it is tried once more on its own, which names the rule (or writes it,
/// if the payment it collided with has failed since).
async fn insert_all(
    pool: &PgPool,
    payments: Vec<NewPayment>,
    lease: Duration,
) -> Vec<Result<Result<PaymentRow, InsertRefused>, ApiError>> {
    let written = store::insert_batch(pool, &payments, lease).await;
    let written = batch::rows_by_key(
        &payments.iter().map(|p| p.payment_id).collect::<Vec<_>>(),
        written,
        |row: &PaymentRow| row.payment_id,
    );
    let mut answers = Vec::with_capacity(payments.len());
    for (payment, written) in payments.iter().zip(written) {
        answers.push(match written {
            Ok(Some(row)) => Ok(Ok(row)),
            Ok(None) => store::insert(pool, payment, lease)
                .await
                .map_err(ApiError::from),
            Err(error) => Err(error),
        });
    }
    answers
}

/// One batch of step records. A payment named twice (two drives of one payment in this
/// replica, which only a lease that ran out mid-drive allows) is recorded once per
/// statement: the statement writes only the call whose lease is the row's, but its rows are
/// matched back to calls by payment id, so both calls would be handed the written row and
/// the stale drive would think its change was written.
async fn advance_all(
    pool: &PgPool,
    calls: Vec<AdvanceCall>,
    lease: Duration,
) -> Vec<Result<Option<PaymentRow>, ApiError>> {
    let mut seen = HashSet::new();
    let (first, again): (Vec<_>, Vec<_>) = calls
        .into_iter()
        .enumerate()
        .partition(|(_, call)| seen.insert(call.payment_id));
    let mut answers: Vec<Option<Result<Option<PaymentRow>, ApiError>>> =
        (0..first.len() + again.len()).map(|_| None).collect();

    let (positions, first): (Vec<usize>, Vec<AdvanceCall>) = first.into_iter().unzip();
    let written = store::advance(pool, &first, lease).await;
    let written = batch::rows_by_key(
        &first.iter().map(|c| c.payment_id).collect::<Vec<_>>(),
        written,
        |row: &PaymentRow| row.payment_id,
    );
    for (position, answer) in positions.into_iter().zip(written) {
        answers[position] = Some(answer);
    }
    for (position, call) in again {
        let written = store::advance(pool, std::slice::from_ref(&call), lease)
            .await
            .map(|mut rows| rows.pop())
            .map_err(ApiError::from);
        answers[position] = Some(written);
    }
    answers
        .into_iter()
        .map(|answer| answer.expect("every call is answered above"))
        .collect()
}
