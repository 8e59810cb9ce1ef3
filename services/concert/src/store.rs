//! Every SQL statement of the concert service.
//!
//! Lock order, everywhere: a fan's advisory lock (HoldSeats), then hold rows (sorted by id),
//! then seat rows in seat order (`ORDER BY schedule_id, seat_number FOR UPDATE`).
//! Transactions that take the same locks in the same order queue behind each other instead
//! of deadlocking, which is what lets hundreds of overlapping multi-seat holds race without
//! a deadlock error ever reaching a client.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use stagedoor_runtime::db;
use uuid::Uuid;

use crate::domain::{ConcertError, MAX_SEATS_PER_FAN};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConcertRow {
    pub concert_id: String,
    pub title: String,
    pub artist: String,
    pub create_time: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub schedule_id: String,
    pub concert_id: String,
    pub start_time: DateTime<Utc>,
    pub venue: String,
    pub seat_count: i32,
}

/// A date with the number of its seats neither sold nor held right now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DateWithSeats {
    #[sqlx(flatten)]
    pub schedule: ScheduleRow,
    pub available: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SeatRow {
    pub seat_number: i32,
    /// AVAILABLE, HELD or SOLD, by the database's clock at the time of the read.
    pub status: String,
    pub price: i64,
    pub section: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HoldRow {
    pub hold_id: Uuid,
    pub schedule_id: String,
    pub concert_id: String,
    pub user_id: String,
    pub seat_numbers: Vec<i32>,
    pub total_price: i64,
    /// HELD, CONFIRMED, RELEASED, or EXPIRED for a HELD hold past its time.
    pub status: String,
    /// EXPIRED in the row itself: the sweeper retired it, and it can no longer be paid.
    pub retired: bool,
    pub expire_time: DateTime<Utc>,
    pub payment_id: Option<String>,
    pub request_id: String,
    pub create_time: DateTime<Utc>,
    pub start_time: DateTime<Utc>,
}

/// A seat's state, derived: a hold past its time frees the seat at that instant. The clock is
/// the statement's, not the transaction's (`now()`), since these reads also run inside hold
/// and confirm batches after lock waits (see `hold_batch`).
const SEAT_STATUS: &str = "CASE WHEN sold_to_payment IS NOT NULL THEN 'SOLD'
                               WHEN held_until > statement_timestamp() THEN 'HELD'
                               ELSE 'AVAILABLE' END";

const HOLD_SELECT: &str = "
    SELECT h.hold_id, h.schedule_id, h.concert_id, h.user_id, h.seat_numbers, h.total_price,
           CASE WHEN h.status = 'HELD' AND h.expire_time <= statement_timestamp() THEN 'EXPIRED'
                ELSE h.status END AS status,
           h.status = 'EXPIRED' AS retired,
           h.expire_time, h.payment_id, h.request_id, h.create_time, s.start_time
      FROM holds h JOIN schedules s ON s.schedule_id = h.schedule_id";

// ---- catalog ---------------------------------------------------------------------------

/// A new concert's id.
pub fn new_concert_id() -> String {
    format!("concert-{}", Uuid::new_v4().simple())
}

/// The concert created with `request_id`, if any.
pub async fn concert_by_request(
    pool: &PgPool,
    request_id: &str,
) -> Result<Option<ConcertRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT concert_id, title, artist, create_time FROM concerts WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(pool)
    .await
}

