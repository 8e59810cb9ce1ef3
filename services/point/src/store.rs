//! Every SQL statement of the wallet.
//!
//! Each change is one statement that updates the user's `wallets` row and appends one
//! `ledger` row. The UPDATE takes the wallet's row lock, so a user's changes are serialised
//! across every replica, and its WHERE clause is the rule itself (`balance >= amount` for a
//! spend, `balance + amount <= cap` for a charge): no read-then-write race can exist.
//! Idempotency is enforced by unique indexes (on the ledger, and on `spend_outcomes` for a
//! spend's refusal); a request that loses the race to insert its entry is undone whole and
//! returns the winner's entry.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres};
use stagedoor_runtime::error::is_unique_violation;

use crate::domain::{Entry, EntryKind, PointError};

const ENTRY_COLUMNS: &str =
    "entry_id, user_id, kind, amount, balance_after, request_id, payment_id, create_time";

#[derive(sqlx::FromRow)]
struct EntryRow {
    entry_id: i64,
    user_id: String,
    kind: String,
    amount: i64,
    balance_after: i64,
    request_id: Option<String>,
    payment_id: Option<String>,
    create_time: DateTime<Utc>,
}

impl From<EntryRow> for Entry {
    fn from(row: EntryRow) -> Self {
        Entry {
            entry_id: row.entry_id,
            user_id: row.user_id,
            kind: EntryKind::from_db(&row.kind),
            amount: row.amount,
            balance_after: row.balance_after,
            request_id: row.request_id,
            payment_id: row.payment_id,
            create_time: row.create_time,
        }
    }
}

/// A user's balance and when it last changed; `None` for a user who never charged.
pub async fn balance(
    pool: &PgPool,
    user_id: &str,
) -> Result<Option<(i64, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT balance, update_time FROM wallets WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(pool)
        .await
}

async fn charge_entry(
    pool: &PgPool,
    user_id: &str,
    request_id: &str,
) -> Result<Option<Entry>, sqlx::Error> {
    let row: Option<EntryRow> = sqlx::query_as(&format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger
          WHERE user_id = $1 AND request_id = $2 AND kind = 'CHARGE'"
    ))
    .bind(user_id)
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Entry::from))
}

async fn payment_entry(
    pool: &PgPool,
    payment_id: &str,
    kind: EntryKind,
) -> Result<Option<Entry>, sqlx::Error> {
    // The kind is written into the statement, not bound: the only indexes on payment_id are
    // partial, one per kind (ledger_spend_once, ledger_refund_once), and a prepared plan for
    // `kind = $2` could use neither. One statement per kind, each prepared once.
    let row: Option<EntryRow> = sqlx::query_as(&format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger WHERE payment_id = $1 AND kind = '{}'",
        kind.as_db()
    ))
    .bind(payment_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Entry::from))
}

/// Runs one change statement (wallet update + ledger insert). `Ok(None)`: the wallet update
/// matched no row (the rule refused it); `Err(Ok(()))`: an identical request's entry already
/// exists (the unique index refused the insert, and the whole statement was undone).
async fn apply(
    statement: sqlx::query::QueryAs<'_, Postgres, EntryRow, sqlx::postgres::PgArguments>,
    pool: &PgPool,
) -> Result<Applied, sqlx::Error> {
    match statement.fetch_optional(pool).await {
        Ok(Some(row)) => Ok(Applied::Done(row.into())),
        Ok(None) => Ok(Applied::Refused),
        Err(error) if is_unique_violation(&error, None) => Ok(Applied::AlreadyDone),
        Err(error) => Err(error),
    }
}

/// What one change statement did.
enum Applied {
    /// The wallet changed and this entry records it.
    Done(Entry),
    /// The wallet's rule refused the change (cap, balance, no such spend).
    Refused,
    /// The entry for this request already exists; nothing changed.
    AlreadyDone,
}

// Each change below is ONE statement: a data-modifying CTE updates the wallet row (taking its
// row lock; the WHERE clause is the rule) and the outer INSERT appends the ledger entry with
// the new balance. One statement is one transaction and one round trip, so a wallet's row
// lock is held for a single commit: on one hot wallet that is what bounds throughput.

