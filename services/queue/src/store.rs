//! Every SQL statement of the queue, and the admission procedure.
//!
//! The one rule that keeps the line correct across replicas: whoever changes which tokens are
//! ACTIVE (admission, completion, expiry) first locks the concert's `lines` row, then touches
//! token rows. Lock order is always line, then tokens, so these transactions never deadlock,
//! and `active_count` on the locked row is the truth about how many are ACTIVE.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::{
    config::QueueConfig,
    domain::{Ending, Ticket, TokenStatus},
};

/// The admission bounds and clocks, read once from the configuration.
#[derive(Debug, Clone)]
pub struct AdmissionPolicy {
    pub max_active: i64,
    pub admit_rate: f64,
    pub burst: f64,
    pub active_ttl: Duration,
    /// A WAITING token unseen for this long is a ghost (`QueueConfig::ghost_after`).
    pub ghost_after: Duration,
    pub heartbeat_every: Duration,
}

impl From<&QueueConfig> for AdmissionPolicy {
    fn from(config: &QueueConfig) -> Self {
        Self {
            max_active: i64::from(config.max_active),
            admit_rate: f64::from(config.admit_rate),
            burst: config.admit_burst(),
            active_ttl: config.active_ttl,
            ghost_after: config.ghost_after(),
            heartbeat_every: config.heartbeat_every(),
        }
    }
}

/// A ticket's columns, with the effective status computed by the database's clock: an ACTIVE
/// row past `expire_time` reads EXPIRED whether or not the sweeper has caught it up.
const TICKET_SELECT: &str = "
    SELECT t.token, t.concert_id, t.user_id, t.place,
           CASE WHEN t.status = 'ACTIVE' AND t.expire_time <= statement_timestamp()
                THEN 'EXPIRED' ELSE t.status END AS status,
           t.create_time, t.admit_time, t.expire_time,
           l.admitted_through,
           extract(epoch FROM statement_timestamp() - t.last_seen)::float8 AS idle_secs
      FROM tokens t
      JOIN lines l ON l.concert_id = t.concert_id";

#[derive(sqlx::FromRow)]
struct TicketRow {
    token: Uuid,
    concert_id: String,
    user_id: String,
    place: i64,
    status: String,
    create_time: DateTime<Utc>,
    admit_time: Option<DateTime<Utc>>,
    expire_time: Option<DateTime<Utc>>,
    admitted_through: i64,
    idle_secs: f64,
}

impl TicketRow {
    fn into_ticket(self, heartbeat_every: Duration) -> Ticket {
        let status = TokenStatus::from_db(&self.status);
        Ticket {
            token: self.token,
            concert_id: self.concert_id,
            user_id: self.user_id,
            place: self.place,
            status,
            create_time: self.create_time,
            admit_time: self.admit_time,
            expire_time: self.expire_time,
            admitted_through: self.admitted_through,
            heartbeat_due: status == TokenStatus::Waiting
                && self.idle_secs > heartbeat_every.as_secs_f64(),
            seen_ago: std::time::Duration::try_from_secs_f64(self.idle_secs).unwrap_or_default(),
        }
    }
}

/// Reads tokens with their lines' admission pointers: one indexed lookup per token, no
/// counting. Unknown tokens are simply absent from the answer. Through the pool, or inside
/// a transaction that has just changed them (`end_batch`).
pub async fn read_tickets<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    policy: &AdmissionPolicy,
    tokens: &[Uuid],
) -> Result<Vec<Ticket>, sqlx::Error> {
    let rows: Vec<TicketRow> = sqlx::query_as(&format!("{TICKET_SELECT} WHERE t.token = ANY($1)"))
        .bind(tokens)
        .fetch_all(executor)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| row.into_ticket(policy.heartbeat_every))
        .collect())
}

/// A concert's `lines` row, locked by the current transaction.
#[derive(Debug)]
struct LockedLine {
    concert_id: String,
    last_place: i64,
    admitted_through: i64,
    active_count: i64,
    admitted_total: i64,
    rate_allowance: f64,
}