/// Creates concert `concert_id`, or returns the one created with the same `request_id` (by a
/// concurrent call: its insert wins, this one changes nothing).
pub async fn create_concert(
    pool: &PgPool,
    concert_id: &str,
    title: &str,
    artist: &str,
    request_id: &str,
) -> Result<ConcertRow, ConcertError> {
    sqlx::query(
        "INSERT INTO concerts (concert_id, title, artist, request_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(concert_id)
    .bind(title)
    .bind(artist)
    .bind(request_id)
    .execute(pool)
    .await?;
    let concert = concert_by_request(pool, request_id)
        .await?
        .ok_or_else(|| sqlx::Error::RowNotFound)?;
    same_concert(concert, title, artist)
}

/// A concert found by its request id, if it is the one asked for again.
pub fn same_concert(
    concert: ConcertRow,
    title: &str,
    artist: &str,
) -> Result<ConcertRow, ConcertError> {
    if concert.title != title || concert.artist != artist {
        return Err(ConcertError::IdempotencyKeyReused);
    }
    Ok(concert)
}

/// Every concert's id.
pub async fn concert_ids(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT concert_id FROM concerts ORDER BY concert_id")
        .fetch_all(pool)
        .await
}

/// One seat of a new date's map.
pub struct NewSeat {
    pub section: String,
    pub price: i64,
}

/// Adds a date with its seat map (seat i+1 is `seats[i]`), or returns the one added with the
/// same `request_id`.
pub async fn add_schedule(
    pool: &PgPool,
    concert_id: &str,
    start_time: DateTime<Utc>,
    venue: &str,
    seats: &[NewSeat],
    request_id: &str,
) -> Result<DateWithSeats, ConcertError> {
    let mut tx = pool.begin().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM concerts WHERE concert_id = $1)")
            .bind(concert_id)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        return Err(ConcertError::ConcertNotFound(concert_id.to_owned()));
    }
    let schedule_id = format!("date-{}", Uuid::new_v4().simple());
    let inserted = sqlx::query(
        "INSERT INTO schedules (schedule_id, concert_id, start_time, venue, seat_count, request_id)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(&schedule_id)
    .bind(concert_id)
    .bind(start_time)
    .bind(venue)
    .bind(seats.len() as i32)
    .bind(request_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        let numbers: Vec<i32> = (1..=seats.len() as i32).collect();
        let sections: Vec<&str> = seats.iter().map(|seat| seat.section.as_str()).collect();
        let prices: Vec<i64> = seats.iter().map(|seat| seat.price).collect();
        sqlx::query(
            "INSERT INTO seats (schedule_id, seat_number, section, price)
             SELECT $1, seat_number, section, price
               FROM unnest($2::int4[], $3::text[], $4::int8[]) AS seat(seat_number, section, price)",
        )
        .bind(&schedule_id)
        .bind(&numbers)
        .bind(&sections)
        .bind(&prices)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let schedule: DateWithSeats = sqlx::query_as(&format!(
        "{SCHEDULE_SELECT} WHERE sc.request_id = $1 GROUP BY sc.schedule_id"
    ))
    .bind(request_id)
    .fetch_one(pool)
    .await?;
    // The key was used before: a retry asks for the very same date. Anything else reuses the
    // key for another date, and answering the old one would hide that this one was never added.
    if inserted == 0 {
        let stored = &schedule.schedule;
        let seat_map: Vec<(String, i64)> = sqlx::query_as(
            "SELECT section, price FROM seats WHERE schedule_id = $1 ORDER BY seat_number",
        )
        .bind(&stored.schedule_id)
        .fetch_all(pool)
        .await?;
        let same_date = stored.concert_id == concert_id
            // Postgres keeps microseconds: compare at that precision.
            && stored.start_time.timestamp_micros() == start_time.timestamp_micros()
            && stored.venue == venue
            && seat_map.len() == seats.len()
            && seat_map
                .iter()
                .zip(seats)
                .all(|((section, price), seat)| *section == seat.section && *price == seat.price);
        if !same_date {
            return Err(ConcertError::IdempotencyKeyReused);
        }
    }
    Ok(schedule)
}

const SCHEDULE_SELECT: &str = "
    SELECT sc.schedule_id, sc.concert_id, sc.start_time, sc.venue, sc.seat_count,
           count(*) FILTER (WHERE st.sold_to_payment IS NULL
                              AND (st.held_until IS NULL
                                   OR st.held_until <= statement_timestamp())) AS available
      FROM schedules sc JOIN seats st ON st.schedule_id = sc.schedule_id";

/// The last concert of a ListConcerts page, in the listing's order (creation time, then id):
/// the next page starts after it. A position rather than an offset, so that a concert going
/// off sale between two pages shifts nothing (see ListConcerts in the proto).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcertCursor {
    pub create_time: DateTime<Utc>,
    pub concert_id: String,
}

/// Up to `limit` concerts on sale after `after` (from the first when `None`), oldest first.
/// On sale means at least one date has not started, sold out or not: a date's sale closes
/// when it starts, so a concert whose dates have all started has nothing left to sell.
pub async fn concerts_on_sale(
    pool: &PgPool,
    after: Option<&ConcertCursor>,
    limit: i64,
) -> Result<Vec<ConcertRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.concert_id, c.title, c.artist, c.create_time
           FROM concerts c
          WHERE ($1::timestamptz IS NULL OR (c.create_time, c.concert_id) > ($1, $2))
            AND EXISTS (SELECT 1 FROM schedules s
                         WHERE s.concert_id = c.concert_id
                           AND s.start_time > statement_timestamp())
          ORDER BY c.create_time, c.concert_id
          LIMIT $3",
    )
    .bind(after.map(|cursor| cursor.create_time))
    .bind(after.map(|cursor| cursor.concert_id.as_str()))
    .bind(limit)
    // Planned for its cursor every time: a generic plan cannot start the index scan at a
    // cursor that may be NULL, and would filter every concert before it instead.
    .persistent(false)
    .fetch_all(pool)
    .await
}

/// Whether a concert exists.
pub async fn concert_exists(pool: &PgPool, concert_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM concerts WHERE concert_id = $1)")
        .bind(concert_id)
        .fetch_one(pool)
        .await
}

