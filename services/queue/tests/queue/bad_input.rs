use stagedoor_proto::queue::v1 as pb;
use stagedoor_testkit::TestDatabase;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{config, count_rows, reason, start};

#[tokio::test]
async fn bad_ids_are_refused_and_write_nothing() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let long = "x".repeat(65);
    let cases = [
        ("", "fan", "concert_id"),
        ("c", "", "user_id"),
        (long.as_str(), "fan", "concert_id"),
        ("c", long.as_str(), "user_id"),
        ("c d", "fan", "concert_id"),
        ("c", "fan/../../etc", "user_id"),
    ];
    for (concert_id, user_id, field) in cases {
        let status = queue
            .public
            .clone()
            .issue_token(pb::IssueTokenRequest {
                concert_id: concert_id.into(),
                user_id: user_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{concert_id:?}/{user_id:?}"
        );
        assert_eq!(reason(&status), "INVALID_FIELD");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("field").map(String::as_str), Some(field));
        let violation = &status.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, field);
    }
    assert_eq!(count_rows(&database).await, (0, 0), "no row written");
}

#[tokio::test]
async fn malformed_tokens_are_refused_on_every_rpc() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    for token in ["", "not-a-token", "Bearer 123", &"f".repeat(200)] {
        let mut public = queue.public.clone();
        let mut internal = queue.internal.clone();
        let results = [
            public
                .get_queue_status(pb::GetQueueStatusRequest {
                    token: token.into(),
                })
                .await
                .map(|_| ()),
            public
                .watch_queue_status(pb::WatchQueueStatusRequest {
                    token: token.into(),
                })
                .await
                .map(|_| ()),
            internal
                .validate_token(pb::ValidateTokenRequest {
                    token: token.into(),
                })
                .await
                .map(|_| ()),
            internal
                .complete_token(pb::CompleteTokenRequest {
                    token: token.into(),
                })
                .await
                .map(|_| ()),
        ];
        for result in results {
            let status = result.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "token {token:?}");
            assert_eq!(reason(&status), "MALFORMED_TOKEN");
        }
    }
    assert_eq!(count_rows(&database).await, (0, 0), "no row written");
}

#[tokio::test]
async fn validate_token_says_who_and_why_not() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 1;
    let queue = start(settings).await;

    let active = queue.issue("concert-7", "alice").await;
    let valid = queue.validate(&active.token).await.unwrap();
    assert_eq!(valid.user_id, "alice");
    assert_eq!(valid.concert_id, "concert-7");
    assert!(valid.expire_time.is_some());

    let waiting = queue.issue("concert-7", "bob").await;
    let refused = queue.validate(&waiting.token).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "TOKEN_NOT_ACTIVE");
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("status").map(String::as_str),
        Some("WAITING")
    );

    queue.complete(&active.token).await.unwrap();
    let done = queue.validate(&active.token).await.unwrap_err();
    assert_eq!(done.code(), Code::FailedPrecondition);
    let info = done.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("status").map(String::as_str),
        Some("DONE")
    );

    let unknown = queue
        .validate(&uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(reason(&unknown), "TOKEN_NOT_FOUND");
}
