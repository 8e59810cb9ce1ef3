//! The payment schema's SQL. Every change of a saga's state is one conditional UPDATE that
//! names the step it expects and the lease it expects: a driver that lost its lease, or a
//! step that someone else already recorded, changes nothing (and learns so from the missing
//! row), so two drivers can never move one payment two ways.
//!
//! A lease is a fresh id in `lease_owner`, drawn by the statement that hands the payment to
//! a driver (the INSERT, or the recovery worker's claim), and it is that one drive's fencing
//! token. It is not the process: a driver stalled past its lease (a long pool wait, a paused
//! runtime) may see its own process's recovery worker take the payment over, and the stale
//! driver's records and renewals must then fail rather than pass an owner check both share.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use stagedoor_runtime::{db, error::is_unique_violation};
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
    /// The fan's queue token while the saga runs; `None` once it is DONE (the table keeps
    /// only the token's digest then, see the migration `0002_token_only_while_running`).
    pub token: Option<String>,
    pub step: String,
    pub status: String,
    pub failure_reason: String,
    pub failure_message: String,
    pub balance_after: i64,
    pub attempts: i32,
    pub create_time: DateTime<Utc>,
    pub complete_time: Option<DateTime<Utc>>,
    /// The lease of the drive this row was handed to (see the module's doc); `None` while
    /// nobody drives it (released for later, or DONE).
    pub lease_owner: Option<Uuid>,
}

impl PaymentRow {
    pub fn step(&self) -> Step {
        Step::from_db(&self.step)
    }

    pub fn status(&self) -> Status {
        Status::from_db(&self.status)
    }
}

/// What a new payment is for; the rest starts at its defaults (step SPEND, PENDING). The
/// payment id is chosen by the caller, so that a batched insert can tell whose row is whose.
#[derive(Debug, Clone)]
pub struct NewPayment {
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
}

/// Why a payment was not recorded.
#[derive(Debug)]
pub enum InsertRefused {
    /// The user already used this request id (a concurrent or earlier Pay).
    RequestUsed,
    /// The hold already has a payment that is not FAILED.
    HoldTaken,
    /// The token already pays for another hold (a payment that is not FAILED).
    TokenTaken,
}

/// The first key of the payment service's advisory locks on a user (see [`insert_batch`]).
const USER_LOCK_CLASS: i32 = 0x5041_5900; // "PAY\0"

/// Records payments at step SPEND, each leased for `lease` to a drive of its own, in one
/// statement: from here on each payment exists whatever happens to this process. Returns
/// the rows written; a payment missing from them collided with a unique constraint (its
/// request id was used, or its hold or its token has a live payment), possibly with another
/// row of the same batch, which `ON CONFLICT DO NOTHING` settles in arrival order.
/// [`insert`] tells which constraint.
pub async fn insert_batch(
    pool: &PgPool,
    payments: &[NewPayment],
    lease: Duration,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    // Rows go in in user order. A row that meets another batch's uncommitted row with the
    // same key (request id, hold, token) waits for that batch to end, and every key belongs to
    // one user. So for two batches to wait on each other, each must have written a row of some
    // user and be waiting at a later row of the same user: a user with two rows in both. Rows
    // of one user arrive in any order (a fan double-clicking Pay on two holds), so those users
    // are serialised: the statement first takes an advisory lock per user with more than one
    // row here, in key order, before it writes anything. A batch with no such user (nearly
    // every batch) takes no lock at all.
    let mut payments: Vec<&NewPayment> = payments.iter().collect();
    payments.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let repeated_users: Vec<&str> = payments
        .windows(2)
        .filter(|pair| pair[0].user_id == pair[1].user_id)
        .map(|pair| pair[0].user_id.as_str())
        .collect();
    let column = |pick: fn(&NewPayment) -> String| -> Vec<String> {
        payments.iter().map(|p| pick(p)).collect()
    };
    sqlx::query_as(
        // `serialised` is evaluated once, before the first row is produced (a scalar subquery
        // in WHERE runs as an init plan), so every lock is held before any row is written.
        // The locks are transaction-scoped: this statement is its own transaction, and they
        // go with it. Two 32-bit keys, a key space apart from the single 64-bit keys that
        // sqlx's migrations and the concert service take in the same database.
        "WITH serialised AS (
             SELECT pg_advisory_xact_lock($13, key)
               FROM (SELECT DISTINCT hashtext(user_id) AS key
                       FROM unnest($12::text[]) AS repeated (user_id)
                      ORDER BY key) AS keys
         )
         INSERT INTO payments (payment_id, user_id, request_id, hold_id, concert_id, schedule_id,
                               seat_numbers, amount, start_time, token, token_sha256,
                               step, status, lease_owner, lease_until)
         SELECT p.payment_id, p.user_id, p.request_id, p.hold_id, p.concert_id, p.schedule_id,
                p.seats::int4[], p.amount, p.start_time, p.token,
                sha256(convert_to(p.token, 'UTF8')), 'SPEND', 'PENDING',
                gen_random_uuid(), now() + make_interval(secs => $11)
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[],
                       $7::text[], $8::int8[], $9::timestamptz[], $10::text[])
                AS p (payment_id, user_id, request_id, hold_id, concert_id, schedule_id, seats,
                      amount, start_time, token)
          WHERE (SELECT count(*) FROM serialised) >= 0
         ON CONFLICT DO NOTHING
         RETURNING *",
    )
    .bind(payments.iter().map(|p| p.payment_id).collect::<Vec<_>>())
    .bind(column(|p| p.user_id.clone()))
    .bind(column(|p| p.request_id.clone()))
    .bind(payments.iter().map(|p| p.hold_id).collect::<Vec<_>>())
    .bind(column(|p| p.concert_id.clone()))
    .bind(column(|p| p.schedule_id.clone()))
    .bind(column(|p| db::int4_array_literal(&p.seat_numbers)))
    .bind(payments.iter().map(|p| p.amount).collect::<Vec<_>>())
    .bind(payments.iter().map(|p| p.start_time).collect::<Vec<_>>())
    .bind(column(|p| p.token.clone()))
    .bind(lease.as_secs_f64())
    .bind(&repeated_users)
    .bind(USER_LOCK_CLASS)
    // Unprepared: a plan cached for one batch size and table size is no good for the next.
    .persistent(false)
    .fetch_all(pool)
    .await
}