/// A concert's dates still on sale (not started yet) with at least one free seat, earliest
/// first; `None` when there is no such concert. Existence is looked up only when no date is
/// listed (sold out, or a token of a line with no concert behind it), so a concert on sale
/// pays nothing for it.
pub async fn available_dates(
    pool: &PgPool,
    concert_id: &str,
) -> Result<Option<Vec<DateWithSeats>>, sqlx::Error> {
    let dates: Vec<DateWithSeats> = sqlx::query_as(&format!(
        "{SCHEDULE_SELECT}
          WHERE sc.concert_id = $1 AND sc.start_time > statement_timestamp()
          GROUP BY sc.schedule_id
         HAVING count(*) FILTER (WHERE st.sold_to_payment IS NULL
                                   AND (st.held_until IS NULL
                                        OR st.held_until <= statement_timestamp())) > 0
          ORDER BY sc.start_time, sc.schedule_id"
    ))
    .bind(concert_id)
    .fetch_all(pool)
    .await?;
    if dates.is_empty() && !concert_exists(pool, concert_id).await? {
        return Ok(None);
    }
    Ok(Some(dates))
}

/// One date (a primary-key lookup: no seat is counted).
pub async fn schedule(
    pool: &PgPool,
    schedule_id: &str,
) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT schedule_id, concert_id, start_time, venue, seat_count
           FROM schedules WHERE schedule_id = $1",
    )
    .bind(schedule_id)
    .fetch_optional(pool)
    .await
}

/// Every seat of a date, by number.
pub async fn seats(pool: &PgPool, schedule_id: &str) -> Result<Vec<SeatRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT seat_number, {SEAT_STATUS} AS status, price, section
           FROM seats WHERE schedule_id = $1 ORDER BY seat_number"
    ))
    .bind(schedule_id)
    .fetch_all(pool)
    .await
}

// ---- holds -------------------------------------------------------------------------------

/// A hold request, checked: seats distinct, ascending, within the date's map.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub schedule_id: String,
    pub concert_id: String,
    /// The fan, from the token.
    pub user_id: String,
    pub seat_numbers: Vec<i32>,
    pub request_id: String,
    /// When the date starts: its sale closes then.
    pub start_time: DateTime<Utc>,
}

