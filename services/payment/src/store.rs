//! The payment schema's SQL. Every change of a saga's state is one conditional UPDATE that
//! names the step it expects and the lease owner it expects: a driver that lost its lease, or
//! a step that someone else already recorded, changes nothing (and learns so from the
//! missing row), so two drivers can never move one payment two ways.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use stagedoor_runtime::error::is_unique_violation;
use uuid::Uuid;

use crate::domain::{Status, Step};

/// One `payments` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentRow {
    pub payment_id: Uuid,
    pub user_id: String,
    pub request_id: String,
    pub hold_id: Uuid,
    pub concert_id: String,
    pub schedule_id: String,
    pub seat_numbers: Vec<i32>,
    pub amount: i64,
    pub start_time: DateTime<Utc>,
    pub token: String,
    pub step: String,
    pub status: String,
    pub failure_reason: String,
    pub failure_message: String,
    pub balance_after: i64,
    pub attempts: i32,
    pub create_time: DateTime<Utc>,
    pub complete_time: Option<DateTime<Utc>>,
}

impl PaymentRow {
    pub fn step(&self) -> Step {
        Step::from_db(&self.step)
    }

    pub fn status(&self) -> Status {
        Status::from_db(&self.status)
    }
}

/// What a new payment is for; the rest starts at its defaults (step SPEND, PENDING).
pub struct NewPayment<'a> {
    pub user_id: &'a str,
    pub request_id: &'a str,
    pub hold_id: Uuid,
    pub concert_id: &'a str,
    pub schedule_id: &'a str,
    pub seat_numbers: &'a [i32],
    pub amount: i64,
    pub start_time: DateTime<Utc>,
    pub token: &'a str,
}

/// Why a payment was not recorded.
#[derive(Debug)]
pub enum InsertRefused {
    /// The user already used this request id (a concurrent or earlier Pay).
    RequestUsed,
    /// The hold already has a payment that is not FAILED.
    HoldTaken,
    Database(sqlx::Error),
}

/// Records a payment at step SPEND, leased to `owner` for `lease`: from here on the payment
/// exists whatever happens to this process.
pub async fn insert(
    pool: &PgPool,
    new: &NewPayment<'_>,
    owner: Uuid,
    lease: Duration,
) -> Result<PaymentRow, InsertRefused> {
    sqlx::query_as(
        "INSERT INTO payments (payment_id, user_id, request_id, hold_id, concert_id, schedule_id,
                               seat_numbers, amount, start_time, token, step, status,
                               lease_owner, lease_until)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'SPEND', 'PENDING',
                 $11, now() + make_interval(secs => $12))
         RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(new.user_id)
    .bind(new.request_id)
    .bind(new.hold_id)
    .bind(new.concert_id)
    .bind(new.schedule_id)
    .bind(new.seat_numbers)
    .bind(new.amount)
    .bind(new.start_time)
    .bind(new.token)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_one(pool)
    .await
    .map_err(|error| {
        if is_unique_violation(&error, Some("payments_request_once")) {
            InsertRefused::RequestUsed
        } else if is_unique_violation(&error, Some("payments_one_live_per_hold")) {
            InsertRefused::HoldTaken
        } else {
            InsertRefused::Database(error)
        }
    })
}

pub async fn by_id(pool: &PgPool, payment_id: Uuid) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM payments WHERE payment_id = $1")
        .bind(payment_id)
        .fetch_optional(pool)
        .await
}

/// The payment a replay is asking about when it presents the very token that paid: the
/// token may be DONE by now, so possession of it is the proof of identity here.
pub async fn by_request_and_token(
    pool: &PgPool,
    request_id: &str,
    token: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM payments WHERE request_id = $1 AND token = $2")
        .bind(request_id)
        .bind(token)
        .fetch_optional(pool)
        .await
}

pub async fn by_user_request(
    pool: &PgPool,
    user_id: &str,
    request_id: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM payments WHERE user_id = $1 AND request_id = $2")
        .bind(user_id)
        .bind(request_id)
        .fetch_optional(pool)
        .await
}

/// The payment of a hold that is not FAILED, if any.
pub async fn live_for_hold(pool: &PgPool, hold_id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT payment_id FROM payments WHERE hold_id = $1 AND status <> 'FAILED'")
        .bind(hold_id)
        .fetch_optional(pool)
        .await
}

