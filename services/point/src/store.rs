//! Every SQL statement of the wallet.
//!
//! Each change is one transaction that updates the user's `wallets` row and appends one
//! `ledger` row. The UPDATE takes the wallet's row lock, so a user's changes are serialised
//! across every replica, and its WHERE clause is the rule itself (`balance >= amount` for a
//! spend, `balance + amount <= cap` for a charge): no read-then-write race can exist.
//! Idempotency is enforced by unique indexes on the ledger; a request that loses the race
//! to insert its entry rolls back whole and returns the winner's entry.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
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
    let row: Option<EntryRow> = sqlx::query_as(&format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger WHERE payment_id = $1 AND kind = $2"
    ))
    .bind(payment_id)
    .bind(kind.as_db())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Entry::from))
}

/// Appends the entry of a change whose wallet row the transaction already updated (and so
/// holds locked), then commits. `Ok(None)`: an identical request committed its entry first
/// (unique violation); everything here was rolled back and the caller returns the winner's.
async fn append_and_commit(
    mut tx: Transaction<'_, Postgres>,
    user_id: &str,
    kind: EntryKind,
    amount: i64,
    balance_after: i64,
    request_id: Option<&str>,
    payment_id: Option<&str>,
) -> Result<Option<Entry>, sqlx::Error> {
    let inserted = sqlx::query_as::<_, EntryRow>(&format!(
        "INSERT INTO ledger (user_id, kind, amount, balance_after, request_id, payment_id)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING {ENTRY_COLUMNS}"
    ))
    .bind(user_id)
    .bind(kind.as_db())
    .bind(amount)
    .bind(balance_after)
    .bind(request_id)
    .bind(payment_id)
    .fetch_one(&mut *tx)
    .await;
    match inserted {
        Ok(row) => {
            tx.commit().await?;
            Ok(Some(row.into()))
        }
        Err(error) if is_unique_violation(&error, None) => Ok(None), // tx dropped: rolled back
        Err(error) => Err(error),
    }
}

/// Adds `amount` to the user's wallet (opening it on the first charge), once per request_id.
pub async fn charge(
    pool: &PgPool,
    user_id: &str,
    amount: i64,
    request_id: &str,
    balance_cap: i64,
) -> Result<Entry, PointError> {
    // A retry: return what the first call did.
    if let Some(entry) = charge_entry(pool, user_id, request_id).await? {
        return replay_charge(entry, amount);
    }
    let mut tx = pool.begin().await?;
    // Opens the wallet or adds to it, taking its row lock; refused (no row) when the new
    // balance would pass the cap. amount <= max_amount <= cap, so the sum cannot overflow.
    let balance_after: Option<i64> = sqlx::query_scalar(
        "INSERT INTO wallets AS w (user_id, balance) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE
             SET balance = w.balance + excluded.balance, update_time = now()
           WHERE w.balance <= $3 - excluded.balance
         RETURNING balance",
    )
    .bind(user_id)
    .bind(amount)
    .bind(balance_cap)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(balance_after) = balance_after else {
        return Err(PointError::BalanceCapExceeded { cap: balance_cap });
    };
    match append_and_commit(
        tx,
        user_id,
        EntryKind::Charge,
        amount,
        balance_after,
        Some(request_id),
        None,
    )
    .await?
    {
        Some(entry) => Ok(entry),
        None => {
            let entry = charge_entry(pool, user_id, request_id)
                .await?
                .ok_or_else(|| sqlx::Error::RowNotFound)?;
            replay_charge(entry, amount)
        }
    }
}

fn replay_charge(entry: Entry, amount: i64) -> Result<Entry, PointError> {
    if entry.amount == amount {
        Ok(entry)
    } else {
        Err(PointError::IdempotencyKeyReused { key: "request_id" })
    }
}

/// Takes `amount` from the user's wallet for a payment, once per payment.
pub async fn spend(
    pool: &PgPool,
    user_id: &str,
    amount: i64,
    payment_id: &str,
) -> Result<Entry, PointError> {
    if let Some(entry) = payment_entry(pool, payment_id, EntryKind::Spend).await? {
        return replay_spend(entry, user_id, amount);
    }
    let mut tx = pool.begin().await?;
    // The conditional UPDATE is the rule: it takes the wallet's row lock and only succeeds
    // when the balance covers the amount, so concurrent spends can never go below zero.
    let balance_after: Option<i64> = sqlx::query_scalar(
        "UPDATE wallets SET balance = balance - $2, update_time = now()
          WHERE user_id = $1 AND balance >= $2
         RETURNING balance",
    )
    .bind(user_id)
    .bind(amount)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(balance_after) = balance_after else {
        drop(tx);
        let balance = balance(pool, user_id)
            .await?
            .map_or(0, |(balance, _)| balance);
        return Err(PointError::InsufficientBalance { balance, amount });
    };
    match append_and_commit(
        tx,
        user_id,
        EntryKind::Spend,
        -amount,
        balance_after,
        None,
        Some(payment_id),
    )
    .await?
    {
        Some(entry) => Ok(entry),
        None => {
            let entry = payment_entry(pool, payment_id, EntryKind::Spend)
                .await?
                .ok_or_else(|| sqlx::Error::RowNotFound)?;
            replay_spend(entry, user_id, amount)
        }
    }
}

fn replay_spend(entry: Entry, user_id: &str, amount: i64) -> Result<Entry, PointError> {
    if entry.user_id == user_id && entry.amount == -amount {
        Ok(entry)
    } else {
        Err(PointError::IdempotencyKeyReused { key: "payment_id" })
    }
}

/// Gives back exactly what a payment spent, once.
pub async fn refund(pool: &PgPool, payment_id: &str) -> Result<Entry, PointError> {
    if let Some(entry) = payment_entry(pool, payment_id, EntryKind::Refund).await? {
        return Ok(entry);
    }
    let spent = payment_entry(pool, payment_id, EntryKind::Spend)
        .await?
        .ok_or(PointError::PaymentNotFound)?;
    let amount = -spent.amount;
    let mut tx = pool.begin().await?;
    // No cap here: a refund restores points the user already had.
    let balance_after: i64 = sqlx::query_scalar(
        "UPDATE wallets SET balance = balance + $2, update_time = now()
          WHERE user_id = $1
         RETURNING balance",
    )
    .bind(&spent.user_id)
    .bind(amount)
    .fetch_one(&mut *tx)
    .await?;
    match append_and_commit(
        tx,
        &spent.user_id,
        EntryKind::Refund,
        amount,
        balance_after,
        None,
        Some(payment_id),
    )
    .await?
    {
        Some(entry) => Ok(entry),
        None => Ok(payment_entry(pool, payment_id, EntryKind::Refund)
            .await?
            .ok_or_else(|| sqlx::Error::RowNotFound)?),
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
