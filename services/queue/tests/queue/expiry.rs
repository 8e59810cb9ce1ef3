use std::time::Duration;

use stagedoor_proto::queue::v1 as pb;
use stagedoor_runtime::time::from_timestamp;
use stagedoor_testkit::TestDatabase;
use tonic::Code;

use crate::{issue_one_batch, on_expiry_of, open_line, open_line_with_policy, reason};

#[tokio::test]
async fn an_active_window_ends_and_the_next_fan_gets_in() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        settings.active_ttl = Duration::from_secs(600);
    })
    .await;

    let first = queue.issue("c", "first").await;
    let second = queue.issue("c", "second").await;
    assert_eq!(first.status(), pb::TokenStatus::Active);
    assert_eq!(second.status(), pb::TokenStatus::Waiting);
    // The window is the configured ACTIVE TTL, from the admission on.
    let stamp = |at: &Option<prost_types::Timestamp>| from_timestamp(at.as_ref().unwrap()).unwrap();
    assert_eq!(
        stamp(&first.expire_time) - stamp(&first.admit_time),
        chrono::Duration::seconds(600)
    );
    // The window ends now, by Postgres's clock (what expiry is judged by), rather than after
    // a short TTL that a slow run could outlast before `second` even entered.
    let admin = database.admin().await;
    sqlx::query("UPDATE queue.tokens SET expire_time = clock_timestamp() WHERE user_id = 'first'")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;

    // `second` keeps polling (which keeps it alive) until it is admitted.
    let admitted = queue
        .wait_for(
            &second.token,
            pb::TokenStatus::Active,
            Duration::from_secs(5),
        )
        .await;
    let expired = queue.status(&first.token).await;
    assert_eq!(expired.status(), pb::TokenStatus::Expired);

    // The window is exact: ValidateToken refuses the expired token...
    let refused = queue.validate(&first.token).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "TOKEN_NOT_ACTIVE");
    // ...and the slot went to the next fan only once the window had ended. (How soon after is
    // a matter of ticks and of the machine's load: the wait above bounds it, loosely.)
    let window_end = from_timestamp(&expired.expire_time.unwrap()).unwrap();
    let admit_time = from_timestamp(&admitted.admit_time.unwrap()).unwrap();
    assert!(admit_time >= window_end);

    // A fan whose token expired enters again at the back with a new token.
    let again = queue.issue("c", "first").await;
    assert_ne!(again.token, first.token);
    assert_eq!(again.place, 3);
}

