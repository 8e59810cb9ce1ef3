//! The queue service, tested through gRPC against the real Postgres: each test gets a fresh
//! database and starts real queue servers on 127.0.0.1:0.

mod admission;
mod bad_input;
mod expiry;
mod infra;
mod issue;
mod watch;

use std::time::Duration;

use stagedoor_proto::queue::v1::{
    self as pb, queue_internal_service_client::QueueInternalServiceClient,
    queue_service_client::QueueServiceClient,
};
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{db, server::ServiceHandle};
use stagedoor_testkit::{eventually, TestDatabase};
use tonic::transport::Channel;

/// A queue server under test and clients of both its services.
pub struct Queue {
    pub handle: ServiceHandle,
    pub public: QueueServiceClient<Channel>,
    pub internal: QueueInternalServiceClient<Channel>,
}

/// Test settings: quick ticks so tests run in seconds; each test adjusts what it exercises.
pub fn config(database: &TestDatabase) -> QueueConfig {
    let mut config = QueueConfig::for_database(database.url(db::QUEUE));
    config.tick = Duration::from_millis(20);
    config.admit_rate = 1_000_000;
    config
}

/// Starts a queue server with `config` and connects to it.
pub async fn start(config: QueueConfig) -> Queue {
    let (handle, channel) =
        stagedoor_testkit::serve(|listener| stagedoor_queue::start(config, listener)).await;
    Queue {
        public: QueueServiceClient::new(channel.clone()),
        internal: QueueInternalServiceClient::new(channel),
        handle,
    }
}

impl Queue {
    /// Opens the lines of `concert_ids`, as the concert service does for each concert it
    /// creates: IssueToken takes fans only for an open line.
    pub async fn open(&self, concert_ids: &[&str]) {
        self.internal
            .clone()
            .open_lines(pb::OpenLinesRequest {
                concert_ids: concert_ids.iter().map(|id| id.to_string()).collect(),
            })
            .await
            .unwrap_or_else(|status| panic!("OpenLines({concert_ids:?}): {status:?}"));
    }

    pub async fn issue(&self, concert_id: &str, user_id: &str) -> pb::QueueTicket {
        self.public
            .clone()
            .issue_token(pb::IssueTokenRequest {
                concert_id: concert_id.into(),
                user_id: user_id.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("IssueToken({concert_id}, {user_id}): {status:?}"))
            .into_inner()
            .ticket
            .unwrap()
    }

    pub async fn status(&self, token: &str) -> pb::QueueTicket {
        self.public
            .clone()
            .get_queue_status(pb::GetQueueStatusRequest {
                token: token.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .ticket
            .unwrap()
    }

    pub async fn validate(&self, token: &str) -> Result<pb::ValidateTokenResponse, tonic::Status> {
        self.internal
            .clone()
            .validate_token(pb::ValidateTokenRequest {
                token: token.into(),
            })
            .await
            .map(|response| response.into_inner())
    }

    pub async fn complete(&self, token: &str) -> Result<pb::TokenStatus, tonic::Status> {
        self.internal
            .clone()
            .complete_token(pb::CompleteTokenRequest {
                token: token.into(),
            })
            .await
            .map(|response| response.into_inner().status())
    }

    /// Polls until the token reaches `status`, or panics after `within`.
    pub async fn wait_for(
        &self,
        token: &str,
        status: pb::TokenStatus,
        within: Duration,
    ) -> pb::QueueTicket {
        let what = format!("token {token} becomes {status:?}");
        eventually(within, &what, || async {
            Some(self.status(token).await).filter(|ticket| ticket.status() == status)
        })
        .await
    }
}

pub use stagedoor_testkit::reason;

/// Rows of the queue's tables, read as the superuser.
pub async fn count_rows(database: &TestDatabase) -> (i64, i64) {
    database
        .row("SELECT (SELECT count(*) FROM queue.tokens), (SELECT count(*) FROM queue.lines)")
        .await
}
