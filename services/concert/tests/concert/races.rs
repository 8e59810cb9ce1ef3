use std::{collections::HashSet, sync::Arc, time::Duration};

use stagedoor_concert::store;
use stagedoor_proto::{concert::v1 as pb, queue::v1 as queue_pb};
use stagedoor_runtime::{db, time::from_timestamp, ApiError};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{mesh, reason};

/// 1,000 fans, each with their own ACTIVE token, race for seat 7 over TWO concert replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_fans_race_for_one_seat_and_one_wins() {
    let mesh = Arc::new(mesh(2, |_, _| {}).await);
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let mut tokens = Vec::new();
    for fan in 0..1_000 {
        let mesh = mesh.clone();
        let concert_id = concert_id.clone();
        tokens.push(tokio::spawn(async move {
            mesh.active_token(&concert_id, &format!("fan-{fan}")).await
        }));
    }
    let mut active = Vec::new();
    for token in tokens {
        active.push(token.await.unwrap());
    }
    // Every fan holds a token first; then all of them fire at once.
    let mut calls = Vec::new();
    for (fan, token) in active.into_iter().enumerate() {
        let (mesh, schedule_id) = (mesh.clone(), schedule_id.clone());
        calls.push(tokio::spawn(async move {
            mesh.hold(fan % 2, &token, &schedule_id, &[7], &format!("r-{fan}"))
                .await
        }));
    }
    let mut winners = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(hold) => winners.push(hold),
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                assert_eq!(reason(&status), "SEAT_UNAVAILABLE");
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner");
    let winner = &winners[0];
    assert_eq!(winner.seat_numbers, vec![7]);

    let admin = mesh.database.admin().await;
    let (held_by,): (Option<uuid::Uuid>,) = sqlx::query_as(
        "SELECT held_by FROM concert.seats WHERE schedule_id = $1 AND seat_number = 7",
    )
    .bind(&schedule_id)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(
        held_by.map(|id| id.to_string()),
        Some(winner.hold_id.clone())
    );
    admin.close().await;
    assert_eq!(mesh.hold_rows().await, 1, "the losers wrote nothing");
}

/// Hundreds of overlapping two-seat holds ({1,2}, {2,3}, {3,4}, ...) race over two replicas:
/// no seat is held twice, no hold is partial, and no deadlock ever reaches a client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_multi_seat_holds_never_split_or_deadlock() {
    let mesh = Arc::new(mesh(2, |_, _| {}).await);
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let mut calls = Vec::new();
    for fan in 0..300 {
        let (mesh, concert_id, schedule_id) =
            (mesh.clone(), concert_id.clone(), schedule_id.clone());
        calls.push(tokio::spawn(async move {
            let token = mesh.active_token(&concert_id, &format!("fan-{fan}")).await;
            // Pairs and triples that overlap their neighbours, in both orders.
            let first = (fan % 48) as i32 + 1;
            let seats: Vec<i32> = if fan % 2 == 0 {
                vec![first, first + 1]
            } else {
                vec![first + 2, first + 1, first]
            };
            mesh.hold(fan % 2, &token, &schedule_id, &seats, &format!("r-{fan}"))
                .await
        }));
    }
    let mut held_seats = HashSet::new();
    let mut holds = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(hold) => {
                for seat in &hold.seat_numbers {
                    assert!(held_seats.insert(*seat), "seat {seat} held twice");
                }
                holds.push(hold);
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::Aborted,
                    "only lost races, no deadlock: {status:?}"
                );
                assert_eq!(reason(&status), "SEAT_UNAVAILABLE");
            }
        }
    }
    assert!(!holds.is_empty());
    // Every hold has all its seats, and no seat is held by a hold that lost.
    let admin = mesh.database.admin().await;
    let seat_owners: Vec<(i32, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT seat_number, held_by FROM concert.seats WHERE schedule_id = $1")
            .bind(&schedule_id)
            .fetch_all(&admin)
            .await
            .unwrap();
    admin.close().await;
    for hold in &holds {
        for seat in &hold.seat_numbers {
            let owner = seat_owners.iter().find(|(n, _)| n == seat).unwrap().1;
            assert_eq!(
                owner.map(|id| id.to_string()).as_deref(),
                Some(hold.hold_id.as_str())
            );
        }
    }
    let owned = seat_owners
        .iter()
        .filter(|(_, owner)| owner.is_some())
        .count();
    assert_eq!(
        owned,
        held_seats.len(),
        "a seat is held by a hold nobody got back"
    );
    assert_eq!(mesh.hold_rows().await, holds.len() as i64);
}