/// Adds `amount` to the user's wallet (opening it on the first charge), once per request_id.
///
/// `amount` is at least 1; `max_amount` and `balance_cap` are today's limits. A retry of a
/// charge that was made is answered with it whatever they are now: a limit lowered since
/// must not turn its receipt into a refusal. So an amount over the maximum is refused only
/// after the look-up that every refusal makes.
pub async fn charge(
    pool: &PgPool,
    user_id: &str,
    amount: i64,
    request_id: &str,
    max_amount: i64,
    balance_cap: i64,
) -> Result<Entry, PointError> {
    if amount <= max_amount {
        // amount <= max_amount <= cap, so `cap - amount` cannot overflow; the sum is only
        // computed when it fits under the cap.
        let sql = format!(
            "WITH wallet AS (
                 INSERT INTO wallets AS w (user_id, balance) VALUES ($1, $2)
                 ON CONFLICT (user_id) DO UPDATE
                     SET balance = w.balance + excluded.balance, update_time = now()
                   WHERE w.balance <= $3 - excluded.balance
                 RETURNING balance)
             INSERT INTO ledger (user_id, kind, amount, balance_after, request_id)
             SELECT $1, 'CHARGE', $2, balance, $4 FROM wallet
             RETURNING {ENTRY_COLUMNS}"
        );
        let statement = sqlx::query_as::<_, EntryRow>(&sql)
            .bind(user_id)
            .bind(amount)
            .bind(balance_cap)
            .bind(request_id);
        if let Applied::Done(entry) = apply(statement, pool).await? {
            return Ok(entry);
        }
    }
    // Refused (over the maximum or the cap) or already done: a retry of a charge that was
    // made is answered with it.
    match charge_entry(pool, user_id, request_id).await? {
        Some(entry) => replay_charge(entry, amount),
        None if amount > max_amount => Err(PointError::AmountOutOfRange {
            amount,
            max: max_amount,
        }),
        None => Err(PointError::BalanceCapExceeded { cap: balance_cap }),
    }
}

fn replay_spend(entry: Entry, user_id: &str, amount: i64) -> Result<Entry, PointError> {
    if entry.user_id == user_id && entry.amount == -amount {
        Ok(entry)
    } else {
        Err(PointError::IdempotencyKeyReused { key: "payment_id" })
    }
}

fn replay_charge(entry: Entry, amount: i64) -> Result<Entry, PointError> {
    if entry.amount == amount {
        Ok(entry)
    } else {
        Err(PointError::IdempotencyKeyReused { key: "request_id" })
    }
}