/// Records one payment like [`insert_batch`], naming the constraint that refuses it.
pub async fn insert(
    pool: &PgPool,
    new: &NewPayment,
    lease: Duration,
) -> Result<Result<PaymentRow, InsertRefused>, sqlx::Error> {
    let inserted = sqlx::query_as(
        "INSERT INTO payments (payment_id, user_id, request_id, hold_id, concert_id, schedule_id,
                               seat_numbers, amount, start_time, token, token_sha256,
                               step, status, lease_owner, lease_until)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, sha256(convert_to($10, 'UTF8')),
                 'SPEND', 'PENDING', gen_random_uuid(), now() + make_interval(secs => $11))
         RETURNING *",
    )
    .bind(new.payment_id)
    .bind(&new.user_id)
    .bind(&new.request_id)
    .bind(new.hold_id)
    .bind(&new.concert_id)
    .bind(&new.schedule_id)
    .bind(&new.seat_numbers)
    .bind(new.amount)
    .bind(new.start_time)
    .bind(&new.token)
    .bind(lease.as_secs_f64())
    .fetch_one(pool)
    .await;
    match inserted {
        Ok(row) => Ok(Ok(row)),
        Err(error) if is_unique_violation(&error, Some("payments_request_once")) => {
            Ok(Err(InsertRefused::RequestUsed))
        }
        Err(error) if is_unique_violation(&error, Some("payments_one_live_per_hold")) => {
            Ok(Err(InsertRefused::HoldTaken))
        }
        Err(error) if is_unique_violation(&error, Some("payments_one_live_per_token")) => {
            Ok(Err(InsertRefused::TokenTaken))
        }
        Err(error) => Err(error),
    }
}

pub async fn by_id(pool: &PgPool, payment_id: Uuid) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM payments WHERE payment_id = $1")
        .bind(payment_id)
        .fetch_optional(pool)
        .await
}

/// The payment a replay is asking about when it presents the very token that paid: the
/// token may be DONE by now, so possession of it is the proof of identity here (checked
/// against the token's digest, which is all a finished payment keeps).
pub async fn by_request_and_token(
    pool: &PgPool,
    request_id: &str,
    token: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM payments
          WHERE request_id = $1 AND token_sha256 = sha256(convert_to($2, 'UTF8'))",
    )
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

/// The payment (not FAILED) that a queue token already pays with, if any.
pub async fn live_for_token(pool: &PgPool, token: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payment_id FROM payments
          WHERE token_sha256 = sha256(convert_to($1, 'UTF8')) AND status <> 'FAILED'
            AND token_exclusive",
    )
    .bind(token)
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