/// Locks the line row; `None` when the concert has no line. With `skip_locked`, also `None`
/// instead of waiting when another transaction (another replica's tick, say) holds it:
/// background work then simply moves on.
async fn lock_line(
    tx: &mut Transaction<'_, Postgres>,
    concert_id: &str,
    skip_locked: bool,
) -> Result<Option<LockedLine>, sqlx::Error> {
    let sql = if skip_locked {
        "SELECT last_place, admitted_through, active_count::int8, admitted_total, rate_allowance
           FROM lines WHERE concert_id = $1 FOR UPDATE SKIP LOCKED"
    } else {
        "SELECT last_place, admitted_through, active_count::int8, admitted_total, rate_allowance
           FROM lines WHERE concert_id = $1 FOR UPDATE"
    };
    let row: Option<(i64, i64, i64, i64, f64)> = sqlx::query_as(sql)
        .bind(concert_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.map(
        |(last_place, admitted_through, active_count, admitted_total, rate_allowance)| LockedLine {
            concert_id: concert_id.to_owned(),
            last_place,
            admitted_through,
            active_count,
            admitted_total,
            rate_allowance,
        },
    ))
}

/// Opens the lines of `concert_ids` (those not open yet); returns how many were opened. The
/// bucket starts full so the first fans of a new line are admitted at once.
pub async fn open_lines(
    pool: &PgPool,
    policy: &AdmissionPolicy,
    concert_ids: &[String],
) -> Result<u64, sqlx::Error> {
    // Two replicas (or two concert services) may open the same line at once: ON CONFLICT
    // makes the second wait for the first's row and then leave it as it is.
    let opened = sqlx::query(
        "INSERT INTO lines (concert_id, rate_allowance)
         SELECT id, $2 FROM unnest($1::text[]) AS id
         ON CONFLICT (concert_id) DO NOTHING",
    )
    .bind(concert_ids)
    .bind(policy.burst)
    .execute(pool)
    .await?;
    Ok(opened.rows_affected())
}

/// The id of every open line (every concert's: there is one per concert, and none closes).
pub async fn line_ids(pool: &PgPool) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT concert_id FROM lines")
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().collect())
}

/// Admission, with the line locked: expire passed windows and ghosts, then admit (see
/// [`admit`]). Returns how many fans were admitted.
async fn advance(
    tx: &mut Transaction<'_, Postgres>,
    policy: &AdmissionPolicy,
    line: &mut LockedLine,
) -> Result<usize, sqlx::Error> {
    let swept = expire_ended(tx, policy, line).await?;
    Ok(admit(tx, policy, line, swept.since_refill).await?.len())
}

/// Expires the line's ACTIVE tokens whose window has passed (their slots are free for the
/// next admission) and its ghosts (WAITING fans who stopped polling). Says when (see
/// [`Swept`]). The clock is read by this statement, *after* the lock was granted, so the
/// bucket refills by the time that really passed since the previous holder saved it.
///
/// Every holder of the line lock runs this before admitting, not only the background tick:
/// the tick takes the lock with SKIP LOCKED, and in a long rush over two replicas the line
/// is locked by one IssueToken batch after another, so a tick alone could leave ghosts
/// unswept until admission reached them, and each admitted ghost would sit on an ACTIVE slot
/// for the whole window. Looking for ghosts is one probe of an index, in the same statement.
async fn expire_ended(
    tx: &mut Transaction<'_, Postgres>,
    policy: &AdmissionPolicy,
    line: &mut LockedLine,
) -> Result<Swept, sqlx::Error> {
    let (expired, since_refill, clock): (i64, f64, DateTime<Utc>) = sqlx::query_as(
        "WITH expired AS (
             UPDATE tokens SET status = 'EXPIRED', end_time = statement_timestamp()
              WHERE concert_id = $1 AND status = 'ACTIVE' AND expire_time <= statement_timestamp()
             RETURNING 1),
         -- Ghosts hold no slot, so no counter changes; admission simply never reaches them.
         -- Their cutoff is taken from the transaction's start, not this statement's: when
         -- IssueToken runs this a second time (a window ended between its statements), no
         -- fan it has already read as WAITING may turn into a ghost behind its back.
         -- A row a heartbeat flush is touching right now is waited for (briefly: the flush
         -- never waits on us, it skips locked rows) and then re-checked, so a fan whose
         -- heartbeat lands in that moment is kept.
         ghosts AS (
             UPDATE tokens SET status = 'EXPIRED', end_time = statement_timestamp()
              WHERE concert_id = $1 AND status = 'WAITING'
                AND last_seen < now() - make_interval(secs => $2)
             RETURNING 1)
         SELECT (SELECT count(*) FROM expired),
                greatest(extract(epoch FROM clock_timestamp() - rate_updated_at)::float8, 0),
                statement_timestamp()
           FROM lines WHERE concert_id = $1",
    )
    // Prepared: each part matches its partial index exactly (`tokens_active_by_expiry`,
    // `tokens_waiting_by_last_seen`), so even a generic plan probes them. (With a LIMIT, the
    // ghosts needed a self-join, whose generic plan scanned the whole table once analyzed.)
    // No LIMIT, then: a wave of fans who left together goes in one statement, about 17 ms
    // per 1,000 ghosts, once.
    .bind(&line.concert_id)
    .bind(policy.ghost_after.as_secs_f64())
    .fetch_one(&mut **tx)
    .await?;
    line.active_count -= expired;
    Ok(Swept {
        since_refill,
        clock,
    })
}

