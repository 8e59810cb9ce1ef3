use stagedoor_proto::point::v1 as pb;
use stagedoor_testkit::TestDatabase;
use tonic::Code;

use crate::{audit, config, reason, start};

#[tokio::test]
async fn an_unknown_user_has_nothing_yet() {
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    let balance = point
        .public
        .clone()
        .get_balance(pb::GetBalanceRequest {
            user_id: "stranger".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, 0);
    assert!(balance.update_time.is_none());
    let history = point
        .public
        .clone()
        .list_point_history(pb::ListPointHistoryRequest {
            user_id: "stranger".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history.entries.is_empty() && history.next_page_token.is_empty());
    // Spending from no wallet is short, not unknown.
    let status = point.spend("stranger", 1, "payment-1").await.unwrap_err();
    assert_eq!(reason(&status), "INSUFFICIENT_BALANCE");
    assert_eq!(audit(&database).await, 0);
}

#[tokio::test]
async fn charges_replay_by_request_id() {
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    let first = point.charge("fan", 5_000, "r-1").await.unwrap();
    assert_eq!(
        (first.amount, first.balance_after, first.request_id.as_str()),
        (5_000, 5_000, "r-1")
    );
    assert_eq!(first.kind(), pb::LedgerEntryKind::Charge);
    let again = point.charge("fan", 5_000, "r-1").await.unwrap();
    assert_eq!(again, first, "the retry returns the original entry");

    let reused = point.charge("fan", 6_000, "r-1").await.unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    // Request ids are per user: another fan may use the same one.
    point.charge("other", 1_000, "r-1").await.unwrap();
    assert_eq!(point.balance("fan").await, 5_000);
    assert_eq!(audit(&database).await, 2);
}

#[tokio::test]
async fn spends_and_refunds_are_keyed_by_payment() {
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    point.charge("fan", 10_000, "top-up").await.unwrap();

    let spent = point.spend("fan", 4_000, "pay-1").await.unwrap();
    assert_eq!(
        (spent.amount, spent.balance_after, spent.payment_id.as_str()),
        (-4_000, 6_000, "pay-1")
    );
    let reused = point.spend("fan", 5_000, "pay-1").await.unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    let reused = point.spend("other", 4_000, "pay-1").await.unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    let refunded = point.refund("pay-1").await.unwrap();
    assert_eq!((refunded.amount, refunded.balance_after), (4_000, 10_000));
    assert_eq!(refunded.kind(), pb::LedgerEntryKind::Refund);
    assert_eq!(
        point.refund("pay-1").await.unwrap(),
        refunded,
        "refunds once"
    );

    let unknown = point.refund("pay-never").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(reason(&unknown), "PAYMENT_NOT_FOUND");

    // A refunded payment id is spent: it cannot be spent again.
    assert_eq!(point.spend("fan", 4_000, "pay-1").await.unwrap(), spent);
    assert_eq!(point.balance("fan").await, 10_000);
    assert_eq!(audit(&database).await, 3);
}

#[tokio::test]
async fn a_refused_spend_stays_refused_once_the_balance_would_cover_it() {
    // The payment saga fails a payment whose spend was refused and never spends for it
    // again; an earlier attempt of the same call that reaches the wallet late must not spend
    // for it either (nothing would ever give those points back).
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    point.charge("fan", 1_000, "top-up").await.unwrap();
    let refused = point.spend("fan", 4_000, "pay-1").await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "INSUFFICIENT_BALANCE")
    );

    point.charge("fan", 9_000, "more").await.unwrap();
    let again = point.spend("fan", 4_000, "pay-1").await.unwrap_err();
    assert_eq!(reason(&again), "INSUFFICIENT_BALANCE", "{again:?}");
    assert_eq!(point.balance("fan").await, 10_000);
    // The same id with another amount or user is still a reused key, and nothing was spent,
    // so there is nothing to refund.
    let reused = point.spend("fan", 3_000, "pay-1").await.unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    let refund = point.refund("pay-1").await.unwrap_err();
    assert_eq!(reason(&refund), "PAYMENT_NOT_FOUND");
    // Another payment spends as usual.
    point.spend("fan", 4_000, "pay-2").await.unwrap();
    assert_eq!(point.balance("fan").await, 6_000);
    assert_eq!(audit(&database).await, 3);
}

