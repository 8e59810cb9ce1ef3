use std::time::Duration;

use chrono::{DateTime, Utc};
use stagedoor_proto::queue::v1 as pb;
use stagedoor_testkit::TestDatabase;
use tokio::time::timeout;

use crate::{config, open_line, reason, start, Queue};

/// The next message of a watch stream, within 5 seconds; `None` when the stream ended.
pub async fn next(
    stream: &mut tonic::Streaming<pb::WatchQueueStatusResponse>,
) -> Option<pb::QueueTicket> {
    timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a message within 5s")
        .expect("no stream error")
        .map(|message| message.ticket.unwrap())
}

/// Opens a watch stream for `token`; the call itself must succeed.
async fn watch(queue: &Queue, token: &str) -> tonic::Streaming<pb::WatchQueueStatusResponse> {
    queue
        .public
        .clone()
        .watch_queue_status(pb::WatchQueueStatusRequest {
            token: token.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Admission wakes the stream at once, whatever its update cadence: with updates an hour
/// apart (three minutes at the head of the line), the ACTIVE message still comes within
/// `next`'s five seconds only because the admission itself wakes the watcher.
#[tokio::test]
async fn a_watcher_hears_of_its_admission_without_polling() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 1;
    settings.watch_interval = Duration::from_secs(3_600);
    settings.active_recheck = Duration::from_secs(3_600);
    let queue = start(settings).await;
    queue.open(&["c"]).await;

    let ahead = queue.issue("c", "ahead").await;
    let watcher = queue.issue("c", "watcher").await;
    let mut stream = watch(&queue, &watcher.token).await;

    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.status(), pb::TokenStatus::Waiting);
    assert_eq!(first.position, 0);

    // The fan ahead pays: the watcher is told, with no GetQueueStatus from this test.
    queue.complete(&ahead.token).await.unwrap();
    let admitted = next(&mut stream).await.unwrap();
    assert_eq!(admitted.status(), pb::TokenStatus::Active);
    assert!(admitted.expire_time.is_some());

    // Then the watcher pays: DONE is the last message and the stream ends. It comes at once
    // from the replica that completed the token: the watch's own re-read of an ACTIVE token
    // is an hour away (`active_recheck`), so only the completion's alarm brings it within
    // `next`'s five seconds.
    queue.complete(&watcher.token).await.unwrap();
    let done = next(&mut stream).await.expect("DONE after the completion");
    assert_eq!(done.status(), pb::TokenStatus::Done);
    assert!(
        next(&mut stream).await.is_none(),
        "the stream ends after a final status"
    );
}

/// A fan who pays through another replica than the one its stream is on: only the watch's
/// re-read of the ACTIVE token can find it DONE, every `active_recheck` (200 ms here, so DONE
/// comes within a second; at the default 2 s it would not).
#[tokio::test]
async fn a_watcher_hears_of_a_payment_made_through_another_replica() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.active_recheck = Duration::from_millis(200);
    let replicas = [start(settings.clone()).await, start(settings).await];
    replicas[0].open(&["c"]).await;
    let fan = replicas[0].issue("c", "fan").await;
    assert_eq!(fan.status(), pb::TokenStatus::Active);

    let mut stream = watch(&replicas[1], &fan.token).await;
    assert_eq!(
        next(&mut stream).await.unwrap().status(),
        pb::TokenStatus::Active
    );
    replicas[0].complete(&fan.token).await.unwrap();
    let done = timeout(Duration::from_secs(1), next(&mut stream))
        .await
        .expect("DONE within a second: the re-read every 200 ms found it");
    assert_eq!(done.unwrap().status(), pb::TokenStatus::Done);
    assert!(
        next(&mut stream).await.is_none(),
        "the stream ends after DONE"
    );
}

/// An open stream keeps its fan in line (it is noted for the heartbeat like a poll, though
/// not on every wake), while a fan who neither polls nor watches is expired as a ghost.
#[tokio::test]
async fn a_watcher_stays_in_line_while_a_ghost_expires() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 1;
    settings.idle_ttl = Duration::from_millis(600);
    let ghost_after = settings.ghost_after();
    let queue = start(settings).await;
    queue.open(&["c"]).await;

    queue.issue("c", "holder").await; // ACTIVE: holds the only slot, nobody moves
    let ghost = queue.issue("c", "ghost").await;
    let watcher = queue.issue("c", "watcher").await;
    let mut stream = watch(&queue, &watcher.token).await;
    assert_eq!(
        next(&mut stream).await.unwrap().status(),
        pb::TokenStatus::Waiting
    );

    // The ghost goes; the watcher, who never polls, stays, for another ghost deadline after
    // that as well. Statuses are read from the rows, not asked for: a poll would itself
    // keep a fan alive.
    let admin = database.admin().await;
    let status_of = |token: String| crate::row_status(admin.clone(), token);
    stagedoor_testkit::eventually(Duration::from_secs(20), "the ghost is swept", || async {
        (status_of(ghost.token.clone()).await == "EXPIRED").then_some(())
    })
    .await;
    tokio::time::sleep(ghost_after).await;
    assert_eq!(status_of(watcher.token.clone()).await, "WAITING");
    drop(stream);
    admin.close().await;
}