/// Makes the holds of a batch of requests that arrived together, in one transaction. Each
/// request gets all its seats or none, and its own answer, in the order of `requests`.
///
/// The transaction takes its locks in one global order, so batches of several replicas
/// queue behind each other instead of deadlocking: first the fans' advisory locks (sorted),
/// then every seat of the batch (sorted by date and number: the module's seat order). With
/// everything locked, the winners are decided in memory in arrival order, which is how a
/// race for one seat has exactly one winner inside a batch; across batches the seat locks
/// decide.
pub async fn hold_batch(
    pool: &PgPool,
    ttl: Duration,
    requests: &[HoldRequest],
) -> Result<Vec<Result<HoldRow, ConcertError>>, sqlx::Error> {
    let users: Vec<&str> = requests.iter().map(|r| r.user_id.as_str()).collect();
    let dates: Vec<&str> = requests.iter().map(|r| r.schedule_id.as_str()).collect();
    let keys: Vec<&str> = requests.iter().map(|r| r.request_id.as_str()).collect();
    let mut answers: Vec<Option<Result<HoldRow, ConcertError>>> =
        requests.iter().map(|_| None).collect();

    // The clock of every statement below is `statement_timestamp()`, not `now()`: `now()` is
    // when the transaction began, and a batch may wait long on the locks behind another
    // replica's batch. A hold that expired meanwhile must count as gone, and a new hold must
    // get its full time from when it is written.
    //
    // Every statement below is sent unprepared: they join batches against tables that fill
    // up during a rush, and a plan cached while `holds` was empty (a scan) would be kept as
    // it grows (see the plan note in libs/runtime/src/db.rs). Planning once per batch is cheap.
    let mut tx = pool.begin().await?;
    // One fan's holds are serialised, so two concurrent holds of the same fan (in two
    // batches, or on two replicas) cannot both pass the 4-seat limit, nor both take one
    // request_id: keys are the fan's across dates (holds_request_once), so the lock is the
    // fan's, whatever the date. (Per fan and date, two batches of one fan on two dates both
    // found a reused key free; the later insert was skipped after its batch had refused other
    // fans the seat it thought taken, a seat then refused for nobody.) Other fans never wait
    // on it. It is its own statement: the next ones' snapshots then see whatever the previous
    // holder of a lock committed.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(key)
           FROM (SELECT DISTINCT hashtextextended('hold/' || user_id, 0) AS key
                   FROM unnest($1::text[]) AS fan (user_id)
                  ORDER BY key) AS keys",
    )
    .bind(&users)
    .persistent(false)
    .execute(&mut *tx)
    .await?;

    // Lock every seat of the batch in seat order and read it under the lock.
    let (seat_dates, seat_numbers): (Vec<&str>, Vec<i32>) = requests
        .iter()
        .flat_map(|r| r.seat_numbers.iter().map(|n| (r.schedule_id.as_str(), *n)))
        .unzip();
    let locked = lock_seats(&mut tx, &seat_dates, &seat_numbers).await?;

    // Retries: a request whose key already made a hold gets that hold back (or is refused
    // if the key was used for other seats), and changes no seat. Read after the seat locks:
    // ReleaseHold, ConfirmHold and the sweeper change a hold together with its seats, so a
    // change that committed while this batch waited for those seats is in the answer ("the
    // same hold as it is now"), where a read before the wait answered HELD for a hold the
    // fan had meanwhile released or paid.
    let earlier: Vec<HoldRow> = sqlx::query_as(&format!(
        "{HOLD_SELECT}
           JOIN unnest($1::text[], $2::text[]) AS k (user_id, request_id)
             ON h.user_id = k.user_id AND h.request_id = k.request_id"
    ))
    .bind(&users)
    .bind(&keys)
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    for (answer, request) in answers.iter_mut().zip(requests) {
        if let Some(existing) = earlier
            .iter()
            .find(|h| h.user_id == request.user_id && h.request_id == request.request_id)
        {
            *answer = Some(replay_hold(existing.clone(), request));
        }
    }

    // Seats each fan already holds on each date (live holds only), under the fans' locks,
    // and the clock every decision of this batch is made by. This statement runs after the
    // seat locks were granted, however long that took: a hold that expired while this batch
    // waited behind another replica's counts as gone, for its seats and for its fan's limit.
    // (One row always, so the clock comes back when nobody holds anything.)
    let (clock, fan_users, fan_dates, fan_counts): FanHolds = sqlx::query_as(
        "SELECT statement_timestamp(), array_agg(user_id), array_agg(schedule_id),
                array_agg(seats)
           FROM (SELECT user_id, schedule_id, sum(cardinality(seat_numbers))::int8 AS seats
                   FROM holds
                  WHERE (user_id, schedule_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                    AND status = 'HELD' AND expire_time > statement_timestamp()
                  GROUP BY user_id, schedule_id) AS fan",
    )
    .bind(&users)
    .bind(&dates)
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    let (fan_users, fan_dates) = (fan_users.unwrap_or_default(), fan_dates.unwrap_or_default());
    let mut held: HashMap<(&str, &str), i64> = fan_users
        .iter()
        .zip(&fan_dates)
        .zip(fan_counts.unwrap_or_default())
        .map(|((user, date), count)| ((user.as_str(), date.as_str()), count))
        .collect();

    // A seat is free when it is not sold and any hold on it has passed its time.
    let mut seats: HashMap<(&str, i32), (bool, i64)> = locked
        .iter()
        .map(|seat| {
            let free = seat.unsold && seat.held_until.is_none_or(|until| until <= clock);
            (
                (seat.schedule_id.as_str(), seat.seat_number),
                (free, seat.price),
            )
        })
        .collect();

    // Decide in arrival order. A winner's seats stop being free for the requests after it.
    let mut winners: Vec<(usize, Uuid, i64)> = Vec::new();
    let mut first_of_key: HashMap<(&str, &str), usize> = HashMap::new();
    // (a copy, its first): the same request twice in one batch, answered after the first.
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        if answers[index].is_some() {
            continue;
        }
        let key = (request.user_id.as_str(), request.request_id.as_str());
        if let Some(&first) = first_of_key.get(&key) {
            repeats.push((index, first));
            continue;
        }
        first_of_key.insert(key, index);
        // Judged by the batch's clock, after the locks and after the replays above: a retry
        // of a hold made before the start still gets its hold back, and a batch that waited
        // on the locks across the start makes no hold after it.
        if request.start_time <= clock {
            answers[index] = Some(Err(ConcertError::SaleClosed {
                schedule_id: request.schedule_id.clone(),
                start_time: request.start_time,
            }));
            continue;
        }
        let date = request.schedule_id.as_str();
        let taken: Vec<i32> = request
            .seat_numbers
            .iter()
            .copied()
            .filter(|n| !seats.get(&(date, *n)).is_some_and(|seat| seat.0))
            .collect();
        if !taken.is_empty() {
            answers[index] = Some(Err(ConcertError::SeatUnavailable(taken)));
            continue;
        }
        let fan = held.entry((request.user_id.as_str(), date)).or_insert(0);
        if *fan as usize + request.seat_numbers.len() > MAX_SEATS_PER_FAN {
            answers[index] = Some(Err(ConcertError::HoldLimitExceeded {
                held: *fan,
                asked: request.seat_numbers.len(),
            }));
            continue;
        }
        *fan += request.seat_numbers.len() as i64;
        let mut total_price = 0;
        for number in &request.seat_numbers {
            let seat = seats.get_mut(&(date, *number)).expect("checked free above");
            seat.0 = false;
            total_price += seat.1;
        }
        winners.push((index, Uuid::new_v4(), total_price));
    }

    // The winners' holds and their seats in one statement. Every key was looked up under
    // the fans' locks, so a conflict cannot happen; DO NOTHING keeps one from failing the
    // whole batch if it ever did (that request is then answered from the table below).
    let column = |pick: fn(&HoldRequest) -> String| -> Vec<String> {
        winners
            .iter()
            .map(|(i, _, _)| pick(&requests[*i]))
            .collect()
    };
    let written: Vec<HoldRow> = sqlx::query_as(
        "WITH hold AS (
             INSERT INTO holds (hold_id, schedule_id, concert_id, user_id, seat_numbers,
                                total_price, status, expire_time, request_id)
             SELECT w.hold_id, w.schedule_id, w.concert_id, w.user_id, w.seats::int4[],
                    w.total_price, 'HELD', statement_timestamp() + make_interval(secs => $8),
                    w.request_id
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::int8[], $7::text[])
                    AS w (hold_id, schedule_id, concert_id, user_id, seats, total_price,
                          request_id)
             ON CONFLICT DO NOTHING
             RETURNING *),
         held AS (
             UPDATE seats SET held_by = hold.hold_id, held_until = hold.expire_time
               FROM hold
              WHERE seats.schedule_id = hold.schedule_id
                AND seats.seat_number = ANY(hold.seat_numbers))
         SELECT h.hold_id, h.schedule_id, h.concert_id, h.user_id, h.seat_numbers,
                h.total_price, h.status, false AS retired, h.expire_time, h.payment_id,
                h.request_id, h.create_time, s.start_time
           FROM hold h JOIN schedules s ON s.schedule_id = h.schedule_id",
    )
    .bind(winners.iter().map(|w| w.1).collect::<Vec<Uuid>>())
    .bind(column(|r| r.schedule_id.clone()))
    .bind(column(|r| r.concert_id.clone()))
    .bind(column(|r| r.user_id.clone()))
    .bind(column(|r| db::int4_array_literal(&r.seat_numbers)))
    .bind(winners.iter().map(|w| w.2).collect::<Vec<i64>>())
    .bind(column(|r| r.request_id.clone()))
    .bind(ttl.as_secs_f64())
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut written: HashMap<Uuid, HoldRow> = written
        .into_iter()
        .map(|hold| (hold.hold_id, hold))
        .collect();
    for (index, hold_id, _) in &winners {
        if let Some(hold) = written.remove(hold_id) {
            answers[*index] = Some(Ok(hold));
        }
    }
    // A copy of a refused request gets the same refusal (a double click on a hold the fan's
    // limit refuses is HOLD_LIMIT_EXCEEDED twice, not once that and once SEAT_UNAVAILABLE).
    // Only an identical copy: a key reused for other seats is judged as before, below.
    for (copy, first) in repeats {
        let (asked, first_asked) = (&requests[copy], &requests[first]);
        if asked.schedule_id != first_asked.schedule_id
            || asked.seat_numbers != first_asked.seat_numbers
        {
            // The key, reused for other seats, made nothing: the first copy was refused,
            // and a refusal is not kept. Judged alone, this request would have been weighed
            // on its own seats; it was not, so it is told to retry rather than refused for
            // seats nobody checked.
            if matches!(answers[first], Some(Err(_))) {
                answers[copy] = Some(Err(ConcertError::KeyRefusedMeanwhile));
            }
            continue;
        }
        answers[copy] = match &answers[first] {
            Some(Err(ConcertError::SeatUnavailable(seats))) => {
                Some(Err(ConcertError::SeatUnavailable(seats.clone())))
            }
            Some(Err(ConcertError::HoldLimitExceeded { held, asked })) => {
                Some(Err(ConcertError::HoldLimitExceeded {
                    held: *held,
                    asked: *asked,
                }))
            }
            Some(Err(ConcertError::SaleClosed {
                schedule_id,
                start_time,
            })) => Some(Err(ConcertError::SaleClosed {
                schedule_id: schedule_id.clone(),
                start_time: *start_time,
            })),
            _ => None,
        };
    }
    // Whatever is still unanswered repeated a key of this batch (or, in theory, lost its
    // insert to a conflict): the table now says what that key made.
    let mut answered = Vec::with_capacity(requests.len());
    for (answer, request) in answers.into_iter().zip(requests) {
        answered.push(match answer {
            Some(answer) => answer,
            // After the commit: a lookup that fails fails this call alone, never the batch's
            // winners, whose holds are made.
            None => match hold_by_request(pool, &request.user_id, &request.request_id).await {
                Ok(Some(existing)) => replay_hold(existing, request),
                // Its first copy lost the seats.
                Ok(None) => Err(ConcertError::SeatUnavailable(request.seat_numbers.clone())),
                Err(error) => Err(ConcertError::Database(error)),
            },
        });
    }
    Ok(answered)
}