#[tokio::test]
async fn a_waiting_fan_who_stops_polling_expires() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        settings.idle_ttl = Duration::from_secs(2);
    })
    .await;

    let holder = queue.issue("c", "holder").await; // ACTIVE, holds the only slot
    let ghost = queue.issue("c", "ghost").await; // never polls again
    let patient = queue.issue("c", "patient").await; // polls
    assert_eq!(holder.status(), pb::TokenStatus::Active);

    // The patient fan polls every 50 ms until the ghost is swept (read from its row: a poll
    // would be a sign of life), about 3 s in (the TTL, a heartbeat period and the flushes'
    // allowance); 20 s is a run gone wrong.
    let admin = database.admin().await;
    let gave_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while crate::row_status(admin.clone(), ghost.token.clone()).await != "EXPIRED" {
        assert!(
            tokio::time::Instant::now() < gave_up,
            "the ghost was never swept"
        );
        assert_eq!(
            queue.status(&patient.token).await.status(),
            pb::TokenStatus::Waiting
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.close().await;
    assert_eq!(
        queue.status(&ghost.token).await.status(),
        pb::TokenStatus::Expired
    );

    // When the slot frees, the patient fan is next: the ghost is skipped.
    assert_eq!(
        queue.complete(&holder.token).await.unwrap(),
        pb::TokenStatus::Done
    );
    // ValidateToken reads the row: the patient fan was admitted by CompleteToken itself.
    let admitted = queue
        .validate(&patient.token)
        .await
        .expect("admitted at once");
    assert_eq!(admitted.user_id, "patient");
}

#[tokio::test]
async fn complete_token_frees_the_slot_at_once_and_is_idempotent() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        // A slow tick: the next fan must be admitted by CompleteToken itself, not by the loop.
        settings.tick = Duration::from_secs(60);
    })
    .await;

    let paying = queue.issue("c", "paying").await;
    let next = queue.issue("c", "next").await;
    assert_eq!(next.status(), pb::TokenStatus::Waiting);

    // A WAITING token cannot be completed, and trying changes nothing.
    let refused = queue.complete(&next.token).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "TOKEN_NOT_ACTIVE");
    assert_eq!(
        queue.status(&next.token).await.status(),
        pb::TokenStatus::Waiting
    );

    assert_eq!(
        queue.complete(&paying.token).await.unwrap(),
        pb::TokenStatus::Done
    );
    queue
        .validate(&next.token)
        .await
        .expect("the next fan is ACTIVE at once");
    // Polls catch up within a board refresh.
    queue
        .wait_for(&next.token, pb::TokenStatus::Active, Duration::from_secs(2))
        .await;
    // Twice is fine and frees nothing more.
    assert_eq!(
        queue.complete(&paying.token).await.unwrap(),
        pb::TokenStatus::Done
    );
    let validated = queue.validate(&paying.token).await.unwrap_err();
    assert_eq!(reason(&validated), "TOKEN_NOT_ACTIVE");

    let (active,): (i32,) = database
        .row("SELECT active_count FROM queue.lines WHERE concert_id = 'c'")
        .await;
    assert_eq!(active, 1);
}

#[tokio::test]
async fn a_window_that_ends_while_the_fan_asks_again_gets_a_new_token() {
    // IssueToken expires the line's ended windows, then reads the fan's live token, two
    // statements with two clocks. A window that ends between them read EXPIRED, and the fan
    // was handed the dead token instead of a new one. `fan`'s window is ended from inside
    // the first pass (by `stalled`'s expiry, after the pass read its clock), so it ends in
    // that gap every time.
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 5;
        // No background tick: only the IssueToken call under test expires windows.
        settings.tick = Duration::from_secs(3_600);
    })
    .await;
    let stalled = queue.issue("c", "stalled").await;
    let fan = queue.issue("c", "fan").await;
    assert_eq!(fan.status(), pb::TokenStatus::Active);

    on_expiry_of(
        &database,
        "stalled",
        "UPDATE queue.tokens SET expire_time = clock_timestamp() WHERE user_id = 'fan';",
    )
    .await;
    let admin = database.admin().await;

    let again = queue.issue("c", "fan").await;
    assert_ne!(again.status(), pb::TokenStatus::Expired, "{again:?}");
    assert_ne!(again.token, fan.token, "a new token, at the back");
    assert!(again.place > stalled.place.max(fan.place));
    // The case happened: the first pass ended `stalled`'s window alone, a second one `fan`'s.
    let ends: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT user_id, end_time FROM queue.tokens WHERE status = 'EXPIRED' ORDER BY end_time",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(
        matches!(ends.as_slice(), [(first, a), (second, b)]
            if first == "stalled" && second == "fan" && a < b),
        "not ended by two passes: {ends:?}"
    );
    admin.close().await;
}

