//! The saga driver: moves one payment from the step it is at to DONE. The row says where the
//! saga stands whenever it matters (a refusal, a compensation, a wait for a peer, the end),
//! so that a driver stopped anywhere (a crash, a shutdown, a peer that went away) leaves a
//! record from which any replica can carry on.
//!
//! Rules, in the order they matter:
//! 1. Every call to a peer is idempotent there, keyed by the payment id (SpendPoints,
//!    ConfirmHold, RefundPoints) or by the token (CompleteToken). Doing a step again is
//!    always safe; skipping one never is. That is also why a success is not written down
//!    at once: the row is written when the saga ends, compensates, or has to wait, and a
//!    driver that dies in between leaves a step that simply replays. A smooth payment
//!    costs one INSERT and one UPDATE.
//! 2. An unknown outcome is retried with the same key, never compensated: "the point service
//!    timed out" does not mean "no points were taken".
//! 3. Only a refusal compensates: seats that cannot be sold send the saga to REFUND.
//! 4. Once the seats are sold the payment is COMPLETED; completing the token is retried
//!    until it succeeds and never undoes the sale.
//! 5. One driver at a time: a driver owns a payment through its lease, an id drawn for this
//!    one drive, and every record it makes is conditional on the row still carrying that
//!    lease at the step it expects (see `store`). A driver whose lease was taken over, even
//!    by its own process's recovery worker, can change nothing any more.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use stagedoor_proto::queue::v1::TokenStatus;
use stagedoor_runtime::ApiError;
use uuid::Uuid;

use crate::{
    domain::{Fault, Status, Step},
    hops::{Hop, HOPS},
    peers::{Failure, Peers},
    store::{self, Advance, PaymentRow},
    writes::PaymentWrites,
};

/// First pause before asking a peer again within one drive; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct SagaSettings {
    /// How long a driver owns a payment without recording progress or renewing.
    pub lease: Duration,
    /// Deadline of every call to a peer: the lease is renewed while it has less than two of
    /// these left.
    pub call_deadline: Duration,
    /// First backoff of a payment released for later; doubles per failed round.
    pub retry_base: Duration,
    /// Longest backoff.
    pub retry_max: Duration,
    /// Failure drill, if any.
    pub fault: Fault,
}

/// Drives the payments of one replica.
pub struct Saga {
    pub pool: PgPool,
    /// The payment row's inserts and step records, batched.
    pub writes: PaymentWrites,
    pub peers: Peers,
    pub settings: SagaSettings,
}

/// Where a drive left a payment.
#[derive(Debug)]
pub enum Driven {
    /// The payment has its answer: COMPLETED (the token may still be being completed in
    /// the background) or FAILED.
    Settled(PaymentRow),
    /// A peer could not be reached within the patience given; the payment is released
    /// to the recovery worker.
    Deferred(PaymentRow),
    /// Another driver owns the payment now (this one's lease ran out); it will finish it.
    Elsewhere,
    /// A failure drill stopped the driver as a crash would, lease and all.
    Crashed,
}

