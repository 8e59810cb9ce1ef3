//! Wiring: pool, migrations, the queue client and the gRPC server of one concert process.

use std::time::Duration;

use sqlx::PgPool;
use stagedoor_proto::concert::v1::{
    concert_admin_service_server::ConcertAdminServiceServer,
    concert_internal_service_server::ConcertInternalServiceServer,
    concert_service_server::ConcertServiceServer,
};
use stagedoor_runtime::{
    auth::TokenValidator,
    batch::{self, BatchFuture, BatchLimits, Batcher},
    db::{self, PoolConfig, StartupError},
    server::{GrpcServer, ServiceHandle},
    ApiError, ShutdownTrigger,
};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::{
    config::ConcertConfig,
    grpc::{ConcertApi, ConcertState, Reads},
    store::{self, HoldRequest, HoldRow},
};

/// HoldSeats batches: up to 500 holds per transaction, two transactions at once per replica
/// (while one waits on a seat lock another replica holds, the next can proceed).
const HOLD_LIMITS: BatchLimits = BatchLimits {
    max_batch: 500,
    concurrent: 2,
    queue_depth: 20_000,
};

/// The shared reads of the public listings and of GetHold (see `ConcertState`).
fn spawn_reads(pool: &PgPool) -> (Reads, Vec<tokio::task::JoinHandle<()>>) {
    let (seat_maps, seat_worker) = Batcher::spawn_shared(BatchLimits::READS, {
        let pool = pool.clone();
        move |schedule_id: String| {
            let pool = pool.clone();
            async move { store::seats(&pool, &schedule_id).await }
        }
    });
    let (open_dates, date_worker) = Batcher::spawn_shared(BatchLimits::READS, {
        let pool = pool.clone();
        move |concert_id: String| {
            let pool = pool.clone();
            async move { store::available_dates(&pool, &concert_id).await }
        }
    });
    let (holds, hold_worker) = Batcher::spawn(BatchLimits::READS, {
        let pool = pool.clone();
        move |hold_ids: Vec<Uuid>| {
            let pool = pool.clone();
            Box::pin(async move {
                let holds = store::holds(&pool, &hold_ids).await;
                batch::rows_by_key(&hold_ids, holds, |hold: &HoldRow| hold.hold_id)
            }) as BatchFuture<Option<HoldRow>>
        }
    });
    let reads = Reads {
        seat_maps,
        open_dates,
        holds,
    };
    (reads, vec![seat_worker, date_worker, hold_worker])
}

/// Starts the worker that makes holds in batches (store::hold_batch).
fn spawn_holds(
    pool: PgPool,
    ttl: Duration,
) -> (Batcher<HoldRequest, HoldRow>, tokio::task::JoinHandle<()>) {
    Batcher::spawn(HOLD_LIMITS, move |requests: Vec<HoldRequest>| {
        let pool = pool.clone();
        Box::pin(async move {
            match store::hold_batch(&pool, ttl, &requests).await {
                Ok(answers) => answers
                    .into_iter()
                    .map(|answer| answer.map_err(ApiError::from))
                    .collect(),
                Err(error) => batch::fail_all(requests.len(), error),
            }
        }) as BatchFuture<HoldRow>
    })
}

/// The concert service's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects, migrates and starts serving on `listener`.
pub async fn start(
    config: ConcertConfig,
    listener: TcpListener,
) -> Result<ServiceHandle, StartupError> {
    let tokens = TokenValidator::new(&config.queue_url, config.token_cache_ttl)
        .map_err(StartupError::Config)?;
    let pool = db::connect(&PoolConfig {
        url: config.database_url.clone(),
        schema: db::CONCERT.schema,
        max_connections: config.database_max_connections,
        acquire_timeout: Duration::from_secs(5),
    })
    .await?;
    db::migrate(&pool, db::CONCERT.schema, &MIGRATOR).await?;

    let (trigger, shutdown) = ShutdownTrigger::new();
    let (holds, hold_worker) = spawn_holds(pool.clone(), config.hold_ttl);
    let (reads, mut background) = spawn_reads(&pool);
    background.push(hold_worker);
    let api = ConcertApi::new(ConcertState {
        pool,
        dates: Default::default(),
        tokens,
        holds,
        reads,
    });
    let local_addr = listener
        .local_addr()
        .map_err(|error| StartupError::Provision(error.into()))?;
    let server = GrpcServer::new()
        .add_service(ConcertServiceServer::new(api.clone()))
        .add_service(ConcertInternalServiceServer::new(api.clone()))
        .add_service(ConcertAdminServiceServer::new(api));
    let server = tokio::spawn(server.serve(listener, shutdown));
    tracing::info!(%local_addr, queue = %config.queue_url, hold_ttl = ?config.hold_ttl, "concert service started");
    Ok(ServiceHandle::new(local_addr, trigger, server, background))
}
