use std::time::Duration;

use stagedoor_proto::{concert::v1 as pb, queue::v1 as queue_pb};
use tonic::{Code, Request};

use crate::{mesh, reason, with_bearer, Mesh};

fn status_of(seats: &[pb::Seat], number: i32) -> pb::SeatStatus {
    seats
        .iter()
        .find(|seat| seat.seat_number == number)
        .unwrap()
        .status()
}

/// A mesh, a date of `seats` seats, and two ACTIVE fans. Holds last the default five
/// minutes: the tests end them with [`Mesh::run_out`] where they need them expired.
struct TwoFans {
    mesh: Mesh,
    concert_id: String,
    schedule_id: String,
    alice: String,
    bob: String,
}

async fn two_fans(seats: i32) -> TwoFans {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(seats).await;
    let alice = mesh.active_token(&concert_id, "alice").await;
    let bob = mesh.active_token(&concert_id, "bob").await;
    TwoFans {
        mesh,
        concert_id,
        schedule_id,
        alice,
        bob,
    }
}

#[tokio::test]
async fn an_expired_hold_frees_its_seats_at_once() {
    let TwoFans {
        mesh,
        concert_id: _,
        schedule_id,
        alice,
        bob,
    } = two_fans(50).await;

    let late = mesh
        .hold(0, &alice, &schedule_id, &[1, 2], "a-1")
        .await
        .unwrap();
    let untouched = mesh
        .hold(0, &alice, &schedule_id, &[10], "a-2")
        .await
        .unwrap();
    assert_eq!(late.status(), pb::HoldStatus::Held);
    assert_eq!(late.total_price, 300_000, "two VIP seats");
    assert_eq!(
        status_of(&mesh.seats(&bob, &schedule_id).await, 1),
        pb::SeatStatus::Held
    );

    mesh.run_out(&[&late.hold_id, &untouched.hold_id]).await;
    // No sweeper ran: the seats are free because the time passed.
    let seats = mesh.seats(&bob, &schedule_id).await;
    assert_eq!(status_of(&seats, 1), pb::SeatStatus::Available);
    assert_eq!(status_of(&seats, 2), pb::SeatStatus::Available);
    let taken = mesh
        .hold(0, &bob, &schedule_id, &[2], "b-1")
        .await
        .expect("held by another fan at once");

    // Paying the old hold now: seat 2 was taken since, so nothing is sold.
    let expired = mesh
        .confirm(0, &late.hold_id, "pay-late")
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::FailedPrecondition);
    assert_eq!(reason(&expired), "HOLD_EXPIRED");
    let seats = mesh.seats(&bob, &schedule_id).await;
    assert_eq!(
        status_of(&seats, 1),
        pb::SeatStatus::Available,
        "nothing changed"
    );
    assert_eq!(status_of(&seats, 2), pb::SeatStatus::Held);
    let hold = mesh.get_hold(&late.hold_id).await;
    assert_eq!(hold.status(), pb::HoldStatus::Expired);
    assert_ne!(taken.hold_id, late.hold_id);

    // An expired hold whose seat nobody took since is still sold when paid.
    let sold = mesh
        .confirm(0, &untouched.hold_id, "pay-untouched")
        .await
        .unwrap();
    assert_eq!(sold.status(), pb::HoldStatus::Confirmed);
    assert_eq!(
        status_of(&mesh.seats(&bob, &schedule_id).await, 10),
        pb::SeatStatus::Sold
    );
}

/// A hold that expires while another fan's HoldSeats waits for the seat's lock is gone by
/// the time that fan's batch decides: expiry is exact however long the lock took.
#[tokio::test]
async fn a_hold_that_expires_during_a_lock_wait_no_longer_counts() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let alice = mesh.active_token(&concert_id, "alice").await;
    let bob = mesh.active_token(&concert_id, "bob").await;
    let alices = mesh
        .hold(0, &alice, &schedule_id, &[7], "a-1")
        .await
        .unwrap();

    // Another transaction sits on seat 7's lock (as another replica's batch would).
    let mut blocker = mesh.lock_seat(&schedule_id, 7).await;
    let waiting = tokio::spawn(mesh.hold(0, &bob, &schedule_id, &[7], "b-1"));
    // Bob's batch waits on the seat's lock, begun while alice's five-minute hold is live.
    mesh.until_lock_waiters(1).await;
    // Alice's hold runs out now, after bob's batch began (a batch judging by its
    // transaction's start would still see it live); the blocker ends its time, as the clock
    // would, and lets bob through.
    sqlx::query(
        "WITH ended AS (
             UPDATE concert.holds SET expire_time = clock_timestamp()
              WHERE hold_id = $1::uuid RETURNING hold_id, expire_time)
         UPDATE concert.seats SET held_until = ended.expire_time
           FROM ended WHERE seats.held_by = ended.hold_id",
    )
    .bind(&alices.hold_id)
    .execute(&mut *blocker)
    .await
    .unwrap();
    blocker.commit().await.unwrap();

    let taken = waiting
        .await
        .unwrap()
        .expect("alice's hold ran out while bob waited");
    assert_eq!(taken.user_id, "bob");
    assert_eq!(taken.seat_numbers, vec![7]);
}