/// The batch's clock, then the seats each of its fans holds per date (three parallel arrays,
/// NULL when nobody holds anything).
type FanHolds = (
    DateTime<Utc>,
    Option<Vec<String>>,
    Option<Vec<String>>,
    Option<Vec<i64>>,
);

/// A seat's row as a transaction sees it under its lock.
#[derive(Debug, sqlx::FromRow)]
struct LockedSeat {
    schedule_id: String,
    seat_number: i32,
    held_by: Option<Uuid>,
    /// Until when its hold keeps it, if it has one (which may have passed).
    held_until: Option<DateTime<Utc>>,
    unsold: bool,
    price: i64,
}

/// Locks the seats `(dates[i], numbers[i])` in the module's seat order (date, then number),
/// the one order every transaction here takes seats in, and reads them under the lock.
async fn lock_seats(
    tx: &mut sqlx::PgConnection,
    dates: &[&str],
    numbers: &[i32],
) -> Result<Vec<LockedSeat>, sqlx::Error> {
    sqlx::query_as(
        "SELECT schedule_id, seat_number, held_by, held_until,
                sold_to_payment IS NULL AS unsold,
                price
           FROM seats
          WHERE (schedule_id, seat_number) IN (SELECT * FROM unnest($1::text[], $2::int4[]))
          ORDER BY schedule_id, seat_number
            FOR UPDATE",
    )
    .bind(dates)
    .bind(numbers)
    .persistent(false)
    .fetch_all(tx)
    .await
}

