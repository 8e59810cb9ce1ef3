//! Crashes and peers that go away: the saga finishes (or undoes) what it started, and
//! points and seats agree afterwards, always.

use std::{collections::HashMap, time::Duration};

use stagedoor_payment::{
    app,
    domain::{Status, Step},
    store::{self, Advance, NewPayment},
    writes::PaymentWrites,
    Fault,
};
use stagedoor_proto::{
    concert::v1::HoldStatus, payment::v1::PaymentStatus, queue::v1::TokenStatus,
};
use stagedoor_runtime::db;
use stagedoor_testkit::{eventually, lock_waiters, until_lock_waiters, LockWaiters, TestDatabase};
use tokio::task::JoinSet;
use tonic::Code;
use uuid::Uuid;

use crate::{mesh, reason, Mesh, SEAT_PRICE};

/// Short leases and a fast recovery worker, so that drills take a second, not a minute.
fn quick_recovery(mesh_settings: &mut crate::Settings) {
    let payment = &mut mesh_settings.payment;
    payment.call_deadline = Duration::from_millis(500);
    payment.lease = Duration::from_secs(1);
    payment.recovery_interval = Duration::from_millis(100);
    payment.retry_max = Duration::from_millis(400);
    payment.pay_patience = Duration::from_millis(300);
}

/// How many rounds of a payment's saga have failed so far (its backoff's count).
async fn attempts_of(admin: &sqlx::PgPool, payment_id: &str) -> i32 {
    sqlx::query_scalar("SELECT attempts FROM payment.payments WHERE payment_id = $1::uuid")
        .bind(payment_id)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// The payment id a PAYMENT_IN_PROGRESS answer names.
fn in_progress(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(status), "PAYMENT_IN_PROGRESS");
    status.get_details_error_info().unwrap().metadata["payment_id"].clone()
}

/// Runs `fans` payments on a replica that crashes at `fault`, then starts two fresh
/// replicas whose recovery workers must finish every one of them, exactly once.
async fn crash_drill(fault: Fault) -> Mesh {
    let mut mesh = mesh(50, |settings| {
        quick_recovery(settings);
        settings.payment.fault = fault;
    })
    .await;
    let mut started = Vec::new();
    for index in 0..10 {
        let fan = mesh.fan(&format!("drill-{index}"), 300_000).await;
        let hold = mesh.hold(&fan, &[index + 1]).await;
        let stopped = mesh.pay(0, &fan, &hold.hold_id, "pay").await.unwrap_err();
        started.push((fan, hold, in_progress(&stopped)));
    }
    mesh.crash_payment(0);

    // Mid-flight: the points are gone (after-spend) or the seats sold (after-confirm), and
    // the records say the payments are PENDING.
    for (_, _, payment_id) in &started {
        let status = mesh
            .payment_rows()
            .await
            .into_iter()
            .find(|(id, _, _)| id.to_string() == *payment_id)
            .unwrap()
            .1;
        assert_eq!(status, "PENDING");
    }

    let mut healthy = mesh.payment_config.clone();
    healthy.fault = Fault::None;
    mesh.start_payment(healthy.clone()).await;
    mesh.start_payment(healthy).await;
    for (fan, hold, payment_id) in &started {
        let payment = mesh.settled(payment_id).await;
        assert_eq!(payment.status(), PaymentStatus::Completed);
        assert_eq!(payment.balance_after, 300_000 - SEAT_PRICE);
        assert_eq!(mesh.balance(&fan.user_id).await, 300_000 - SEAT_PRICE);
        let spends = mesh
            .ledger(&fan.user_id)
            .await
            .into_iter()
            .filter(|(kind, _, _)| kind == "SPEND")
            .count();
        assert_eq!(spends, 1, "spent exactly once");
        let sold = mesh.hold_now(&hold.hold_id).await;
        assert_eq!(sold.status(), HoldStatus::Confirmed);
        assert_eq!(&sold.payment_id, payment_id);
        // The token is completed too: the recovery finishes every step.
        eventually(
            Duration::from_secs(5),
            "the recovery completes the token",
            || async { (mesh.token_status(&fan.token).await == TokenStatus::Done).then_some(()) },
        )
        .await;
        // And the fan's retry of Pay gets the receipt.
        let receipt = mesh.pay(1, fan, &hold.hold_id, "pay").await.unwrap();
        assert_eq!(&receipt.payment_id, payment_id);
    }
    mesh.audit().await;
    mesh
}

