use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use stagedoor_testkit::TestDatabase;
use tonic::Code;

use crate::{audit, config, reason, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_charges_over_two_replicas_add_up() {
    let database = TestDatabase::create().await;
    let replicas = Arc::new([
        start(config(&database)).await,
        start(config(&database)).await,
    ]);
    let mut calls = Vec::new();
    for call in 0..500 {
        let replicas = replicas.clone();
        calls.push(tokio::spawn(async move {
            replicas[call % 2]
                .charge("fan", 1_000, &format!("charge-{call}"))
                .await
        }));
    }
    for call in calls {
        call.await.unwrap().expect("every charge succeeds");
    }
    assert_eq!(replicas[0].balance("fan").await, 500_000);
    assert_eq!(audit(&database).await, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_spends_against_a_hundred_thousand_exactly_a_hundred_win() {
    let database = TestDatabase::create().await;
    let replicas = Arc::new([
        start(config(&database)).await,
        start(config(&database)).await,
    ]);
    replicas[0].charge("fan", 100_000, "top-up").await.unwrap();

    let mut calls = Vec::new();
    for call in 0..500 {
        let replicas = replicas.clone();
        calls.push(tokio::spawn(async move {
            replicas[call % 2]
                .spend("fan", 1_000, &format!("payment-{call}"))
                .await
        }));
    }
    let (mut won, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(entry) => {
                assert_eq!(entry.amount, -1_000);
                won += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition);
                assert_eq!(reason(&status), "INSUFFICIENT_BALANCE");
                refused += 1;
            }
        }
    }
    // The schema refuses a negative balance (`CHECK (balance >= 0)`), so an overspend would
    // surface as a failed call: what proves the race right is the exact count of winners.
    assert_eq!((won, refused), (100, 400));
    assert_eq!(replicas[1].balance("fan").await, 0);
    assert_eq!(audit(&database).await, 101);
}

/// Charges, spends and refunds of one wallet raced together over two replicas, each refund
/// racing the spend it would return. At every moment a reader can see, the balance equals the
/// sum of the wallet's ledger (sampled throughout, both read by one statement, hence from one
/// snapshot); a refund is paid only for a spend that happened; the end balance is what the
/// calls that succeeded add up to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn charges_spends_and_refunds_raced_on_one_wallet_keep_it_equal_to_its_ledger() {
    let database = TestDatabase::create().await;
    let replicas = Arc::new([
        start(config(&database)).await,
        start(config(&database)).await,
    ]);
    replicas[0].charge("fan", 20_000, "top-up").await.unwrap();

    let admin = database.admin().await;
    let racing = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (admin, racing) = (admin.clone(), racing.clone());
        async move {
            let (mut samples, mut apart) = (0, Vec::new());
            while racing.load(Ordering::Relaxed) {
                let (balance, ledger): (i64, i64) = sqlx::query_as(
                    "SELECT w.balance,
                            (SELECT sum(amount)::int8 FROM point.ledger l
                              WHERE l.user_id = w.user_id)
                       FROM point.wallets w WHERE w.user_id = 'fan'",
                )
                .fetch_one(&admin)
                .await
                .unwrap();
                if balance != ledger {
                    apart.push((balance, ledger));
                }
                samples += 1;
            }
            (samples, apart)
        }
    });

    const CHARGE: i64 = 1_000;
    const PRICE: i64 = 1_500;
    let start = Arc::new(tokio::sync::Barrier::new(600));
    let calls: Vec<_> = (0..600usize)
        .map(|call| {
            let (replicas, start) = (replicas.clone(), start.clone());
            tokio::spawn(async move {
                let replica = &replicas[call % 2];
                let payment = format!("payment-{}", call / 3);
                start.wait().await;
                let outcome = match call % 3 {
                    0 => {
                        replica
                            .charge("fan", CHARGE, &format!("charge-{call}"))
                            .await
                    }
                    1 => replica.spend("fan", PRICE, &payment).await,
                    _ => replica.refund(&payment).await,
                };
                (call, outcome)
            })
        })
        .collect();
    let (mut charged, mut spent, mut refunded) = (0, HashSet::new(), HashSet::new());
    for call in calls {
        let (call, outcome) = call.await.unwrap();
        let payment = call / 3;
        match (call % 3, outcome) {
            (0, Ok(_)) => charged += 1,
            (1, Ok(entry)) => {
                assert_eq!(entry.amount, -PRICE);
                spent.insert(payment);
            }
            (_, Ok(entry)) => {
                assert_eq!(entry.amount, PRICE);
                refunded.insert(payment);
            }
            (1, Err(status)) => assert_eq!(reason(&status), "INSUFFICIENT_BALANCE"),
            (0, Err(status)) => panic!("a charge failed: {status:?}"),
            (_, Err(status)) => assert_eq!(reason(&status), "PAYMENT_NOT_FOUND"),
        }
    }
    racing.store(false, Ordering::Relaxed);
    let (samples, apart) = sampler.await.unwrap();
    admin.close().await;

    assert_eq!(charged, 200, "every charge succeeds");
    // Both ends of the refunds' race were seen. (Refusals are certain: 200 spends of 1,500
    // ask more than the 220,000 ever charged.)
    assert!(
        !refunded.is_empty() && refunded.len() < 200,
        "{} of 200 refunds paid",
        refunded.len()
    );
    assert!(
        refunded.is_subset(&spent),
        "refunded without a spend: {:?}",
        refunded.difference(&spent).collect::<Vec<_>>()
    );
    assert!(samples > 5, "the sampler must really sample");
    assert!(apart.is_empty(), "balance and ledger seen apart: {apart:?}");
    let expected =
        20_000 + CHARGE * charged - PRICE * spent.len() as i64 + PRICE * refunded.len() as i64;
    assert_eq!(replicas[1].balance("fan").await, expected);
    assert_eq!(
        audit(&database).await,
        1 + charged + spent.len() as i64 + refunded.len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_spend_a_hundred_times_spends_once() {
    let database = TestDatabase::create().await;
    let replicas = Arc::new([
        start(config(&database)).await,
        start(config(&database)).await,
    ]);
    replicas[0].charge("fan", 50_000, "top-up").await.unwrap();
    let mut calls = Vec::new();
    for call in 0..100 {
        let replicas = replicas.clone();
        calls.push(tokio::spawn(async move {
            replicas[call % 2].spend("fan", 7_000, "payment-1").await
        }));
    }
    let mut entry_ids = std::collections::HashSet::new();
    for call in calls {
        let entry = call
            .await
            .unwrap()
            .expect("a repeated spend returns the first one");
        assert_eq!(entry.balance_after, 43_000);
        entry_ids.insert(entry.entry_id);
    }
    assert_eq!(entry_ids.len(), 1, "one entry, returned to every caller");
    assert_eq!(replicas[0].balance("fan").await, 43_000);
    assert_eq!(audit(&database).await, 2);
}

/// Two attempts of each of 200 payments over two replicas, the second wave after the first,
/// raced with charges that keep the wallet near empty: an attempt refused for want of points
/// and a later one that finds them (the saga's retry of a call whose first attempt was still
/// on its way) must agree. Each payment's attempts answer alike, and a payment refused to
/// anyone spent nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_of_a_payment_raced_with_charges_agree_on_spent_or_refused() {
    const PAYMENTS: usize = 200;
    let database = TestDatabase::create().await;
    let replicas = Arc::new([
        start(config(&database)).await,
        start(config(&database)).await,
    ]);
    let mut attempts = Vec::new();
    let mut charges = Vec::new();
    for wave in 0..2 {
        for payment in 0..PAYMENTS {
            let spenders = replicas.clone();
            attempts.push((
                payment,
                tokio::spawn(async move {
                    spenders[(payment + wave) % 2]
                        .spend("fan", 1_000, &format!("payment-{payment}"))
                        .await
                }),
            ));
            if payment % 2 == 0 {
                let replicas = replicas.clone();
                charges.push(tokio::spawn(async move {
                    replicas[payment % 2]
                        .charge("fan", 1_000, &format!("charge-{wave}-{payment}"))
                        .await
                }));
            }
        }
    }
    let mut answers: Vec<Vec<Result<String, String>>> = vec![Vec::new(); PAYMENTS];
    for (payment, attempt) in attempts {
        answers[payment].push(match attempt.await.unwrap() {
            Ok(entry) => Ok(entry.entry_id),
            Err(status) => Err(reason(&status)),
        });
    }
    for charge in charges {
        charge.await.unwrap().expect("every charge succeeds");
    }
    let mut spent = 0;
    for (payment, answers) in answers.iter().enumerate() {
        assert_eq!(
            answers[0], answers[1],
            "payment-{payment}'s attempts disagree"
        );
        match &answers[0] {
            Ok(_) => spent += 1,
            Err(reason) => assert_eq!(reason, "INSUFFICIENT_BALANCE"),
        }
    }
    let (spends,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM point.ledger WHERE kind = 'SPEND'")
            .fetch_one(&database.admin().await)
            .await
            .unwrap();
    assert_eq!(
        spends, spent,
        "a SPEND for every payment answered spent, and no other"
    );
    assert!(
        0 < spent && spent < PAYMENTS as i64,
        "{spent} of {PAYMENTS} spent: the race needs both outcomes"
    );
    assert_eq!(
        replicas[0].balance("fan").await,
        PAYMENTS as i64 * 1_000 - spent * 1_000
    );
    assert_eq!(audit(&database).await, PAYMENTS as i64 + spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_raced_with_itself_refunds_once() {
    let database = TestDatabase::create().await;
    let replicas = Arc::new([
        start(config(&database)).await,
        start(config(&database)).await,
    ]);
    replicas[0].charge("fan", 50_000, "top-up").await.unwrap();
    replicas[0].spend("fan", 30_000, "payment-1").await.unwrap();
    let mut calls = Vec::new();
    for call in 0..100 {
        let replicas = replicas.clone();
        calls.push(tokio::spawn(async move {
            replicas[call % 2].refund("payment-1").await
        }));
    }
    let mut entry_ids = std::collections::HashSet::new();
    for call in calls {
        let entry = call
            .await
            .unwrap()
            .expect("a repeated refund returns the first one");
        assert_eq!(entry.amount, 30_000);
        entry_ids.insert(entry.entry_id);
    }
    assert_eq!(entry_ids.len(), 1);
    assert_eq!(replicas[0].balance("fan").await, 50_000);
    assert_eq!(audit(&database).await, 3);
}