/// Reads holds by id (any fan's), from the pool or inside a transaction; unknown ids are
/// absent from the answer.
pub async fn holds<'e>(
    db: impl sqlx::PgExecutor<'e>,
    hold_ids: &[Uuid],
) -> Result<Vec<HoldRow>, sqlx::Error> {
    sqlx::query_as(&format!("{HOLD_SELECT} WHERE h.hold_id = ANY($1)"))
        .bind(hold_ids)
        .fetch_all(db)
        .await
}

async fn hold_by_request(
    pool: &PgPool,
    user_id: &str,
    request_id: &str,
) -> Result<Option<HoldRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{HOLD_SELECT} WHERE h.user_id = $1 AND h.request_id = $2"
    ))
    .bind(user_id)
    .bind(request_id)
    .fetch_optional(pool)
    .await
}

/// A retry gets its hold back; the same key for another date or other seats is refused.
fn replay_hold(existing: HoldRow, request: &HoldRequest) -> Result<HoldRow, ConcertError> {
    if existing.schedule_id == request.schedule_id && existing.seat_numbers == request.seat_numbers
    {
        Ok(existing)
    } else {
        Err(ConcertError::IdempotencyKeyReused)
    }
}

/// Reads the hold as the transaction left it, then commits.
async fn read_and_commit(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    hold_id: Uuid,
) -> Result<HoldRow, ConcertError> {
    let hold: HoldRow = sqlx::query_as(&format!("{HOLD_SELECT} WHERE h.hold_id = $1"))
        .bind(hold_id)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(hold)
}

/// The fan cancels their hold; its seats are free at once. Idempotent. The token must be
/// of the hold's concert, like every call that acts on a concert's seats.
pub async fn release(
    pool: &PgPool,
    hold_id: Uuid,
    user_id: &str,
    token_concert: &str,
) -> Result<HoldRow, ConcertError> {
    let mut tx = pool.begin().await?;
    // The hold's row first, then its seats (lock order).
    let current: Option<(String, String, String, String, Vec<i32>)> = sqlx::query_as(
        "SELECT status, user_id, concert_id, schedule_id, seat_numbers
           FROM holds WHERE hold_id = $1 FOR UPDATE",
    )
    .bind(hold_id)
    .fetch_optional(&mut *tx)
    .await?;
    match current {
        Some((_, owner, ..)) if owner != user_id => {
            return Err(ConcertError::HoldNotFound(hold_id.to_string()))
        }
        None => return Err(ConcertError::HoldNotFound(hold_id.to_string())),
        Some((_, _, concert, ..)) if concert != token_concert => {
            return Err(ConcertError::WrongConcert {
                token_concert: token_concert.to_owned(),
                concert,
            })
        }
        Some((status, ..)) if status == "CONFIRMED" => {
            return Err(ConcertError::HoldNotHeld("CONFIRMED"))
        }
        // Released before, or retired by the sweeper: its seats are free already.
        Some((status, ..)) if status == "RELEASED" || status == "EXPIRED" => {}
        // Still HELD in its row, live or past its time: either way the fan's cancel is
        // final, so a payment still on its way can no longer buy an expired hold's seats.
        Some((_, _, _, schedule_id, seat_numbers)) => {
            sqlx::query("UPDATE holds SET status = 'RELEASED' WHERE hold_id = $1")
                .bind(hold_id)
                .execute(&mut *tx)
                .await?;
            unmark_seats(&mut tx, &[(hold_id, schedule_id, seat_numbers)]).await?;
        }
    }
    read_and_commit(tx, hold_id).await
}

