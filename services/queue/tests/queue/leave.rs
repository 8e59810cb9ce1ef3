//! LeaveQueue: a fan who is done gives the place back, WAITING or ACTIVE.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use stagedoor_proto::queue::v1 as pb;
use stagedoor_runtime::time::from_timestamp;
use stagedoor_testkit::TestDatabase;
use tokio::time::timeout;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    active_at_commits, config, count_active_at_commits, open_line, reason, start, watch::next,
};

/// A WAITING fan who leaves is never admitted: the next slot goes to the fan behind, and the
/// replica that answered the leave says EXPIRED at once (not WAITING from its memory of the
/// line). Leaving again changes nothing; entering again starts at the back.
#[tokio::test]
async fn a_fan_who_leaves_while_waiting_is_never_admitted() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| settings.max_active = 1).await;
    let first = queue.issue("c", "first").await;
    let leaver = queue.issue("c", "leaver").await;
    let behind = queue.issue("c", "behind").await;
    assert_eq!(first.status(), pb::TokenStatus::Active);
    assert_eq!(leaver.status(), pb::TokenStatus::Waiting);
    // Issued here, so this replica answers its polls from memory as soon as its board has
    // read the line (every 100 ms). Proven, not waited for: with the leaver's row hidden
    // from the service (a row-level policy), only a poll answered from memory says WAITING.
    let admin = database.admin().await;
    let hidden = stagedoor_testkit::RowPolicy::force(
        &admin,
        "queue.tokens",
        "hide_the_leaver",
        "user_id <> 'leaver'",
    )
    .await;
    stagedoor_testkit::eventually(
        Duration::from_secs(10),
        "a poll of the leaver answered from memory",
        || async {
            let polled = queue
                .public
                .clone()
                .get_queue_status(pb::GetQueueStatusRequest {
                    token: leaver.token.clone(),
                })
                .await;
            let status = polled.ok()?.into_inner().ticket?.status();
            (status == pb::TokenStatus::Waiting).then_some(())
        },
    )
    .await;
    hidden.remove(&admin).await;
    admin.close().await;

    let left = queue.leave(&leaver.token).await.unwrap();
    assert_eq!(left.status(), pb::TokenStatus::Expired);
    assert_eq!((left.place, left.position), (2, 0));
    assert_eq!(
        queue.status(&leaver.token).await.status(),
        pb::TokenStatus::Expired
    );
    let refused = queue.validate(&leaver.token).await.unwrap_err();
    assert_eq!(reason(&refused), "TOKEN_NOT_ACTIVE");

    // The fan ahead pays: the slot goes past the fan who left, to the one behind.
    queue.complete(&first.token).await.unwrap();
    assert_eq!(
        queue.validate(&behind.token).await.unwrap().user_id,
        "behind"
    );
    assert_eq!(
        queue.status(&leaver.token).await.status(),
        pb::TokenStatus::Expired
    );

    let again = queue.leave(&leaver.token).await.unwrap();
    assert_eq!(again.status(), pb::TokenStatus::Expired);
    let back = queue.issue("c", "leaver").await;
    assert_ne!(back.token, leaver.token);
    assert_eq!((back.place, back.status()), (4, pb::TokenStatus::Waiting));
}

/// An ACTIVE fan who leaves frees the slot at once: with no background tick for an hour, the
/// fan behind is admitted by the leave itself, and the line's count stays exact.
#[tokio::test]
async fn a_fan_who_leaves_while_active_frees_the_slot_at_once() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |settings| {
        settings.max_active = 1;
        settings.tick = Duration::from_secs(3_600);
    })
    .await;
    let leaver = queue.issue("c", "leaver").await;
    let behind = queue.issue("c", "behind").await;
    assert_eq!(leaver.status(), pb::TokenStatus::Active);
    assert_eq!(behind.status(), pb::TokenStatus::Waiting);

    let left = queue.leave(&leaver.token).await.unwrap();
    assert_eq!(left.status(), pb::TokenStatus::Expired);
    assert!(left.admit_time.is_some(), "it was admitted before leaving");
    // Its window ended with the leave, not 30 minutes later.
    let window_end = left.expire_time.as_ref().and_then(from_timestamp).unwrap();
    assert!(window_end <= Utc::now(), "{window_end}");
    assert_eq!(
        queue.validate(&behind.token).await.unwrap().user_id,
        "behind",
        "the slot went to the next fan with the leave"
    );

    let admin = database.admin().await;
    let (counter, active, ended): (i32, i64, bool) = sqlx::query_as(
        "SELECT active_count,
                (SELECT count(*) FROM queue.tokens WHERE status = 'ACTIVE'),
                (SELECT end_time IS NOT NULL FROM queue.tokens WHERE user_id = 'leaver')
           FROM queue.lines",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((i64::from(counter), active), (1, 1));
    assert!(ended);
    admin.close().await;
}