/// What [`expire_ended`] did, as its caller needs it.
struct Swept {
    /// Seconds since the rate bucket was last refilled.
    since_refill: f64,
    /// The clock the pass expired windows by: every ACTIVE window that ended by then is
    /// EXPIRED now.
    clock: DateTime<Utc>,
}

/// A token admitted by [`admit`].
#[derive(Debug, sqlx::FromRow)]
struct Admitted {
    token: Uuid,
    place: i64,
    admit_time: DateTime<Utc>,
    expire_time: DateTime<Utc>,
}

/// Refills the rate bucket, admits the next WAITING fans in place order within both bounds
/// and saves the line. Returns the fans admitted.
async fn admit(
    tx: &mut Transaction<'_, Postgres>,
    policy: &AdmissionPolicy,
    line: &mut LockedLine,
    since_refill: f64,
) -> Result<Vec<Admitted>, sqlx::Error> {
    // Token bucket: refill at admit_rate per second, never above two ticks' worth (see
    // `QueueConfig::admit_burst`). It spreads admissions over the ticks, but alone it lets a
    // window of one second hold a bucket more than the rate (a minute's worth more with
    // QUEUE_TICK=30s).
    let allowance = (line.rate_allowance + policy.admit_rate * since_refill).min(policy.burst);
    let free_slots = (policy.max_active - line.active_count).max(0);
    let mut budget = free_slots.min(allowance.floor() as i64);
    if budget > 0 {
        // So the bucket is also held to what the last second admitted: then no one-second
        // window ever holds more than `admit_rate` (every admission of this line happens
        // under its lock, and is stamped later than this count). One range scan of the
        // `tokens_admitted_by_time` index, only when a slot and the bucket allow anyone in:
        // at most a second's admissions: 0.05-0.09 ms for 200 of them (the default rate),
        // 2-7 ms for 10,000 just admitted (BENCHMARKS.md, session of 2026-12-03).
        let last_second: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tokens
              WHERE concert_id = $1 AND admit_time > statement_timestamp() - interval '1 second'",
        )
        .bind(&line.concert_id)
        .fetch_one(&mut **tx)
        .await?;
        budget = budget.min((policy.admit_rate as i64 - last_second).max(0));
    }

    let mut admitted = Vec::new();
    if budget > 0 {
        // The next WAITING fans by place, found from the admission pointer on through the
        // (concert_id, place) index: everyone before it was admitted or skipped already.
        // Their rows are locked in place order; the heartbeat flush takes token rows with
        // SKIP LOCKED, so it can never wait on us in a cycle.
        admitted = sqlx::query_as::<_, Admitted>(
            "WITH next AS (
                 SELECT token FROM tokens
                  WHERE concert_id = $1 AND place > $2 AND status = 'WAITING'
                  ORDER BY place LIMIT $3
                  FOR UPDATE)
             UPDATE tokens t
                SET status = 'ACTIVE',
                    admit_time = statement_timestamp(),
                    expire_time = statement_timestamp() + make_interval(secs => $4)
               FROM next WHERE t.token = next.token
             RETURNING t.token, t.place, t.admit_time, t.expire_time",
        )
        .persistent(false)
        .bind(&line.concert_id)
        .bind(line.admitted_through)
        .bind(budget)
        .bind(policy.active_ttl.as_secs_f64())
        .fetch_all(&mut **tx)
        .await?;
        let count = admitted.len() as i64;
        line.admitted_through = if count < budget {
            // Fewer WAITING fans than the budget: nobody is left in line, every place up to
            // the newest was admitted or skipped.
            line.last_place
        } else {
            admitted
                .iter()
                .map(|fan| fan.place)
                .max()
                .unwrap_or(line.admitted_through)
        };
        line.active_count += count;
        line.admitted_total += count;
    }
    line.rate_allowance = allowance - admitted.len() as f64;

    sqlx::query(
        "UPDATE lines
            SET last_place = $2, admitted_through = $3, active_count = $4,
                admitted_total = $5, rate_allowance = $6,
                rate_updated_at = rate_updated_at + make_interval(secs => $7)
          WHERE concert_id = $1",
    )
    .bind(&line.concert_id)
    .bind(line.last_place)
    .bind(line.admitted_through)
    .bind(line.active_count as i32)
    .bind(line.admitted_total)
    .bind(line.rate_allowance)
    .bind(since_refill)
    .execute(&mut **tx)
    .await?;
    Ok(admitted)
}

