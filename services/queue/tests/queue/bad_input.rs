use stagedoor_proto::queue::v1 as pb;
use stagedoor_testkit::TestDatabase;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{config, count_rows, reason, start};

#[tokio::test]
async fn bad_ids_are_refused_and_write_nothing() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    queue.open(&["c"]).await;
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
    assert_eq!(count_rows(&database).await, (0, 1), "no token written");
}

#[tokio::test]
async fn a_concert_without_a_line_takes_no_fan() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    queue.open(&["c"]).await;
    let status = queue
        .public
        .clone()
        .issue_token(pb::IssueTokenRequest {
            concert_id: "no-such-concert".into(),
            user_id: "fan".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "CONCERT_NOT_FOUND");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("concert_id").map(String::as_str),
        Some("no-such-concert")
    );
    assert_eq!(
        count_rows(&database).await,
        (0, 1),
        "no token, and no line for a made-up id"
    );
    // The open line takes fans.
    queue.issue("c", "fan").await;
}

#[tokio::test]
async fn open_lines_is_idempotent_and_refuses_bad_ids() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let open = |ids: Vec<String>| {
        let mut internal = queue.internal.clone();
        async move {
            internal
                .open_lines(pb::OpenLinesRequest { concert_ids: ids })
                .await
                .map(|response| response.into_inner().opened_count)
        }
    };
    let too_many: Vec<String> = (0..1_001).map(|n| format!("c-{n}")).collect();
    for ids in [
        vec![],
        too_many,
        vec!["a".to_owned(), "not an id".to_owned()],
        vec!["a".to_owned(), String::new()],
    ] {
        let status = open(ids).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason(&status), "INVALID_FIELD");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(
            info.metadata.get("field").map(String::as_str),
            Some("concert_ids")
        );
    }
    assert_eq!(count_rows(&database).await, (0, 0), "no line opened");

    assert_eq!(open(vec!["a".into(), "b".into()]).await.unwrap(), 2);
    assert_eq!(
        open(vec!["b".into(), "c".into()]).await.unwrap(),
        1,
        "b was open"
    );
    let first = queue.issue("b", "fan").await;
    let line = || {
        database.row::<(i64, i64, i32)>(
            "SELECT last_place, admitted_through, active_count FROM queue.lines
              WHERE concert_id = 'b'",
        )
    };
    let before = line().await;
    assert_eq!(open(vec!["b".into()]).await.unwrap(), 0);
    assert_eq!(
        line().await,
        before,
        "the open line's counters are untouched"
    );
    assert_eq!(
        queue.issue("b", "fan").await.token,
        first.token,
        "opening an open line changes nothing"
    );
    assert_eq!(count_rows(&database).await, (1, 3));
}

#[tokio::test]
async fn malformed_tokens_are_refused_on_every_rpc() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    queue.open(&["c"]).await;
    // A real ACTIVE token beside them, which no malformed one may reach.
    let alice = queue.issue("c", "alice").await;
    assert_eq!(alice.status(), pb::TokenStatus::Active);
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
            public
                .leave_queue(pb::LeaveQueueRequest {
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
    assert_eq!(count_rows(&database).await, (1, 1), "no row written");
    let still = queue.validate(&alice.token).await.unwrap();
    assert_eq!(still.user_id, "alice", "the real token is still ACTIVE");
}

#[tokio::test]
async fn validate_token_says_who_and_why_not() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 1;
    let queue = start(settings).await;
    queue.open(&["concert-7"]).await;

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

/// ValidateTokens answers every token, in order, exactly as ValidateToken answers it alone:
/// ACTIVE, WAITING, DONE, never issued, malformed, and a token asked twice.
#[tokio::test]
async fn validate_tokens_answers_each_token_as_validate_token_would() {
    let database = TestDatabase::create().await;
    let mut settings = config(&database);
    settings.max_active = 2;
    let queue = start(settings).await;
    queue.open(&["concert-7"]).await;
    let alice = queue.issue("concert-7", "alice").await;
    let carol = queue.issue("concert-7", "carol").await;
    queue.complete(&carol.token).await.unwrap();
    // Dave takes the place Carol freed; Bob waits behind Alice and Dave.
    queue.issue("concert-7", "dave").await;
    let bob = queue.issue("concert-7", "bob").await;
    let tokens = vec![
        alice.token.clone(),
        bob.token.clone(),
        carol.token.clone(),
        uuid::Uuid::new_v4().to_string(),
        "not-a-token".to_owned(),
        alice.token.clone(),
    ];

    let validations = queue
        .internal
        .clone()
        .validate_tokens(pb::ValidateTokensRequest {
            tokens: tokens.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .validations;
    assert_eq!(validations.len(), tokens.len());
    let mut reasons = Vec::new();
    for (token, validation) in tokens.iter().zip(validations) {
        let alone = queue.validate(token).await;
        match (validation.result.unwrap(), alone) {
            (pb::token_validation::Result::Valid(together), Ok(alone)) => {
                assert_eq!(together, alone, "{token}");
                reasons.push(format!("ACTIVE {}", together.user_id));
            }
            (pb::token_validation::Result::Refused(together), Err(alone)) => {
                let info = alone.get_details_error_info().unwrap();
                assert_eq!(together.code, alone.code() as i32, "{token}");
                assert_eq!(together.reason, info.reason, "{token}");
                assert_eq!(together.message, alone.message(), "{token}");
                // ValidateTokens also says whose a token that is not ACTIVE is (for the
                // concert service's ReleaseHold), and nothing else beyond ValidateToken.
                let mut metadata = together.metadata.clone();
                let owner = (metadata.remove("user_id"), metadata.remove("concert_id"));
                // Carol was admitted (her window's end is known), Bob never was.
                let window_end = metadata.remove("expire_time");
                assert_eq!(window_end.is_some(), *token == carol.token, "{token}");
                assert_eq!(metadata, info.metadata, "{token}");
                if together.reason == "TOKEN_NOT_ACTIVE" {
                    let user = if *token == bob.token { "bob" } else { "carol" };
                    assert_eq!(
                        owner,
                        (Some(user.to_owned()), Some("concert-7".to_owned())),
                        "{token}"
                    );
                } else {
                    assert_eq!(owner, (None, None), "{token}");
                }
                let status = together.metadata.get("status").cloned().unwrap_or_default();
                reasons.push(format!("{} {status}", together.reason).trim().to_owned());
            }
            (together, alone) => panic!("{token}: together {together:?}, alone {alone:?}"),
        }
    }
    assert_eq!(
        reasons,
        [
            "ACTIVE alice",
            "TOKEN_NOT_ACTIVE WAITING",
            "TOKEN_NOT_ACTIVE DONE",
            "TOKEN_NOT_FOUND",
            "MALFORMED_TOKEN",
            "ACTIVE alice",
        ]
    );

    // The call itself: 1 to 1,000 tokens.
    for count in [0, 1_001] {
        let refused = queue
            .internal
            .clone()
            .validate_tokens(pb::ValidateTokensRequest {
                tokens: vec![alice.token.clone(); count],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{count} tokens");
        assert_eq!(reason(&refused), "INVALID_FIELD");
    }
}