/// Takes `amount` from the user's wallet for a payment, once per payment: the first outcome,
/// spent or refused for want of points, is the payment's for good (`spend_outcomes`).
///
/// `amount` is at least 1 and `balance_cap` today's cap, the most a spend may take. As for
/// [`charge`], a repeated spend is answered with its entry whatever the cap is now: the
/// payment saga replays SpendPoints after a crash and takes a refusal as final, so an
/// AMOUNT_OUT_OF_RANGE there would fail a payment whose points were spent and seats sold.
/// For the same reason a refusal is recorded and repeated, even once the balance would
/// cover the amount: a late attempt must not spend for a payment that has failed.
pub async fn spend(
    pool: &PgPool,
    user_id: &str,
    amount: i64,
    payment_id: &str,
    balance_cap: i64,
) -> Result<Entry, PointError> {
    if amount <= balance_cap {
        // `balance >= $2` in the UPDATE is the rule: concurrent spends queue on the row lock
        // and each re-checks it against the balance the previous one left, so none goes
        // below zero. The SPEND entry's trigger inserts the payment's outcome, which undoes
        // the whole statement when the payment already has one (spent, or refused by an
        // attempt that got there first).
        let sql = format!(
            "WITH wallet AS (
                 UPDATE wallets SET balance = balance - $2, update_time = now()
                  WHERE user_id = $1 AND balance >= $2
                 RETURNING balance)
             INSERT INTO ledger (user_id, kind, amount, balance_after, payment_id)
             SELECT $1, 'SPEND', -$2, balance, $3 FROM wallet
             RETURNING {ENTRY_COLUMNS}"
        );
        let statement = sqlx::query_as::<_, EntryRow>(&sql)
            .bind(user_id)
            .bind(amount)
            .bind(payment_id);
        match apply(statement, pool).await? {
            Applied::Done(entry) => return Ok(entry),
            // Short of points: the refusal becomes the payment's outcome, unless another
            // attempt decided first (then nothing is inserted, and its outcome is read).
            Applied::Refused => {
                sqlx::query(
                    "INSERT INTO spend_outcomes (payment_id, user_id, amount, refused)
                     VALUES ($1, $2, $3, true)
                     ON CONFLICT (payment_id) DO NOTHING",
                )
                .bind(payment_id)
                .bind(user_id)
                .bind(amount)
                .execute(pool)
                .await?;
            }
            Applied::AlreadyDone => {}
        }
    }
    let outcome: Option<(String, i64, bool)> =
        sqlx::query_as("SELECT user_id, amount, refused FROM spend_outcomes WHERE payment_id = $1")
            .bind(payment_id)
            .fetch_optional(pool)
            .await?;
    match outcome {
        Some((spender, spent, _)) if spender != user_id || spent != amount => {
            Err(PointError::IdempotencyKeyReused { key: "payment_id" })
        }
        Some((_, _, false)) => Ok(payment_entry(pool, payment_id, EntryKind::Spend)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?),
        // Refused now or before. The balance said is today's (advisory: a charge may have
        // landed since the refusal).
        Some((_, _, true)) => {
            let balance = balance(pool, user_id)
                .await?
                .map_or(0, |(balance, _)| balance);
            Err(PointError::InsufficientBalance { balance, amount })
        }
        // Never decided (over today's cap: nothing is recorded, since the cap is
        // configuration, not the wallet). A SPEND always has its outcome (trigger and
        // backfill of migration 0003); the ledger is asked all the same before saying no,
        // since a spend answered as refused would be points lost.
        None => match payment_entry(pool, payment_id, EntryKind::Spend).await? {
            Some(entry) => replay_spend(entry, user_id, amount),
            None => Err(PointError::AmountOutOfRange {
                amount,
                max: balance_cap,
            }),
        },
    }
}

/// Gives back exactly what a payment spent, once. No cap applies: a refund restores points
/// the user already had.
pub async fn refund(pool: &PgPool, payment_id: &str) -> Result<Entry, PointError> {
    let sql = format!(
        "WITH spent AS (
             SELECT user_id, -amount AS amount FROM ledger
              WHERE payment_id = $1 AND kind = 'SPEND'),
         wallet AS (
             UPDATE wallets w SET balance = w.balance + spent.amount, update_time = now()
               FROM spent WHERE w.user_id = spent.user_id
             RETURNING w.user_id, w.balance, spent.amount)
         INSERT INTO ledger (user_id, kind, amount, balance_after, payment_id)
         SELECT user_id, 'REFUND', amount, balance, $1 FROM wallet
         RETURNING {ENTRY_COLUMNS}"
    );
    let statement = sqlx::query_as::<_, EntryRow>(&sql).bind(payment_id);
    match apply(statement, pool).await? {
        Applied::Done(entry) => Ok(entry),
        Applied::AlreadyDone => Ok(payment_entry(pool, payment_id, EntryKind::Refund)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?),
        // No spend for this payment: nothing to give back.
        Applied::Refused => Err(PointError::PaymentNotFound),
    }
}

/// A page of a user's history, newest first, starting below `before` (an entry id).
pub async fn history(
    pool: &PgPool,
    user_id: &str,
    before: Option<i64>,
    page_size: i64,
) -> Result<Vec<Entry>, sqlx::Error> {
    let rows: Vec<EntryRow> = sqlx::query_as(&format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger
          WHERE user_id = $1 AND entry_id < $2
          ORDER BY entry_id DESC
          LIMIT $3"
    ))
    .bind(user_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(page_size)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Entry::from).collect())
}
