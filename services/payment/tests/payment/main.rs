//! The payment saga, tested across the four real services: each test gets a fresh database
//! and starts real queue, concert, point and payment servers on 127.0.0.1, talking gRPC to
//! one another exactly as in production. Peers are stopped and restarted on their own
//! address to play "peer down"; payment replicas are aborted mid-saga to play "crash".

mod interop;
mod races;
mod recovery;
mod semantics;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use stagedoor_concert::ConcertConfig;
use stagedoor_payment::PaymentConfig;
use stagedoor_point::PointConfig;
use stagedoor_proto::{
    concert::v1::{
        self as concert_pb, concert_admin_service_client::ConcertAdminServiceClient,
        concert_internal_service_client::ConcertInternalServiceClient,
        concert_service_client::ConcertServiceClient,
    },
    payment::v1::{self as pb, payment_service_client::PaymentServiceClient},
    point::v1::{
        self as point_pb,
        point_internal_service_server::{PointInternalService, PointInternalServiceServer},
        point_service_client::PointServiceClient,
    },
    queue::v1::{self as queue_pb, queue_service_client::QueueServiceClient},
};
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{db, server::ServiceHandle};
use stagedoor_testkit::{eventually, TestDatabase};
use tonic::transport::Channel;

pub use stagedoor_runtime::auth::with_bearer;
pub use stagedoor_testkit::reason;

/// Price of every seat of the test date.
pub const SEAT_PRICE: i64 = 100_000;

/// What a test may tune before the mesh starts.
pub struct Settings {
    pub queue: QueueConfig,
    pub concert: ConcertConfig,
    pub point: PointConfig,
    /// Template of every payment replica (the peers' URLs are filled in).
    pub payment: PaymentConfig,
    pub payment_replicas: usize,
}

/// One payment replica and its client.
pub struct PaymentReplica {
    pub handle: Option<ServiceHandle>,
    pub client: PaymentServiceClient<Channel>,
}

/// Four services on one fresh database.
pub struct Mesh {
    pub database: TestDatabase,
    pub queue_handle: ServiceHandle,
    pub queue: QueueServiceClient<Channel>,
    pub concert_handle: Option<ServiceHandle>,
    pub concert_config: ConcertConfig,
    pub concert_addr: SocketAddr,
    pub concert_public: ConcertServiceClient<Channel>,
    pub concert_internal: ConcertInternalServiceClient<Channel>,
    pub concert_admin: ConcertAdminServiceClient<Channel>,
    pub point_handle: Option<ServiceHandle>,
    pub point_config: PointConfig,
    pub point_addr: SocketAddr,
    pub point: PointServiceClient<Channel>,
    pub payment_config: PaymentConfig,
    pub payments: Vec<PaymentReplica>,
    pub concert_id: String,
    pub schedule_id: String,
}

/// A fan with an ACTIVE token.
#[derive(Clone)]
pub struct Fan {
    pub user_id: String,
    pub token: String,
}

/// Starts a service on a given address (a restart on the address it had).
async fn serve_on<F, Fut>(addr: SocketAddr, start: F) -> ServiceHandle
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<ServiceHandle, db::StartupError>>,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("the address is free again");
    start(listener).await.expect("the service starts")
}

