//! What one fan sees: the receipt, refusals, the paid-after-expiry rule, replays, reads.

use std::time::Duration;

use stagedoor_proto::{
    concert::v1::{self as concert_pb, HoldStatus},
    payment::v1::{self as pb, PaymentStatus},
    queue::v1::TokenStatus,
};
use stagedoor_testkit::eventually;
use tonic::Code;

use crate::{mesh, reason, with_bearer, SEAT_PRICE};

#[tokio::test]
async fn pay_spends_sells_completes_the_token_and_admits_the_next_fan() {
    // One fan ACTIVE at a time: completing the payer's token must admit the next in line.
    let mesh = mesh(50, |settings| settings.queue.max_active = 1).await;
    let fan = mesh.fan("fan-1", 500_000).await;
    let next = mesh.issue("fan-2").await;
    assert_eq!(next.status(), TokenStatus::Waiting);
    let hold = mesh.hold(&fan, &[7, 8]).await;

    let receipt = mesh.pay(0, &fan, &hold.hold_id, "pay-1").await.unwrap();
    assert_eq!(receipt.status(), PaymentStatus::Completed);
    assert_eq!(receipt.user_id, "fan-1");
    assert_eq!(receipt.hold_id, hold.hold_id);
    assert_eq!(receipt.concert_id, mesh.concert_id);
    assert_eq!(receipt.schedule_id, mesh.schedule_id);
    assert_eq!(receipt.seat_numbers, vec![7, 8]);
    assert_eq!(receipt.amount, 2 * SEAT_PRICE);
    assert_eq!(receipt.balance_after, 500_000 - 2 * SEAT_PRICE);
    assert_eq!(receipt.request_id, "pay-1");
    assert_eq!(receipt.start_time, hold.start_time);
    assert!(receipt.create_time.is_some() && receipt.complete_time.is_some());
    assert!(receipt.failure_reason.is_empty());

    assert_eq!(mesh.balance("fan-1").await, 500_000 - 2 * SEAT_PRICE);
    let confirmed = mesh.hold_now(&hold.hold_id).await;
    assert_eq!(confirmed.status(), HoldStatus::Confirmed);
    assert_eq!(confirmed.payment_id, receipt.payment_id);
    assert_eq!(mesh.token_status(&fan.token).await, TokenStatus::Done);
    // The next fan is admitted by the completion (the queue's tick may take a moment).
    eventually(
        Duration::from_secs(5),
        "the next fan becomes ACTIVE",
        || async { (mesh.token_status(&next.token).await == TokenStatus::Active).then_some(()) },
    )
    .await;
    // The seats are SOLD for everyone.
    let seats = mesh
        .concert_public
        .clone()
        .list_available_seats(with_bearer(
            concert_pb::ListAvailableSeatsRequest {
                schedule_id: mesh.schedule_id.clone(),
            },
            &next.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .seats;
    for seat in seats
        .iter()
        .filter(|seat| [7, 8].contains(&seat.seat_number))
    {
        assert_eq!(seat.status(), concert_pb::SeatStatus::Sold);
    }
    // The history shows the SPEND, naming the payment.
    assert_eq!(
        mesh.ledger("fan-1").await,
        vec![
            ("CHARGE".into(), 500_000, None),
            (
                "SPEND".into(),
                -2 * SEAT_PRICE,
                Some(receipt.payment_id.clone())
            ),
        ]
    );
    // Reads agree with the receipt.
    assert_eq!(mesh.payment(&receipt.payment_id).await, receipt);
    // The finished payment keeps no bearer token, only its digest...
    let admin = mesh.database.admin().await;
    let (kept, digest_matches): (Option<String>, bool) = sqlx::query_as(
        "SELECT token, token_sha256 = sha256(convert_to($2, 'UTF8'))
           FROM payment.payments WHERE payment_id = $1::uuid",
    )
    .bind(&receipt.payment_id)
    .bind(&fan.token)
    .fetch_one(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert_eq!((kept, digest_matches), (None, true));
    // ...which is enough: pressing Pay again (the token is DONE now) gives the same
    // receipt, charges nothing.
    let again = mesh.pay(0, &fan, &hold.hold_id, "pay-1").await.unwrap();
    assert_eq!(again, receipt);
    // A second tab's Pay, with a request id of its own, finds the token used up; the refusal
    // names the payment that used it, so that tab can show the receipt too.
    let other_tab = mesh.pay(0, &fan, &hold.hold_id, "pay-2").await.unwrap_err();
    assert_eq!(
        (other_tab.code(), reason(&other_tab).as_str()),
        (Code::FailedPrecondition, "TOKEN_NOT_ACTIVE")
    );
    assert_eq!(
        stagedoor_testkit::detail(&other_tab, "payment_id"),
        Some(receipt.payment_id.clone())
    );
    assert_eq!(mesh.ledger("fan-1").await.len(), 2);
    mesh.audit().await;
}

#[tokio::test]
async fn a_hold_costing_more_than_one_charge_may_add_is_paid() {
    // One charge adds at most 1.5 seats' price; the fan charges three times and holds four
    // seats.
    let mesh = mesh(50, |settings| {
        settings.point.max_amount = SEAT_PRICE * 3 / 2
    })
    .await;
    let fan = mesh.fan("big-spender", SEAT_PRICE * 3 / 2).await;
    mesh.charge("big-spender", SEAT_PRICE * 3 / 2).await;
    mesh.charge("big-spender", SEAT_PRICE).await;
    let hold = mesh.hold(&fan, &[1, 2, 3, 4]).await;

    let receipt = mesh.pay(0, &fan, &hold.hold_id, "pay-1").await.unwrap();
    assert_eq!(receipt.status(), PaymentStatus::Completed);
    assert_eq!(receipt.amount, 4 * SEAT_PRICE);
    assert_eq!(mesh.balance("big-spender").await, 0);
    mesh.audit().await;
}

#[tokio::test]
async fn insufficient_balance_spends_nothing_and_keeps_the_hold() {
    let mesh = mesh(50, |_| {}).await;
    let fan = mesh.fan("short", SEAT_PRICE - 1).await;
    let hold = mesh.hold(&fan, &[1]).await;

    let refused = mesh
        .pay(0, &fan, &hold.hold_id, "pay-short")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "INSUFFICIENT_BALANCE");
    assert_eq!(
        stagedoor_testkit::detail(&refused, "amount"),
        Some(SEAT_PRICE.to_string()),
        "what the payment needed"
    );
    assert_eq!(mesh.balance("short").await, SEAT_PRICE - 1);
    assert_eq!(mesh.ledger("short").await.len(), 1, "only the charge");
    assert_eq!(
        mesh.hold_now(&hold.hold_id).await.status(),
        HoldStatus::Held
    );
    assert_eq!(mesh.token_status(&fan.token).await, TokenStatus::Active);
    // The same request id replays the same refusal.
    let replayed = mesh
        .pay(0, &fan, &hold.hold_id, "pay-short")
        .await
        .unwrap_err();
    assert_eq!(reason(&replayed), "INSUFFICIENT_BALANCE");

    // Topped up, a new request id pays the same hold.
    mesh.charge("short", 1).await;
    let receipt = mesh
        .pay(0, &fan, &hold.hold_id, "pay-short-2")
        .await
        .unwrap();
    assert_eq!(receipt.balance_after, 0);
    let history = mesh.payments[0]
        .client
        .clone()
        .list_payments(pb::ListPaymentsRequest {
            user_id: "short".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.payments.len(), 1);
    assert_eq!(
        history.payments[0].payment_id, receipt.payment_id,
        "newest first"
    );
    // The token continues this fan's listing only.
    let borrowed = mesh.payments[0]
        .client
        .clone()
        .list_payments(pb::ListPaymentsRequest {
            user_id: "someone-else".into(),
            page_size: 1,
            page_token: history.next_page_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (borrowed.code(), reason(&borrowed).as_str()),
        (Code::InvalidArgument, "INVALID_FIELD")
    );
    let rest = mesh.payments[0]
        .client
        .clone()
        .list_payments(pb::ListPaymentsRequest {
            user_id: "short".into(),
            page_size: 1,
            page_token: history.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.payments.len(), 1);
    assert_eq!(rest.payments[0].status(), PaymentStatus::Failed);
    assert_eq!(rest.payments[0].failure_reason, "INSUFFICIENT_BALANCE");
    assert!(rest.next_page_token.is_empty());
    mesh.audit().await;
}

#[tokio::test]
async fn expired_hold_whose_seat_was_retaken_is_refunded() {
    let mesh = mesh(50, |settings| {
        settings.concert.hold_ttl = Duration::from_millis(300);
    })
    .await;
    let late = mesh.fan("late", 300_000).await;
    let quick = mesh.fan("quick", 0).await;
    let expired = mesh.hold(&late, &[3, 4]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Seat 4 is free again the instant the hold expired; another fan takes it.
    mesh.hold(&quick, &[4]).await;

    let refused = mesh
        .pay(0, &late, &expired.hold_id, "pay-late")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "HOLD_EXPIRED");
    let rows = mesh.payment_rows().await;
    assert_eq!(rows.len(), 1);
    let payment = mesh.payment(&rows[0].0.to_string()).await;
    assert_eq!(payment.status(), PaymentStatus::Failed);
    assert_eq!(payment.failure_reason, "HOLD_EXPIRED");
    // The record says what the spend left, as the proto promises once points were spent.
    assert_eq!(payment.balance_after, 300_000 - 2 * SEAT_PRICE);
    // The points went out and came back.
    let ledger = mesh.ledger("late").await;
    let kinds: Vec<_> = ledger
        .iter()
        .map(|(kind, amount, _)| (kind.as_str(), *amount))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("CHARGE", 300_000),
            ("SPEND", -2 * SEAT_PRICE),
            ("REFUND", 2 * SEAT_PRICE)
        ]
    );
    assert_eq!(mesh.balance("late").await, 300_000);
    // The late fan's token is still ACTIVE: they may hold other seats and try again.
    assert_eq!(mesh.token_status(&late.token).await, TokenStatus::Active);
    mesh.audit().await;
}

#[tokio::test]
async fn expired_hold_nobody_took_is_still_sold() {
    let mesh = mesh(50, |settings| {
        settings.concert.hold_ttl = Duration::from_millis(200);
    })
    .await;
    let fan = mesh.fan("slow", 100_000).await;
    let hold = mesh.hold(&fan, &[9]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let receipt = mesh.pay(0, &fan, &hold.hold_id, "pay-slow").await.unwrap();
    assert_eq!(receipt.status(), PaymentStatus::Completed);
    assert_eq!(
        mesh.hold_now(&hold.hold_id).await.status(),
        HoldStatus::Confirmed
    );
    mesh.audit().await;
}

#[tokio::test]
async fn bad_calls_get_a_clear_status_and_change_nothing() {
    let mesh = mesh(50, |settings| settings.queue.max_active = 2).await;
    let fan = mesh.fan("owner", 500_000).await;
    let other = mesh.fan("other", 500_000).await;
    let waiting = mesh.issue("waiting").await;
    assert_eq!(waiting.status(), TokenStatus::Waiting);
    let hold = mesh.hold(&fan, &[1]).await;
    let mut client = mesh.payments[0].client.clone();
    let pay_request = |hold_id: &str, request_id: &str| pb::PayRequest {
        hold_id: hold_id.into(),
        request_id: request_id.into(),
    };

    // Token problems.
    let missing = client
        .pay(pay_request(&hold.hold_id, "r1"))
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), reason(&missing).as_str()),
        (Code::Unauthenticated, "MISSING_TOKEN")
    );
    let mut malformed = tonic::Request::new(pay_request(&hold.hold_id, "r1"));
    malformed
        .metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    let malformed = client.pay(malformed).await.unwrap_err();
    assert_eq!(
        (malformed.code(), reason(&malformed).as_str()),
        (Code::Unauthenticated, "MALFORMED_TOKEN")
    );
    // Well formed (a token is a UUID), but never issued: the queue's answer, passed on.
    let unknown_token = client
        .pay(with_bearer(
            pay_request(&hold.hold_id, "r1"),
            &uuid::Uuid::new_v4().to_string(),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (unknown_token.code(), reason(&unknown_token).as_str()),
        (Code::Unauthenticated, "TOKEN_NOT_FOUND"),
        "{unknown_token:?}"
    );
    let not_active = client
        .pay(with_bearer(
            pay_request(&hold.hold_id, "r1"),
            &waiting.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (not_active.code(), reason(&not_active).as_str()),
        (Code::FailedPrecondition, "TOKEN_NOT_ACTIVE")
    );
    // Another fan's hold is not theirs to pay: it does not exist for them.
    let not_theirs = mesh.pay(0, &other, &hold.hold_id, "r2").await.unwrap_err();
    assert_eq!(
        (not_theirs.code(), reason(&not_theirs).as_str()),
        (Code::NotFound, "HOLD_NOT_FOUND")
    );
    // Unknown and malformed ids.
    let unknown_hold = mesh
        .pay(0, &fan, &uuid::Uuid::new_v4().to_string(), "r3")
        .await
        .unwrap_err();
    assert_eq!(
        (unknown_hold.code(), reason(&unknown_hold).as_str()),
        (Code::NotFound, "HOLD_NOT_FOUND")
    );
    for (hold_id, request_id) in [
        ("not-a-hold", "r4"),
        (hold.hold_id.as_str(), ""),
        (hold.hold_id.as_str(), "has space"),
    ] {
        let bad = mesh.pay(0, &fan, hold_id, request_id).await.unwrap_err();
        assert_eq!(
            (bad.code(), reason(&bad).as_str()),
            (Code::InvalidArgument, "INVALID_FIELD"),
            "{hold_id} {request_id}"
        );
    }
    let bad_id = client
        .get_payment(pb::GetPaymentRequest {
            payment_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&bad_id), "INVALID_FIELD");
    let no_payment = client
        .get_payment(pb::GetPaymentRequest {
            payment_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (no_payment.code(), reason(&no_payment).as_str()),
        (Code::NotFound, "PAYMENT_NOT_FOUND")
    );
    for (user_id, page_size, page_token) in [
        ("", 0, ""),
        ("owner", 101, ""),
        ("owner", -1, ""),
        ("owner", 0, "garbage"),
    ] {
        let bad = client
            .list_payments(pb::ListPaymentsRequest {
                user_id: user_id.into(),
                page_size,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            reason(&bad),
            "INVALID_FIELD",
            "{user_id} {page_size} {page_token}"
        );
    }
    // Nothing of the above recorded a payment or moved a point.
    assert!(mesh.payment_rows().await.is_empty());
    assert_eq!(mesh.balance("owner").await, 500_000);
    assert_eq!(
        mesh.hold_now(&hold.hold_id).await.status(),
        HoldStatus::Held
    );

    // A request id used for one hold cannot pay another.
    let paid_by_r5 = mesh.pay(0, &fan, &hold.hold_id, "r5").await.unwrap();
    let second_hold = mesh.hold(&other, &[2]).await;
    let reused = mesh
        .pay(0, &other, &second_hold.hold_id, "r6")
        .await
        .map(|_| ());
    assert!(reused.is_ok());
    let fan_again = crate::Fan {
        user_id: "owner".into(),
        token: fan.token.clone(),
    };
    let reused = mesh
        .pay(0, &fan_again, &second_hold.hold_id, "r5")
        .await
        .unwrap_err();
    assert_eq!(
        (reused.code(), reason(&reused).as_str()),
        (Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED")
    );
    // It names the payment the request id made.
    assert_eq!(
        stagedoor_testkit::detail(&reused, "payment_id"),
        Some(paid_by_r5.payment_id)
    );
    mesh.audit().await;
}

#[tokio::test]
async fn a_retired_hold_is_refused_before_anything_is_spent() {
    // Holds expire after 200 ms and are retired 100 ms later: past the rule that sells an
    // expired hold nobody took. Pay must say HOLD_EXPIRED before the saga starts, to a fan
    // short of points as well (who would otherwise hear INSUFFICIENT_BALANCE), and to a fan
    // who has the points (who would otherwise be charged and refunded).
    let mesh = mesh(50, |settings| {
        settings.concert.hold_ttl = Duration::from_millis(200);
        settings.concert.hold_sweep_after = Duration::from_millis(100);
        settings.concert.hold_sweep_every = Duration::from_millis(50);
    })
    .await;
    let short = mesh.fan("short", SEAT_PRICE / 2).await;
    let rich = mesh.fan("rich", 3 * SEAT_PRICE).await;
    let holds = [
        (&short, mesh.hold(&short, &[5]).await),
        (&rich, mesh.hold(&rich, &[6]).await),
    ];
    for (_, hold) in &holds {
        let retired = eventually(
            Duration::from_secs(5),
            "the sweeper retires the hold",
            || async { Some(mesh.hold_now(&hold.hold_id).await).filter(|now| now.retired) },
        )
        .await;
        assert_eq!(retired.status(), HoldStatus::Expired);
    }
    let ledgers_before = (mesh.ledger("short").await, mesh.ledger("rich").await);

    for (fan, hold) in &holds {
        let refused = mesh.pay(0, fan, &hold.hold_id, "late").await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(reason(&refused), "HOLD_EXPIRED");
    }
    assert!(mesh.payment_rows().await.is_empty(), "no payment recorded");
    assert_eq!(
        (mesh.ledger("short").await, mesh.ledger("rich").await),
        ledgers_before,
        "nothing spent, nothing refunded"
    );
    assert_eq!(mesh.balance("rich").await, 3 * SEAT_PRICE);
    mesh.audit().await;
}