/// ReleaseHold frees a live hold's seats at once, and of an expired hold only the seats it
/// still has: one taken by another fan since stays theirs.
#[tokio::test]
async fn release_frees_only_the_seats_a_hold_still_has() {
    let TwoFans {
        mesh,
        concert_id: _,
        schedule_id,
        alice,
        bob,
    } = two_fans(50).await;
    let release = |token: &str, hold_id: &str| {
        let released = mesh.release(token, hold_id);
        async move { released.await.unwrap() }
    };

    let old = mesh
        .hold(0, &alice, &schedule_id, &[1, 2], "a-1")
        .await
        .unwrap();
    mesh.run_out(&[&old.hold_id]).await;
    let bobs = mesh
        .hold(0, &bob, &schedule_id, &[2, 3], "b-1")
        .await
        .unwrap();
    // Alice lets go of her expired hold: seat 2 is bob's now and stays so.
    assert_eq!(
        release(&alice, &old.hold_id).await.status(),
        pb::HoldStatus::Released
    );
    let seats = mesh.seats(&bob, &schedule_id).await;
    assert_eq!(status_of(&seats, 1), pb::SeatStatus::Available);
    assert_eq!(status_of(&seats, 2), pb::SeatStatus::Held);

    // Bob lets go of his live hold: both seats are free at once, for anyone.
    assert_eq!(
        release(&bob, &bobs.hold_id).await.status(),
        pb::HoldStatus::Released
    );
    let seats = mesh.seats(&alice, &schedule_id).await;
    assert_eq!(status_of(&seats, 2), pb::SeatStatus::Available);
    assert_eq!(status_of(&seats, 3), pb::SeatStatus::Available);
    mesh.hold(0, &alice, &schedule_id, &[2, 3], "a-2")
        .await
        .expect("released seats can be held again");
}

