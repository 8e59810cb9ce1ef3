//! The concert service, tested through gRPC against the real Postgres, with the real queue
//! service vouching for tokens: each test gets a fresh database, a queue server and one or
//! more concert servers on 127.0.0.1:0.

mod catalog;
mod races;
mod semantics;

use stagedoor_concert::ConcertConfig;
use stagedoor_proto::{
    concert::v1::{
        self as pb, concert_admin_service_client::ConcertAdminServiceClient,
        concert_internal_service_client::ConcertInternalServiceClient,
        concert_service_client::ConcertServiceClient,
    },
    queue::v1::{
        self as queue_pb, queue_internal_service_client::QueueInternalServiceClient,
        queue_service_client::QueueServiceClient,
    },
};
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{db, server::ServiceHandle};
use stagedoor_testkit::TestDatabase;
use tonic::transport::Channel;

pub use stagedoor_runtime::auth::with_bearer;
pub use stagedoor_testkit::reason;

/// One concert server and clients of its three services.
pub struct Concert {
    #[allow(dead_code)] // keeps the server alive for the test
    pub handle: ServiceHandle,
    pub public: ConcertServiceClient<Channel>,
    pub internal: ConcertInternalServiceClient<Channel>,
    pub admin: ConcertAdminServiceClient<Channel>,
}

/// A queue server and `replicas` concert servers on one fresh database.
pub struct Mesh {
    pub database: TestDatabase,
    #[allow(dead_code)]
    pub queue_handle: ServiceHandle,
    pub queue: QueueServiceClient<Channel>,
    pub queue_internal: QueueInternalServiceClient<Channel>,
    pub concerts: Vec<Concert>,
}

/// Starts the mesh; `tune` adjusts the settings (hold TTL, queue cap) a test exercises.
pub async fn mesh(
    replicas: usize,
    tune: impl FnOnce(&mut QueueConfig, &mut ConcertConfig),
) -> Mesh {
    let database = TestDatabase::create().await;
    let mut queue_config = QueueConfig::for_database(database.url(db::QUEUE));
    queue_config.max_active = 5_000;
    queue_config.admit_rate = 1_000_000;
    queue_config.tick = std::time::Duration::from_millis(20);
    let mut concert_config = ConcertConfig::new(database.url(db::CONCERT), String::new());
    tune(&mut queue_config, &mut concert_config);
    let (queue_handle, queue_channel) =
        stagedoor_testkit::serve(|listener| stagedoor_queue::start(queue_config, listener)).await;
    concert_config.queue_url = queue_handle.url();
    let mut concerts = Vec::new();
    for _ in 0..replicas {
        let config = concert_config.clone();
        let (handle, channel) =
            stagedoor_testkit::serve(|listener| stagedoor_concert::start(config, listener)).await;
        concerts.push(Concert {
            public: ConcertServiceClient::new(channel.clone()),
            internal: ConcertInternalServiceClient::new(channel.clone()),
            admin: ConcertAdminServiceClient::new(channel),
            handle,
        });
    }
    Mesh {
        database,
        queue_handle,
        queue: QueueServiceClient::new(queue_channel.clone()),
        queue_internal: QueueInternalServiceClient::new(queue_channel),
        concerts,
    }
}

impl Mesh {
    /// A transaction holding the row lock of seat `seat_number` of `schedule_id`, as another
    /// replica's batch would, until it is committed or dropped.
    pub async fn lock_seat(
        &self,
        schedule_id: &str,
        seat_number: i32,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let admin = self.database.admin().await;
        let mut blocker = admin.begin().await.unwrap();
        sqlx::query(
            "SELECT 1 FROM concert.seats WHERE schedule_id = $1 AND seat_number = $2 FOR UPDATE",
        )
        .bind(schedule_id)
        .bind(seat_number)
        .execute(&mut *blocker)
        .await
        .unwrap();
        blocker
    }

    /// Waits (20 s at most) until `count` of the concert service's connections to this test's
    /// database wait for a lock (a row's, or a fan's advisory lock): a batch parked behind
    /// [`Mesh::lock_seat`] has got that far, however slow the machine.
    pub async fn until_lock_waiters(&self, count: i64) {
        let admin = self.database.admin().await;
        let concert_service = stagedoor_testkit::LockWaiters {
            role: Some("stagedoor_concert"),
            ..Default::default()
        };
        stagedoor_testkit::until_lock_waiters(
            &admin,
            concert_service,
            count,
            std::time::Duration::from_secs(20),
        )
        .await;
        admin.close().await;
    }