#[tokio::test]
async fn a_window_that_the_second_expiry_pass_ends_is_not_answered_active() {
    // When a window ended between IssueToken's first expiry pass and its read, a second pass
    // runs, by a later clock still: it may end windows the read saw ACTIVE. Those fans used
    // to be told ACTIVE of a row that was EXPIRED when the answer left. From inside the first
    // pass, `fan`'s window is ended (which calls for the second pass) and `other`'s set to
    // end 2 s later; a row-level policy holds the read 2 s on `other`'s row, so the read
    // sees `other` ACTIVE (it starts within a round trip of the first pass) and the second
    // pass sees it ended. The policy records what the read saw, so a run too slow for that
    // fails rather than passing untested. `fan` and `other` ask again in one batch.
    let database = TestDatabase::create().await;
    let (queue, policy) = open_line_with_policy(&database, |settings| {
        settings.max_active = 5;
        settings.tick = Duration::from_secs(3_600); // no background sweep
    })
    .await;
    let stalled = queue.issue("c", "stalled").await;
    let fan = queue.issue("c", "fan").await;
    let other = queue.issue("c", "other").await;
    for ticket in [&stalled, &fan, &other] {
        assert_eq!(ticket.status(), pb::TokenStatus::Active);
    }

    on_expiry_of(
        &database,
        "stalled",
        "UPDATE queue.tokens SET expire_time = clock_timestamp() WHERE user_id = 'fan';
         UPDATE queue.tokens SET expire_time = clock_timestamp() + interval '2 seconds'
          WHERE user_id = 'other';",
    )
    .await;
    let admin = database.admin().await;
    for statement in [
        "CREATE TABLE queue.reads_of_other (saw_active boolean NOT NULL)",
        // The read is the statement that computes `idle_secs`; the policy holds the service's
        // own role to it too (FORCE), and lets every row through. SECURITY DEFINER: the
        // record table is the test's. `statement_timestamp()` is the read's own clock, the
        // one its status is computed by.
        "CREATE FUNCTION queue.slow_read(fan text, window_end timestamptz) RETURNS boolean
           LANGUAGE plpgsql SECURITY DEFINER AS
           $$ BEGIN
                IF fan = 'other' AND current_query() LIKE '%idle_secs%' THEN
                    INSERT INTO queue.reads_of_other
                    VALUES (window_end > statement_timestamp());
                    PERFORM pg_sleep(2);
                END IF;
                RETURN true;
              END $$",
    ] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    stagedoor_testkit::RowPolicy::force(
        &admin,
        "queue.tokens",
        "slow_read",
        "queue.slow_read(user_id, expire_time)",
    )
    .await;

    let tickets = issue_one_batch(&database, &policy, &["fan", "other"]).await;
    let ticket_of = |user: &str| &tickets[user];
    assert_ne!(ticket_of("fan").token.to_string(), fan.token);
    let other_again = ticket_of("other");
    // The case happened: the read saw `other` ACTIVE, `stalled` went in the first pass,
    // `fan` and `other` together in the second (one statement, one end time).
    let (reads, all_active): (i64, Option<bool>) =
        sqlx::query_as("SELECT count(*), bool_and(saw_active) FROM queue.reads_of_other")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(
        reads > 0 && all_active == Some(true),
        "the read did not see `other` ACTIVE ({reads} reads): too slow a run"
    );
    let ends: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT user_id, end_time FROM queue.tokens
          WHERE user_id IN ('stalled', 'fan', 'other') AND status = 'EXPIRED'
          ORDER BY user_id",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    let end_of = |user: &str| ends.iter().find(|(id, _)| id == user).map(|(_, end)| *end);
    assert!(
        end_of("stalled").is_some()
            && end_of("fan") == end_of("other")
            && end_of("stalled") < end_of("fan"),
        "not ended by one second pass: {ends:?}"
    );
    assert_ne!(
        other_again.token.to_string(),
        other.token,
        "told ACTIVE of an EXPIRED token"
    );
    assert_eq!(
        crate::row_status(admin.clone(), other_again.token.to_string()).await,
        other_again.status.as_db(),
        "the answer is the row's"
    );
    admin.close().await;
}