/// One fan fires 40 single-seat holds on 40 free seats at once, over two replicas (in the
/// same batch and in concurrent batches): the 4-seat limit still holds, exactly 4 win. And
/// one request id sent 100 times at once makes one hold, which every copy gets back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_fans_concurrent_holds_keep_the_limit_and_one_key_makes_one_hold() {
    let mesh = Arc::new(mesh(2, |_, _| {}).await);
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let hoarder = mesh.active_token(&concert_id, "hoarder").await;
    let calls: Vec<_> = (1..=40)
        .map(|seat: i32| {
            let (mesh, token, schedule_id) = (mesh.clone(), hoarder.clone(), schedule_id.clone());
            tokio::spawn(async move {
                mesh.hold(
                    seat as usize % 2,
                    &token,
                    &schedule_id,
                    &[seat],
                    &format!("r-{seat}"),
                )
                .await
            })
        })
        .collect();
    let mut won = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => won += 1,
            Err(status) => assert_eq!(reason(&status), "HOLD_LIMIT_EXCEEDED", "{status:?}"),
        }
    }
    assert_eq!(
        won, 4,
        "a fan holds at most 4 seats of a date, however fast they click"
    );
    assert_eq!(mesh.hold_rows().await, 4);
    // The full fan clicks one more hold a hundred times: every copy hears the same refusal.
    let calls: Vec<_> = (0..100)
        .map(|copy| {
            let (mesh, token, schedule_id) = (mesh.clone(), hoarder.clone(), schedule_id.clone());
            tokio::spawn(async move {
                mesh.hold(copy % 2, &token, &schedule_id, &[47], "one-too-many")
                    .await
            })
        })
        .collect();
    for call in calls {
        let refused = call.await.unwrap().unwrap_err();
        assert_eq!(reason(&refused), "HOLD_LIMIT_EXCEEDED", "{refused:?}");
    }
    assert_eq!(mesh.hold_rows().await, 4);

    let clicker = mesh.active_token(&concert_id, "clicker").await;
    let calls: Vec<_> = (0..100)
        .map(|copy| {
            let (mesh, token, schedule_id) = (mesh.clone(), clicker.clone(), schedule_id.clone());
            tokio::spawn(async move {
                mesh.hold(copy % 2, &token, &schedule_id, &[45, 46], "same-key")
                    .await
            })
        })
        .collect();
    let mut holds = HashSet::new();
    for call in calls {
        let hold = call
            .await
            .unwrap()
            .expect("every copy gets the one hold back");
        holds.insert(hold.hold_id);
    }
    assert_eq!(holds.len(), 1, "one key, one hold");
    assert_eq!(mesh.hold_rows().await, 5);
}