impl Saga {
    /// Drives `payment`, whose row was just leased to this drive (its `lease_owner`, by the
    /// INSERT or the recovery worker's claim), as far as it goes. `asked_at` is when that
    /// write was asked for: no later than the lease's start in the database (`now()` of the
    /// write's own transaction), however long the write then waited for locks or its batch.
    ///
    /// `patience` is how long to keep asking a peer whose answer is unknown before leaving
    /// the payment to the recovery worker: Pay waits a little for a slow peer, the
    /// recovery worker (patience zero) makes one attempt per round and backs off.
    pub async fn drive(
        &self,
        mut payment: PaymentRow,
        asked_at: Instant,
        patience: Duration,
    ) -> Result<Driven, ApiError> {
        // This drive's fencing token: every record, renewal and release names it.
        let lease_owner = match payment.lease_owner {
            Some(lease_owner) => lease_owner,
            None if payment.step() == Step::Done => return Ok(Driven::Settled(payment)),
            // Released or never leased: not this drive's to move.
            None => return Ok(Driven::Elsewhere),
        };
        let give_up_at = Instant::now() + patience;
        let mut pause = FIRST_PAUSE;
        // The step the row says. `payment.step` runs ahead of it while successful steps are
        // carried in memory (see `Next::Proceed`).
        let mut recorded = payment.step();
        // When this driver's lease was last set, as this process can know it: when the write
        // that set it (the INSERT or the claim before this call, then every record and
        // renewal) was asked for. The database starts the lease later than that (at its
        // transaction's start), never earlier: counted from here, the lease left is never
        // overestimated, however long a write waited for locks. (Counted from the write's
        // answer, a write that waited most of a lease on a lock would leave this driver
        // believing in a lease the database had nearly ended, and recovery would claim the
        // payment while it still drove it.) A step carried in memory (`Next::Proceed`)
        // writes nothing, so without the check below two slow calls in a row could outlast
        // the lease too.
        let mut leased_at = asked_at;
        loop {
            let step = payment.step();
            // The lease must outlast the call about to be made, with one more call's deadline
            // to spare for recording its outcome: renew it when less is left. With the
            // default 30 s lease and 5 s deadline this never happens on a smooth payment; at
            // the smallest lease allowed (two deadlines) it happens before every call.
            if step != Step::Done
                && leased_at.elapsed() + self.settings.call_deadline * 2 > self.settings.lease
            {
                let asked_at = Instant::now();
                if !self.renew(&payment, lease_owner, recorded).await? {
                    return Ok(Driven::Elsewhere);
                }
                leased_at = asked_at;
                // The renewal itself may have waited (for a pooled connection, a row lock) so
                // long that what it bought will not outlast the call: the lease could lapse
                // mid-call and recovery drive the payment alongside. Leave it to recovery
                // instead, which claims it under a lease of its own. One deadline is the bound
                // here, not the two above: enough for one driver at a time, which is what this
                // guards (recording the outcome may then find the lease gone, and the drive
                // ends as `Elsewhere`, which is safe).
                if leased_at.elapsed() + self.settings.call_deadline > self.settings.lease {
                    tracing::warn!(payment_id = %payment.payment_id, step = step.as_db(),
                        "the lease's renewal took most of it; leaving the payment to recovery");
                    self.release(&payment, lease_owner).await?;
                    return Ok(Driven::Deferred(payment));
                }
            }
            let next = match step {
                Step::Done => return Ok(Driven::Settled(payment)),
                Step::Spend => self.spend(&payment).await,
                Step::Confirm => self.confirm(&payment).await,
                Step::Refund => self.refund(&payment).await,
                Step::CompleteToken => self.complete_token(&payment).await,
            };
            match next {
                Next::Proceed(change) => {
                    change.apply(&mut payment);
                    pause = FIRST_PAUSE;
                }
                Next::Record(change) => {
                    let asked_at = Instant::now();
                    match self.record(&payment, lease_owner, recorded, change).await? {
                        Some(next) => payment = next,
                        None => return Ok(Driven::Elsewhere),
                    }
                    leased_at = asked_at;
                    recorded = payment.step();
                    pause = FIRST_PAUSE;
                }
                Next::Crash => return Ok(Driven::Crashed),
                Next::Unknown(cause) => {
                    // Whatever succeeded so far is written down before waiting: whoever
                    // carries on starts from there (and replays nothing it need not).
                    if step != recorded {
                        let progress = Advance::progress(&payment);
                        match self
                            .record(&payment, lease_owner, recorded, progress)
                            .await?
                        {
                            Some(next) => payment = next,
                            None => return Ok(Driven::Elsewhere),
                        }
                        recorded = step;
                    }
                    // The fan has paid and the seats are sold: answer now, and leave the
                    // token to the recovery worker, which retries it until the queue takes it.
                    if step == Step::CompleteToken {
                        tracing::warn!(payment_id = %payment.payment_id, %cause,
                            "token not completed yet; recovery will retry");
                        self.release(&payment, lease_owner).await?;
                        return Ok(Driven::Settled(payment));
                    }
                    // At most half the lease: the check at the top of the loop then renews
                    // with half of it still left, before the next call.
                    let wait = pause.min(self.settings.lease / 2);
                    if Instant::now() + wait >= give_up_at {
                        tracing::warn!(payment_id = %payment.payment_id, step = step.as_db(), %cause,
                            "peer unavailable; leaving the payment to recovery");
                        self.release(&payment, lease_owner).await?;
                        return Ok(Driven::Deferred(payment));
                    }
                    // Same step, same key, again; but only while this driver still owns it.
                    // The lease is renewed before the pause, not after: the call that just
                    // failed may have taken its whole deadline, and a pause on top of that
                    // could outlast the lease. Once it lapses, a recovery worker (this
                    // process's own, too) claims the payment under a new lease; this drive
                    // could then record nothing, but its calls would still race the new
                    // driver's, and the payment would wait out a recovery round for nothing.
                    let asked_at = Instant::now();
                    if !self.renew(&payment, lease_owner, step).await? {
                        return Ok(Driven::Elsewhere);
                    }
                    leased_at = asked_at;
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    /// Writes `change` over the row, which must still be at step `recorded` and carry this
    /// drive's lease; `None` when it does not (another driver took over).
    async fn record(
        &self,
        payment: &PaymentRow,
        lease_owner: Uuid,
        recorded: Step,
        change: Advance,
    ) -> Result<Option<PaymentRow>, ApiError> {
        let started = Instant::now();
        let written = self
            .writes
            .advance(payment.payment_id, lease_owner, recorded, change)
            .await;
        HOPS.record(Hop::Record, started);
        written
    }

    async fn spend(&self, payment: &PaymentRow) -> Next {
        let payment_id = payment.payment_id.to_string();
        let spent = self
            .peers
            .spend(&payment.user_id, payment.amount, &payment_id)
            .await;
        if spent.is_ok() && self.settings.fault == Fault::AfterSpend {
            tracing::warn!(%payment_id, "failure drill: stopping after the spend, before recording it");
            return Next::Crash;
        }
        match spent {
            // Carried in memory, not written: if this driver dies before the next record,
            // recovery asks SpendPoints again with the same payment id and gets this very
            // entry back. A write here would buy nothing but a round trip.
            Ok(balance_after) => Next::Proceed(Advance {
                to: Step::Confirm,
                status: Status::Pending,
                balance_after: Some(balance_after),
                failure: None,
            }),
            // Refused (short of points, amount out of range): nothing was taken, so there is
            // nothing to undo, and the hold stays held for the fan to try again. Final: the
            // point service keeps a refusal for want of points as the payment's outcome, so
            // an earlier attempt of this call that reaches it late cannot spend after this.
            Err(Failure::Refused { reason, message }) => Next::Record(Advance {
                to: Step::Done,
                status: Status::Failed,
                balance_after: None,
                failure: Some((reason, message)),
            }),
            Err(Failure::Unknown(cause)) => Next::Unknown(cause),
        }
    }

    async fn confirm(&self, payment: &PaymentRow) -> Next {
        let payment_id = payment.payment_id.to_string();
        let confirmed = self
            .peers
            .confirm(&payment.hold_id.to_string(), &payment_id)
            .await;
        if confirmed.is_ok() && self.settings.fault == Fault::AfterConfirm {
            tracing::warn!(%payment_id, "failure drill: stopping after the confirm, before recording it");
            return Next::Crash;
        }
        match confirmed {
            // Sold: from here on the payment is COMPLETED, whatever the queue says next.
            // Carried in memory like the spend (ConfirmHold replays for the same payment).
            Ok(()) => Next::Proceed(Advance {
                to: Step::CompleteToken,
                status: Status::Completed,
                balance_after: None,
                failure: None,
            }),
            // A definite no (the hold expired and a seat was taken since, or the hold was
            // released): the points must go back. The reason is kept for the client.
            Err(Failure::Refused { reason, message }) => {
                tracing::info!(%payment_id, %reason, "seats not sold; refunding the points");
                Next::Record(Advance {
                    to: Step::Refund,
                    status: Status::Pending,
                    // The spend's, carried in memory so far: written now, or the receipt of
                    // the failed payment would say 0.
                    balance_after: Some(payment.balance_after),
                    failure: Some((reason, message)),
                })
            }
            Err(Failure::Unknown(cause)) => Next::Unknown(cause),
        }
    }

    async fn refund(&self, payment: &PaymentRow) -> Next {
        let failed = Next::Record(Advance {
            to: Step::Done,
            status: Status::Failed,
            balance_after: Some(payment.balance_after),
            failure: None,
        });
        match self.peers.refund(&payment.payment_id.to_string()).await {
            Ok(()) => failed,
            // The point service has no spend of this payment: nothing to give back.
            Err(Failure::Refused { reason, .. }) if reason == "PAYMENT_NOT_FOUND" => failed,
            // Any other refusal of a refund is a bug somewhere: keep trying, and say so,
            // rather than keep the fan's points.
            Err(Failure::Refused { reason, message }) => {
                tracing::error!(payment_id = %payment.payment_id, %reason, %message,
                    "refund refused; will retry");
                Next::Unknown(format!("refund refused: {reason}"))
            }
            Err(Failure::Unknown(cause)) => Next::Unknown(cause),
        }
    }

    async fn complete_token(&self, payment: &PaymentRow) -> Next {
        // The one write of a smooth payment after its insert: COMPLETED with its receipt.
        let done = Next::Record(Advance {
            to: Step::Done,
            status: Status::Completed,
            balance_after: Some(payment.balance_after),
            failure: None,
        });
        // The table keeps the token until the saga is DONE (a CHECK says so), so a payment
        // at this step has it; one without it could only have finished already.
        let Some(token) = payment.token.as_deref() else {
            return done;
        };
        match self.peers.complete_token(token).await {
            Ok(TokenStatus::Done) => done,
            Ok(status) => {
                tracing::info!(payment_id = %payment.payment_id, ?status, "the token had already ended");
                done
            }
            // The queue will never complete this token (it does not know it): the sale
            // stands regardless, so stop asking.
            Err(Failure::Refused { reason, message }) => {
                tracing::warn!(payment_id = %payment.payment_id, %reason, %message,
                    "token cannot be completed; the sale stands");
                done
            }
            Err(Failure::Unknown(cause)) => Next::Unknown(cause),
        }
    }

    /// Extends this drive's lease of `payment`, whose row is at `step`; false when the row
    /// moved on or another driver owns it now.
    async fn renew(
        &self,
        payment: &PaymentRow,
        lease_owner: Uuid,
        step: Step,
    ) -> Result<bool, sqlx::Error> {
        store::renew(
            &self.pool,
            payment.payment_id,
            lease_owner,
            step,
            self.settings.lease,
        )
        .await
    }

    async fn release(&self, payment: &PaymentRow, lease_owner: Uuid) -> Result<(), sqlx::Error> {
        store::release(
            &self.pool,
            payment.payment_id,
            lease_owner,
            self.settings.retry_base,
            self.settings.retry_max,
        )
        .await
    }
}

/// What one step's call means for the saga.
enum Next {
    /// A step succeeded and the next one follows: go on without writing. Every success
    /// replays at its callee, so losing it to a crash costs a repeated call, never money.
    Proceed(Advance),
    /// Record this outcome (a refusal, compensation, or the end) and go on.
    Record(Advance),
    /// Ask again with the same key (after a pause, or in a later recovery round).
    Unknown(String),
    /// A failure drill: stop here as a killed process would.
    Crash,
}

impl Advance {
    /// Applies a step's outcome to the in-memory payment (not yet written).
    fn apply(self, payment: &mut PaymentRow) {
        payment.step = self.to.as_db().to_owned();
        payment.status = self.status.as_db().to_owned();
        if let Some(balance_after) = self.balance_after {
            payment.balance_after = balance_after;
        }
    }

    /// The in-memory progress of `payment`, to be written down.
    fn progress(payment: &PaymentRow) -> Self {
        Advance {
            to: payment.step(),
            status: payment.status(),
            balance_after: Some(payment.balance_after),
            failure: None,
        }
    }
}