#[tokio::test]
async fn a_fan_who_polls_just_before_the_idle_deadline_keeps_the_place() {
    // Two things put a fan's written `last_seen` behind the fan's last poll, and the sweeper
    // must allow for both:
    // - a poll notes a heartbeat only when the last one written is a heartbeat period old,
    //   so a fan's last poll may be up to a period after the last write (the sweeper used to
    //   count the TTL from the write);
    // - a poll only notes the fan in memory, and the flusher writes it up to a flush period
    //   later (the sweeper used to expire at exactly the TTL, before the write landed). A
    //   trigger slows every flush by 500 ms, which puts the write late every time.
    // The fan below is never silent for the TTL: polls at 0.9 s, 4.6 s and 7.4 s after
    // entering (gaps of 0.9 s, 3.7 s and 2.8 s against a TTL of 4 s).
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        // Heartbeats every 1 s, flushed every 250 ms; ghosts after 4 s + 1 s + 4 flushes.
        settings.idle_ttl = Duration::from_secs(4);
        settings.tick = Duration::from_millis(10);
    })
    .await;
    let admin = database.admin().await;
    for statement in [
        // A statement trigger fires before the flush locks any row, so the slow flush
        // protects nothing from the sweeper while it sleeps.
        "CREATE FUNCTION queue.slow_flush() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN
                IF current_query() LIKE '%SET last_seen%' THEN PERFORM pg_sleep(0.5); END IF;
                RETURN NULL;
              END $$",
        "CREATE TRIGGER slow_flush BEFORE UPDATE ON queue.tokens FOR EACH STATEMENT
           EXECUTE FUNCTION queue.slow_flush()",
    ] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    admin.close().await;

    let holder = queue.issue("c", "holder").await; // ACTIVE, holds the only slot
    let fan = queue.issue("c", "fan").await;
    assert_eq!(holder.status(), pb::TokenStatus::Active);
    assert_eq!(fan.status(), pb::TokenStatus::Waiting);

    let entered = tokio::time::Instant::now();
    // Answered from memory (it trusts the ticket for a heartbeat period): the written
    // heartbeat is the one IssueToken wrote, and a poll so soon after notes no other.
    tokio::time::sleep_until(entered + Duration::from_millis(900)).await;
    assert_eq!(
        queue.status(&fan.token).await.status(),
        pb::TokenStatus::Waiting
    );
    // Silent for most of the TTL, then a poll read from the row, which notes the fan.
    tokio::time::sleep_until(entered + Duration::from_millis(4_600)).await;
    // The case is built: the poll at 0.9 s came before a heartbeat was due and wrote none
    // (a run that slow it did would test nothing, and fails here instead).
    let (unwritten,): (bool,) = database
        .row("SELECT last_seen = create_time FROM queue.tokens WHERE user_id = 'fan'")
        .await;
    assert!(unwritten, "the poll at 0.9 s wrote a heartbeat");
    assert_eq!(
        queue.status(&fan.token).await.status(),
        pb::TokenStatus::Waiting
    );
    tokio::time::sleep_until(entered + Duration::from_millis(7_400)).await;
    assert_eq!(
        queue.status(&fan.token).await.status(),
        pb::TokenStatus::Waiting,
        "a fan who polled within the idle TTL was swept as a ghost"
    );
    assert_eq!(
        queue.complete(&holder.token).await.unwrap(),
        pb::TokenStatus::Done
    );
    let admitted = queue.validate(&fan.token).await.expect("admitted next");
    assert_eq!(admitted.user_id, "fan");
}