/// 20 holds, each confirmed by forty concurrent ConfirmHold calls over two replicas (800
/// released at once): twenty retries of one payment and twenty other payments. Per hold exactly one payment
/// buys it, every call of that payment is answered with the sale, every other payment is
/// refused, and each seat is sold to its hold's buyer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_confirms_sell_each_hold_to_exactly_one_payment() {
    let mesh = Arc::new(mesh(2, |_, _| {}).await);
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let mut holds = Vec::new();
    for fan in 0..20 {
        let token = mesh.active_token(&concert_id, &format!("fan-{fan}")).await;
        let hold = mesh
            .hold(fan % 2, &token, &schedule_id, &[fan as i32 + 1], "r")
            .await
            .unwrap();
        holds.push(hold.hold_id);
    }

    let attempts = 40;
    let start = Arc::new(tokio::sync::Barrier::new(holds.len() * attempts));
    let mut calls = Vec::new();
    for (index, hold_id) in holds.iter().enumerate() {
        for attempt in 0..attempts {
            let payment_id = if attempt % 2 == 0 {
                format!("pay-{index}")
            } else {
                format!("other-{index}-{attempt}")
            };
            let (mesh, hold_id, start) = (mesh.clone(), hold_id.clone(), start.clone());
            calls.push(tokio::spawn(async move {
                start.wait().await;
                let answer = mesh.confirm(attempt % 2, &hold_id, &payment_id).await;
                (hold_id, payment_id, answer)
            }));
        }
    }
    let mut buyers: std::collections::HashMap<String, HashSet<String>> = Default::default();
    let mut refused: std::collections::HashMap<String, HashSet<String>> = Default::default();
    for call in calls {
        let (hold_id, payment_id, answer) = call.await.unwrap();
        match answer {
            Ok(hold) => {
                assert_eq!(
                    hold.payment_id, payment_id,
                    "a sale answers its own payment"
                );
                buyers.entry(hold_id).or_default().insert(payment_id);
            }
            Err(status) => {
                assert_eq!(
                    (status.code(), reason(&status).as_str()),
                    (Code::FailedPrecondition, "HOLD_NOT_HELD"),
                    "{status:?}"
                );
                refused.entry(hold_id).or_default().insert(payment_id);
            }
        }
    }
    assert_eq!(buyers.len(), holds.len(), "every hold was sold");
    let admin = mesh.database.admin().await;
    for (hold_id, payments) in &buyers {
        assert_eq!(
            payments.len(),
            1,
            "one buyer for hold {hold_id}: {payments:?}"
        );
        let buyer = payments.iter().next().unwrap();
        assert!(
            !refused.get(hold_id).is_some_and(|r| r.contains(buyer)),
            "the buyer's retries are never refused"
        );
        let sold_to: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT s.sold_to_payment FROM concert.seats s
               JOIN concert.holds h ON s.schedule_id = h.schedule_id
                                   AND s.seat_number = ANY(h.seat_numbers)
              WHERE h.hold_id = $1::uuid",
        )
        .bind(hold_id)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert_eq!(sold_to, vec![Some(buyer.clone())]);
    }
    let sold: i64 =
        sqlx::query_scalar("SELECT count(*) FROM concert.seats WHERE sold_to_payment IS NOT NULL")
            .fetch_one(&admin)
            .await
            .unwrap();
    admin.close().await;
    assert_eq!(sold, 20, "no other seat was sold");
}

/// The same rule inside one batch, where the race above only sometimes lands: a batch that
/// holds two payments of one hold, a retry of the winner, and an unknown hold answers each
/// call on its own, in arrival order.
#[tokio::test]
async fn one_confirm_batch_sells_a_hold_once_and_answers_each_call() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(50).await;
    let token = mesh.active_token(&concert_id, "fan").await;
    let hold = mesh
        .hold(0, &token, &schedule_id, &[3, 4], "r")
        .await
        .unwrap();
    let hold_id: uuid::Uuid = hold.hold_id.parse().unwrap();
    let pool = mesh.database.service_pool(db::CONCERT, 1).await;
    let call = |hold_id, payment_id: &str| store::ConfirmRequest {
        hold_id,
        payment_id: payment_id.into(),
    };
    let answers = store::confirm_batch(
        &pool,
        &[
            call(hold_id, "pay-a"),
            call(hold_id, "pay-b"),
            call(hold_id, "pay-a"),
            call(uuid::Uuid::new_v4(), "pay-c"),
        ],
    )
    .await
    .unwrap();
    pool.close().await;
    let outcome: Vec<Result<String, String>> = answers
        .into_iter()
        .map(|answer| match answer {
            Ok(hold) => Ok(format!("{} {:?}", hold.status, hold.payment_id)),
            Err(error) => Err(ApiError::from(error).reason().to_owned()),
        })
        .collect();
    assert_eq!(outcome[0], Ok("CONFIRMED Some(\"pay-a\")".to_owned()));
    assert_eq!(
        outcome[1],
        Err("HOLD_NOT_HELD".to_owned()),
        "another payment"
    );
    assert_eq!(outcome[2], outcome[0], "the retry gets the sale");
    assert_eq!(outcome[3], Err("HOLD_NOT_FOUND".to_owned()));
    let seats = mesh.seats(&token, &schedule_id).await;
    let sold: Vec<i32> = seats
        .iter()
        .filter(|seat| seat.status() == pb::SeatStatus::Sold)
        .map(|seat| seat.seat_number)
        .collect();
    assert_eq!(sold, vec![3, 4]);
}