/// The hold sweeper's pass: retires up to `limit` unpaid holds whose time ran out more than
/// `grace` ago. Each becomes EXPIRED in its row, and its seats lose its mark where they still
/// carry it. Returns how many holds were retired (fewer than `limit`: nothing is left).
///
/// Nobody waits for this: a hold past its `expire_time` already reads as EXPIRED and its
/// seats as AVAILABLE. The grace keeps the paid-after-expiry rule working for payments that
/// were on their way when the hold ran out (ConfirmHold recognises an untaken seat by the
/// hold's mark on it, which this removes). Any number of replicas may sweep at once.
pub async fn retire_expired_holds(
    pool: &PgPool,
    grace: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Holds first, then their seats: the module's lock order. SKIP LOCKED because a hold
    // locked right now is being confirmed or released, and its owner will decide it; the
    // sweeper takes it on a later pass if it is still unpaid then. (SKIP LOCKED never waits,
    // so the order the holds are taken in cannot deadlock.) Oldest first, in the order of
    // the partial index `holds_held_by_expiry`: the search reads one chunk of that index and
    // stops. Ordered by `hold_id`, Postgres either sorted the whole backlog or walked the
    // primary key through every sold hold of the table (BENCHMARKS.md, "The hold sweeper's
    // search").
    let retired: Vec<(Uuid, String, Vec<i32>)> = sqlx::query_as(
        "UPDATE holds SET status = 'EXPIRED'
          WHERE hold_id IN (
                SELECT hold_id FROM holds
                 WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => $1)
                 ORDER BY expire_time
                 LIMIT $2
                   FOR UPDATE SKIP LOCKED)
         RETURNING hold_id, schedule_id, seat_numbers",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if retired.is_empty() {
        return Ok(0);
    }
    unmark_seats(&mut tx, &retired).await?;
    tx.commit().await?;
    Ok(retired.len() as u64)
}

/// Takes each hold's mark off its seats `(hold_id, schedule_id, seat_numbers)`, where a seat
/// still carries it: a seat taken by another fan since the hold expired (or sold) belongs to
/// them. The seats are found by their key and locked in seat order like everywhere else
/// here, so this cannot deadlock with a batch of holds or confirms.
async fn unmark_seats(
    tx: &mut sqlx::PgConnection,
    holds: &[(Uuid, String, Vec<i32>)],
) -> Result<(), sqlx::Error> {
    let (mut dates, mut numbers, mut marks) = (Vec::new(), Vec::new(), Vec::new());
    for (hold_id, date, seats) in holds {
        for number in seats {
            dates.push(date.as_str());
            numbers.push(*number);
            marks.push(*hold_id);
        }
    }
    sqlx::query(
        "UPDATE seats SET held_by = NULL, held_until = NULL
          WHERE (schedule_id, seat_number) IN (
                SELECT s.schedule_id, s.seat_number
                  FROM seats s
                  JOIN unnest($1::text[], $2::int4[], $3::uuid[]) AS r (schedule_id, seat_number, hold_id)
                    ON s.schedule_id = r.schedule_id AND s.seat_number = r.seat_number
                 WHERE s.held_by = r.hold_id AND s.sold_to_payment IS NULL
                 ORDER BY s.schedule_id, s.seat_number
                   FOR UPDATE OF s)",
    )
    .bind(&dates)
    .bind(&numbers)
    .bind(&marks)
    .persistent(false)
    .execute(tx)
    .await?;
    Ok(())
}

/// A ConfirmHold call, checked.
#[derive(Debug, Clone)]
pub struct ConfirmRequest {
    pub hold_id: Uuid,
    pub payment_id: String,
}

/// A hold's row as ConfirmHold sees it under its lock (the raw status: HELD, CONFIRMED,
/// RELEASED, or EXPIRED once the sweeper retired it).
#[derive(Debug, sqlx::FromRow)]
struct LockedHold {
    hold_id: Uuid,
    status: String,
    payment_id: Option<String>,
    schedule_id: String,
    seat_numbers: Vec<i32>,
}