#[tokio::test]
async fn spends_by_a_replica_of_the_previous_version_are_decided_too() {
    // During a rolling upgrade a replica without spend outcomes spends with its own
    // statement, below. The ledger's trigger records its outcome all the same: a new
    // replica replays that spend (rather than refuse a payment whose points were taken), and
    // the old statement cannot spend after a refusal.
    const OLD_SPEND: &str = "WITH wallet AS (
             UPDATE point.wallets SET balance = balance - $2, update_time = now()
              WHERE user_id = $1 AND balance >= $2
             RETURNING balance)
         INSERT INTO point.ledger (user_id, kind, amount, balance_after, payment_id)
         SELECT $1, 'SPEND', -$2, balance, $3 FROM wallet";
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    let admin = database.admin().await;
    let old_spend = |amount: i64, payment_id: &'static str| {
        sqlx::query(OLD_SPEND)
            .bind("fan")
            .bind(amount)
            .bind(payment_id)
            .execute(&admin)
    };
    point.charge("fan", 10_000, "top-up").await.unwrap();
    old_spend(4_000, "pay-old").await.unwrap();
    let replayed = point.spend("fan", 4_000, "pay-old").await.unwrap();
    assert_eq!(replayed.balance_after, 6_000);

    let refused = point.spend("fan", 7_000, "pay-late").await.unwrap_err();
    assert_eq!(reason(&refused), "INSUFFICIENT_BALANCE");
    point.charge("fan", 5_000, "more").await.unwrap();
    let late = old_spend(7_000, "pay-late").await.unwrap_err();
    assert!(
        late.as_database_error()
            .is_some_and(|error| error.is_unique_violation()),
        "{late:?}"
    );
    assert_eq!(point.balance("fan").await, 11_000);
    admin.close().await;
    assert_eq!(audit(&database).await, 3);
}

#[tokio::test]
async fn history_pages_newest_first() {
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    for n in 1..=25 {
        point.charge("fan", n, &format!("r-{n}")).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = point
            .public
            .clone()
            .list_point_history(pb::ListPointHistoryRequest {
                user_id: "fan".into(),
                page_size: 10,
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 10);
        seen.extend(page.entries.iter().map(|entry| entry.amount));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, (1..=25).rev().collect::<Vec<i64>>());

    // A made-up token, and a real one passed with another fan's id: both are refused rather
    // than answered with someone's page cut short at another listing's position.
    point.charge("other-fan", 1, "o-1").await.unwrap();
    let first_page = point
        .public
        .clone()
        .list_point_history(pb::ListPointHistoryRequest {
            user_id: "fan".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    for (user_id, page_token) in [
        ("fan", "not-a-token".to_owned()),
        ("other-fan", first_page.next_page_token),
    ] {
        let bad = point
            .public
            .clone()
            .list_point_history(pb::ListPointHistoryRequest {
                user_id: user_id.into(),
                page_size: 10,
                page_token,
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{user_id}");
        assert_eq!(reason(&bad), "INVALID_FIELD");
    }
}

#[tokio::test]
async fn the_ledger_is_append_only() {
    let database = TestDatabase::create().await;
    let point = start(config(&database)).await;
    point.charge("fan", 1_000, "r-1").await.unwrap();
    let role = sqlx::PgPool::connect(&database.url(stagedoor_runtime::db::POINT))
        .await
        .unwrap();
    for statement in [
        "UPDATE point.ledger SET amount = 1000000",
        "DELETE FROM point.ledger",
        "TRUNCATE point.ledger",
        "TRUNCATE point.wallets CASCADE",
    ] {
        let refused = sqlx::query(statement).execute(&role).await;
        let refused = refused.expect_err(statement).to_string();
        assert!(refused.contains("append-only"), "`{statement}`: {refused}");
    }
    role.close().await;
    assert_eq!(audit(&database).await, 1);
}

/// POINT_MAX_AMOUNT and POINT_BALANCE_CAP are settings and may be lowered while charges and
/// spends made under the old ones are still being retried. A retry of a call that went
/// through gets its receipt whatever the limits are now: the payment saga replays
/// SpendPoints after a crash and takes a refusal as final, so an AMOUNT_OUT_OF_RANGE there
/// would fail a payment whose points were spent and seats sold. New calls over the limits
/// are still refused.
#[tokio::test]
async fn retries_of_calls_made_under_higher_limits_get_their_receipts() {
    let database = TestDatabase::create().await;
    let before = start(config(&database)).await;
    before.charge("fan", 50_000, "top-up").await.unwrap();
    let charged = before.charge("fan", 40_000, "top-up-2").await.unwrap();
    let spent = before.spend("fan", 60_000, "pay-1").await.unwrap();
    drop(before);

    let mut lowered = config(&database);
    (lowered.max_amount, lowered.balance_cap) = (10_000, 20_000);
    let after = start(lowered).await;
    assert_eq!(
        after.charge("fan", 40_000, "top-up-2").await.unwrap(),
        charged
    );
    assert_eq!(after.spend("fan", 60_000, "pay-1").await.unwrap(), spent);

    for refused in [
        after.charge("fan", 40_000, "top-up-3").await.unwrap_err(),
        after.spend("fan", 25_000, "pay-2").await.unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert_eq!(reason(&refused), "AMOUNT_OUT_OF_RANGE");
    }
    // A different amount under a used key is still a reused key, not a receipt.
    let reused = after.spend("fan", 70_000, "pay-1").await.unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(after.balance("fan").await, 30_000);
    assert_eq!(audit(&database).await, 3);
}
