//! Races: double clicks, several request ids for one hold, many fans over two replicas.

use std::{collections::HashSet, sync::Arc};

use stagedoor_proto::payment::v1::PaymentStatus;
use stagedoor_runtime::db;
use tonic::Code;

use crate::{mesh, reason, Fan, SEAT_PRICE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_fifty_times_at_once_pays_once() {
    let mesh = Arc::new(mesh(50, |settings| settings.payment_replicas = 2).await);
    let fan = mesh.fan("clicker", 1_000_000).await;
    let hold = mesh.hold(&fan, &[1, 2, 3]).await;

    let mut clicks = Vec::new();
    for click in 0..50 {
        let (mesh, fan, hold_id) = (mesh.clone(), fan.clone(), hold.hold_id.clone());
        clicks.push(tokio::spawn(async move {
            mesh.pay(click % 2, &fan, &hold_id, "double-click").await
        }));
    }
    let mut payment_ids = HashSet::new();
    for click in clicks {
        let receipt = click.await.unwrap().expect("every click gets the receipt");
        assert_eq!(receipt.status(), PaymentStatus::Completed);
        payment_ids.insert(receipt.payment_id);
    }
    assert_eq!(payment_ids.len(), 1, "one payment");
    assert_eq!(mesh.payment_rows().await.len(), 1);
    let spends = mesh
        .ledger("clicker")
        .await
        .into_iter()
        .filter(|(kind, _, _)| kind == "SPEND")
        .count();
    assert_eq!(spends, 1, "one SPEND");
    assert_eq!(mesh.balance("clicker").await, 1_000_000 - 3 * SEAT_PRICE);
    mesh.audit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_request_ids_for_one_hold_charge_once() {
    let mesh = Arc::new(mesh(50, |settings| settings.payment_replicas = 2).await);
    let fan = mesh.fan("eager", 1_000_000).await;
    let hold = mesh.hold(&fan, &[10]).await;

    let mut attempts = Vec::new();
    for attempt in 0..50 {
        let (mesh, fan, hold_id) = (mesh.clone(), fan.clone(), hold.hold_id.clone());
        attempts.push(tokio::spawn(async move {
            mesh.pay(attempt % 2, &fan, &hold_id, &format!("attempt-{attempt}"))
                .await
        }));
    }
    let mut paid = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => paid += 1,
            Err(refused) => {
                // Refused before paying: the race lost to the winner's live payment, the
                // hold already sold, or the token completed by the winner a moment before
                // this call asked.
                assert!(
                    matches!(
                        (refused.code(), reason(&refused).as_str()),
                        (Code::AlreadyExists, "HOLD_ALREADY_PAYING")
                            | (Code::FailedPrecondition, "HOLD_NOT_HELD")
                            | (Code::FailedPrecondition, "TOKEN_NOT_ACTIVE")
                    ),
                    "{refused:?}"
                );
            }
        }
    }
    assert_eq!(paid, 1, "exactly one payment succeeds");
    assert_eq!(
        mesh.balance("eager").await,
        1_000_000 - SEAT_PRICE,
        "points spent once"
    );
    mesh.audit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fans_paying_at_once_over_two_replicas_keep_every_invariant() {
    let mesh = Arc::new(mesh(400, |settings| settings.payment_replicas = 2).await);
    let mut fans = Vec::new();
    for index in 0..200 {
        // Every fifth fan is short of points: their payment fails and keeps nothing.
        let points = if index % 5 == 0 {
            SEAT_PRICE
        } else {
            2 * SEAT_PRICE
        };
        let fan = mesh.fan(&format!("fan-{index}"), points).await;
        let seats = [2 * index + 1, 2 * index + 2];
        let hold = mesh.hold(&fan, &seats).await;
        fans.push((fan, hold.hold_id));
    }
    let mut payers = Vec::new();
    for (index, (fan, hold_id)) in fans.into_iter().enumerate() {
        let mesh = mesh.clone();
        payers.push(tokio::spawn(async move {
            // Each fan also double-clicks: two calls with one request id.
            let first = mesh.pay(index % 2, &fan, &hold_id, "buy");
            let second = mesh.pay((index + 1) % 2, &fan, &hold_id, "buy");
            let (first, second) = tokio::join!(first, second);
            match (&first, &second) {
                (Ok(a), Ok(b)) => assert_eq!(a.payment_id, b.payment_id),
                (Err(a), Err(b)) => assert_eq!(reason(a), reason(b)),
                _ => panic!("one request id, two answers: {first:?} {second:?}"),
            }
            first.is_ok()
        }));
    }
    let mut completed = 0;
    for payer in payers {
        if payer.await.unwrap() {
            completed += 1;
        }
    }
    assert_eq!(completed, 160, "the 40 short fans fail, everyone else pays");
    assert_eq!(mesh.payment_rows().await.len(), 200, "one payment per fan");
    mesh.audit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_admission_pays_for_one_hold_however_many_dates_it_holds() {
    // A hundred fans, each holding one seat on each of three dates and charged for all
    // three, pay the three holds at once (different request ids, two replicas): 300 Pays.
    // Paying completes the token, so a Pay sent after another finished is refused by the
    // queue; Pays sent together must not all slip through while the token is still ACTIVE,
    // not even when each spells the token differently (the queue reads every UUID spelling).
    let mesh = Arc::new(mesh(100, |settings| settings.payment_replicas = 2).await);
    let dates = [
        mesh.schedule_id.clone(),
        mesh.add_date(100).await,
        mesh.add_date(100).await,
    ];
    let mut fans = Vec::new();
    for index in 0..100 {
        let fan = mesh.fan(&format!("fan-{index}"), 3 * SEAT_PRICE).await;
        let mut holds = Vec::new();
        for date in &dates {
            holds.push(mesh.hold_on(&fan, date, &[index + 1]).await.hold_id);
        }
        fans.push((fan, holds));
    }
    let mut payers = Vec::new();
    for (index, (fan, holds)) in fans.into_iter().enumerate() {
        let spellings = [
            fan.token.clone(),
            fan.token.replace('-', "").to_uppercase(),
            format!("{{{}}}", fan.token),
        ];
        for ((n, hold_id), token) in holds.into_iter().enumerate().zip(spellings) {
            let mesh = mesh.clone();
            let fan = Fan {
                user_id: fan.user_id.clone(),
                token,
            };
            payers.push(tokio::spawn(async move {
                let request_id = format!("buy-{n}");
                let paid = mesh.pay((index + n) % 2, &fan, &hold_id, &request_id).await;
                (fan.user_id.clone(), paid)
            }));
        }
    }
    let mut completed_by_fan = std::collections::HashMap::<String, usize>::new();
    for payer in payers {
        let (user_id, paid) = payer.await.unwrap();
        match paid {
            Ok(payment) => {
                assert_eq!(payment.status(), PaymentStatus::Completed);
                *completed_by_fan.entry(user_id).or_default() += 1;
            }
            Err(refused) => {
                assert!(
                    matches!(
                        (refused.code(), reason(&refused).as_str()),
                        (Code::AlreadyExists, "TOKEN_ALREADY_PAYING")
                            | (Code::FailedPrecondition, "TOKEN_NOT_ACTIVE")
                    ),
                    "{refused:?}"
                );
            }
        }
    }
    assert_eq!(completed_by_fan.len(), 100, "every fan bought one hold");
    assert!(
        completed_by_fan.values().all(|&count| count == 1),
        "a fan bought more than one hold with one admission: {completed_by_fan:?}"
    );
    for index in 0..100 {
        assert_eq!(mesh.balance(&format!("fan-{index}")).await, 2 * SEAT_PRICE);
    }
    assert_eq!(
        mesh.payment_rows().await.len(),
        100,
        "refused Pays record nothing"
    );
    mesh.audit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_where_one_admission_paid_twice_still_migrates() {
    // A database from before the one-payment-per-token rule may hold exactly what the rule
    // forbids: two live payments of one token. Its index must still build, and leave them be.
    let mesh = mesh(10, |_| {}).await;
    let fan = mesh.fan("early-fan", SEAT_PRICE).await;
    let hold = mesh.hold(&fan, &[1]).await;
    mesh.pay(0, &fan, &hold.hold_id, "buy").await.unwrap();

    // Back to the schema before the rule, then the race it closes: a second live payment
    // of the same token (another hold, another request id).
    let admin = mesh.database.admin().await;
    let mut rewind = admin.begin().await.unwrap();
    for statement in [
        "DROP INDEX payment.payments_one_live_per_token",
        "ALTER TABLE payment.payments DROP COLUMN token_exclusive",
        "DELETE FROM payment._sqlx_migrations WHERE version = 3",
        "CREATE TEMP TABLE twin AS SELECT * FROM payment.payments",
        "UPDATE twin SET payment_id = gen_random_uuid(), hold_id = gen_random_uuid(),
                         request_id = 'buy-again', create_time = create_time + interval '1 ms'",
        "INSERT INTO payment.payments SELECT * FROM twin",
    ] {
        sqlx::query(statement).execute(&mut *rewind).await.unwrap();
    }
    rewind.commit().await.unwrap();

    // Panics if the migration cannot build its index over the old twin payments.
    mesh.database
        .migrate(db::PAYMENT, stagedoor_payment::app::migrator())
        .await;

    let (exclusive, exempt): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE token_exclusive), count(*) FILTER (WHERE NOT token_exclusive)
           FROM payment.payments",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert_eq!(
        (exclusive, exempt),
        (1, 1),
        "the older payment keeps the token, the twin is left out of the index"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_holding_one_fans_payments_in_opposite_orders_do_not_deadlock() {
    // A fan clicks Pay on two holds (two concerts, two tokens), twice, and the clicks land
    // in two batches in opposite orders: batch A writes hold 1 then hold 2, batch B hold 2
    // then hold 1. Without the per-user lock, A waits at hold 2 for B while B waits at hold 1
    // for A, and Postgres kills one statement: every payment of that batch, other fans'
    // too, fails. A trigger holds each batch's second click at a gate until both batches
    // have got as far as they can (both at the gate without the lock; one at the gate and
    // one waiting for the lock with it), which makes that interleaving certain.
    use stagedoor_payment::store::{self, NewPayment};
    use stagedoor_runtime::db;
    use std::time::Duration;

    let database = stagedoor_testkit::TestDatabase::create().await;
    database
        .migrate(db::PAYMENT, stagedoor_payment::app::migrator())
        .await;
    let gate = stagedoor_testkit::RowGate::on_insert(
        &database,
        "payment.payments",
        "NEW.request_id IN ('a-2', 'b-1')",
    )
    .await;
    let pool = database.service_pool(db::PAYMENT, 4).await;

    let (hold_1, hold_2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let click = |hold_id, token: &str, request_id: &str| NewPayment {
        payment_id: uuid::Uuid::new_v4(),
        user_id: "clicker".into(),
        request_id: request_id.into(),
        hold_id,
        concert_id: "c".into(),
        schedule_id: "s".into(),
        seat_numbers: vec![1],
        amount: SEAT_PRICE,
        start_time: chrono::Utc::now(),
        token: token.into(),
    };
    // Each batch also carries another fan's payment, which must not pay for the clicker.
    let bystander = |name: &str| NewPayment {
        user_id: format!("bystander-{name}"),
        hold_id: uuid::Uuid::new_v4(),
        token: format!("token-{name}"),
        ..click(hold_1, "", "pay")
    };
    let batch_a = [
        click(hold_1, "token-1", "a-1"),
        click(hold_2, "token-2", "a-2"),
        bystander("a"),
    ];
    let batch_b = [
        click(hold_2, "token-2", "b-2"),
        click(hold_1, "token-1", "b-1"),
        bystander("b"),
    ];
    let lease = Duration::from_secs(60);
    // Both batches as far as they go: two of the payment service's sessions wait on
    // advisory locks (both at the gate without the user's lock; one there and one on the
    // user's lock with it).
    let open_the_gate = async {
        let admin = database.admin().await;
        let as_far_as_they_go = stagedoor_testkit::LockWaiters {
            role: Some("stagedoor_payment"),
            wait_event: Some("advisory"),
            ..Default::default()
        };
        stagedoor_testkit::until_lock_waiters(
            &admin,
            as_far_as_they_go,
            2,
            Duration::from_secs(20),
        )
        .await;
        admin.close().await;
        gate.open().await;
    };
    let (a, b, ()) = tokio::join!(
        store::insert_batch(&pool, &batch_a, lease),
        store::insert_batch(&pool, &batch_b, lease),
        open_the_gate,
    );
    let (a, b) = (
        a.expect("batch A is written"),
        b.expect("batch B is written"),
    );
    let mut written: Vec<(String, uuid::Uuid)> = a
        .iter()
        .chain(&b)
        .map(|row| (row.user_id.clone(), row.hold_id))
        .collect();
    written.sort();
    let clicker: Vec<_> = written
        .iter()
        .filter(|(user, _)| user == "clicker")
        .collect();
    assert_eq!(clicker.len(), 2, "one payment per hold: {written:?}");
    assert_ne!(clicker[0].1, clicker[1].1);
    assert!(written.iter().any(|(user, _)| user == "bystander-a"));
    assert!(written.iter().any(|(user, _)| user == "bystander-b"));
}