/// Starts the mesh with one date of `seat_count` seats at [`SEAT_PRICE`].
pub async fn mesh(seat_count: i32, tune: impl FnOnce(&mut Settings)) -> Mesh {
    let database = TestDatabase::create().await;
    let mut queue = QueueConfig::for_database(database.url(db::QUEUE));
    queue.max_active = 5_000;
    queue.admit_rate = 1_000_000;
    queue.tick = Duration::from_millis(20);
    let mut settings = Settings {
        queue,
        concert: ConcertConfig::new(database.url(db::CONCERT), String::new()),
        point: PointConfig::for_database(database.url(db::POINT)),
        payment: PaymentConfig::new(database.url(db::PAYMENT), "", "", ""),
        payment_replicas: 1,
    };
    // Four services (and replicas) per test, two tests at a time, one Postgres with 100
    // connections: small pools keep every test inside its share.
    settings.queue.database_max_connections = 6;
    settings.concert.database_max_connections = 6;
    settings.point.database_max_connections = 6;
    settings.payment.database_max_connections = 6;
    tune(&mut settings);

    let (queue_handle, queue_channel) =
        stagedoor_testkit::serve(|listener| stagedoor_queue::start(settings.queue, listener)).await;
    settings.concert.queue_url = queue_handle.url();
    let concert_config = settings.concert.clone();
    let (concert_handle, concert_channel) =
        stagedoor_testkit::serve(|listener| stagedoor_concert::start(settings.concert, listener))
            .await;
    let point_config = settings.point.clone();
    let (point_handle, point_channel) =
        stagedoor_testkit::serve(|listener| stagedoor_point::start(settings.point, listener)).await;
    let mut payment_config = settings.payment;
    payment_config.queue_url = queue_handle.url();
    payment_config.concert_url = concert_handle.url();
    payment_config.point_url = point_handle.url();

    let mut mesh = Mesh {
        concert_addr: concert_handle.local_addr(),
        point_addr: point_handle.local_addr(),
        database,
        queue_handle,
        queue: QueueServiceClient::new(queue_channel),
        concert_handle: Some(concert_handle),
        concert_config,
        concert_public: ConcertServiceClient::new(concert_channel.clone()),
        concert_internal: ConcertInternalServiceClient::new(concert_channel.clone()),
        concert_admin: ConcertAdminServiceClient::new(concert_channel),
        point_handle: Some(point_handle),
        point_config,
        point: PointServiceClient::new(point_channel),
        payment_config,
        payments: Vec::new(),
        concert_id: String::new(),
        schedule_id: String::new(),
    };
    for _ in 0..settings.payment_replicas {
        mesh.start_payment(mesh.payment_config.clone()).await;
    }
    mesh.concert_id = mesh
        .concert_admin
        .clone()
        .create_concert(concert_pb::CreateConcertRequest {
            title: "Paid in Full".into(),
            artist: "The Ledgers".into(),
            request_id: "payment-test-concert".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .concert
        .unwrap()
        .concert_id;
    mesh.schedule_id = mesh.add_date(seat_count).await;
    mesh
}

impl Mesh {
    /// Adds a date of `seat_count` seats at [`SEAT_PRICE`] to the mesh's concert.
    pub async fn add_date(&self, seat_count: i32) -> String {
        let request_id = format!("date-{}", uuid::Uuid::new_v4().simple());
        self.concert_admin
            .clone()
            .add_schedule(concert_pb::AddScheduleRequest {
                concert_id: self.concert_id.clone(),
                // A month ahead: a date's sale closes when it starts.
                start_time: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 30 * 86_400,
                    nanos: 0,
                }),
                venue: "Jamsil Arena".into(),
                seat_count,
                sections: vec![concert_pb::PriceSection {
                    name: "R".into(),
                    first_seat: 1,
                    last_seat: seat_count,
                    price: SEAT_PRICE,
                }],
                request_id,
            })
            .await
            .unwrap()
            .into_inner()
            .schedule
            .unwrap()
            .schedule_id
    }

    /// Starts one more payment replica with `config` (peers as in the mesh).
    pub async fn start_payment(&mut self, config: PaymentConfig) -> usize {
        let (handle, channel) =
            stagedoor_testkit::serve(|listener| stagedoor_payment::start(config, listener)).await;
        self.payments.push(PaymentReplica {
            handle: Some(handle),
            client: PaymentServiceClient::new(channel),
        });
        self.payments.len() - 1
    }

    /// Kills a payment replica mid-whatever, as a crash would.
    pub fn crash_payment(&mut self, replica: usize) {
        if let Some(handle) = self.payments[replica].handle.take() {
            handle.abort();
        }
    }

    pub async fn stop_point(&mut self) {
        let handle = self.point_handle.take().expect("point is running");
        handle.shutdown().await.unwrap();
    }

    pub async fn restart_point(&mut self) {
        let config = self.point_config.clone();
        self.point_handle = Some(
            serve_on(self.point_addr, |listener| {
                stagedoor_point::start(config, listener)
            })
            .await,
        );
    }

    /// Brings the real point service back in place of a [`Mesh::hang_point`] one, and waits
    /// for recovery to finish `payment_id`, which must end COMPLETED.
    pub async fn point_back_then_completed(&mut self, payment_id: &str) -> pb::Payment {
        self.stop_point().await;
        self.restart_point().await;
        let payment = self.settled(payment_id).await;
        assert_eq!(payment.status(), pb::PaymentStatus::Completed);
        payment
    }

    /// Replaces the point service with one that answers every SpendPoints and RefundPoints
    /// UNAVAILABLE after `delay`: a peer that hangs rather than refuses, for as long as a
    /// call's deadline allows. [`Mesh::point_back_then_completed`] brings the real one back.
    pub async fn hang_point(&mut self, delay: Duration) -> HangingPoint {
        self.stop_point().await;
        let hanging = HangingPoint {
            delay,
            ..HangingPoint::default()
        };
        let service = hanging.clone();
        self.point_handle = Some(
            serve_on(self.point_addr, |listener| async move {
                let trigger = stagedoor_runtime::ShutdownTrigger::default();
                stagedoor_runtime::server::GrpcServer::new()
                    .add_service(PointInternalServiceServer::new(service))
                    .spawn(listener, trigger, Vec::new())
            })
            .await,
        );
        hanging
    }

    pub async fn stop_concert(&mut self) {
        let handle = self.concert_handle.take().expect("concert is running");
        handle.shutdown().await.unwrap();
    }

    pub async fn restart_concert(&mut self) {
        let config = self.concert_config.clone();
        self.concert_handle = Some(
            serve_on(self.concert_addr, |listener| {
                stagedoor_concert::start(config, listener)
            })
            .await,
        );
    }

    /// A fan admitted at once, with `points` charged.
    pub async fn fan(&self, user_id: &str, points: i64) -> Fan {
        let ticket = self.issue(user_id).await;
        assert_eq!(
            ticket.status(),
            queue_pb::TokenStatus::Active,
            "{user_id} admitted"
        );
        if points > 0 {
            self.charge(user_id, points).await;
        }
        Fan {
            user_id: user_id.into(),
            token: ticket.token,
        }
    }

    pub async fn issue(&self, user_id: &str) -> queue_pb::QueueTicket {
        self.queue
            .clone()
            .issue_token(queue_pb::IssueTokenRequest {
                concert_id: self.concert_id.clone(),
                user_id: user_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .ticket
            .unwrap()
    }

    pub async fn charge(&self, user_id: &str, amount: i64) {
        self.point
            .clone()
            .charge_points(point_pb::ChargePointsRequest {
                user_id: user_id.into(),
                amount,
                request_id: format!("charge-{}", uuid::Uuid::new_v4().simple()),
            })
            .await
            .unwrap();
    }

    /// Holds seats of the mesh's first date.
    pub async fn hold(&self, fan: &Fan, seats: &[i32]) -> concert_pb::Hold {
        self.hold_on(fan, &self.schedule_id, seats).await
    }

    pub async fn hold_on(&self, fan: &Fan, schedule_id: &str, seats: &[i32]) -> concert_pb::Hold {
        self.concert_public
            .clone()
            .hold_seats(with_bearer(
                concert_pb::HoldSeatsRequest {
                    schedule_id: schedule_id.into(),
                    seat_numbers: seats.to_vec(),
                    request_id: format!("hold-{}", uuid::Uuid::new_v4().simple()),
                },
                &fan.token,
            ))
            .await
            .unwrap()
            .into_inner()
            .hold
            .unwrap()
    }

    /// Pay through `replica`; the call owns its client, so a test may spawn it.
    pub fn pay(
        &self,
        replica: usize,
        fan: &Fan,
        hold_id: &str,
        request_id: &str,
    ) -> impl std::future::Future<Output = Result<pb::Payment, tonic::Status>> + Send + 'static
    {
        let mut client = self.payments[replica].client.clone();
        let request = with_bearer(
            pb::PayRequest {
                hold_id: hold_id.into(),
                request_id: request_id.into(),
            },
            &fan.token,
        );
        async move {
            client
                .pay(request)
                .await
                .map(|response| response.into_inner().payment.unwrap())
        }
    }

    pub async fn payment(&self, payment_id: &str) -> pb::Payment {
        self.payments
            .iter()
            .find(|replica| replica.handle.is_some())
            .expect("a payment replica is running")
            .client
            .clone()
            .get_payment(pb::GetPaymentRequest {
                payment_id: payment_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .payment
            .unwrap()
    }

    /// Waits (up to 20 s) until the payment is no longer PENDING.
    pub async fn settled(&self, payment_id: &str) -> pb::Payment {
        let what = format!("payment {payment_id} leaves PENDING");
        eventually(Duration::from_secs(20), &what, || async {
            Some(self.payment(payment_id).await)
                .filter(|payment| payment.status() != pb::PaymentStatus::Pending)
        })
        .await
    }

    pub async fn balance(&self, user_id: &str) -> i64 {
        self.point
            .clone()
            .get_balance(point_pb::GetBalanceRequest {
                user_id: user_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
    }

    pub async fn hold_now(&self, hold_id: &str) -> concert_pb::Hold {
        self.concert_internal
            .clone()
            .get_hold(concert_pb::GetHoldRequest {
                hold_id: hold_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .hold
            .unwrap()
    }

    pub async fn token_status(&self, token: &str) -> queue_pb::TokenStatus {
        self.queue
            .clone()
            .get_queue_status(queue_pb::GetQueueStatusRequest {
                token: token.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .ticket
            .unwrap()
            .status()
    }

    /// A user's ledger as `(kind, amount, payment_id)`, oldest first: read straight from the
    /// point schema, the test's read-only audit.
    pub async fn ledger(&self, user_id: &str) -> Vec<(String, i64, Option<String>)> {
        let admin = self.database.admin().await;
        let rows = sqlx::query_as(
            "SELECT kind, amount, payment_id FROM point.ledger WHERE user_id = $1 ORDER BY entry_id",
        )
        .bind(user_id)
        .fetch_all(&admin)
        .await
        .unwrap();
        admin.close().await;
        rows
    }

    /// Rows of `payment.payments`, as `(payment_id, status, step)`.
    pub async fn payment_rows(&self) -> Vec<(uuid::Uuid, String, String)> {
        let admin = self.database.admin().await;
        let rows = sqlx::query_as("SELECT payment_id, status, step FROM payment.payments")
            .fetch_all(&admin)
            .await
            .unwrap();
        admin.close().await;
        rows
    }

    /// The invariants that must hold whatever happened, checked against every schema:
    /// every SOLD seat belongs to exactly one COMPLETED payment and the other way round;
    /// each payment spent at most once and refunded at most once; FAILED payments kept no
    /// point; every wallet's balance equals its ledger sum.
    pub async fn audit(&self) {
        let admin = self.database.admin().await;
        let completed: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT payment_id, amount FROM payment.payments WHERE status = 'COMPLETED'",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        for (payment_id, amount) in &completed {
            let net: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(amount), 0)::bigint FROM point.ledger WHERE payment_id = $1",
            )
            .bind(payment_id.to_string())
            .fetch_one(&admin)
            .await
            .unwrap();
            assert_eq!(
                net, -amount,
                "completed payment {payment_id} spent its amount once"
            );
        }
        let failed_kept: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM payment.payments p
              WHERE status = 'FAILED'
                AND (SELECT coalesce(sum(amount), 0) FROM point.ledger l
                      WHERE l.payment_id = p.payment_id::text) <> 0",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(failed_kept, 0, "a FAILED payment kept points");
        // Points move for payments only through the saga, so every spend or refund names a
        // payment it made, and a refunded payment never completed.
        let (unknown_payments, refunded_completed): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM point.ledger l
                      WHERE l.kind IN ('SPEND', 'REFUND')
                        AND NOT EXISTS (SELECT 1 FROM payment.payments p
                                         WHERE p.payment_id::text = l.payment_id)),
                    (SELECT count(*) FROM point.ledger l
                       JOIN payment.payments p ON p.payment_id::text = l.payment_id
                      WHERE l.kind = 'REFUND' AND p.status = 'COMPLETED')",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(
            (unknown_payments, refunded_completed),
            (0, 0),
            "points moved for unknown payments, or refunded for completed ones"
        );
        let sold_by_unknown: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM concert.holds h
              WHERE h.status = 'CONFIRMED'
                AND NOT EXISTS (SELECT 1 FROM payment.payments p
                                 WHERE p.payment_id::text = h.payment_id
                                   AND p.status = 'COMPLETED')",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(sold_by_unknown, 0, "seats sold without a completed payment");
        let completed_unsold: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM payment.payments p
              WHERE p.status = 'COMPLETED'
                AND NOT EXISTS (SELECT 1 FROM concert.holds h
                                 WHERE h.payment_id = p.payment_id::text
                                   AND h.status = 'CONFIRMED')",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(
            completed_unsold, 0,
            "completed payments without their seats"
        );
        let (seats_sold, seats_paid): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM concert.seats WHERE sold_to_payment IS NOT NULL),
                    (SELECT coalesce(sum(cardinality(seat_numbers)), 0)::bigint
                       FROM payment.payments WHERE status = 'COMPLETED')",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(
            seats_sold, seats_paid,
            "seats sold == seats of completed payments"
        );
        let drift: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM point.wallets w
              WHERE w.balance <> (SELECT coalesce(sum(amount), 0) FROM point.ledger l
                                   WHERE l.user_id = w.user_id)",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(drift, 0, "a balance differs from its ledger");
        admin.close().await;
    }
}

/// The point service of [`Mesh::hang_point`]: it sits on every call for `delay`, answers
/// UNAVAILABLE, and counts the calls it is sitting on. Answering before the caller's deadline
/// (rather than never) makes the count exact: a call is over on both sides before the same
/// driver can send its next one, so two calls at once mean two drivers.
#[derive(Clone, Default)]
pub struct HangingPoint {
    delay: Duration,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl HangingPoint {
    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls it is sitting on now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls it ever sat on at once.
    pub fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    async fn hang<T>(&self) -> Result<tonic::Response<T>, tonic::Status> {
        /// Counts the call out however it ends: tonic drops the handler when the caller's
        /// deadline passes first, and a count left up would read as a second driver.
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _in_flight = InFlight(&self.in_flight);
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Err(tonic::Status::unavailable("the point service is hanging"))
    }
}

#[tonic::async_trait]
impl PointInternalService for HangingPoint {
    async fn spend_points(
        &self,
        _: tonic::Request<point_pb::SpendPointsRequest>,
    ) -> Result<tonic::Response<point_pb::SpendPointsResponse>, tonic::Status> {
        self.hang().await
    }

    async fn refund_points(
        &self,
        _: tonic::Request<point_pb::RefundPointsRequest>,
    ) -> Result<tonic::Response<point_pb::RefundPointsResponse>, tonic::Status> {
        self.hang().await
    }
}