#[tokio::test]
async fn watching_an_unknown_token_fails_the_call() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let status = queue
        .public
        .clone()
        .watch_queue_status(pb::WatchQueueStatusRequest {
            token: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(reason(&status), "TOKEN_NOT_FOUND");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_completes() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 1;
    let queue = start(settings).await;
    queue.open(&["c"]).await;
    queue.issue("c", "ahead").await;
    let waiting = queue.issue("c", "waiting").await;
    let mut stream = watch(&queue, &waiting.token).await;
    stream.message().await.unwrap().unwrap();

    // Graceful shutdown must not hang on a stream whose client never hangs up.
    timeout(Duration::from_secs(10), queue.handle.shutdown())
        .await
        .expect("shutdown finishes")
        .expect("server stops cleanly");
    let ended = timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream ends");
    // The stream ends with a status a client can act on: watch again, elsewhere.
    let status = ended.expect_err("the stream ends with a status, not silently");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(crate::reason(&status), "SHUTTING_DOWN", "{status:?}");
}

/// A BFF multiplexes its fans over a few connections, and every waiting fan's watch holds a
/// stream open. Past a server's per-connection stream limit a client queues new streams until
/// old ones end: with hyper's own default of 200 (which the shared server overrides), the
/// 201st watcher and every call after it on that connection (a poll, a Pay's token check)
/// would wait for a watch to end. (With that limit set, this test fails at the 201st.)
#[tokio::test]
async fn a_thousand_watchers_on_one_connection_leave_room_for_other_calls() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| settings.max_active = 1).await;
    let tickets = line_of(&queue, 1_000).await;

    // Every watcher on the test's one connection, each holding its stream open.
    let mut streams = Vec::with_capacity(tickets.len());
    for ticket in &tickets {
        let opened = timeout(Duration::from_secs(10), watch(&queue, &ticket.token))
            .await
            .unwrap_or_else(|_| panic!("watcher {} could not open its stream", streams.len()));
        streams.push(opened);
    }
    for stream in &mut streams {
        assert!(
            next(stream).await.is_some(),
            "every watcher hears its place"
        );
    }
    // A poll on the same connection is answered while all of them watch.
    let polled = timeout(Duration::from_secs(5), queue.status(&tickets[999].token))
        .await
        .expect("a poll beside 1,000 open watches was answered");
    assert_eq!(polled.place, tickets[999].place);
}

/// `count` fans in line for `c`, in place order.
async fn line_of(queue: &Queue, count: usize) -> Vec<pb::QueueTicket> {
    let mut calls = tokio::task::JoinSet::new();
    for fan in 0..count {
        let public = queue.public.clone();
        calls.spawn(async move { crate::issue_with(public, "c", &format!("fan-{fan:04}")).await });
    }
    let mut tickets = calls.join_all().await;
    tickets.sort_by_key(|ticket| ticket.place);
    tickets
}

/// Watching is being there: a fan who watched for longer than the idle TTL, then closed the
/// stream, keeps the place for the TTL after closing. (A watch that noted nothing would let
/// the sweeper take the fan a TTL after entering, and this test catches that. The note at a
/// stream's end matters only when the last write is over a heartbeat period old, which at
/// this TTL the periodic notes never leave: it is not what this test checks.)
#[tokio::test]
async fn a_fan_who_stops_watching_keeps_the_place_for_the_idle_ttl() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        settings.idle_ttl = Duration::from_secs(2); // heartbeats every 500 ms
        settings.tick = Duration::from_millis(10);
    })
    .await;
    let holder = queue.issue("c", "holder").await; // ACTIVE, holds the only slot
    let fan = queue.issue("c", "fan").await;
    let entered = tokio::time::Instant::now();
    let mut stream = watch(&queue, &fan.token).await;
    assert_eq!(
        next(&mut stream).await.unwrap().status(),
        pb::TokenStatus::Waiting
    );
    tokio::time::sleep_until(entered + Duration::from_millis(2_450)).await;
    drop(stream);
    let closed = tokio::time::Instant::now();

    tokio::time::sleep_until(closed + Duration::from_millis(1_900)).await;
    assert_eq!(
        queue.status(&fan.token).await.status(),
        pb::TokenStatus::Waiting,
        "a fan silent for less than the TTL since the stream closed was swept as a ghost"
    );
    queue.complete(&holder.token).await.unwrap();
    assert_eq!(queue.validate(&fan.token).await.unwrap().user_id, "fan");
}