/// A replica checks the tokens of fans who arrive together in shared ValidateTokens calls:
/// 400 first calls at once, mixing ACTIVE, WAITING, never-issued and malformed tokens, each
/// get their own token's answer, never a neighbour's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fans_checked_together_each_get_their_own_tokens_answer() {
    let mesh = Arc::new(
        mesh(2, |queue, concert| {
            queue.max_active = 100;
            concert.token_cache_ttl = Duration::ZERO;
        })
        .await,
    );
    let (concert_id, schedule_id) = mesh.catalog(400).await;
    let mut fans = Vec::new();
    for fan in 0..200 {
        let (token, status) = mesh.token(&concert_id, &format!("fan-{fan}")).await;
        let expected = match status {
            queue_pb::TokenStatus::Active => format!("OK fan-{fan}"),
            _ => "TOKEN_NOT_ACTIVE WAITING".to_owned(),
        };
        fans.push((token, expected));
    }
    for fan in 0..100 {
        fans.push((uuid::Uuid::new_v4().to_string(), "TOKEN_NOT_FOUND".into()));
        fans.push((format!("forged-{fan}"), "MALFORMED_TOKEN".into()));
    }
    let active = fans.iter().filter(|(_, e)| e.starts_with("OK")).count();
    assert_eq!(active, 100, "the queue admitted its cap, the rest wait");

    let start = Arc::new(tokio::sync::Barrier::new(fans.len()));
    let calls: Vec<_> = fans
        .into_iter()
        .enumerate()
        .map(|(index, (token, expected))| {
            let (mesh, schedule_id, start) = (mesh.clone(), schedule_id.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                // Each fan holds a seat of their own: the hold names whose token it was.
                let seat = index as i32 + 1;
                let answer = mesh
                    .hold(index % 2, &token, &schedule_id, &[seat], "r")
                    .await;
                let got = match answer {
                    Ok(hold) => format!("OK {}", hold.user_id),
                    Err(status) => {
                        let info = status.get_details_error_info().unwrap();
                        let detail = info.metadata.get("status").cloned().unwrap_or_default();
                        format!("{} {detail}", info.reason).trim().to_owned()
                    }
                };
                (expected, got)
            })
        })
        .collect();
    for call in calls {
        let (expected, got) = call.await.unwrap();
        assert_eq!(got, expected);
    }
}