/// Issues tokens to a batch of fans of one concert in one transaction: fans who already hold
/// a live token get it back, the others get the next places in arrival order, then admission
/// runs at once. Batching is what lets IssueToken pass the one-row-per-transaction limit of
/// the hot `lines` row: one lock, one insert, many fans.
///
/// Returns one ticket per distinct user, in no particular order, or `None` when the concert
/// has no open line (see [`open_lines`]).
pub async fn issue_batch(
    pool: &PgPool,
    policy: &AdmissionPolicy,
    concert_id: &str,
    user_ids: &[String],
) -> Result<Option<Vec<Ticket>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Only a concert the concert service opened a line for takes fans: a made-up id gets no
    // row, so it costs nothing to any replica's admission.
    let Some(mut line) = lock_line(&mut tx, concert_id, false).await? else {
        return Ok(None);
    };

    // Under the line lock nobody else can insert a token for this concert, so checking for
    // live tokens and then inserting is race-free (the partial unique index backs it anyway).
    // Windows that passed are expired first so their fans get a new token, not a dead one.
    let mut since_refill = expire_ended(&mut tx, policy, &mut line).await?.since_refill;
    let mut tickets: Vec<Ticket> = sqlx::query_as::<_, TicketRow>(&format!(
        "{TICKET_SELECT}
          WHERE t.user_id = ANY($2) AND t.concert_id = $1 AND t.status IN ('WAITING', 'ACTIVE')"
    ))
    // Planned for its actual batch every time (see stagedoor_runtime::db on plans).
    .persistent(false)
    .bind(concert_id)
    .bind(user_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| row.into_ticket(policy.heartbeat_every))
    .collect();
    // Each statement has its own clock, so a window that ended between the expiry above and
    // this read reads EXPIRED here while its row is still ACTIVE. Its fan is owed a new
    // token, not the dead one: expire it now and count the fan as new, which the unique
    // index allows once the row is EXPIRED. This pass's clock is later still, so it may also
    // end windows this read saw ACTIVE: those fans are owed a new token just the same, and
    // must not be told ACTIVE of a row that is EXPIRED when the answer leaves.
    if tickets
        .iter()
        .any(|ticket| ticket.status == TokenStatus::Expired)
    {
        let swept = expire_ended(&mut tx, policy, &mut line).await?;
        since_refill = swept.since_refill;
        tickets.retain(|ticket| match ticket.status {
            TokenStatus::Expired => false,
            TokenStatus::Active => ticket.expire_time.is_some_and(|end| end > swept.clock),
            _ => true,
        });
    }

    // Everything from here to the commit runs under the line lock, so it stays linear in the
    // batch (a batch is up to a thousand fans).
    let mut seen: HashSet<&str> = tickets
        .iter()
        .map(|ticket| ticket.user_id.as_str())
        .collect();
    let new_users: Vec<&str> = user_ids
        .iter()
        .map(String::as_str)
        .filter(|user| seen.insert(user))
        .collect();
    if !new_users.is_empty() {
        let tokens: Vec<Uuid> = new_users.iter().map(|_| Uuid::new_v4()).collect();
        let places: Vec<i64> = (1..=new_users.len() as i64)
            .map(|offset| line.last_place + offset)
            .collect();
        let create_time: DateTime<Utc> = sqlx::query_scalar(
            "WITH issued AS (
                 INSERT INTO tokens (token, concert_id, user_id, place, status)
                 SELECT token, $1, user_id, place, 'WAITING'
                   FROM unnest($2::uuid[], $3::text[], $4::int8[]) AS fan(token, user_id, place)
                 RETURNING create_time)
             SELECT min(create_time) FROM issued",
        )
        .persistent(false)
        .bind(concert_id)
        .bind(&tokens)
        .bind(&new_users)
        .bind(&places)
        .fetch_one(&mut *tx)
        .await?;
        line.last_place += new_users.len() as i64;
        tickets.extend(
            new_users
                .iter()
                .zip(tokens)
                .zip(places)
                .map(|((user, token), place)| Ticket {
                    token,
                    concert_id: concert_id.to_owned(),
                    user_id: (*user).to_owned(),
                    place,
                    status: TokenStatus::Waiting,
                    create_time,
                    admit_time: None,
                    expire_time: None,
                    admitted_through: 0,
                    heartbeat_due: false,
                    seen_ago: std::time::Duration::ZERO,
                }),
        );
    }
    let admitted = admit(&mut tx, policy, &mut line, since_refill).await?;
    tx.commit().await?;

    // The batch's tickets as they stand after admission, built from what the statements
    // returned rather than read back.
    let admitted: HashMap<Uuid, &Admitted> = admitted.iter().map(|fan| (fan.token, fan)).collect();
    for ticket in &mut tickets {
        ticket.admitted_through = line.admitted_through;
        if let Some(fan) = admitted.get(&ticket.token) {
            ticket.status = TokenStatus::Active;
            ticket.admit_time = Some(fan.admit_time);
            ticket.expire_time = Some(fan.expire_time);
            ticket.heartbeat_due = false;
        }
    }
    Ok(Some(tickets))
}