#[tokio::test]
async fn a_crash_after_the_spend_is_finished_by_recovery() {
    crash_drill(Fault::AfterSpend).await;
}

#[tokio::test]
async fn a_crash_after_the_confirm_is_finished_by_recovery() {
    crash_drill(Fault::AfterConfirm).await;
}

#[tokio::test]
async fn point_down_mid_saga_leaves_the_payment_pending_until_it_returns() {
    let mut mesh = mesh(50, quick_recovery).await;
    let fan = mesh.fan("patient", 250_000).await;
    let hold = mesh.hold(&fan, &[5, 6]).await;
    mesh.stop_point().await;

    let waiting = mesh.pay(0, &fan, &hold.hold_id, "pay").await.unwrap_err();
    let payment_id = in_progress(&waiting);
    // Two rounds of recovery failed against the missing peer (each one gives the payment
    // back with one more attempt counted), and the payment is still just pending.
    let admin = mesh.database.admin().await;
    let attempts = || attempts_of(&admin, &payment_id);
    let before = attempts().await;
    eventually(
        Duration::from_secs(10),
        "the recovery tried twice while point was down",
        || async { (attempts().await >= before + 2).then_some(()) },
    )
    .await;
    admin.close().await;
    assert_eq!(
        mesh.payment(&payment_id).await.status(),
        PaymentStatus::Pending
    );
    assert_eq!(
        mesh.hold_now(&hold.hold_id).await.status(),
        HoldStatus::Held
    );

    mesh.restart_point().await;
    let payment = mesh.settled(&payment_id).await;
    assert_eq!(payment.status(), PaymentStatus::Completed);
    assert_eq!(mesh.balance("patient").await, 250_000 - 2 * SEAT_PRICE);
    let receipt = mesh.pay(0, &fan, &hold.hold_id, "pay").await.unwrap();
    assert_eq!(receipt.payment_id, payment_id);
    mesh.audit().await;
}

#[tokio::test]
async fn a_driver_whose_peer_hangs_keeps_its_lease_and_drives_alone() {
    // Pay keeps retrying for 6 s; every SpendPoints takes 450 ms of the 500 ms deadline,
    // and the pauses between tries grow toward a second: longer than what a 1 s lease has
    // left after a call. The recovery worker scans every 100 ms for lapsed leases, in this
    // process too (before the fix it claimed the payment mid-drive, and both drove it).
    let mut mesh = mesh(50, |settings| {
        quick_recovery(settings);
        settings.payment.pay_patience = Duration::from_secs(6);
    })
    .await;
    let fan = mesh.fan("stuck", 100_000).await;
    let hold = mesh.hold(&fan, &[7]).await;
    let point = mesh.hang_point(Duration::from_millis(450)).await;

    let waiting = mesh.pay(0, &fan, &hold.hold_id, "pay").await.unwrap_err();
    let payment_id = in_progress(&waiting);
    // Pay asked about once a second for 6 s (five or six calls; three at least however slow
    // the run, with pauses capped at a second); then recovery's own tries, one per round.
    let asked_by_pay = point.calls();
    assert!(asked_by_pay >= 3, "Pay kept asking: {asked_by_pay} calls");
    eventually(
        Duration::from_secs(5),
        "the recovery keeps asking",
        || async { (point.calls() >= asked_by_pay + 2).then_some(()) },
    )
    .await;
    assert_eq!(
        point.most_in_flight(),
        1,
        "two drivers of one payment spent at once"
    );
    // Another request id for the same hold and token, while that payment is under way, lost
    // the race (DESIGN.md: ALREADY_EXISTS) and is told which payment won.
    let lost = mesh
        .pay(0, &fan, &hold.hold_id, "pay-again")
        .await
        .unwrap_err();
    assert_eq!(lost.code(), Code::AlreadyExists, "{lost:?}");
    assert!(
        ["HOLD_ALREADY_PAYING", "TOKEN_ALREADY_PAYING"].contains(&reason(&lost).as_str()),
        "{lost:?}"
    );
    {
        use tonic_types::StatusExt;
        let info = lost.get_details_error_info().unwrap();
        assert_eq!(info.metadata["payment_id"], payment_id);
    }

    mesh.point_back_then_completed(&payment_id).await;
    assert_eq!(mesh.balance("stuck").await, 0);
    mesh.audit().await;
}