/// ConfirmHold racing the sweepers of two replicas: 200 holds expire, the sweepers (no
/// grace, every 10 ms) retire them, and each hold's payment arrives on one of the replicas,
/// half of them between 100 ms before and 100 ms after its hold's expiry, the others a second
/// before or after it. Every hold ends one way only:
/// sold to its payment (the call said so, its seat is SOLD to it) or retired (the call said
/// HOLD_EXPIRED, its seat unmarked and unsold). No other answer, and both happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirms_racing_the_sweepers_end_each_hold_sold_or_retired() {
    let mesh = Arc::new(
        mesh(2, |_, concert| {
            concert.hold_ttl = Duration::from_secs(3);
            concert.hold_sweep_after = Duration::ZERO;
            concert.hold_sweep_every = Duration::from_millis(10);
        })
        .await,
    );
    let (concert_id, schedule_id) = mesh.catalog(200).await;
    // 50 fans hold 4 seats each, all at once, so that every hold is made well inside the TTL.
    let fans: Vec<_> = (0..50)
        .map(|fan| {
            let (mesh, concert_id, schedule_id) =
                (mesh.clone(), concert_id.clone(), schedule_id.clone());
            tokio::spawn(async move {
                let token = mesh.active_token(&concert_id, &format!("fan-{fan}")).await;
                let mut holds = Vec::new();
                for seat in 0..4 {
                    let number = fan * 4 + seat + 1;
                    let hold = mesh
                        .hold(0, &token, &schedule_id, &[number], &format!("r-{number}"))
                        .await
                        .unwrap();
                    holds.push(hold);
                }
                holds
            })
        })
        .collect();
    let mut holds = Vec::new();
    for fan in fans {
        holds.extend(fan.await.unwrap());
    }

    let calls: Vec<_> = holds
        .iter()
        .enumerate()
        .map(|(index, hold)| {
            let (mesh, hold_id) = (mesh.clone(), hold.hold_id.clone());
            let expiry = from_timestamp(hold.expire_time.as_ref().unwrap()).unwrap();
            // Half of them from 100 ms before the hold's expiry to 100 ms after it: the race.
            // A quarter a second before (sold, unless making the holds took most of their
            // 3 s) and a quarter a second after (retired), so that both outcomes are seen
            // however the race itself falls.
            let offset = match index % 4 {
                0 => -1_000,
                1 => 1_000,
                _ => (index as i64 * 2) % 200 - 100,
            };
            let pay_at = expiry + chrono::Duration::milliseconds(offset);
            tokio::spawn(async move {
                let wait = (pay_at - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                let payment_id = format!("pay-{index}");
                let answer = mesh.confirm(index % 2, &hold_id, &payment_id).await;
                (hold_id, payment_id, answer)
            })
        })
        .collect();

    let admin = mesh.database.admin().await;
    let (mut sold, mut retired) = (0, 0);
    for call in calls {
        let (hold_id, payment_id, answer) = call.await.unwrap();
        let (status, held_by, sold_to): (String, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT h.status, s.held_by::text, s.sold_to_payment
                   FROM concert.holds h
                   JOIN concert.seats s ON s.schedule_id = h.schedule_id
                                       AND s.seat_number = h.seat_numbers[1]
                  WHERE h.hold_id = $1::uuid",
        )
        .bind(&hold_id)
        .fetch_one(&admin)
        .await
        .unwrap();
        match answer {
            Ok(hold) => {
                assert_eq!(hold.status(), pb::HoldStatus::Confirmed);
                assert_eq!(
                    (status.as_str(), held_by, sold_to),
                    ("CONFIRMED", None, Some(payment_id))
                );
                sold += 1;
            }
            Err(refusal) => {
                assert_eq!(
                    (refusal.code(), reason(&refusal).as_str()),
                    (Code::FailedPrecondition, "HOLD_EXPIRED"),
                    "{refusal:?}"
                );
                // Nobody takes seats here, so HOLD_EXPIRED can only mean the sweeper had
                // retired the hold.
                assert_eq!((status.as_str(), held_by, sold_to), ("EXPIRED", None, None));
                retired += 1;
            }
        }
    }
    admin.close().await;
    println!("{sold} holds sold, {retired} retired");
    assert_eq!(sold + retired, 200);
    assert!(
        sold > 0 && retired > 0,
        "payments before the expiry sell, those well after it find the hold retired: \
         {sold} sold, {retired} retired"
    );
}