#[tokio::test]
async fn confirm_is_idempotent_per_payment_and_sells_once() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let hold = mesh
        .hold(0, &fan, &schedule_id, &[20, 21], "r-1")
        .await
        .unwrap();

    let first = mesh.confirm(0, &hold.hold_id, "pay-1").await.unwrap();
    assert_eq!(
        (first.status(), first.payment_id.as_str()),
        (pb::HoldStatus::Confirmed, "pay-1")
    );
    assert_eq!(
        mesh.confirm(0, &hold.hold_id, "pay-1").await.unwrap(),
        first,
        "the retry is answered the same"
    );
    let other = mesh.confirm(0, &hold.hold_id, "pay-2").await.unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert_eq!(reason(&other), "HOLD_NOT_HELD");

    let seats = mesh.seats(&fan, &schedule_id).await;
    assert_eq!(status_of(&seats, 20), pb::SeatStatus::Sold);
    assert_eq!(status_of(&seats, 21), pb::SeatStatus::Sold);
    let admin = mesh.database.admin().await;
    let sales: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT sold_to_payment FROM concert.seats WHERE sold_to_payment IS NOT NULL",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert_eq!(sales, vec!["pay-1".to_owned()]);

    // A paid hold cannot be released.
    let release = mesh.release(&fan, &hold.hold_id).await.unwrap_err();
    assert_eq!(reason(&release), "HOLD_NOT_HELD");

    // A payment buys one hold: the same payment id on another hold sells nothing.
    let another = mesh
        .hold(0, &fan, &schedule_id, &[22], "r-2")
        .await
        .unwrap();
    let reused = mesh
        .confirm(0, &another.hold_id, "pay-1")
        .await
        .unwrap_err();
    assert_eq!(
        (reused.code(), reason(&reused).as_str()),
        (Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(
        stagedoor_testkit::detail(&reused, "hold_id").as_deref(),
        Some(hold.hold_id.as_str())
    );
    let seats = mesh.seats(&fan, &schedule_id).await;
    assert_eq!(status_of(&seats, 22), pb::SeatStatus::Held);
}

/// Within one batch too: two holds confirmed with one payment id in one transaction, the
/// first sells, the second is refused and nothing of it is sold.
#[tokio::test]
async fn one_payment_id_in_one_batch_buys_one_hold() {
    use stagedoor_runtime::db;
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let first = mesh
        .hold(0, &fan, &schedule_id, &[30], "r-1")
        .await
        .unwrap();
    let second = mesh
        .hold(0, &fan, &schedule_id, &[31], "r-2")
        .await
        .unwrap();
    let pool = mesh.database.service_pool(db::CONCERT, 1).await;
    let request = |hold: &pb::Hold| stagedoor_concert::store::ConfirmRequest {
        hold_id: hold.hold_id.parse().unwrap(),
        payment_id: "pay-once".into(),
    };
    let answers =
        stagedoor_concert::store::confirm_batch(&pool, &[request(&first), request(&second)])
            .await
            .unwrap();
    pool.close().await;
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(
        matches!(
            &answers[1],
            Err(stagedoor_concert::domain::ConcertError::PaymentBoughtAnotherHold { hold_id, .. })
                if *hold_id == first.hold_id
        ),
        "{:?}",
        answers[1]
    );
    let seats = mesh.seats(&fan, &schedule_id).await;
    assert_eq!(status_of(&seats, 30), pb::SeatStatus::Sold);
    assert_eq!(status_of(&seats, 31), pb::SeatStatus::Held);
}

/// An expired hold is gone wherever seats are counted, before any sweeper runs: its seats
/// count as free in ListAvailableDates, they no longer count against its fan's four, and a
/// release of it is final, so a payment on its way can no longer buy it (unreleased, an
/// expired hold whose seats nobody took is still sold: see the first test).
#[tokio::test]
async fn an_expired_hold_counts_for_nothing_and_once_released_cannot_be_paid() {
    let TwoFans {
        mesh,
        concert_id,
        schedule_id,
        alice,
        bob,
    } = two_fans(8).await;
    let first = mesh
        .hold(0, &alice, &schedule_id, &[1, 2, 3, 4], "a-1")
        .await
        .unwrap();
    let bobs_first = mesh
        .hold(0, &bob, &schedule_id, &[5, 6, 7, 8], "b-1")
        .await
        .unwrap();
    assert!(
        mesh.dates(&bob, &concert_id).await.is_empty(),
        "every seat held: the date is off the list"
    );

    mesh.run_out(&[&first.hold_id, &bobs_first.hold_id]).await;
    let dates = mesh.dates(&bob, &concert_id).await;
    assert_eq!(
        dates
            .iter()
            .map(|date| date.available_seat_count)
            .collect::<Vec<_>>(),
        vec![8],
        "both holds expired: every seat free again"
    );
    // Alice's four expired seats no longer count: four more are hers.
    mesh.hold(0, &alice, &schedule_id, &[5, 6, 7, 8], "a-2")
        .await
        .expect("an expired hold counts against nobody's limit");

    let released = mesh.release(&alice, &first.hold_id).await.unwrap();
    assert_eq!(released.status(), pb::HoldStatus::Released);
    let late = mesh
        .confirm(0, &first.hold_id, "pay-late")
        .await
        .unwrap_err();
    assert_eq!(
        (late.code(), reason(&late).as_str()),
        (Code::FailedPrecondition, "HOLD_NOT_HELD")
    );
    assert_eq!(
        stagedoor_testkit::detail(&late, "status").as_deref(),
        Some("RELEASED")
    );
    let seats = mesh.seats(&bob, &schedule_id).await;
    for seat in 1..=4 {
        assert_eq!(status_of(&seats, seat), pb::SeatStatus::Available);
    }
}

#[tokio::test]
async fn tokens_decide_who_may_call_and_as_whom() {
    let mesh = mesh(1, |queue, concert| {
        queue.max_active = 2;
        // Ask the queue on every call, so a token completed a moment ago is refused at once.
        concert.token_cache_ttl = Duration::ZERO;
    })
    .await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let (other_concert, _) = mesh.catalog(50).await;
    let alice = mesh.active_token(&concert_id, "alice").await;
    let elsewhere = mesh.active_token(&other_concert, "carol").await;
    // Two ACTIVE at once per concert: alice and bob are in, erin waits.
    mesh.active_token(&concert_id, "bob").await;
    let (waiting, waiting_status) = mesh.token(&concert_id, "erin").await;
    assert_eq!(waiting_status, queue_pb::TokenStatus::Waiting);
    let public = mesh.concerts[0].public.clone();
    let dates = |token: Option<&str>, concert: &str| {
        let mut public = public.clone();
        let message = pb::ListAvailableDatesRequest {
            concert_id: concert.into(),
        };
        let request = match token {
            Some(token) => with_bearer(message, token),
            None => Request::new(message),
        };
        async move { public.list_available_dates(request).await }
    };

    let missing = dates(None, &concert_id).await.unwrap_err();
    assert_eq!(
        (missing.code(), reason(&missing).as_str()),
        (Code::Unauthenticated, "MISSING_TOKEN")
    );
    let malformed = dates(Some("not-a-token"), &concert_id).await.unwrap_err();
    assert_eq!(
        (malformed.code(), reason(&malformed).as_str()),
        (Code::Unauthenticated, "MALFORMED_TOKEN")
    );
    let unknown = dates(Some(&uuid::Uuid::new_v4().to_string()), &concert_id)
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), reason(&unknown).as_str()),
        (Code::Unauthenticated, "TOKEN_NOT_FOUND")
    );
    let not_yet = dates(Some(&waiting), &concert_id).await.unwrap_err();
    assert_eq!(
        (not_yet.code(), reason(&not_yet).as_str()),
        (Code::FailedPrecondition, "TOKEN_NOT_ACTIVE")
    );
    let wrong = dates(Some(&elsewhere), &concert_id).await.unwrap_err();
    assert_eq!(
        (wrong.code(), reason(&wrong).as_str()),
        (Code::PermissionDenied, "TOKEN_WRONG_CONCERT")
    );
    let wrong_hold = mesh
        .hold(0, &elsewhere, &schedule_id, &[1], "c-1")
        .await
        .unwrap_err();
    assert_eq!(reason(&wrong_hold), "TOKEN_WRONG_CONCERT");
    // A line with no concert behind it (opened for a concert whose insert then failed, or
    // left from before the concert service opened lines): its token is no use, and the
    // concert service says NOT_FOUND rather than an empty list that reads as "sold out".
    mesh.queue_internal
        .clone()
        .open_lines(queue_pb::OpenLinesRequest {
            concert_ids: vec!["concert-typo".into()],
        })
        .await
        .unwrap();
    let typo = mesh.active_token("concert-typo", "dave").await;
    let nowhere = dates(Some(&typo), "concert-typo").await.unwrap_err();
    assert_eq!(
        (nowhere.code(), reason(&nowhere).as_str()),
        (Code::NotFound, "CONCERT_NOT_FOUND")
    );

    // The hold is the token's user's, whoever the caller claims to be.
    let dates = dates(Some(&alice), &concert_id)
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert_eq!((dates.len(), dates[0].available_seat_count), (1, 50));
    let hold = mesh
        .hold(0, &alice, &schedule_id, &[5], "a-1")
        .await
        .unwrap();
    assert_eq!(hold.user_id, "alice");
    // Alice's token of another concert does not reach this concert's hold, even her own.
    let alice_elsewhere = mesh.active_token(&other_concert, "alice").await;
    let cross = mesh
        .release(&alice_elsewhere, &hold.hold_id)
        .await
        .unwrap_err();
    assert_eq!(
        (cross.code(), reason(&cross).as_str()),
        (Code::PermissionDenied, "TOKEN_WRONG_CONCERT")
    );
    assert_eq!(
        mesh.get_hold(&hold.hold_id).await.status(),
        pb::HoldStatus::Held
    );

    // A DONE token no longer works.
    mesh.queue_internal
        .clone()
        .complete_token(queue_pb::CompleteTokenRequest {
            token: alice.clone(),
        })
        .await
        .unwrap();
    let done = mesh
        .hold(0, &alice, &schedule_id, &[6], "a-2")
        .await
        .unwrap_err();
    assert_eq!(
        (done.code(), reason(&done).as_str()),
        (Code::FailedPrecondition, "TOKEN_NOT_ACTIVE")
    );
    assert_eq!(mesh.hold_rows().await, 1);
}