/// Ends live tokens of one concert's line in one transaction (see `batcher`): paid tokens
/// become DONE if still ACTIVE inside their window, left ones EXPIRED if still WAITING or
/// ACTIVE. The freed slots go to the next fans at once, and the answer is each token's ticket
/// afterwards, in the order given. A token already DONE or EXPIRED is left as it is (ending
/// is idempotent), and so is a token of another line.
pub async fn end_batch(
    pool: &PgPool,
    policy: &AdmissionPolicy,
    concert_id: &str,
    endings: &[(Uuid, Ending)],
) -> Result<Vec<Ticket>, sqlx::Error> {
    let with = |wanted: Ending| -> Vec<Uuid> {
        endings
            .iter()
            .filter(|(_, ending)| *ending == wanted)
            .map(|(token, _)| *token)
            .collect()
    };
    let (paid, left) = (with(Ending::Paid), with(Ending::Left));
    let mut tx = pool.begin().await?;
    // The line lock: the ACTIVE count and admission change together, for every replica.
    // A WAITING fan leaves under it too. Without it, admission could make the token ACTIVE
    // between the caller's read and this UPDATE, and the slot it took would then have to be
    // given back with the line locked anyway; with it, no token of the line changes status
    // behind this transaction's back.
    let Some(mut line) = lock_line(&mut tx, concert_id, false).await? else {
        return Err(sqlx::Error::RowNotFound);
    };
    // Every UPDATE below is conditional on the token's status and on the line this
    // transaction locked: a concurrent completion, a leave or the expiry sweeper may have
    // ended a token since the caller read it, and the count corrected here is this line's,
    // so a token of another concert must never be counted, whoever grouped the batch.
    if !paid.is_empty() {
        let completed = sqlx::query(
            "UPDATE tokens SET status = 'DONE', end_time = statement_timestamp(),
                               expire_time = statement_timestamp()
              WHERE token = ANY($1) AND concert_id = $2
                AND status = 'ACTIVE' AND expire_time > statement_timestamp()",
        )
        .bind(&paid)
        .bind(concert_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        line.active_count -= completed as i64;
    }
    if !left.is_empty() {
        // An ACTIVE token gives its slot back (even past its window: it is still counted
        // until expired); a WAITING one holds no slot, and admission simply never reaches it.
        // The two parts touch disjoint rows (by status, in one snapshot), and Postgres runs
        // both to completion though only the first is counted. An ended window ends at the
        // ending, for whoever reads the ticket's `expire_time` (as a payment's does above).
        let left_active: i64 = sqlx::query_scalar(
            "WITH left_active AS (
                 UPDATE tokens SET status = 'EXPIRED', end_time = statement_timestamp(),
                                   expire_time = least(expire_time, statement_timestamp())
                  WHERE token = ANY($1) AND concert_id = $2 AND status = 'ACTIVE'
                 RETURNING 1),
             left_waiting AS (
                 UPDATE tokens SET status = 'EXPIRED', end_time = statement_timestamp()
                  WHERE token = ANY($1) AND concert_id = $2 AND status = 'WAITING')
             SELECT count(*) FROM left_active",
        )
        .bind(&left)
        .bind(concert_id)
        .fetch_one(&mut *tx)
        .await?;
        line.active_count -= left_active;
    }
    // The freed slots go to the next fans now, not at the next tick.
    advance(&mut tx, policy, &mut line).await?;
    let tokens: Vec<Uuid> = endings.iter().map(|(token, _)| *token).collect();
    let tickets = read_tickets(&mut *tx, policy, &tokens).await?;
    tx.commit().await?;
    let tickets: HashMap<Uuid, Ticket> = tickets
        .into_iter()
        .map(|ticket| (ticket.token, ticket))
        .collect();
    tokens
        .iter()
        .map(|token| tickets.get(token).cloned().ok_or(sqlx::Error::RowNotFound))
        .collect()
}