/// Leaving never undoes a payment: a DONE token stays DONE, and the answer says so.
#[tokio::test]
async fn leaving_after_paying_changes_nothing() {
    let database = TestDatabase::create().await;
    let queue = open_line(&database, |_| {}).await;
    let paid = queue.issue("c", "paid").await;
    queue.complete(&paid.token).await.unwrap();
    let left = queue.leave(&paid.token).await.unwrap();
    assert_eq!(left.status(), pb::TokenStatus::Done);
    // The window ended with the payment, not 30 minutes later.
    let window_end = left.expire_time.as_ref().and_then(from_timestamp).unwrap();
    assert!(window_end <= Utc::now(), "{window_end}");
    let refused = queue.validate(&paid.token).await.unwrap_err();
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("status").map(String::as_str),
        Some("DONE")
    );

    let unknown = queue
        .leave(&uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(reason(&unknown), "TOKEN_NOT_FOUND");
}

/// A watch on one replica ends with EXPIRED when its fan leaves through another, although
/// that replica's board never moves past the fan's place: the watch re-reads its row once
/// per heartbeat period (here 0.5 s) instead of counting down to a place nobody will take.
#[tokio::test]
async fn a_watch_on_another_replica_ends_when_its_fan_leaves() {
    watch_then_leave(Duration::from_secs(2), 1).await;
}

/// On the replica that answers the leave, the watch ends at once: with the default idle TTL
/// its periodic check is 30 s away, beyond `next`'s five seconds.
#[tokio::test]
async fn a_watch_on_the_replica_that_answers_the_leave_ends_at_once() {
    watch_then_leave(Duration::from_secs(120), 0).await;
}