#[tokio::test]
async fn bad_holds_are_refused_and_change_nothing() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let other = mesh.active_token(&concert_id, "other").await;

    for seats in [vec![0], vec![51], vec![3, 3], vec![1, 2, 3, 4, 5], vec![]] {
        let status = mesh
            .hold(0, &fan, &schedule_id, &seats, "r-bad")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "seats {seats:?}");
        assert_eq!(reason(&status), "INVALID_FIELD");
    }
    let unknown = mesh
        .hold(0, &fan, "date-nope", &[1], "r-1")
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), reason(&unknown).as_str()),
        (Code::NotFound, "SCHEDULE_NOT_FOUND")
    );
    let no_key = mesh
        .hold(0, &fan, &schedule_id, &[1], "")
        .await
        .unwrap_err();
    assert_eq!(reason(&no_key), "INVALID_FIELD");
    assert_eq!(mesh.hold_rows().await, 0, "nothing written");

    // Releasing: unknown, malformed, or someone else's hold.
    let release = |token: &str, hold_id: &str| mesh.release(token, hold_id);
    let hold = mesh
        .hold(0, &other, &schedule_id, &[9], "o-1")
        .await
        .unwrap();
    let theirs = release(&fan, &hold.hold_id).await.unwrap_err();
    assert_eq!(
        (theirs.code(), reason(&theirs).as_str()),
        (Code::NotFound, "HOLD_NOT_FOUND")
    );
    let unknown = release(&fan, &uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown), "HOLD_NOT_FOUND");
    let malformed = release(&fan, "hold-9").await.unwrap_err();
    assert_eq!(
        (malformed.code(), reason(&malformed).as_str()),
        (Code::InvalidArgument, "INVALID_FIELD")
    );
    assert_eq!(
        status_of(&mesh.seats(&fan, &schedule_id).await, 9),
        pb::SeatStatus::Held,
        "still theirs"
    );

    // Its owner releases it: free at once; twice is fine.
    let released = release(&other, &hold.hold_id).await.unwrap();
    assert_eq!(released.status(), pb::HoldStatus::Released);
    release(&other, &hold.hold_id).await.unwrap();
    assert_eq!(
        status_of(&mesh.seats(&fan, &schedule_id).await, 9),
        pb::SeatStatus::Available
    );
}

