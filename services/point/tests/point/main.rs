//! The point service, tested through gRPC against the real Postgres: each test gets a fresh
//! database and starts real point servers on 127.0.0.1:0. After every test that writes, the
//! ledger is audited: every wallet's balance equals the sum of its entries.

mod input;
mod races;
mod semantics;

use stagedoor_point::PointConfig;
use stagedoor_proto::point::v1::{
    self as pb, point_internal_service_client::PointInternalServiceClient,
    point_service_client::PointServiceClient,
};
use stagedoor_runtime::{db, server::ServiceHandle};
use stagedoor_testkit::TestDatabase;
use tonic::transport::Channel;

pub use stagedoor_testkit::reason;

/// A point server under test and clients of both its services.
pub struct Point {
    #[allow(dead_code)] // kept so the server lives as long as the test
    pub handle: ServiceHandle,
    pub public: PointServiceClient<Channel>,
    pub internal: PointInternalServiceClient<Channel>,
}

pub fn config(database: &TestDatabase) -> PointConfig {
    PointConfig::for_database(database.url(db::POINT))
}

pub async fn start(config: PointConfig) -> Point {
    let (handle, channel) =
        stagedoor_testkit::serve(|listener| stagedoor_point::start(config, listener)).await;
    Point {
        public: PointServiceClient::new(channel.clone()),
        internal: PointInternalServiceClient::new(channel),
        handle,
    }
}

impl Point {
    pub async fn charge(
        &self,
        user_id: &str,
        amount: i64,
        request_id: &str,
    ) -> Result<pb::LedgerEntry, tonic::Status> {
        self.public
            .clone()
            .charge_points(pb::ChargePointsRequest {
                user_id: user_id.into(),
                amount,
                request_id: request_id.into(),
            })
            .await
            .map(|response| response.into_inner().entry.unwrap())
    }

    pub async fn spend(
        &self,
        user_id: &str,
        amount: i64,
        payment_id: &str,
    ) -> Result<pb::LedgerEntry, tonic::Status> {
        self.internal
            .clone()
            .spend_points(pb::SpendPointsRequest {
                user_id: user_id.into(),
                amount,
                payment_id: payment_id.into(),
            })
            .await
            .map(|response| response.into_inner().entry.unwrap())
    }

    pub async fn refund(&self, payment_id: &str) -> Result<pb::LedgerEntry, tonic::Status> {
        self.internal
            .clone()
            .refund_points(pb::RefundPointsRequest {
                payment_id: payment_id.into(),
            })
            .await
            .map(|response| response.into_inner().entry.unwrap())
    }

    pub async fn balance(&self, user_id: &str) -> i64 {
        self.public
            .clone()
            .get_balance(pb::GetBalanceRequest {
                user_id: user_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
    }
}

/// The audit: every wallet's balance is the sum of its ledger, and its newest entry's
/// `balance_after`. Returns the number of ledger rows.
pub async fn audit(database: &TestDatabase) -> i64 {
    let admin = database.admin().await;
    let mismatched: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT w.user_id, w.balance, l.total::int8
           FROM point.wallets w
           LEFT JOIN (SELECT user_id, sum(amount) AS total FROM point.ledger GROUP BY user_id) l
             USING (user_id)
          WHERE w.balance IS DISTINCT FROM coalesce(l.total, 0)
             OR w.balance IS DISTINCT FROM (SELECT balance_after FROM point.ledger e
                                             WHERE e.user_id = w.user_id
                                             ORDER BY entry_id DESC LIMIT 1)",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(
        mismatched.is_empty(),
        "balance != sum of ledger: {mismatched:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM point.ledger")
        .fetch_one(&admin)
        .await
        .unwrap();
    admin.close().await;
    rows
}