/// Sells the seats of a batch of holds, each to its payment, in one transaction; each call
/// gets its own answer, in the order of `requests`. Idempotent per payment: a hold already
/// sold to the same payment answers as sold. See the proto for the paid-after-expiry rule.
///
/// Locks in the module's order: every hold row of the batch (sorted by id), then every seat
/// (sorted by date and number). ReleaseHold takes a hold before its seats and HoldSeats takes
/// no existing hold at all, so no two transactions wait on each other in a circle.
pub async fn confirm_batch(
    pool: &PgPool,
    requests: &[ConfirmRequest],
) -> Result<Vec<Result<HoldRow, ConcertError>>, sqlx::Error> {
    let hold_ids: Vec<Uuid> = requests.iter().map(|r| r.hold_id).collect();

    let mut tx = pool.begin().await?;
    let locked: Vec<LockedHold> = sqlx::query_as(
        "SELECT hold_id, status, payment_id, schedule_id, seat_numbers
           FROM holds
          WHERE hold_id = ANY($1)
          ORDER BY hold_id
            FOR UPDATE",
    )
    .bind(&hold_ids)
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    // Status and buyer are updated below as this batch decides.
    let mut locked_holds: HashMap<Uuid, LockedHold> =
        locked.into_iter().map(|h| (h.hold_id, h)).collect();
    // A payment buys one hold: the holds this batch's payments bought already (index
    // `holds_by_payment`), and below the ones it sells. The payment service never confirms
    // two holds with one payment; this keeps a caller that did from being sold the second
    // hold's seats for the first one's points. (Two batches confirming two holds with one
    // payment at the very same moment could both pass: that takes a caller racing itself.)
    let payment_ids: Vec<&str> = requests.iter().map(|r| r.payment_id.as_str()).collect();
    let mut bought: HashMap<String, Uuid> =
        sqlx::query_as("SELECT payment_id, hold_id FROM holds WHERE payment_id = ANY($1)")
            .bind(&payment_ids)
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();

    // Lock the seats of every hold that may be sold, in seat order, and look at them.
    let (seat_dates, seat_numbers): (Vec<&str>, Vec<i32>) = locked_holds
        .values()
        .filter(|hold| hold.status == "HELD")
        .flat_map(|hold| {
            let date = hold.schedule_id.as_str();
            hold.seat_numbers.iter().map(move |n| (date, *n))
        })
        .unzip();
    let seats = lock_seats(&mut tx, &seat_dates, &seat_numbers).await?;
    // A seat still belongs to a hold when the hold's id is on it and it is unsold, whether
    // or not the hold's time has passed. A seat re-held by anyone since the hold expired
    // names another hold.
    let still_held: HashSet<(&str, i32, Uuid)> = seats
        .iter()
        .filter_map(|seat| {
            seat.held_by
                .filter(|_| seat.unsold)
                .map(|hold| (seat.schedule_id.as_str(), seat.seat_number, hold))
        })
        .collect();

    // Decide in arrival order; a hold sold here answers its later copies as CONFIRMED.
    let mut sold: Vec<(Uuid, String)> = Vec::new();
    let decisions: Vec<Result<(), ConcertError>> = requests
        .iter()
        .map(|request| {
            let Some(hold) = locked_holds.get_mut(&request.hold_id) else {
                return Err(ConcertError::HoldNotFound(request.hold_id.to_string()));
            };
            if let Some(other) = bought.get(&request.payment_id) {
                if *other != request.hold_id {
                    return Err(ConcertError::PaymentBoughtAnotherHold {
                        payment_id: request.payment_id.clone(),
                        hold_id: other.to_string(),
                    });
                }
            }
            match hold.status.as_str() {
                "CONFIRMED" if hold.payment_id.as_deref() == Some(request.payment_id.as_str()) => {
                    Ok(())
                }
                "CONFIRMED" => Err(ConcertError::HoldNotHeld("CONFIRMED")),
                "RELEASED" => Err(ConcertError::HoldNotHeld("RELEASED")),
                // Retired by the sweeper, its seats unmarked: too late to pay.
                "EXPIRED" => Err(ConcertError::HoldExpired),
                _ if hold.seat_numbers.iter().all(|n| {
                    still_held.contains(&(hold.schedule_id.as_str(), *n, request.hold_id))
                }) =>
                {
                    hold.status = "CONFIRMED".to_owned();
                    hold.payment_id = Some(request.payment_id.clone());
                    bought.insert(request.payment_id.clone(), request.hold_id);
                    sold.push((request.hold_id, request.payment_id.clone()));
                    Ok(())
                }
                // Some seat was taken since the hold expired: nothing of it is sold.
                _ => Err(ConcertError::HoldExpired),
            }
        })
        .collect();

    // The sold holds and their seats, in one statement.
    let (sold_holds, buyers): (Vec<Uuid>, Vec<String>) = sold.into_iter().unzip();
    if !sold_holds.is_empty() {
        sqlx::query(
            "WITH sale AS (
             UPDATE holds SET status = 'CONFIRMED', payment_id = s.payment_id
               FROM unnest($1::uuid[], $2::text[]) AS s (hold_id, payment_id)
              WHERE holds.hold_id = s.hold_id
             RETURNING holds.hold_id, holds.schedule_id, holds.seat_numbers, holds.payment_id)
         UPDATE seats SET sold_to_payment = sale.payment_id, held_by = NULL, held_until = NULL
           FROM sale
          WHERE seats.schedule_id = sale.schedule_id
            AND seats.seat_number = ANY(sale.seat_numbers)",
        )
        .bind(&sold_holds)
        .bind(&buyers)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    }
    // Every hold as this transaction leaves it, read before the commit.
    let answered = holds(&mut *tx, &hold_ids).await?;
    tx.commit().await?;

    let answered: HashMap<Uuid, HoldRow> = answered.into_iter().map(|h| (h.hold_id, h)).collect();
    Ok(decisions
        .into_iter()
        .zip(requests)
        .map(|(decision, request)| decision.map(|()| answered[&request.hold_id].clone()))
        .collect())
}