#[tokio::test]
async fn a_ghost_never_reaches_a_slot_even_when_no_background_tick_gets_the_line() {
    // The background tick takes the line lock with SKIP LOCKED, and in a long rush over two
    // replicas IssueToken batches hold it one after another, so the tick may not get in for
    // minutes. Ghosts used to be swept by the tick alone, and admission then handed them
    // ACTIVE slots they would sit on for the whole window. No tick at all here: the
    // CompleteToken that frees the slot must skip the ghost by itself.
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        settings.idle_ttl = Duration::from_secs(1);
        settings.tick = Duration::from_secs(3_600);
    })
    .await;

    let holder = queue.issue("c", "holder").await; // ACTIVE, holds the only slot
    let ghost = queue.issue("c", "ghost").await; // next in line, never polls again
    let patient = queue.issue("c", "patient").await; // polls
    assert_eq!(holder.status(), pb::TokenStatus::Active);
    let past_the_ghost_deadline = tokio::time::Instant::now() + Duration::from_millis(1_800);
    while tokio::time::Instant::now() < past_the_ghost_deadline {
        queue.status(&patient.token).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Read from the row: a poll would be a sign of life.
    let ghost_row =
        || database.row::<(String,)>("SELECT status FROM queue.tokens WHERE user_id = 'ghost'");
    assert_eq!(
        ghost_row().await.0,
        "WAITING",
        "nothing has swept the line yet"
    );

    assert_eq!(
        queue.complete(&holder.token).await.unwrap(),
        pb::TokenStatus::Done
    );
    let admitted = queue
        .validate(&patient.token)
        .await
        .expect("the patient fan got the slot");
    assert_eq!(admitted.user_id, "patient");
    assert_eq!(ghost_row().await.0, "EXPIRED");
    assert!(
        ghost.place < patient.place,
        "the ghost was ahead of the patient fan"
    );
}

#[tokio::test]
async fn a_fan_read_as_waiting_is_not_expired_as_a_ghost_later_in_the_same_batch() {
    // IssueToken expires ended windows and ghosts, reads the batch's tickets, and when a
    // window ended in between, expires again. If the second pass measured idleness by its
    // own (later) clock, a fan already read as WAITING could cross the ghost deadline in
    // between and be expired while the answer says WAITING. From inside the first pass,
    // `fan`'s window is ended (so that the second pass runs) and `idle` is put exactly on
    // the deadline as the transaction's clock counts it: not a ghost by that clock, a ghost
    // by any later one. `fan` and `idle` ask in one batch.
    let database = TestDatabase::create().await;
    let (queue, policy) = open_line_with_policy(&database, |settings| {
        settings.max_active = 2;
        settings.tick = Duration::from_secs(3_600); // no background sweep
    })
    .await;
    let stalled = queue.issue("c", "stalled").await;
    let fan = queue.issue("c", "fan").await;
    let idle = queue.issue("c", "idle").await;
    assert_eq!(stalled.status(), pb::TokenStatus::Active);
    assert_eq!(fan.status(), pb::TokenStatus::Active);
    assert_eq!(idle.status(), pb::TokenStatus::Waiting);

    on_expiry_of(
        &database,
        "stalled",
        &format!(
            "UPDATE queue.tokens SET expire_time = clock_timestamp() WHERE user_id = 'fan';
             UPDATE queue.tokens SET last_seen = now() - make_interval(secs => {})
              WHERE user_id = 'idle';",
            policy.ghost_after.as_secs_f64()
        ),
    )
    .await;
    let admin = database.admin().await;

    let tickets = issue_one_batch(&database, &policy, &["fan", "idle"]).await;
    let ticket_of = |user: &str| &tickets[user];
    assert_ne!(
        ticket_of("fan").token.to_string(),
        fan.token,
        "the fan whose window ended got a new token"
    );
    // `fan`'s ended window freed a slot, and `idle` is next in line: admitted, not expired
    // behind the answer's back (which then said WAITING of a row that was EXPIRED).
    let idle_again = ticket_of("idle");
    assert_eq!(idle_again.token.to_string(), idle.token);
    assert_eq!(
        (
            idle_again.status.as_db(),
            crate::row_status(admin.clone(), idle.token.clone())
                .await
                .as_str()
        ),
        ("ACTIVE", "ACTIVE")
    );
    // The case happened: the trigger ran in the first pass (only it ended `fan`'s window,
    // and so put `idle` on the deadline), and a second pass ended `fan`'s window later.
    let (stalled_end, fan_end): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT (SELECT end_time FROM queue.tokens WHERE user_id = 'stalled'),
                    (SELECT end_time FROM queue.tokens WHERE user_id = 'fan' AND status = 'EXPIRED')",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(
        stalled_end < fan_end,
        "no second pass: {stalled_end} {fan_end}"
    );
    admin.close().await;
}