/// One step's outcome of one payment, to record with [`advance`].
pub struct AdvanceCall {
    pub payment_id: Uuid,
    /// The drive's lease, which the row must still carry.
    pub lease_owner: Uuid,
    /// The step the row must still be at.
    pub from: Step,
    pub change: Advance,
}

/// Records, for each call, that step `from` is done and the saga moves on, renewing the
/// lease (or ending it at DONE), in one statement. A payment is updated only while the
/// call's lease is still the row's and the row is at step `from`; the rows returned are
/// those updated, and a payment missing from them has another driver now, which this one
/// must leave it to. Each payment at most once per call (the caller matches rows to calls
/// by payment id, see `writes::advance_all`).
pub async fn advance(
    pool: &PgPool,
    calls: &[AdvanceCall],
    lease: Duration,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    let failure = |pick: fn(&(String, String)) -> &String| -> Vec<Option<String>> {
        calls
            .iter()
            .map(|call| call.change.failure.as_ref().map(|f| pick(f).clone()))
            .collect()
    };
    sqlx::query_as(
        "UPDATE payments p
            SET step = a.to_step,
                status = a.status,
                balance_after = coalesce(a.balance_after, p.balance_after),
                failure_reason = coalesce(a.reason, p.failure_reason),
                failure_message = coalesce(a.message, p.failure_message),
                complete_time = CASE WHEN a.status = 'PENDING' THEN NULL
                                     ELSE coalesce(p.complete_time, now()) END,
                lease_owner = CASE WHEN a.to_step = 'DONE' THEN NULL ELSE p.lease_owner END,
                -- The bearer token goes with the saga's end; its digest stays for replays.
                token = CASE WHEN a.to_step = 'DONE' THEN NULL ELSE p.token END,
                lease_until = CASE WHEN a.to_step = 'DONE' THEN NULL
                                   ELSE now() + make_interval(secs => $9) END,
                attempts = 0
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[],
                       $7::text[], $8::uuid[])
                AS a (payment_id, from_step, to_step, status, balance_after, reason, message,
                      lease_owner)
          WHERE p.payment_id = a.payment_id AND p.step = a.from_step
            AND p.lease_owner = a.lease_owner
         RETURNING p.*",
    )
    .bind(calls.iter().map(|c| c.payment_id).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.from.as_db()).collect::<Vec<_>>())
    .bind(
        calls
            .iter()
            .map(|c| c.change.to.as_db())
            .collect::<Vec<_>>(),
    )
    .bind(
        calls
            .iter()
            .map(|c| c.change.status.as_db())
            .collect::<Vec<_>>(),
    )
    .bind(
        calls
            .iter()
            .map(|c| c.change.balance_after)
            .collect::<Vec<_>>(),
    )
    .bind(failure(|(reason, _)| reason))
    .bind(failure(|(_, message)| message))
    .bind(calls.iter().map(|c| c.lease_owner).collect::<Vec<_>>())
    .bind(lease.as_secs_f64())
    .persistent(false)
    .fetch_all(pool)
    .await
}

/// Extends the lease `lease_owner` before another attempt at `step`; false when it was lost.
pub async fn renew(
    pool: &PgPool,
    payment_id: Uuid,
    lease_owner: Uuid,
    step: Step,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE payments SET lease_until = now() + make_interval(secs => $4)
          WHERE payment_id = $1 AND step = $2 AND lease_owner = $3",
    )
    .bind(payment_id)
    .bind(step.as_db())
    .bind(lease_owner)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Gives a payment back for later: a peer was unreachable. The recovery worker of any
/// replica picks it up after a backoff that doubles with each failed round (`base`,
/// `2 base`, ... at most `max`). Only while `lease_owner` is still its lease.
pub async fn release(
    pool: &PgPool,
    payment_id: Uuid,
    lease_owner: Uuid,
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
    .bind(lease_owner)
    .bind(base.as_secs_f64())
    .bind(max.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes over up to `limit` unfinished payments whose lease ran out, each under a new lease
/// (which fences off whoever drove it before, see the module's doc).
///
/// FOR UPDATE SKIP LOCKED: replicas scanning at the same moment each take different rows
/// instead of queueing behind one another, and a row a driver is updating right now (its
/// lease being renewed) is skipped rather than stolen.
pub async fn claim_due(
    pool: &PgPool,
    lease: Duration,
    limit: i64,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE payments
            SET lease_owner = gen_random_uuid(), lease_until = now() + make_interval(secs => $1)
          WHERE payment_id IN (
                SELECT payment_id FROM payments
                 WHERE step <> 'DONE' AND lease_until <= now()
                 ORDER BY lease_until
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)
         RETURNING *",
    )
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}