/// ConfirmHold and the hold sweeper on one expired, unpaid hold, placed in both orders (the
/// test above meets them only by chance). Whichever locks the hold first decides it: the
/// sweeper first retires it, and the confirm, which waited for its lock, answers
/// HOLD_EXPIRED and sells nothing; the confirm first sells it, and the sweeper (SKIP LOCKED)
/// passes over it meanwhile and finds it sold after. The test sweeps by hand, at the moment
/// it picks, with no grace.
#[tokio::test]
async fn a_confirm_and_the_sweeper_on_one_expired_hold_end_it_one_way() {
    use stagedoor_testkit::RowGate;
    let mesh = mesh(1, |_, concert| {
        concert.hold_sweep_every = Duration::from_secs(3_600);
    })
    .await;
    let (concert_id, schedule_id) = mesh.catalog(10).await;
    let fan = mesh.active_token(&concert_id, "fan").await;
    let first = mesh.hold(0, &fan, &schedule_id, &[1], "r-1").await.unwrap();
    let second = mesh.hold(0, &fan, &schedule_id, &[2], "r-2").await.unwrap();
    let pool = mesh.database.service_pool(db::CONCERT, 2).await;
    let sweep = || {
        let pool = pool.clone();
        async move {
            store::retire_expired_holds(&pool, Duration::ZERO, 500)
                .await
                .unwrap()
        }
    };
    let admin = mesh.database.admin().await;
    let state_of = |hold_id: String| {
        let admin = admin.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
                "SELECT h.status, s.held_by::text, s.sold_to_payment
                   FROM concert.holds h
                   JOIN concert.seats s ON s.schedule_id = h.schedule_id
                                       AND s.seat_number = h.seat_numbers[1]
                  WHERE h.hold_id = $1::uuid",
            )
            .bind(hold_id)
            .fetch_one(&admin)
            .await
            .unwrap()
        }
    };

    // The sweeper first: parked at its UPDATE of `first`, with the hold's row locked.
    mesh.run_out(&[&first.hold_id]).await;
    let gate = RowGate::on_update(
        &mesh.database,
        "concert.holds",
        &format!(
            "NEW.status = 'EXPIRED' AND OLD.hold_id = '{}'",
            first.hold_id
        ),
    )
    .await;
    let swept = tokio::spawn(sweep());
    gate.until_parked(1).await;
    let (confirmed, ()) = tokio::join!(mesh.confirm(0, &first.hold_id, "pay-1"), async {
        // The confirm waits for the hold's lock behind the parked sweeper.
        mesh.until_lock_waiters(2).await;
        gate.open().await;
    });
    assert_eq!(swept.await.unwrap(), 1);
    let refused = confirmed.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "HOLD_EXPIRED")
    );
    assert_eq!(
        state_of(first.hold_id.clone()).await,
        ("EXPIRED".to_owned(), None, None)
    );

    // The confirm first: parked at its UPDATE of `second`, with the hold's row locked; the
    // sweeps meanwhile pass over it.
    mesh.run_out(&[&second.hold_id]).await;
    let gate = RowGate::on_update(
        &mesh.database,
        "concert.holds",
        &format!(
            "NEW.status = 'CONFIRMED' AND OLD.hold_id = '{}'",
            second.hold_id
        ),
    )
    .await;
    let (confirmed, ()) = tokio::join!(mesh.confirm(0, &second.hold_id, "pay-2"), async {
        gate.until_parked(1).await;
        // Bounded: a sweeper that waited for the lock would wait for this gate.
        let swept = tokio::time::timeout(Duration::from_secs(10), sweep())
            .await
            .expect("the sweeper waited for the hold a confirm holds");
        assert_eq!(swept, 0, "the sweeper skips the locked hold");
        gate.open().await;
    });
    assert_eq!(confirmed.unwrap().status(), pb::HoldStatus::Confirmed);
    assert_eq!(sweep().await, 0, "a sold hold is not the sweeper's");
    assert_eq!(
        state_of(second.hold_id.clone()).await,
        ("CONFIRMED".to_owned(), None, Some("pay-2".to_owned()))
    );
    admin.close().await;
    pool.close().await;
}

