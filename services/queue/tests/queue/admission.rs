use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use stagedoor_proto::queue::v1 as pb;
use stagedoor_testkit::TestDatabase;

use crate::{active_at_commits, config, count_active_at_commits, start};

/// 2,000 fans rush one concert through TWO queue replicas on one database while a third party
/// keeps completing ACTIVE tokens, and a sampler watches the ACTIVE count the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rush_over_two_replicas_keeps_the_line_exact() {
    const FANS: usize = 2_000;
    const CAP: i64 = 50;
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = CAP as u32;
    let replicas = [start(settings.clone()).await, start(settings).await];
    replicas[0].open(&["rush"]).await;
    let admin = database.admin().await;

    // ACTIVE rows counted at every commit that admits a fan, on either replica.
    count_active_at_commits(&database).await;
    let racing = Arc::new(AtomicBool::new(true));

    // Fans who got in finish (pay) while others are still arriving, so admission keeps
    // moving on both replicas during the race.
    let completer = tokio::spawn({
        let (admin, racing) = (admin.clone(), racing.clone());
        let internals = [replicas[0].internal.clone(), replicas[1].internal.clone()];
        async move {
            let mut completed = 0usize;
            while racing.load(Ordering::Relaxed) {
                let active: Vec<uuid::Uuid> = sqlx::query_scalar(
                    "SELECT token FROM queue.tokens WHERE status = 'ACTIVE' AND concert_id = 'rush' LIMIT 10",
                )
                .fetch_all(&admin)
                .await
                .unwrap();
                for token in active {
                    let mut internal = internals[completed % 2].clone();
                    let status = internal
                        .complete_token(pb::CompleteTokenRequest {
                            token: token.to_string(),
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .status();
                    assert_eq!(status, pb::TokenStatus::Done);
                    completed += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            completed
        }
    });

    let mut calls = Vec::with_capacity(FANS);
    for fan in 0..FANS {
        let mut client = replicas[fan % 2].public.clone();
        calls.push(tokio::spawn(async move {
            client
                .issue_token(pb::IssueTokenRequest {
                    concert_id: "rush".into(),
                    user_id: format!("fan-{fan}"),
                })
                .await
                .map(|response| response.into_inner().ticket.unwrap())
        }));
    }
    let mut tickets = Vec::with_capacity(FANS);
    for call in calls {
        tickets.push(
            call.await
                .unwrap()
                .expect("IssueToken succeeds under the rush"),
        );
    }
    // Let admission and completion run on for a moment after the last arrival.
    tokio::time::sleep(Duration::from_millis(300)).await;
    racing.store(false, Ordering::Relaxed);
    let completed = completer.await.unwrap();
    let (highest, counts) = active_at_commits(&admin).await;

    // Every token distinct; places exactly 1..=FANS, no gap, no duplicate.
    let tokens: HashSet<&str> = tickets.iter().map(|t| t.token.as_str()).collect();
    assert_eq!(tokens.len(), FANS);
    let mut places: Vec<i64> = tickets.iter().map(|t| t.place).collect();
    places.sort_unstable();
    assert_eq!(places, (1..=FANS as i64).collect::<Vec<_>>());

    // Never above the cap, at any commit.
    assert!(counts > 10, "admissions were counted: {counts}");
    assert!(
        highest <= CAP,
        "{highest} tokens were ACTIVE at once with a cap of {CAP}"
    );
    assert!(
        completed > 0,
        "completions must have freed slots during the race"
    );

    // FIFO: everyone admitted so far holds the lowest places, and admission times follow
    // places (no fan was admitted before a fan ahead of them).
    let admitted: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT place, admit_time FROM queue.tokens
          WHERE concert_id = 'rush' AND admit_time IS NOT NULL ORDER BY place",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(admitted.len() as i64 >= completed as i64);
    for (index, (place, _)) in admitted.iter().enumerate() {
        assert_eq!(*place, index as i64 + 1, "admission skipped a waiting fan");
    }
    for pair in admitted.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "place {} was admitted after place {}",
            pair[0].0,
            pair[1].0
        );
    }

    // The line's counter agrees with the rows.
    let (counter, rows): (i32, i64) = sqlx::query_as(
        "SELECT active_count, (SELECT count(*) FROM queue.tokens WHERE status = 'ACTIVE' AND concert_id = 'rush')
           FROM queue.lines WHERE concert_id = 'rush'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(i64::from(counter), rows);
    admin.close().await;
}

/// With a large cap and a rate of R per second, no window of one second holds more than R
/// admissions, ticking every 100 ms.
#[tokio::test]
async fn admission_rate_is_bounded() {
    admissions_stay_within_the_rate(Duration::from_millis(100)).await;
}

/// The same with a background tick an hour apart, where a token bucket one tick deep would
/// hold an hour's worth of admissions: fans arriving one after another are admitted by
/// their own IssueToken batches, still at most R in any second.
#[tokio::test]
async fn admission_rate_is_bounded_whatever_the_tick() {
    admissions_stay_within_the_rate(Duration::from_secs(3_600)).await;
}

/// Fans arrive one every 20 ms for 2.5 s at a rate of 20 per second and a cap nobody
/// reaches; every window of one second that starts at an admission holds at most 20.
async fn admissions_stay_within_the_rate(tick: Duration) {
    const RATE: u32 = 20;
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 10_000;
    settings.admit_rate = RATE;
    settings.tick = tick;
    let queue = start(settings).await;
    queue.open(&["slow"]).await;

    let arrivals = tokio::time::Instant::now();
    for fan in 0..125 {
        queue.issue("slow", &format!("fan-{fan}")).await;
        tokio::time::sleep_until(arrivals + Duration::from_millis(20 * (fan + 1))).await;
    }
    assert_admitted_within(&database, RATE).await;
}

/// The rate is the line's, not each replica's: 300 fans arrive at once over TWO replicas on
/// one database, each admitting through its own IssueToken batches and background ticks, and
/// every window of one second still holds at most R admissions of the two together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_rate_holds_over_two_replicas_in_a_rush() {
    const RATE: u32 = 40;
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 10_000;
    settings.admit_rate = RATE;
    settings.tick = Duration::from_millis(20);
    let replicas = Arc::new([start(settings.clone()).await, start(settings).await]);
    replicas[0].open(&["slow"]).await;

    crate::rush(&replicas, "slow", 300).await;
    // Both replicas' ticks go on admitting the line for a few seconds (the fans' tokens are
    // far from idle expiry): windows of a rush's start and of the steady rate both counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_admitted_within(&database, RATE).await;
}

/// Every window of one second that starts at an admission holds at most `rate` admissions,
/// and at least one second's worth were admitted at all.
async fn assert_admitted_within(database: &TestDatabase, rate: u32) {
    let admin = database.admin().await;
    let admit_times: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT admit_time FROM queue.tokens WHERE admit_time IS NOT NULL ORDER BY admit_time",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;

    assert!(
        admit_times.len() >= rate as usize,
        "only {} admitted",
        admit_times.len()
    );
    for (index, start) in admit_times.iter().enumerate() {
        let window_end = *start + chrono::Duration::seconds(1);
        let in_window = admit_times[index..]
            .iter()
            .take_while(|at| **at < window_end)
            .count();
        assert!(
            in_window <= rate as usize,
            "{in_window} admitted within one second of {start}, rate {rate}"
        );
    }
}

/// A poll answered from memory trusts the line board's counters for 1 s, and the board's
/// read must count from when it was asked, not answered: a refresh that took long (a busy
/// Postgres) brings counters as old as its query. Here one refresh is held at its start
/// while `fan` is admitted, and let go 1.1 s later; the next refresh is held too, so that
/// the old counters stay on the board. `fan`'s poll must not be told WAITING from them.
#[tokio::test]
async fn a_slow_board_refresh_does_not_pass_for_a_fresh_one() {
    const FIRST_READ: i64 = 5_101;
    const SECOND_READ: i64 = 5_102;
    let database = TestDatabase::create().await;
    let queue = crate::open_line(&database, |settings| settings.max_active = 1).await;
    let holder = queue.issue("c", "holder").await;
    let fan = queue.issue("c", "fan").await;
    assert_eq!(fan.status(), pb::TokenStatus::Waiting);
    // Polled once: remembered as WAITING (the cache trusts it for a quarter of the idle TTL).
    assert_eq!(
        queue.status(&fan.token).await.status(),
        pb::TokenStatus::Waiting
    );

    let admin = database.admin().await;
    let mut locks = admin.acquire().await.unwrap();
    for key in [FIRST_READ, SECOND_READ] {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *locks)
            .await
            .unwrap();
    }
    // The board's read is the statement with `OR concert_id = ANY`; a row-level policy
    // (forced on the service's own role) holds its first run on one lock, its second on the
    // other, and lets everything else through.
    sqlx::query("CREATE SEQUENCE queue.board_reads")
        .execute(&admin)
        .await
        .unwrap();
    stagedoor_testkit::RowPolicy::checked_by(
        &admin,
        "queue.lines",
        "held_board_read",
        &format!(
            "DECLARE n int8;
             BEGIN
               IF current_query() LIKE '%OR concert_id = ANY%' THEN
                   n := nextval('queue.board_reads');
                   IF n = 1 THEN
                       PERFORM pg_advisory_lock_shared({FIRST_READ});
                       PERFORM pg_advisory_unlock_shared({FIRST_READ});
                   ELSIF n = 2 THEN
                       PERFORM pg_advisory_lock_shared({SECOND_READ});
                       PERFORM pg_advisory_unlock_shared({SECOND_READ});
                   END IF;
               END IF;
               RETURN true;
             END"
        ),
    )
    .await;
    let board_read_held = stagedoor_testkit::LockWaiters {
        wait_event: Some("advisory"),
        query_contains: Some("OR concert_id = ANY"),
        ..Default::default()
    };
    stagedoor_testkit::until_lock_waiters(&admin, board_read_held, 1, Duration::from_secs(10))
        .await;

    // Admitted while the held read's snapshot still has the old pointer...
    assert_eq!(
        queue.complete(&holder.token).await.unwrap(),
        pb::TokenStatus::Done
    );
    let (row,): (String,) = database
        .row("SELECT status FROM queue.tokens WHERE user_id = 'fan'")
        .await;
    assert_eq!(row, "ACTIVE");
    // ...which is more than the 1 s the cache trusts by the time the read is let go.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(FIRST_READ)
        .execute(&mut *locks)
        .await
        .unwrap();
    // The next read has started (the refresher is one loop), so the held one's counters are
    // on the board, and stay there while the next is held.
    stagedoor_testkit::eventually(
        Duration::from_secs(10),
        "the board's next read is held",
        || async {
            let (reads,): (i64,) = database
                .row("SELECT last_value FROM queue.board_reads")
                .await;
            (reads >= 2 && stagedoor_testkit::lock_waiters(&admin, board_read_held).await == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        queue.status(&fan.token).await.status(),
        pb::TokenStatus::Active,
        "an admitted fan was told WAITING from a board read older than the cache trusts"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SECOND_READ)
        .execute(&mut *locks)
        .await
        .unwrap();
    drop(locks);
    admin.close().await;
}