/// Windows that end while their fans pay or leave, over TWO replicas: a slot must be freed
/// once, whichever of expiry (a tick or any line-lock holder), CompleteToken or LeaveQueue
/// gets to the token first. A slot freed twice would let the line admit past its cap. 600
/// fans rush a line of 20 slots whose windows last 300 ms; a completer pays for or leaves the
/// tokens whose window is about to end, on both replicas, while a sampler watches the
/// ACTIVE count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_ending_as_fans_pay_or_leave_over_two_replicas_free_each_slot_once() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    const CAP: i64 = 20;
    let database = TestDatabase::create().await;
    let mut settings = crate::config(&database);
    settings.max_active = CAP as u32;
    settings.active_ttl = Duration::from_millis(300);
    let replicas = Arc::new([
        crate::start(settings.clone()).await,
        crate::start(settings).await,
    ]);
    replicas[0].open(&["rush"]).await;
    let admin = database.admin().await;
    let racing = Arc::new(AtomicBool::new(true));
    crate::count_active_at_commits(&database).await;

    let completer = tokio::spawn({
        let (admin, racing, replicas) = (admin.clone(), racing.clone(), replicas.clone());
        async move {
            let (mut paid, mut calls) = (0usize, 0usize);
            while racing.load(Ordering::Relaxed) {
                // Tokens at the edge of their window: the call races their expiry.
                let ending: Vec<uuid::Uuid> = sqlx::query_scalar(
                    "SELECT token FROM queue.tokens
                      WHERE concert_id = 'rush' AND status = 'ACTIVE'
                        AND expire_time < now() + interval '40 milliseconds'
                      LIMIT 10",
                )
                .fetch_all(&admin)
                .await
                .unwrap();
                for token in ending {
                    let replica = &replicas[calls % 2];
                    let token = token.to_string();
                    calls += 1;
                    if calls % 3 == 0 {
                        // Leaving answers the token as it ends up: EXPIRED either way.
                        replica.leave(&token).await.unwrap();
                    } else {
                        // EXPIRED when the window ended first (the call still succeeds).
                        match replica.complete(&token).await.unwrap() {
                            pb::TokenStatus::Done => paid += 1,
                            pb::TokenStatus::Expired => {}
                            status => panic!("CompleteToken answered {status:?}"),
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (paid, calls)
        }
    });

    crate::rush(&replicas, "rush", 600).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    racing.store(false, Ordering::Relaxed);
    let (paid, calls) = completer.await.unwrap();
    let (highest, counts) = crate::active_at_commits(&admin).await;

    assert!(counts > 10, "admissions were counted: {counts}");
    assert!(
        highest <= CAP,
        "{highest} tokens were ACTIVE at once with a cap of {CAP}"
    );
    let (admitted, counter, active): (i64, i32, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM queue.tokens
                  WHERE concert_id = 'rush' AND admit_time IS NOT NULL),
                active_count,
                (SELECT count(*) FROM queue.tokens
                  WHERE concert_id = 'rush' AND status = 'ACTIVE')
           FROM queue.lines WHERE concert_id = 'rush'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    admin.close().await;
    // The race really ran: slots went round several times, and calls met ending windows.
    assert!(admitted > 3 * CAP, "only {admitted} admitted");
    assert!(paid > 0 && calls > paid, "paid {paid} of {calls} calls");
    assert_eq!(
        i64::from(counter),
        active,
        "the line's counter agrees with the rows"
    );
}