/// A fan's request ids are theirs across dates (a hold is unique per fan and request_id). Two
/// batches holding for one fan on two dates under the same key must therefore not both decide
/// a hold: the later insert would be skipped after its batch had refused other fans the seat
/// it believed taken, leaving that seat free and those fans refused for nobody. The fan's
/// lock covers all of their dates, so the second batch decides after the first committed.
#[tokio::test]
async fn a_key_reused_on_two_dates_at_once_never_refuses_a_seat_for_nobody() {
    let mesh = mesh(1, |_, _| {}).await;
    let (first_concert, first_date) = mesh.catalog(10).await;
    let (second_concert, second_date) = mesh.catalog(10).await;
    let pool = mesh.database.service_pool(db::CONCERT, 4).await;
    let request = |user: &str, concert: &str, date: &str, key: &str| store::HoldRequest {
        schedule_id: date.into(),
        concert_id: concert.into(),
        user_id: user.into(),
        seat_numbers: vec![1],
        request_id: key.into(),
        start_time: chrono::Utc::now() + chrono::Duration::days(30),
    };
    let ttl = Duration::from_secs(300);

    // Another transaction has seat 1 of the first date locked: the first batch, past its
    // look-up of earlier keys, waits there.
    let blocker = mesh.lock_seat(&first_date, 1).await;
    let admin = mesh.database.admin().await;
    let first = tokio::spawn({
        let (pool, batch) = (
            pool.clone(),
            vec![
                request("fan", &first_concert, &first_date, "k"),
                request("rival", &first_concert, &first_date, "r"),
            ],
        );
        async move { store::hold_batch(&pool, ttl, &batch).await.unwrap() }
    });
    // The first batch waits for the locked seat.
    mesh.until_lock_waiters(1).await;
    let second = tokio::spawn({
        let (pool, batch) = (
            pool.clone(),
            vec![request("fan", &second_concert, &second_date, "k")],
        );
        async move { store::hold_batch(&pool, ttl, &batch).await.unwrap() }
    });
    // The second waits for the fan's lock, which the first holds.
    mesh.until_lock_waiters(2).await;
    blocker.commit().await.unwrap();

    let answers: Vec<String> = first
        .await
        .unwrap()
        .into_iter()
        .chain(second.await.unwrap())
        .map(|answer| match answer {
            Ok(hold) => format!("held {}", hold.schedule_id),
            Err(error) => ApiError::from(error).reason().to_owned(),
        })
        .collect();
    let holder: Option<String> = sqlx::query_scalar(
        "SELECT h.user_id FROM concert.seats s JOIN concert.holds h ON h.hold_id = s.held_by
          WHERE s.schedule_id = $1 AND s.seat_number = 1",
    )
    .bind(&first_date)
    .fetch_optional(&admin)
    .await
    .unwrap();
    admin.close().await;
    pool.close().await;
    if answers[1] == "SEAT_UNAVAILABLE" {
        assert!(
            holder.is_some(),
            "the rival was refused seat 1 of the first date, which nobody holds: {answers:?}"
        );
    }
    // The first batch decided first, so the fan holds that seat and the key is spent there.
    assert_eq!(holder.as_deref(), Some("fan"), "{answers:?}");
    assert_eq!(answers[2], "IDEMPOTENCY_KEY_REUSED", "{answers:?}");
}

/// A key reused in one batch for other seats, after its first request was refused: nothing
/// was decided for the second request, so it is told to retry (ABORTED, CONCURRENT_UPDATE),
/// not refused SEAT_UNAVAILABLE for seats nobody checked; and those seats stay free.
#[tokio::test]
async fn a_key_refused_in_a_batch_leaves_its_copy_for_other_seats_undecided() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, schedule_id) = mesh.catalog(10).await;
    let rival = mesh.active_token(&concert_id, "rival").await;
    mesh.hold(0, &rival, &schedule_id, &[1], "r-1")
        .await
        .unwrap();
    let pool = mesh.database.service_pool(db::CONCERT, 2).await;
    let request = |seat: i32| store::HoldRequest {
        schedule_id: schedule_id.clone(),
        concert_id: concert_id.clone(),
        user_id: "fan".into(),
        seat_numbers: vec![seat],
        request_id: "k".into(),
        start_time: chrono::Utc::now() + chrono::Duration::days(30),
    };
    // The same key twice in one batch: seat 1 (the rival's) first, then the free seat 2.
    let answers = store::hold_batch(&pool, Duration::from_secs(300), &[request(1), request(2)])
        .await
        .unwrap();
    pool.close().await;

    let reasons: Vec<String> = answers
        .into_iter()
        .map(|answer| match answer {
            Ok(hold) => format!("held {:?}", hold.seat_numbers),
            Err(error) => ApiError::from(error).reason().to_owned(),
        })
        .collect();
    assert_eq!(reasons, ["SEAT_UNAVAILABLE", "CONCURRENT_UPDATE"]);
    let fan = mesh.active_token(&concert_id, "fan").await;
    let seat_two = mesh
        .seats(&fan, &schedule_id)
        .await
        .into_iter()
        .find(|seat| seat.seat_number == 2)
        .unwrap();
    assert_eq!(seat_two.status(), pb::SeatStatus::Available);
    // The retry is judged on its own seats.
    let retried = mesh.hold(0, &fan, &schedule_id, &[2], "k").await.unwrap();
    assert_eq!(retried.seat_numbers, vec![2]);
}
