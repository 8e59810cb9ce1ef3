use std::sync::{
    atomic::{AtomicBool, AtomicI64, Ordering},
    Arc,
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

    // A sampler reads the balance as Postgres has it, as often as it can, during the race.
    let admin = database.admin().await;
    let racing = Arc::new(AtomicBool::new(true));
    let lowest = Arc::new(AtomicI64::new(i64::MAX));
    let sampler = tokio::spawn({
        let (admin, racing, lowest) = (admin.clone(), racing.clone(), lowest.clone());
        async move {
            let mut samples = 0;
            while racing.load(Ordering::Relaxed) {
                let balance: i64 =
                    sqlx::query_scalar("SELECT balance FROM point.wallets WHERE user_id = 'fan'")
                        .fetch_one(&admin)
                        .await
                        .unwrap();
                lowest.fetch_min(balance, Ordering::Relaxed);
                samples += 1;
            }
            samples
        }
    });

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
                assert!(entry.balance_after >= 0);
                won += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition);
                assert_eq!(reason(&status), "INSUFFICIENT_BALANCE");
                refused += 1;
            }
        }
    }
    racing.store(false, Ordering::Relaxed);
    assert!(sampler.await.unwrap() > 5, "the sampler must really sample");
    admin.close().await;

    assert_eq!((won, refused), (100, 400));
    assert_eq!(replicas[1].balance("fan").await, 0);
    assert!(
        lowest.load(Ordering::Relaxed) >= 0,
        "a balance went negative"
    );
    assert_eq!(audit(&database).await, 101);
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