/// One background tick for one line: expire passed windows and ghosts (WAITING fans who
/// stopped polling), admit. Skips the line when another replica is working on it right now.
/// Returns how many fans were admitted.
pub async fn sweep_and_admit(
    pool: &PgPool,
    policy: &AdmissionPolicy,
    concert_id: &str,
) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(mut line) = lock_line(&mut tx, concert_id, true).await? else {
        return Ok(0);
    };
    let admitted = advance(&mut tx, policy, &mut line).await?;
    tx.commit().await?;
    Ok(admitted as i64)
}

/// Lines with fans waiting or ACTIVE: the ones background ticks must visit.
pub async fn busy_lines(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT concert_id FROM lines WHERE last_place > admitted_through OR active_count > 0",
    )
    .fetch_all(pool)
    .await
}

/// A line's counters as seen by a replica's board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineCounters {
    pub admitted_through: i64,
    pub admitted_total: i64,
    pub active_count: i64,
}

/// Counters of the busy lines and of `watched` ones, for the board's refresh.
pub async fn line_counters(
    pool: &PgPool,
    watched: &[String],
) -> Result<Vec<(String, LineCounters)>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT concert_id, admitted_through, admitted_total, active_count::int8
           FROM lines
          WHERE last_place > admitted_through OR active_count > 0 OR concert_id = ANY($1)",
    )
    .bind(watched)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(concert_id, admitted_through, admitted_total, active_count)| {
                (
                    concert_id,
                    LineCounters {
                        admitted_through,
                        admitted_total,
                        active_count,
                    },
                )
            },
        )
        .collect())
}

/// Refreshes `last_seen` of WAITING tokens that were polled or watched. SKIP LOCKED: a row
/// locked right now is being admitted or expired, and this flush must never wait in a cycle
/// with admission (see the lock order above).
pub async fn touch(pool: &PgPool, tokens: &[Uuid]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE tokens SET last_seen = statement_timestamp()
          WHERE token IN (
                SELECT token FROM tokens
                 WHERE token = ANY($1) AND status = 'WAITING'
                 FOR UPDATE SKIP LOCKED)",
    )
    .bind(tokens)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