    /// A concert with one date of `seat_count` seats (VIP 1-10 dearer, the rest cheaper).
    pub async fn catalog(&self, seat_count: i32) -> (String, String) {
        let mut admin = self.concerts[0].admin.clone();
        let concert = admin
            .create_concert(pb::CreateConcertRequest {
                title: "Night Drive".into(),
                artist: "The Stagehands".into(),
                request_id: format!("concert-{}", uuid::Uuid::new_v4().simple()),
            })
            .await
            .unwrap()
            .into_inner()
            .concert
            .unwrap();
        let vip_end = seat_count.min(10);
        let mut sections = vec![pb::PriceSection {
            name: "VIP".into(),
            first_seat: 1,
            last_seat: vip_end,
            price: 150_000,
        }];
        if seat_count > 10 {
            sections.push(pb::PriceSection {
                name: "R".into(),
                first_seat: 11,
                last_seat: seat_count,
                price: 90_000,
            });
        }
        let schedule = admin
            .add_schedule(pb::AddScheduleRequest {
                concert_id: concert.concert_id.clone(),
                // A month ahead: a date's sale closes when it starts.
                start_time: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 30 * 86_400,
                    nanos: 0,
                }),
                venue: "Olympic Hall".into(),
                seat_count,
                sections,
                request_id: format!("date-{}", uuid::Uuid::new_v4().simple()),
            })
            .await
            .unwrap()
            .into_inner()
            .schedule
            .unwrap();
        (concert.concert_id, schedule.schedule_id)
    }

    /// The queue's IssueToken, as a fan calls it.
    pub async fn issue(
        &self,
        concert_id: &str,
        user_id: &str,
    ) -> Result<queue_pb::QueueTicket, tonic::Status> {
        self.queue
            .clone()
            .issue_token(queue_pb::IssueTokenRequest {
                concert_id: concert_id.into(),
                user_id: user_id.into(),
            })
            .await
            .map(|response| response.into_inner().ticket.unwrap())
    }

    /// A fan's token for a concert, and its status.
    pub async fn token(&self, concert_id: &str, user_id: &str) -> (String, queue_pb::TokenStatus) {
        let ticket = self.issue(concert_id, user_id).await.unwrap();
        let status = ticket.status();
        (ticket.token, status)
    }

    /// An ACTIVE token (the tests' queues admit at once).
    pub async fn active_token(&self, concert_id: &str, user_id: &str) -> String {
        let (token, status) = self.token(concert_id, user_id).await;
        assert_eq!(
            status,
            queue_pb::TokenStatus::Active,
            "the test queue admits {user_id} at once"
        );
        token
    }

    /// HoldSeats as the fan of `token` calls it on `replica`. The call owns what it needs,
    /// so it can also be spawned, for a call the test must not wait on yet.
    pub fn hold(
        &self,
        replica: usize,
        token: &str,
        schedule_id: &str,
        seats: &[i32],
        request_id: &str,
    ) -> impl std::future::Future<Output = Result<pb::Hold, tonic::Status>> + Send + 'static {
        let mut public = self.concerts[replica].public.clone();
        let request = with_bearer(
            pb::HoldSeatsRequest {
                schedule_id: schedule_id.into(),
                seat_numbers: seats.to_vec(),
                request_id: request_id.into(),
            },
            token,
        );
        async move {
            public
                .hold_seats(request)
                .await
                .map(|response| response.into_inner().hold.unwrap())
        }
    }

    /// ListAvailableDates of `concert_id`, as the fan of `token` calls it.
    pub async fn dates(&self, token: &str, concert_id: &str) -> Vec<pb::Schedule> {
        self.concerts[0]
            .public
            .clone()
            .list_available_dates(with_bearer(
                pb::ListAvailableDatesRequest {
                    concert_id: concert_id.into(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .schedules
    }

    pub async fn seats(&self, token: &str, schedule_id: &str) -> Vec<pb::Seat> {
        self.concerts[0]
            .public
            .clone()
            .list_available_seats(with_bearer(
                pb::ListAvailableSeatsRequest {
                    schedule_id: schedule_id.into(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .seats
    }

    pub async fn confirm(
        &self,
        replica: usize,
        hold_id: &str,
        payment_id: &str,
    ) -> Result<pb::Hold, tonic::Status> {
        self.concerts[replica]
            .internal
            .clone()
            .confirm_hold(pb::ConfirmHoldRequest {
                hold_id: hold_id.into(),
                payment_id: payment_id.into(),
            })
            .await
            .map(|response| response.into_inner().hold.unwrap())
    }

    /// ReleaseHold of `hold_id`, as the fan of `token` calls it (spawnable, as [`Mesh::hold`]).
    pub fn release(
        &self,
        token: &str,
        hold_id: &str,
    ) -> impl std::future::Future<Output = Result<pb::Hold, tonic::Status>> + Send + 'static {
        let mut public = self.concerts[0].public.clone();
        let request = with_bearer(
            pb::ReleaseHoldRequest {
                hold_id: hold_id.into(),
            },
            token,
        );
        async move {
            public
                .release_hold(request)
                .await
                .map(|response| response.into_inner().hold.unwrap())
        }
    }

    /// A hold as the internal GetHold reads it now.
    pub async fn get_hold(&self, hold_id: &str) -> pb::Hold {
        self.concerts[0]
            .internal
            .clone()
            .get_hold(pb::GetHoldRequest {
                hold_id: hold_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .hold
            .unwrap()
    }

    /// Ends the time of each of `hold_ids` now, in its row and on its seats, as the clock
    /// would when its TTL ran out: expiry is judged by Postgres's clock against these
    /// columns, so a test makes a hold expire at the step it chooses instead of sleeping
    /// through a short TTL that a slow run could outlast before its steps were done.
    pub async fn run_out(&self, hold_ids: &[&str]) {
        self.run_out_ago(hold_ids, std::time::Duration::ZERO).await
    }

    /// [`Mesh::run_out`], as if the holds had ended `ago` (for the sweeper's grace).
    pub async fn run_out_ago(&self, hold_ids: &[&str], ago: std::time::Duration) {
        let admin = self.database.admin().await;
        sqlx::query(
            "WITH ended AS (
                 UPDATE concert.holds
                    SET expire_time = clock_timestamp() - make_interval(secs => $2)
                  WHERE hold_id = ANY($1::uuid[]) RETURNING hold_id, expire_time)
             UPDATE concert.seats SET held_until = ended.expire_time
               FROM ended WHERE seats.held_by = ended.hold_id",
        )
        .bind(hold_ids)
        .bind(ago.as_secs_f64())
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    }

    /// Number of rows in the holds table.
    pub async fn hold_rows(&self) -> i64 {
        let (rows,) = self
            .database
            .row::<(i64,)>("SELECT count(*) FROM concert.holds")
            .await;
        rows
    }
}