/// A payment whose INSERT waited most of its lease on a lock (here on an uncommitted row with
/// the same key, which the INSERT must wait out to know whether it conflicts) starts its drive
/// with little of the lease left, since the database counts the lease from the INSERT's
/// start. The driver counts
/// it from when it asked for the INSERT, so it renews before its first call; counted from the
/// INSERT's answer (as before), it called the hanging point service on a lease about to lapse,
/// and the recovery worker (every 100 ms) claimed the payment and spent alongside it.
#[tokio::test]
async fn a_payment_whose_insert_waited_on_a_lock_renews_its_lease_before_its_first_call() {
    // A lease of three call deadlines: at two, the driver renews before every call anyway.
    let mut mesh = mesh(50, |settings| {
        quick_recovery(settings); // 500 ms calls, recovery every 100 ms
        settings.payment.lease = Duration::from_millis(1_500);
        settings.payment.pay_patience = Duration::from_secs(3);
    })
    .await;
    let fan = mesh.fan("held-up", 100_000).await;
    let hold = mesh.hold(&fan, &[8]).await;
    let point = mesh.hang_point(Duration::from_millis(450)).await;

    let (admin, locker) = (mesh.database.admin().await, mesh.database.admin().await);
    let mut blocker = locker.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO payment.payments
                (payment_id, user_id, request_id, hold_id, concert_id, schedule_id, seat_numbers,
                 amount, start_time, token, token_sha256, step, status, lease_owner, lease_until)
         VALUES (gen_random_uuid(), 'held-up', 'pay', gen_random_uuid(), 'c', 's', '{1}',
                 1, now(), 'another', sha256('another'), 'SPEND', 'PENDING',
                 gen_random_uuid(), now() + interval '1 hour')",
    )
    .execute(&mut *blocker)
    .await
    .unwrap();
    let hold_up = async {
        // The INSERT waits for the uncommitted row.
        let insert_on_the_row = LockWaiters {
            role: Some("stagedoor_payment"),
            wait_event: Some("transactionid"),
            ..Default::default()
        };
        until_lock_waiters(&admin, insert_on_the_row, 1, Duration::from_secs(20)).await;
        // 1.2 s of the 1.5 s lease spent waiting: the lease lapses in the database during
        // the first call to the point service (which hangs for 450 ms), unless renewed.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        blocker.rollback().await.unwrap();
    };
    let (waited, ()) = tokio::join!(mesh.pay(0, &fan, &hold.hold_id, "pay"), hold_up);
    let payment_id = in_progress(&waited.unwrap_err());
    assert!(point.calls() >= 1, "the drive asked the point service");
    assert_eq!(
        point.most_in_flight(),
        1,
        "two drivers of one payment spent at once"
    );
    admin.close().await;
    locker.close().await;

    mesh.point_back_then_completed(&payment_id).await;
    assert_eq!(mesh.balance("held-up").await, 100_000 - SEAT_PRICE);
    mesh.audit().await;
}