/// A user's payments, newest first, strictly after the `(create_time, payment_id)` cursor.
pub async fn list(
    pool: &PgPool,
    user_id: &str,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    let (before_time, before_id) = after.unzip();
    sqlx::query_as(
        "SELECT * FROM payments
          WHERE user_id = $1
            AND ($2::timestamptz IS NULL OR (create_time, payment_id) < ($2, $3))
          ORDER BY create_time DESC, payment_id DESC
          LIMIT $4",
    )
    .bind(user_id)
    .bind(before_time)
    .bind(before_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A step's outcome to record.
pub struct Advance {
    pub to: Step,
    pub status: Status,
    pub balance_after: Option<i64>,
    /// `(reason, message)` of a definite refusal.
    pub failure: Option<(String, String)>,
}

/// Records that step `from` is done and the saga moves on, renewing the lease (or ending it
/// at DONE). `None` when `owner` no longer drives this payment at step `from`: someone else
/// took over, and this driver must stop.
pub async fn advance(
    pool: &PgPool,
    payment_id: Uuid,
    owner: Uuid,
    from: Step,
    change: &Advance,
    lease: Duration,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    let (reason, message) = match &change.failure {
        Some((reason, message)) => (Some(reason.as_str()), Some(message.as_str())),
        None => (None, None),
    };
    sqlx::query_as(
        "UPDATE payments
            SET step = $4,
                status = $5,
                balance_after = coalesce($6, balance_after),
                failure_reason = coalesce($7, failure_reason),
                failure_message = coalesce($8, failure_message),
                complete_time = CASE WHEN $5 = 'PENDING' THEN NULL
                                     ELSE coalesce(complete_time, now()) END,
                lease_owner = CASE WHEN $4 = 'DONE' THEN NULL ELSE lease_owner END,
                lease_until = CASE WHEN $4 = 'DONE' THEN NULL
                                   ELSE now() + make_interval(secs => $9) END,
                attempts = 0
          WHERE payment_id = $1 AND step = $2 AND lease_owner = $3
         RETURNING *",
    )
    .bind(payment_id)
    .bind(from.as_db())
    .bind(owner)
    .bind(change.to.as_db())
    .bind(change.status.as_db())
    .bind(change.balance_after)
    .bind(reason)
    .bind(message)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Extends `owner`'s lease before another attempt at `step`; false when it was lost.
pub async fn renew(
    pool: &PgPool,
    payment_id: Uuid,
    owner: Uuid,
    step: Step,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE payments SET lease_until = now() + make_interval(secs => $4)
          WHERE payment_id = $1 AND step = $2 AND lease_owner = $3",
    )
    .bind(payment_id)
    .bind(step.as_db())
    .bind(owner)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Gives a payment back for later: a peer was unreachable. The recovery worker of any
/// replica picks it up after a backoff that doubles with each failed round (`base`,
/// `2 base`, ... at most `max`).
pub async fn release(
    pool: &PgPool,
    payment_id: Uuid,
    owner: Uuid,
    base: Duration,
    max: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments
            SET lease_owner = NULL,
                lease_until = now() + make_interval(
                    secs => least($3 * power(2, least(attempts, 20)), $4)),
                attempts = attempts + 1
          WHERE payment_id = $1 AND lease_owner = $2 AND step <> 'DONE'",
    )
    .bind(payment_id)
    .bind(owner)
    .bind(base.as_secs_f64())
    .bind(max.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes over up to `limit` unfinished payments whose lease ran out, for `owner`.
///
/// FOR UPDATE SKIP LOCKED: replicas scanning at the same moment each take different rows
/// instead of queueing behind one another, and a row a driver is updating right now (its
/// lease being renewed) is skipped rather than stolen.
pub async fn claim_due(
    pool: &PgPool,
    owner: Uuid,
    lease: Duration,
    limit: i64,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE payments
            SET lease_owner = $1, lease_until = now() + make_interval(secs => $2)
          WHERE payment_id IN (
                SELECT payment_id FROM payments
                 WHERE step <> 'DONE' AND lease_until <= now()
                 ORDER BY lease_until
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
         RETURNING *",
    )
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}