#[tokio::test]
async fn a_fan_holds_at_most_four_seats_of_a_date_and_retries_replay() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let three = mesh
        .hold(0, &fan, &schedule_id, &[11, 12, 13], "r-1")
        .await
        .unwrap();
    assert_eq!(
        mesh.hold(0, &fan, &schedule_id, &[11, 12, 13], "r-1")
            .await
            .unwrap(),
        three,
        "retry"
    );
    let reused = mesh
        .hold(0, &fan, &schedule_id, &[14], "r-1")
        .await
        .unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    let over = mesh
        .hold(0, &fan, &schedule_id, &[14, 15], "r-2")
        .await
        .unwrap_err();
    assert_eq!(
        (over.code(), reason(&over).as_str()),
        (Code::FailedPrecondition, "HOLD_LIMIT_EXCEEDED")
    );
    assert_eq!(
        (
            stagedoor_testkit::detail(&over, "limit").as_deref(),
            stagedoor_testkit::detail(&over, "held").as_deref()
        ),
        (Some("4"), Some("3"))
    );
    mesh.hold(0, &fan, &schedule_id, &[14], "r-3")
        .await
        .expect("the fourth seat fits");
    assert_eq!(mesh.hold_rows().await, 2);
}

#[tokio::test]
async fn a_sold_out_date_drops_out_of_the_list() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(2).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let dates = || mesh.dates(&fan, &concert_id);
    assert_eq!(dates().await.len(), 1);
    let hold = mesh
        .hold(0, &fan, &schedule_id, &[1, 2], "r-1")
        .await
        .unwrap();
    assert!(dates().await.is_empty(), "held seats are not free");
    mesh.confirm(0, &hold.hold_id, "pay-1").await.unwrap();
    assert!(dates().await.is_empty(), "sold out");
    // Sold, not merely still held.
    let seats = mesh.seats(&fan, &schedule_id).await;
    assert_eq!(status_of(&seats, 1), pb::SeatStatus::Sold);
    assert_eq!(status_of(&seats, 2), pb::SeatStatus::Sold);
}