/// At the smallest lease (two call deadlines) the driver renews before every call. A renewal
/// that itself waited long (here on the payment's row, locked by another transaction while
/// the driver paused between two tries) buys a lease counted from before the wait: too
/// little left for the next call, which would let the lease lapse mid-call and recovery
/// spend alongside. The driver leaves the payment to recovery instead of calling on it.
#[tokio::test]
async fn a_renewal_that_waited_long_is_not_called_on() {
    let mut mesh = mesh(50, |settings| {
        quick_recovery(settings); // a 1 s lease, 500 ms calls, recovery every 100 ms
        settings.payment.pay_patience = Duration::from_secs(8);
    })
    .await;
    let fan = mesh.fan("slow-renewal", 100_000).await;
    let hold = mesh.hold(&fan, &[9]).await;
    let point = mesh.hang_point(Duration::from_millis(450)).await;

    let admin = mesh.database.admin().await;
    let lease_until = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT lease_until FROM payment.payments WHERE user_id = 'slow-renewal'",
        )
        .fetch_optional(&admin)
        .await
        .unwrap()
        .flatten()
    };
    let lock_in_a_pause = async {
        loop {
            // From the fourth try on (pauses grow to half the lease), a call in flight, and
            // the lease as its drive left it.
            let during_the_call = eventually(
                Duration::from_secs(20),
                "a fourth try in flight",
                || async {
                    if point.calls() >= 4 && point.in_flight() == 1 {
                        lease_until().await
                    } else {
                        None
                    }
                },
            )
            .await;
            let calls = point.calls();
            // The call ends, and the drive renews its lease before it pauses: the same
            // statement as the renewal that ends the pause, so the lock below must come after
            // this one has committed.
            let paused = eventually(
                Duration::from_secs(10),
                "the renewal before the pause, or another call",
                || async {
                    if point.calls() != calls {
                        return Some(false);
                    }
                    let now = lease_until().await;
                    (point.in_flight() == 0 && now.is_some() && now != Some(during_the_call))
                        .then_some(true)
                },
            )
            .await;
            if !paused {
                continue;
            }
            let mut blocker = admin.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM payment.payments WHERE user_id = 'slow-renewal' FOR UPDATE")
                .execute(&mut *blocker)
                .await
                .unwrap();
            // In a pause, the renewal that ends it now waits for this lock: told apart from
            // the driver's other writes by its statement, the only one that starts
            // `UPDATE payments SET lease_until`. Another write waiting (a release, once Pay's
            // patience is spent), or a call starting: that tests nothing, so let go and take
            // the next pause.
            // Recovery's claim skips locked rows, so it never waits here.
            let renewal_waits = eventually(
                Duration::from_secs(10),
                "a payment write waits for the lock, or a call starts",
                || async {
                    if point.calls() != calls {
                        return Some(false);
                    }
                    let waiting = |query_contains| LockWaiters {
                        role: Some("stagedoor_payment"),
                        query_contains,
                        ..Default::default()
                    };
                    if lock_waiters(&admin, waiting(Some("UPDATE payments SET lease_until"))).await
                        > 0
                    {
                        return Some(true);
                    }
                    (lock_waiters(&admin, waiting(None)).await > 0).then_some(false)
                },
            )
            .await;
            if !renewal_waits {
                blocker.rollback().await.unwrap();
                continue;
            }
            // The renewal waits until most of its lease is gone.
            tokio::time::sleep(Duration::from_millis(1_200)).await;
            blocker.commit().await.unwrap();
            break;
        }
    };
    let lock_in_a_pause = async {
        tokio::time::timeout(Duration::from_secs(30), lock_in_a_pause)
            .await
            .expect("a pause locked within 30 s")
    };
    let (waited, ()) = tokio::join!(mesh.pay(0, &fan, &hold.hold_id, "pay"), lock_in_a_pause);
    let payment_id = in_progress(&waited.unwrap_err());
    // Recovery goes on trying (one call per round) while the point service hangs: two of its
    // calls, so that the check below covers recovery as well as Pay.
    let asked_by_pay = point.calls();
    eventually(
        Duration::from_secs(5),
        "the recovery keeps asking",
        || async { (point.calls() >= asked_by_pay + 2).then_some(()) },
    )
    .await;
    assert_eq!(
        point.most_in_flight(),
        1,
        "two drivers of one payment spent at once"
    );
    admin.close().await;

    mesh.point_back_then_completed(&payment_id).await;
    mesh.audit().await;
}

/// A crash drill stops everything the replica was doing, Pay's sagas included. They run
/// apart from the call, since a client that hangs up must not stop them, and used to run on
/// after `ServiceHandle::abort`: the drills tested a gentler crash than a killed process.
#[tokio::test]
async fn a_crashed_replica_stops_driving_its_payments() {
    // The saga's one call to the point service hangs for an hour, under an hour's lease and
    // a ten-minute deadline, and the fan's Pay stays open through the crash: nothing but the
    // crash can end that call within the test. A crashed replica's saga is dropped, and with
    // it the call (the client resets its stream and the point service's handler is dropped);
    // a saga that ran on would keep it open.
    let mut mesh = mesh(50, |settings| {
        settings.payment.lease = Duration::from_secs(3_600);
        settings.payment.call_deadline = Duration::from_secs(600);
        settings.payment.pay_patience = Duration::from_secs(3_600);
    })
    .await;
    let fan = mesh.fan("crashed", 100_000).await;
    let hold = mesh.hold(&fan, &[10]).await;
    let point = mesh.hang_point(Duration::from_secs(3_600)).await;
    let pay = tokio::spawn(mesh.pay(0, &fan, &hold.hold_id, "pay"));
    eventually(
        Duration::from_secs(20),
        "the saga calls the point service",
        || async { (point.in_flight() == 1).then_some(()) },
    )
    .await;
    mesh.crash_payment(0);
    eventually(
        Duration::from_secs(20),
        "the crash ends the saga's call",
        || async { (point.in_flight() == 0).then_some(()) },
    )
    .await;
    assert_eq!(point.calls(), 1, "one call, by the one drive");
    // The fan's call ends with the replica, as a killed process's would.
    let ended = tokio::time::timeout(Duration::from_secs(20), pay)
        .await
        .expect("Pay ends with the crash")
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
}