/// Makes the service's reads of tickets by token (the statement of a watch's re-read) fail
/// as a statement timeout would (SQLSTATE 57014: UNAVAILABLE / DATABASE_BUSY) until `until`
/// (for ever when `None`). A row-level policy, forced on the service's own role, runs the
/// check; the sequence `queue.ticket_reads` counts every such read, failed or not.
async fn fail_ticket_reads(database: &TestDatabase, until: Option<DateTime<Utc>>) {
    let until = until.map_or("'infinity'".to_owned(), |until| {
        format!("'{}'", until.to_rfc3339())
    });
    let admin = database.admin().await;
    sqlx::query("CREATE SEQUENCE queue.ticket_reads")
        .execute(&admin)
        .await
        .unwrap();
    stagedoor_testkit::RowPolicy::checked_by(
        &admin,
        "queue.tokens",
        "busy_ticket_read",
        &format!(
            "BEGIN
               IF current_query() LIKE '%t.token = ANY%' THEN
                   PERFORM nextval('queue.ticket_reads');
                   IF clock_timestamp() < {until}::timestamptz THEN
                       RAISE EXCEPTION 'a busy moment' USING ERRCODE = 'query_canceled';
                   END IF;
               END IF;
               RETURN true;
             END"
        ),
    )
    .await;
    admin.close().await;
}

/// When an ACTIVE fan's window ends, the stream reads the token's row to say how it ended.
/// Reads that fail for a moment are tried again by the stream's own timer, backing off (100
/// ms, doubled each time), and the stream goes on to EXPIRED: ended with DATABASE_BUSY,
/// every watcher of a sale would come back at once to open a new stream against the same
/// busy database. Here the reads fail for 1.5 s from the window's end, nothing else wakes
/// the watch (its periodic re-read is an hour away), and the retries must neither stop nor
/// come faster than their pauses (about five reads in those 1.5 s; a read on every wake of
/// the past window would be seventeen).
#[tokio::test]
async fn a_watch_tries_a_failed_read_again_at_a_backing_off_pace() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.active_ttl = Duration::from_secs(3);
    settings.active_recheck = Duration::from_secs(3_600);
    let queue = start(settings).await;
    queue.open(&["c"]).await;
    let fan = queue.issue("c", "fan").await;
    assert_eq!(fan.status(), pb::TokenStatus::Active);
    let window = fan.expire_time.expect("an ACTIVE token's window end");
    let window_end = DateTime::from_timestamp(window.seconds, window.nanos as u32).unwrap();
    let mut stream = watch(&queue, &fan.token).await;
    assert_eq!(
        next(&mut stream).await.unwrap().status(),
        pb::TokenStatus::Active
    );

    fail_ticket_reads(
        &database,
        Some(window_end + chrono::Duration::milliseconds(1_500)),
    )
    .await;
    let ended = timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("the stream tells how the window ended")
        .expect("no stream error: the failed reads were tried again")
        .and_then(|message| message.ticket)
        .expect("a message before the stream ends");
    assert_eq!(ended.status(), pb::TokenStatus::Expired);
    let (reads,): (i64,) = database
        .row("SELECT last_value FROM queue.ticket_reads")
        .await;
    assert!(
        (3..=9).contains(&reads),
        "{reads} reads of the row: tried again too often, or not at all"
    );
}

/// A database away for longer than a heartbeat period does end the stream, with the error
/// (UNAVAILABLE: open a new one), rather than keep a fan watching a ticket nobody can read.
#[tokio::test]
async fn a_watch_whose_reads_keep_failing_ends_with_the_error() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.active_recheck = Duration::from_millis(100);
    settings.idle_ttl = Duration::from_secs(2); // a heartbeat period of 500 ms
    let queue = start(settings).await;
    queue.open(&["c"]).await;
    let fan = queue.issue("c", "fan").await;
    let mut stream = watch(&queue, &fan.token).await;
    assert_eq!(
        next(&mut stream).await.unwrap().status(),
        pb::TokenStatus::Active
    );

    fail_ticket_reads(&database, None).await;
    let ended = timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends within 5 s")
        .expect_err("the stream ends with an error");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert_eq!(reason(&ended), "DATABASE_BUSY");
}