#[tokio::test]
async fn a_vouched_token_is_trusted_no_longer_than_the_cache_ttl() {
    let mesh = mesh(1, |_, concert| {
        concert.token_cache_ttl = Duration::from_millis(500)
    })
    .await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    mesh.seats(&fan, &schedule_id).await; // the queue vouches; the answer is kept
    mesh.queue_internal
        .clone()
        .complete_token(queue_pb::CompleteTokenRequest { token: fan.clone() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let refused = mesh
        .hold(0, &fan, &schedule_id, &[1], "r-1")
        .await
        .unwrap_err();
    assert_eq!(
        reason(&refused),
        "TOKEN_NOT_ACTIVE",
        "asked the queue again after the TTL"
    );
    assert_eq!(mesh.hold_rows().await, 0);
}

/// The sweeper retires unpaid holds some time after they expire and touches nothing else:
/// not a paid hold, not a live one, not a seat another fan took after the expiry. A retired
/// hold can no longer be paid, even though nobody took its seats.
#[tokio::test]
async fn the_sweeper_retires_unpaid_holds_and_nothing_else() {
    // Holds live five minutes and are retired a minute after they end, by a sweeper that
    // looks every 50 ms: the test moves the holds' ends, never races them.
    let grace = Duration::from_secs(60);
    let mesh = mesh(1, |_, concert| {
        concert.hold_sweep_after = grace;
        concert.hold_sweep_every = Duration::from_millis(50);
    })
    .await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let alice = mesh.active_token(&concert_id, "alice").await;
    let bob = mesh.active_token(&concert_id, "bob").await;

    let untaken = mesh
        .hold(0, &alice, &schedule_id, &[1, 2], "a-1")
        .await
        .unwrap();
    let retaken = mesh
        .hold(0, &alice, &schedule_id, &[5], "a-2")
        .await
        .unwrap();
    let paid = mesh
        .hold(0, &alice, &schedule_id, &[3], "a-3")
        .await
        .unwrap();
    mesh.confirm(0, &paid.hold_id, "pay-paid").await.unwrap();

    let admin = mesh.database.admin().await;
    let row_status = |hold_id: String| {
        let admin = admin.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT status FROM concert.holds WHERE hold_id = $1::uuid",
            )
            .bind(hold_id)
            .fetch_one(&admin)
            .await
            .unwrap()
        }
    };
    // Past the expiry, inside the grace: bob takes seat 5 from a hold not yet retired (else
    // the sweeper would have nothing of bob's to leave alone).
    mesh.run_out(&[&untaken.hold_id, &retaken.hold_id]).await;
    let bobs = mesh.hold(0, &bob, &schedule_id, &[5], "b-1").await.unwrap();
    assert_eq!(
        row_status(retaken.hold_id.clone()).await,
        "HELD",
        "swept before bob took its seat"
    );
    // Past the grace: the next sweeps retire alice's two unpaid holds, and leave her paid
    // one, whose time has passed as well.
    mesh.run_out_ago(&[&untaken.hold_id, &retaken.hold_id, &paid.hold_id], grace)
        .await;
    stagedoor_testkit::eventually(Duration::from_secs(10), "the sweeper retires", || async {
        let statuses = [
            row_status(untaken.hold_id.clone()).await,
            row_status(retaken.hold_id.clone()).await,
        ];
        (statuses == ["EXPIRED", "EXPIRED"]).then_some(())
    })
    .await;
    assert_eq!(row_status(paid.hold_id.clone()).await, "CONFIRMED");
    assert_eq!(
        row_status(bobs.hold_id.clone()).await,
        "HELD",
        "a live hold stays"
    );
    let marks: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT seat_number, held_by::text, sold_to_payment FROM concert.seats
          WHERE seat_number IN (1, 2, 3, 5) ORDER BY seat_number",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(
        marks,
        vec![
            (1, None, None),
            (2, None, None),
            (3, None, Some("pay-paid".to_owned())),
            (5, Some(bobs.hold_id.clone()), None),
        ],
        "retired holds' seats unmarked; the sale and bob's hold untouched"
    );

    // Too late to pay for a retired hold, though its seats are still free; nothing changes.
    let late = mesh
        .confirm(0, &untaken.hold_id, "pay-late")
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(reason(&late), "HOLD_EXPIRED");
    let seats = mesh.seats(&bob, &schedule_id).await;
    assert_eq!(status_of(&seats, 1), pb::SeatStatus::Available);
    assert_eq!(status_of(&seats, 5), pb::SeatStatus::Held);
    // Releasing it is the no-op that releasing any expired hold is.
    let released = mesh.release(&alice, &untaken.hold_id).await.unwrap();
    assert_eq!(released.status(), pb::HoldStatus::Expired);
    assert_eq!(row_status(untaken.hold_id.clone()).await, "EXPIRED");
    admin.close().await;
}

