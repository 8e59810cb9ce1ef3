//! The queue service, tested through gRPC against the real Postgres: each test gets a fresh
//! database and starts real queue servers on 127.0.0.1:0.

mod admission;
mod bad_input;
mod expiry;
mod infra;
mod issue;
mod leave;
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

/// A queue server with the test settings as `tune` leaves them, and concert `c`'s line open.
pub async fn open_line(database: &TestDatabase, tune: impl FnOnce(&mut QueueConfig)) -> Queue {
    let mut settings = config(database);
    tune(&mut settings);
    let queue = start(settings).await;
    queue.open(&["c"]).await;
    queue
}

/// [`open_line`], and the admission policy the server runs with (for tests that call the
/// store directly).
pub async fn open_line_with_policy(
    database: &TestDatabase,
    tune: impl FnOnce(&mut QueueConfig),
) -> (Queue, stagedoor_queue::store::AdmissionPolicy) {
    let mut settings = config(database);
    tune(&mut settings);
    let policy = stagedoor_queue::store::AdmissionPolicy::from(&settings);
    let queue = start(settings).await;
    queue.open(&["c"]).await;
    (queue, policy)
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
        issue_with(self.public.clone(), concert_id, user_id).await
    }

    /// [`Queue::issue`] on a task of its own, for a call the test must not wait on yet.
    pub fn issue_in_background(
        &self,
        concert_id: &'static str,
        user_id: &'static str,
    ) -> tokio::task::JoinHandle<pb::QueueTicket> {
        tokio::spawn(issue_with(self.public.clone(), concert_id, user_id))
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

    /// LeaveQueue through this replica.
    pub async fn leave(&self, token: &str) -> Result<pb::QueueTicket, tonic::Status> {
        self.public
            .clone()
            .leave_queue(pb::LeaveQueueRequest {
                token: token.into(),
            })
            .await
            .map(|response| response.into_inner().ticket.unwrap())
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

/// A token's status as its row says, read by the admin (asking the service would be a
/// poll, and a poll is a sign of life).
pub async fn row_status(admin: sqlx::PgPool, token: String) -> String {
    sqlx::query_scalar("SELECT status FROM queue.tokens WHERE token = $1::uuid")
        .bind(token)
        .fetch_one(&admin)
        .await
        .unwrap()
}

/// Counts the ACTIVE tokens of concert `rush` at the commit of every transaction that made
/// one ACTIVE (a deferred constraint trigger, run just before the commit, once per row made
/// ACTIVE), keeping the highest count and how many counts were made. Exact where a sampler reading the table
/// from outside could miss a moment over the cap: every admission changes ACTIVE rows under
/// its line's lock, so no other change to them is in flight at that commit.
pub async fn count_active_at_commits(database: &TestDatabase) {
    let admin = database.admin().await;
    for statement in [
        "CREATE TABLE queue.active_at_commits (highest bigint NOT NULL, counts bigint NOT NULL)",
        "INSERT INTO queue.active_at_commits VALUES (0, 0)",
        // SECURITY DEFINER: the table is the test's, the trigger fires for the queue's role.
        "CREATE FUNCTION queue.count_active() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
           SET search_path = queue AS
           $$ BEGIN
                UPDATE active_at_commits
                   SET highest = greatest(highest, (SELECT count(*) FROM tokens
                                                     WHERE concert_id = 'rush'
                                                       AND status = 'ACTIVE')),
                       counts = counts + 1;
                RETURN NULL;
              END $$",
        "CREATE CONSTRAINT TRIGGER count_active AFTER INSERT OR UPDATE ON queue.tokens
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
           WHEN (NEW.concert_id = 'rush' AND NEW.status = 'ACTIVE')
           EXECUTE FUNCTION queue.count_active()",
    ] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    admin.close().await;
}

/// What [`count_active_at_commits`] saw: the most ACTIVE tokens any commit left, and how
/// many times it counted (once per admitted fan).
pub async fn active_at_commits(admin: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT highest, counts FROM queue.active_at_commits")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// `fans` fans (`fan-0`, `fan-1`, ...) enter `concert_id`'s line in the same instant, every
/// other one through each of the two replicas.
pub async fn rush(replicas: &std::sync::Arc<[Queue; 2]>, concert_id: &'static str, fans: usize) {
    let arrive = std::sync::Arc::new(tokio::sync::Barrier::new(fans));
    let calls: Vec<_> = (0..fans)
        .map(|fan| {
            let (replicas, arrive) = (replicas.clone(), arrive.clone());
            tokio::spawn(async move {
                arrive.wait().await;
                replicas[fan % 2]
                    .issue(concert_id, &format!("fan-{fan}"))
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
}

/// Rows of the queue's tables, read as the superuser.
pub async fn count_rows(database: &TestDatabase) -> (i64, i64) {
    database
        .row("SELECT (SELECT count(*) FROM queue.tokens), (SELECT count(*) FROM queue.lines)")
        .await
}

async fn issue_with(
    mut client: QueueServiceClient<Channel>,
    concert_id: &str,
    user_id: &str,
) -> pb::QueueTicket {
    client
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

/// Runs `body` (PL/pgSQL statements) inside the statement that expires `user_id`'s token,
/// through a trigger on that row's turn to EXPIRED: the way to change other rows between
/// two statements of one transaction (an expiry pass and the read after it) at a point the
/// test chooses, not at a time it guesses. What `body` writes is the transaction's own:
/// the pass it runs in does not see it (its snapshot is older), every later statement does.
/// `user_id`'s window is ended now, so the next expiry pass of the line runs `body`.
pub async fn on_expiry_of(database: &TestDatabase, user_id: &str, body: &str) {
    let admin = database.admin().await;
    for statement in [
        format!(
            "CREATE FUNCTION queue.on_expiry() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN {body} RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER on_expiry BEFORE UPDATE ON queue.tokens FOR EACH ROW
               WHEN (OLD.user_id = '{user_id}' AND OLD.status <> 'EXPIRED'
                     AND NEW.status = 'EXPIRED')
               EXECUTE FUNCTION queue.on_expiry()"
        ),
        format!("UPDATE queue.tokens SET expire_time = now() WHERE user_id = '{user_id}'"),
    ] {
        sqlx::query(&statement).execute(&admin).await.unwrap();
    }
    admin.close().await;
}

/// IssueToken for `users` of concert `c` in one batch, by construction (the gRPC path gives
/// one batch only by timing), through the store as the queue's own role; the tickets by user.
pub async fn issue_one_batch(
    database: &TestDatabase,
    policy: &stagedoor_queue::store::AdmissionPolicy,
    users: &[&str],
) -> std::collections::HashMap<String, stagedoor_queue::domain::Ticket> {
    let pool = database.service_pool(db::QUEUE, 2).await;
    let users: Vec<String> = users.iter().map(|user| (*user).to_owned()).collect();
    let tickets = stagedoor_queue::store::issue_batch(&pool, policy, "c", &users)
        .await
        .unwrap()
        .expect("the line is open");
    pool.close().await;
    tickets
        .into_iter()
        .map(|ticket| (ticket.user_id.clone(), ticket))
        .collect()
}
