use stagedoor_testkit::TestDatabase;
use tonic::Code;

use crate::{audit, config, reason, start};

#[tokio::test]
async fn bad_amounts_and_ids_are_refused_and_write_nothing() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_amount = 1_000_000;
    settings.balance_cap = 2_000_000;
    let point = start(settings).await;
    let long = "u".repeat(65);

    let cases: Vec<(&str, i64, &str, &str)> = vec![
        ("fan", 0, "r", "AMOUNT_OUT_OF_RANGE"),
        ("fan", -5, "r", "AMOUNT_OUT_OF_RANGE"),
        ("fan", 1_000_001, "r", "AMOUNT_OUT_OF_RANGE"),
        ("fan", i64::MAX, "r", "AMOUNT_OUT_OF_RANGE"),
        ("", 10, "r", "INVALID_FIELD"),
        (long.as_str(), 10, "r", "INVALID_FIELD"),
        ("fan", 10, "", "INVALID_FIELD"),
        ("fan", 10, "has space", "INVALID_FIELD"),
    ];
    for (user_id, amount, request_id, expected) in &cases {
        let status = point
            .charge(user_id, *amount, request_id)
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{user_id:?} {amount} {request_id:?}"
        );
        assert_eq!(reason(&status), *expected);
        // A spend's limit is the balance cap, not the charge maximum (below).
        if *amount == 1_000_001 {
            continue;
        }
        let status = point.spend(user_id, *amount, request_id).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "spend {user_id:?} {amount} {request_id:?}"
        );
        assert_eq!(reason(&status), *expected, "spend");
    }
    let status = point.refund("").await.unwrap_err();
    assert_eq!(reason(&status), "INVALID_FIELD");
    assert_eq!(audit(&database).await, 0, "nothing written");

    // The balance cap: 1,000,000 + 1,000,000 fits, one more won does not.
    point.charge("fan", 1_000_000, "a").await.unwrap();
    point.charge("fan", 1_000_000, "b").await.unwrap();
    let capped = point.charge("fan", 1, "c").await.unwrap_err();
    assert_eq!(capped.code(), Code::FailedPrecondition);
    assert_eq!(reason(&capped), "BALANCE_CAP_EXCEEDED");
    assert_eq!(point.balance("fan").await, 2_000_000);
    assert_eq!(audit(&database).await, 2);

    // A spend pays a whole hold, which may cost more than one charge may add: anything up to
    // the cap is a valid amount, and past it no wallet could ever pay.
    let over_cap = point.spend("fan", 2_000_001, "pay-0").await.unwrap_err();
    assert_eq!(over_cap.code(), Code::InvalidArgument);
    assert_eq!(reason(&over_cap), "AMOUNT_OUT_OF_RANGE");
    let spent = point.spend("fan", 1_500_000, "pay-1").await.unwrap();
    assert_eq!(spent.balance_after, 500_000);
    assert_eq!(audit(&database).await, 3);
}