#[tokio::test]
async fn a_date_that_has_started_is_off_sale_and_changes_nothing() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, later) = mesh.catalog(10).await;
    let mut admin = mesh.concerts[0].admin.clone();
    let add_date = |starts_in: chrono::Duration, key: &str| {
        let start = chrono::Utc::now() + starts_in;
        pb::AddScheduleRequest {
            concert_id: concert_id.clone(),
            start_time: Some(prost_types::Timestamp {
                seconds: start.timestamp(),
                nanos: start.timestamp_subsec_nanos() as i32,
            }),
            venue: "Olympic Hall".into(),
            seat_count: 10,
            sections: vec![pb::PriceSection {
                name: "R".into(),
                first_seat: 1,
                last_seat: 10,
                price: 90_000,
            }],
            request_id: key.into(),
        }
    };
    // Entered after the fact (an admin may record a past date): never on sale.
    let past = admin
        .add_schedule(add_date(chrono::Duration::hours(-1), "past"))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap()
        .schedule_id;
    // On sale now, for four more seconds (time enough for the steps before it starts, on a
    // busy machine).
    let soon = admin
        .add_schedule(add_date(chrono::Duration::seconds(4), "soon"))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    let starts = soon.start_time.unwrap();
    let soon = soon.schedule_id;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let listed = || async {
        let dates = mesh.dates(&fan, &concert_id).await;
        dates
            .into_iter()
            .map(|date| date.schedule_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(listed().await, vec![soon.clone(), later.clone()]);
    let before_the_start = mesh
        .hold(0, &fan, &soon, &[1], "before-the-start")
        .await
        .expect("on sale until it starts");
    let closed = |status: tonic::Status, schedule_id: &str| {
        use tonic_types::StatusExt;
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "SALE_CLOSED");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata["schedule_id"], schedule_id);
    };
    let refused = mesh.hold(0, &fan, &past, &[1], "past").await.unwrap_err();
    closed(refused, &past);

    let until_start = chrono::DateTime::from_timestamp(starts.seconds, starts.nanos as u32)
        .unwrap()
        - chrono::Utc::now();
    tokio::time::sleep(until_start.to_std().unwrap_or_default() + Duration::from_millis(100)).await;
    assert_eq!(listed().await, vec![later.clone()]);
    // A retry of the hold made before the start still gets it back (its reply may have
    // been lost); it may still be paid.
    let replayed = mesh
        .hold(0, &fan, &soon, &[1], "before-the-start")
        .await
        .expect("a retry gets its hold back");
    assert_eq!(replayed.hold_id, before_the_start.hold_id);
    let holds_before = mesh.hold_rows().await;
    for schedule_id in [&soon, &past] {
        let refused = mesh
            .hold(0, &fan, schedule_id, &[2], &format!("after-{schedule_id}"))
            .await
            .unwrap_err();
        closed(refused, schedule_id);
        let seats = mesh.concerts[0]
            .public
            .clone()
            .list_available_seats(with_bearer(
                pb::ListAvailableSeatsRequest {
                    schedule_id: schedule_id.clone(),
                },
                &fan,
            ))
            .await
            .unwrap_err();
        closed(seats, schedule_id);
    }
    assert_eq!(mesh.hold_rows().await, holds_before, "nothing written");
    // The date still on sale is untouched.
    mesh.hold(0, &fan, &later, &[2], "later").await.unwrap();
}

/// A retried HoldSeats answers the hold as it is when the retry is answered. Here the fan
/// released the hold while the retry waited for the hold's seat (behind another replica's
/// batch): the retry says RELEASED, not the HELD it would have read before the wait.
#[tokio::test]
async fn a_retried_hold_answers_the_hold_as_it_is_after_waiting_for_its_seats() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let alice = mesh.active_token(&concert_id, "alice").await;
    let held = mesh
        .hold(0, &alice, &schedule_id, &[7], "a-1")
        .await
        .unwrap();

    let blocker = mesh.lock_seat(&schedule_id, 7).await;
    // Alice cancels: ReleaseHold waits for seat 7 first ...
    let release = tokio::spawn(mesh.release(&alice, &held.hold_id));
    mesh.until_lock_waiters(1).await;
    // ... and her HoldSeats from before, retried, waits behind it.
    let retry = tokio::spawn(mesh.hold(0, &alice, &schedule_id, &[7], "a-1"));
    mesh.until_lock_waiters(2).await;
    blocker.commit().await.unwrap();

    let released = release.await.unwrap().unwrap();
    assert_eq!(released.status(), pb::HoldStatus::Released);
    let retried = retry.await.unwrap().unwrap();
    assert_eq!(retried.hold_id, held.hold_id);
    assert_eq!(retried.status(), pb::HoldStatus::Released);
}