/// Two replicas with `idle_ttl`; a WAITING fan watches through replica `watch_on` and leaves
/// through replica 0; the stream must say EXPIRED and end.
async fn watch_then_leave(idle_ttl: Duration, watch_on: usize) {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 1;
    settings.idle_ttl = idle_ttl;
    settings.watch_interval = Duration::from_secs(3_600);
    let replicas = [start(settings.clone()).await, start(settings).await];
    replicas[0].open(&["c"]).await;
    replicas[0].issue("c", "ahead").await;
    let leaver = replicas[0].issue("c", "leaver").await;

    let mut stream = replicas[watch_on]
        .public
        .clone()
        .watch_queue_status(pb::WatchQueueStatusRequest {
            token: leaver.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = |ticket: Option<pb::QueueTicket>| ticket.map(|ticket| ticket.status());
    assert_eq!(
        status(next(&mut stream).await),
        Some(pb::TokenStatus::Waiting)
    );
    replicas[0].leave(&leaver.token).await.unwrap();
    assert_eq!(
        status(next(&mut stream).await),
        Some(pb::TokenStatus::Expired)
    );
    assert!(
        next(&mut stream).await.is_none(),
        "the stream ends after EXPIRED"
    );
}

/// 600 fans rush one concert over TWO replicas; a third of them leave at once, through the
/// other replica, racing their own admission (some leave WAITING, some ACTIVE), while a
/// payer completes whoever is ACTIVE. Nobody is stranded: every fan who stayed is admitted,
/// in place order; nobody who left is admitted afterwards; the ACTIVE count never passes the
/// cap and agrees with the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fans_leaving_in_a_rush_over_two_replicas_strand_nobody() {
    const FANS: usize = 600;
    const CAP: i64 = 20;
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = CAP as u32;
    let replicas = Arc::new([start(settings.clone()).await, start(settings).await]);
    replicas[0].open(&["rush"]).await;
    let admin = database.admin().await;

    let racing = Arc::new(AtomicBool::new(true));
    let arrived = Arc::new(AtomicBool::new(false));
    count_active_at_commits(&database).await;
    // The payer: completes ACTIVE tokens through both replicas until every fan has arrived
    // and every fan who stayed has been admitted and paid. A token its fan left meanwhile
    // answers EXPIRED.
    let payer = tokio::spawn({
        let (admin, replicas, arrived) = (admin.clone(), replicas.clone(), arrived.clone());
        async move {
            let mut completed = 0usize;
            loop {
                // Read before the rows: a fan still arriving when the rows are read is not
                // taken for the end of the rush.
                let all_arrived = arrived.load(Ordering::Relaxed);
                let (active, waiting): (Vec<uuid::Uuid>, i64) = sqlx::query_as(
                    "SELECT ARRAY(SELECT token FROM queue.tokens WHERE status = 'ACTIVE' LIMIT 10),
                            (SELECT count(*) FROM queue.tokens WHERE status = 'WAITING')",
                )
                .fetch_one(&admin)
                .await
                .unwrap();
                if active.is_empty() && waiting == 0 && all_arrived {
                    return completed;
                }
                for token in active {
                    let status = replicas[completed % 2]
                        .complete(&token.to_string())
                        .await
                        .unwrap();
                    assert!(
                        matches!(status, pb::TokenStatus::Done | pb::TokenStatus::Expired),
                        "{status:?}"
                    );
                    completed += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let mut fans = Vec::with_capacity(FANS);
    for fan in 0..FANS {
        let replicas = replicas.clone();
        fans.push(tokio::spawn(async move {
            let ticket = replicas[fan % 2].issue("rush", &format!("fan-{fan}")).await;
            let left = if fan % 3 == 0 {
                Some(replicas[(fan + 1) % 2].leave(&ticket.token).await.unwrap())
            } else {
                None
            };
            (ticket, left)
        }));
    }
    let mut leavers = Vec::new();
    for fan in fans {
        let (ticket, left) = fan.await.unwrap();
        if let Some(left) = left {
            assert!(
                matches!(
                    left.status(),
                    pb::TokenStatus::Expired | pb::TokenStatus::Done
                ),
                "a leave ends the token: {:?}",
                left.status()
            );
            leavers.push((ticket.token, left.status()));
        }
    }
    arrived.store(true, Ordering::Relaxed);
    let completed = timeout(Duration::from_secs(60), payer)
        .await
        .expect("every fan who stayed is admitted and pays within a minute")
        .unwrap();
    racing.store(false, Ordering::Relaxed);
    let (highest, counts) = active_at_commits(&admin).await;
    assert!(counts > 10, "admissions were counted: {counts}");
    assert!(highest <= CAP, "{highest} ACTIVE at a commit, cap {CAP}");
    assert!(completed >= FANS - leavers.len());

    // Every leaver's token is as its leave answered, and stayed so.
    let (tokens, answered): (Vec<String>, Vec<String>) = leavers
        .iter()
        .map(|(token, status)| {
            let status = if *status == pb::TokenStatus::Done {
                "DONE"
            } else {
                "EXPIRED"
            };
            (token.clone(), status.to_owned())
        })
        .unzip();
    let changed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue.tokens t
           JOIN unnest($1::text[], $2::text[]) AS left_(token, status)
             ON t.token::text = left_.token
          WHERE t.status <> left_.status",
    )
    .bind(&tokens)
    .bind(&answered)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(changed, 0, "a token changed after its fan left");

    // Every fan who stayed was admitted, in place order.
    let stayed: Vec<(i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT place, admit_time FROM queue.tokens
          WHERE token::text <> ALL($1) ORDER BY place",
    )
    .bind(&tokens)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(stayed.len(), FANS - leavers.len());
    for pair in stayed.windows(2) {
        let (Some(earlier), Some(later)) = (pair[0].1, pair[1].1) else {
            panic!("a fan who stayed was never admitted: {pair:?}");
        };
        assert!(
            earlier <= later,
            "place {} was admitted after place {}",
            pair[0].0,
            pair[1].0
        );
    }
    let (counter, rows): (i32, i64) = sqlx::query_as(
        "SELECT active_count, (SELECT count(*) FROM queue.tokens WHERE status = 'ACTIVE')
           FROM queue.lines",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((i64::from(counter), rows), (0, 0), "everyone paid or left");
    admin.close().await;
}