#[tokio::test]
async fn concert_down_after_the_spend_keeps_the_points_until_the_seats_are_sold() {
    let mut mesh = mesh(50, |settings| {
        quick_recovery(settings);
        settings.payment.fault = Fault::AfterSpend;
    })
    .await;
    let fan = mesh.fan("spent", 250_000).await;
    let hold = mesh.hold(&fan, &[11]).await;
    let stopped = mesh.pay(0, &fan, &hold.hold_id, "pay").await.unwrap_err();
    let payment_id = in_progress(&stopped);
    mesh.crash_payment(0);
    mesh.stop_concert().await;

    let mut healthy = mesh.payment_config.clone();
    healthy.fault = Fault::None;
    let admin = mesh.database.admin().await;
    let attempts = || attempts_of(&admin, &payment_id);
    let before = attempts().await;
    mesh.start_payment(healthy).await;
    // The recovery re-spends (a replay at the point service), cannot confirm, and waits:
    // the points stay spent, nothing is refunded on a guess. Two rounds of it, seen in the
    // payment's count of failed attempts.
    eventually(
        Duration::from_secs(20),
        "the recovery tried twice and could not confirm",
        || async { (attempts().await >= before + 2).then_some(()) },
    )
    .await;
    admin.close().await;
    assert_eq!(
        mesh.payment(&payment_id).await.status(),
        PaymentStatus::Pending
    );
    assert_eq!(mesh.balance("spent").await, 250_000 - SEAT_PRICE);
    assert!(mesh
        .ledger("spent")
        .await
        .iter()
        .all(|(kind, _, _)| kind != "REFUND"));

    mesh.restart_concert().await;
    let payment = mesh.settled(&payment_id).await;
    assert_eq!(payment.status(), PaymentStatus::Completed);
    assert_eq!(
        mesh.hold_now(&hold.hold_id).await.status(),
        HoldStatus::Confirmed
    );
    assert_eq!(mesh.balance("spent").await, 250_000 - SEAT_PRICE);
    mesh.audit().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_does_not_stop_the_saga() {
    // A long lease and a slow recovery worker: if the payment completes quickly, it was the
    // abandoned call's own saga that finished it, not the recovery.
    let mut mesh = mesh(50, |settings| {
        settings.payment.pay_patience = Duration::from_secs(20);
        settings.payment.recovery_interval = Duration::from_secs(60);
        settings.payment.retry_max = Duration::from_secs(60);
    })
    .await;
    let fan = mesh.fan("gone", 100_000).await;
    let hold = mesh.hold(&fan, &[20]).await;
    mesh.stop_point().await;

    // The client gives up once the payment is recorded, while its saga waits for the point
    // service.
    {
        let pay = mesh.pay(0, &fan, &hold.hold_id, "pay");
        let recorded = eventually(
            Duration::from_secs(20),
            "the payment is recorded",
            || async { (!mesh.payment_rows().await.is_empty()).then_some(()) },
        );
        tokio::select! {
            paid = pay => panic!("Pay answered while the point service is down: {paid:?}"),
            () = recorded => {}
        }
    }
    mesh.restart_point().await;
    let rows = mesh.payment_rows().await;
    assert_eq!(rows.len(), 1);
    let payment = mesh.settled(&rows[0].0.to_string()).await;
    assert_eq!(payment.status(), PaymentStatus::Completed);
    assert_eq!(mesh.balance("gone").await, 0);
    mesh.audit().await;
}

#[tokio::test]
async fn a_hang_up_at_any_moment_leaves_no_payment_undriven() {
    // An hour's lease and a slow recovery worker: only the call's own task can settle a
    // payment within this test. Sixty callers hang up after 0, 1, 2, ... ms, so some do so
    // between the payment's INSERT and the start of its saga; each payment recorded must
    // still settle at once.
    let mesh = mesh(61, |settings| {
        settings.payment.lease = Duration::from_secs(3_600);
        settings.payment.recovery_interval = Duration::from_secs(60);
        settings.payment.retry_max = Duration::from_secs(60);
    })
    .await;
    for index in 0..60 {
        let fan = mesh.fan(&format!("impatient-{index}"), SEAT_PRICE).await;
        let hold = mesh.hold(&fan, &[index + 1]).await;
        let _ = tokio::time::timeout(
            Duration::from_millis(index as u64),
            mesh.pay(0, &fan, &hold.hold_id, "pay"),
        )
        .await;
    }
    let mut pending = Vec::new();
    for _ in 0..100 {
        pending = mesh
            .payment_rows()
            .await
            .into_iter()
            .filter(|(_, status, _)| status == "PENDING")
            .collect();
        if pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pending.is_empty(), "left undriven: {pending:?}");
    // Settled means paid: every fan had the points and a seat nobody else wanted.
    // (About 55 of the 60 calls get as far as recording their payment on this machine.)
    let rows = mesh.payment_rows().await;
    assert!(
        !rows.is_empty(),
        "no call got as far as recording its payment"
    );
    let unpaid: Vec<_> = rows
        .iter()
        .filter(|(_, status, _)| status != "COMPLETED")
        .collect();
    assert!(unpaid.is_empty(), "settled without being paid: {unpaid:?}");
    // A caller who waits is paid as ever.
    let patient = mesh.fan("patient", SEAT_PRICE).await;
    let hold = mesh.hold(&patient, &[61]).await;
    let paid = mesh.pay(0, &patient, &hold.hold_id, "pay").await.unwrap();
    assert_eq!(paid.status(), PaymentStatus::Completed);
    mesh.audit().await;
}

#[tokio::test]
async fn a_hang_up_while_its_payment_is_written_leaves_it_driven() {
    // The moment the sweep above hits only by chance, made certain: the payment's INSERT is
    // held inside Postgres (a trigger waits on an advisory lock the test holds) while the
    // caller hangs up, and commits after. Its saga must still run: under an hour's lease and
    // a slow recovery worker, only the call's own task can settle it within this test.
    let mesh = mesh(1, |settings| {
        settings.payment.lease = Duration::from_secs(3_600);
        settings.payment.recovery_interval = Duration::from_secs(60);
        settings.payment.retry_max = Duration::from_secs(60);
    })
    .await;
    let fan = mesh.fan("hung-up", SEAT_PRICE).await;
    let hold = mesh.hold(&fan, &[1]).await;
    let gate =
        stagedoor_testkit::RowGate::on_insert(&mesh.database, "payment.payments", "true").await;
    {
        let pay = mesh.pay(0, &fan, &hold.hold_id, "pay");
        tokio::select! {
            paid = pay => panic!("Pay answered while its INSERT is held: {paid:?}"),
            () = gate.until_parked(1) => {}
        }
    }
    gate.open().await;

    let rows = eventually(
        Duration::from_secs(20),
        "the payment is recorded",
        || async { Some(mesh.payment_rows().await).filter(|rows| !rows.is_empty()) },
    )
    .await;
    let payment = mesh.settled(&rows[0].0.to_string()).await;
    assert_eq!(payment.status(), PaymentStatus::Completed);
    mesh.audit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drive_whose_lease_was_taken_over_changes_nothing_even_in_its_own_process() {
    // 200 payments whose first drives stalled past their lease (a long pool wait, a paused
    // runtime) and were claimed again by the recovery worker of the same process. Before
    // leases were per drive, the lease owner was the process, so the stale drives passed
    // every check the new ones did. Here all 200 stale drives act at once, through the one
    // batched writer both drives share in a process, and must change nothing at all.
    const PAYMENTS: usize = 200;
    let database = TestDatabase::create().await;
    database.migrate(db::PAYMENT, app::migrator()).await;
    let pool = database.service_pool(db::PAYMENT, 8).await;
    let lease = Duration::from_secs(60);
    let new: Vec<NewPayment> = (0..PAYMENTS)
        .map(|n| NewPayment {
            payment_id: Uuid::new_v4(),
            user_id: format!("fan-{n}"),
            request_id: "pay".into(),
            hold_id: Uuid::new_v4(),
            concert_id: "c".into(),
            schedule_id: "s".into(),
            seat_numbers: vec![1],
            amount: SEAT_PRICE,
            start_time: chrono::Utc::now(),
            token: format!("token-{n}"),
        })
        .collect();
    let first = store::insert_batch(&pool, &new, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(first.len(), PAYMENTS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = store::claim_due(&pool, lease, PAYMENTS as i64 + 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), PAYMENTS, "every lapsed lease is claimed");
    let stale: HashMap<Uuid, Uuid> = first
        .iter()
        .map(|row| (row.payment_id, row.lease_owner.expect("inserted leased")))
        .collect();
    let snapshot = || async {
        sqlx::query_as::<
            _,
            (
                Uuid,
                String,
                Option<Uuid>,
                chrono::DateTime<chrono::Utc>,
                i32,
            ),
        >(
            "SELECT payment_id, step, lease_owner, lease_until, attempts FROM payments
              ORDER BY payment_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = snapshot().await;

    let (writes, workers) = PaymentWrites::spawn(pool.clone(), lease);
    let mut stale_drives = JoinSet::new();
    for row in &claimed {
        let payment_id = row.payment_id;
        let old = stale[&payment_id];
        assert_ne!(Some(old), row.lease_owner, "a claim draws a new lease");
        let (pool, writes) = (pool.clone(), writes.clone());
        stale_drives.spawn(async move {
            // What a stale drive does: renew before its next call, record a refusal, or
            // give the payment back for later.
            let renewed = store::renew(&pool, payment_id, old, Step::Spend, lease)
                .await
                .unwrap();
            let refusal = Advance {
                to: Step::Done,
                status: Status::Failed,
                balance_after: None,
                failure: Some(("INSUFFICIENT_BALANCE".into(), "stale".into())),
            };
            let recorded = writes
                .advance(payment_id, old, Step::Spend, refusal)
                .await
                .unwrap();
            store::release(&pool, payment_id, old, lease, lease)
                .await
                .unwrap();
            (renewed, recorded.is_some())
        });
    }
    while let Some(outcome) = stale_drives.join_next().await {
        assert_eq!(
            outcome.unwrap(),
            (false, false),
            "a stale drive renewed or recorded"
        );
    }
    assert_eq!(snapshot().await, before, "a stale drive changed a row");

    // The current drives are untouched: each records its progress, while the stale drive of
    // the same payment records a refusal at the same moment, so that both calls can share
    // one batch of the writer. Only the current one's lands.
    let mut both_drives = JoinSet::new();
    for row in &claimed {
        let current = row.lease_owner.unwrap();
        for (lease, to, status) in [
            (current, Step::Confirm, Status::Pending),
            (stale[&row.payment_id], Step::Done, Status::Failed),
        ] {
            let (writes, payment_id) = (writes.clone(), row.payment_id);
            both_drives.spawn(async move {
                let change = Advance {
                    to,
                    status,
                    balance_after: Some(0),
                    failure: (to == Step::Done).then(|| ("HOLD_EXPIRED".into(), "stale".into())),
                };
                let recorded = writes
                    .advance(payment_id, lease, Step::Spend, change)
                    .await
                    .unwrap();
                (
                    lease == current,
                    recorded.map(|row| (row.step, row.lease_owner)),
                )
            });
        }
    }
    while let Some(outcome) = both_drives.join_next().await {
        match outcome.unwrap() {
            (true, recorded) => {
                let (step, lease) = recorded.expect("the current drive records");
                assert_eq!(step, "CONFIRM");
                assert!(lease.is_some());
            }
            (false, recorded) => assert_eq!(recorded, None, "a stale drive recorded"),
        }
    }
    let steps: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT step FROM payments")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(steps, vec![("CONFIRM".to_owned(),)]);
    for (_, worker) in workers {
        worker.abort();
    }
    pool.close().await;
}