/// A fan who paid for one hold (the payment completes the token: DONE) still frees the
/// other holds it has: ReleaseHold takes the fan's token while it waits, while it is ACTIVE,
/// and for a hold's TTL after its window, since giving seats back takes nothing from anyone.
/// Everything else still wants an ACTIVE token; an ended token still releases its own fan's
/// holds only, and one whose window ended longer ago than that is no credential at all.
#[tokio::test]
async fn a_fan_whose_token_is_done_can_still_give_holds_back() {
    // No cache of vouched tokens: every call asks the queue.
    let mesh = mesh(1, |_, concert| concert.token_cache_ttl = Duration::ZERO).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let other = mesh.active_token(&concert_id, "other").await;
    let bought = mesh.hold(0, &fan, &schedule_id, &[1], "r-1").await.unwrap();
    let kept = mesh
        .hold(0, &fan, &schedule_id, &[2, 3], "r-2")
        .await
        .unwrap();
    let others = mesh
        .hold(0, &other, &schedule_id, &[4], "o-1")
        .await
        .unwrap();
    let stale = mesh.active_token(&concert_id, "stale").await;
    let stales = mesh
        .hold(0, &stale, &schedule_id, &[6], "s-1")
        .await
        .unwrap();
    mesh.confirm(0, &bought.hold_id, "pay-1").await.unwrap();
    for token in [&fan, &stale] {
        mesh.queue_internal
            .clone()
            .complete_token(queue_pb::CompleteTokenRequest {
                token: token.clone(),
            })
            .await
            .unwrap();
    }
    // `stale`'s window ended an hour ago, far more than the 5 minutes a hold lasts.
    let admin = mesh.database.admin().await;
    sqlx::query(
        "UPDATE queue.tokens SET expire_time = now() - interval '1 hour' WHERE user_id = 'stale'",
    )
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let too_old = mesh.release(&stale, &stales.hold_id).await.unwrap_err();
    assert_eq!(reason(&too_old), "TOKEN_NOT_ACTIVE");

    let released = mesh
        .release(&fan, &kept.hold_id)
        .await
        .expect("a DONE token releases its fan's hold");
    assert_eq!(released.status(), pb::HoldStatus::Released);
    let seats = mesh.seats(&other, &schedule_id).await;
    assert_eq!(status_of(&seats, 2), pb::SeatStatus::Available);
    assert_eq!(status_of(&seats, 3), pb::SeatStatus::Available);

    let not_theirs = mesh.release(&fan, &others.hold_id).await.unwrap_err();
    assert_eq!(reason(&not_theirs), "HOLD_NOT_FOUND");
    let no_more = mesh
        .hold(0, &fan, &schedule_id, &[5], "r-3")
        .await
        .unwrap_err();
    assert_eq!(reason(&no_more), "TOKEN_NOT_ACTIVE");
    let unknown = mesh
        .release(&uuid::Uuid::new_v4().to_string(), &kept.hold_id)
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown), "TOKEN_NOT_FOUND");
}

/// A fan who left the line with seats still held, and queued again, releases them with the
/// new token while it waits: a WAITING token names the fan as well as an ACTIVE one.
#[tokio::test]
async fn a_waiting_token_gives_back_the_holds_of_an_earlier_admission() {
    let mesh = mesh(1, |queue, concert| {
        queue.max_active = 1;
        concert.token_cache_ttl = Duration::ZERO;
    })
    .await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let first = mesh.active_token(&concert_id, "fan").await;
    let held = mesh
        .hold(0, &first, &schedule_id, &[7], "r-1")
        .await
        .unwrap();
    mesh.queue
        .clone()
        .leave_queue(queue_pb::LeaveQueueRequest {
            token: first.clone(),
        })
        .await
        .unwrap();
    // Someone else takes the only slot; the fan queues again behind them.
    mesh.active_token(&concert_id, "next").await;
    let (again, status) = mesh.token(&concert_id, "fan").await;
    assert_eq!(status, queue_pb::TokenStatus::Waiting);

    let released = mesh
        .release(&again, &held.hold_id)
        .await
        .expect("a WAITING token releases its fan's hold");
    assert_eq!(released.status(), pb::HoldStatus::Released);
}
