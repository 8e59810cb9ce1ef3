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

use crate::{
    config::ConcertConfig,
    grpc::{ConcertApi, ConcertState},
    store::{self, HoldRequest, HoldRow},
};

/// HoldSeats batches: up to 500 holds per transaction, two transactions at once per replica
/// (while one waits on a seat lock another replica holds, the next can proceed).
const HOLD_LIMITS: BatchLimits = BatchLimits {
    max_batch: 500,
    concurrent: 2,
    queue_depth: 20_000,
};

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
    let api = ConcertApi::new(ConcertState {
        pool,
        dates: Default::default(),
        tokens,
        holds,
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
    Ok(ServiceHandle::new(
        local_addr,
        trigger,
        server,
        vec![hold_worker],
    ))
}
