//! Wiring: pool, migrations, the queue client and the gRPC server of one concert process.

use std::{future::Future, time::Duration};

use sqlx::PgPool;
use stagedoor_proto::concert::v1::{
    concert_admin_service_server::ConcertAdminServiceServer,
    concert_internal_service_server::ConcertInternalServiceServer,
    concert_service_server::ConcertServiceServer,
};
use stagedoor_runtime::{
    auth::TokenValidator,
    batch::{self, BatchFuture, BatchLimits, Batcher, SharedReads},
    db::{self, PoolConfig, StartupError},
    server::{GrpcServer, Port, ServiceHandle},
    ApiError, Shutdown, ShutdownTrigger,
};
use uuid::Uuid;

use crate::{
    config::ConcertConfig,
    domain::ConcertError,
    grpc::{ConcertApi, ConcertState, Reads},
    lines::{self, QueueLines},
    store::{self, HoldRow},
};

/// HoldSeats batches: up to 500 holds per transaction, two transactions at once per replica
/// (while one waits on a seat lock another replica holds, the next can proceed).
const HOLD_LIMITS: BatchLimits = BatchLimits {
    max_batch: 500,
    concurrent: 2,
    queue_depth: 20_000,
};

/// The shared reads of the public listings and of GetHold (see `ConcertState`).
fn spawn_reads(pool: &PgPool) -> (Reads, tokio::task::JoinHandle<()>) {
    let seat_maps = SharedReads::new({
        let pool = pool.clone();
        move |schedule_id: String| {
            let pool = pool.clone();
            async move { store::seats(&pool, &schedule_id).await }
        }
    });
    let open_dates = SharedReads::new({
        let pool = pool.clone();
        move |concert_id: String| {
            let pool = pool.clone();
            async move { store::available_dates(&pool, &concert_id).await }
        }
    });
    // A quarter of the pool at most, fewer connections with a smaller pool (see BatchLimits).
    let hold_reads = BatchLimits::READS.within(pool.options().get_max_connections(), 4);
    let (holds, hold_worker) = Batcher::spawn(hold_reads, {
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
    (reads, hold_worker)
}

/// ConfirmHold batches: the payments that confirm together share one transaction
/// (`store::confirm_batch`).
const CONFIRM_LIMITS: BatchLimits = HOLD_LIMITS;

/// Starts a worker that runs a batch of hold writes as one transaction (`work`, one of
/// `store::hold_batch` and `store::confirm_batch`), each call getting its own answer.
fn spawn_hold_writes<I, F, Fut>(
    limits: BatchLimits,
    pool: PgPool,
    work: F,
) -> (Batcher<I, HoldRow>, tokio::task::JoinHandle<()>)
where
    I: Send + 'static,
    F: Fn(PgPool, Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<HoldRow, ConcertError>>, sqlx::Error>> + Send + 'static,
{
    Batcher::spawn(limits, move |requests: Vec<I>| {
        let count = requests.len();
        let transaction = work(pool.clone(), requests);
        Box::pin(async move {
            match transaction.await {
                Ok(answers) => answers
                    .into_iter()
                    .map(|answer| answer.map_err(ApiError::from))
                    .collect(),
                Err(error) => batch::fail_all(count, error),
            }
        }) as BatchFuture<HoldRow>
    })
}

/// The concert service's migrations, embedded in the binary: a fresh `Migrator` each time, since
/// `db::migrate` sets how it locks.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// Connects, migrates and starts serving on `port`.
pub async fn start(
    config: ConcertConfig,
    port: impl Into<Port>,
) -> Result<ServiceHandle, StartupError> {
    let tokens = TokenValidator::new(
        &config.queue_url,
        config.token_cache_ttl,
        config.queue_deadline,
    )
    .map_err(StartupError::Config)?;
    let lines =
        QueueLines::new(&config.queue_url, config.queue_deadline).map_err(StartupError::Config)?;
    let pool = db::connect(&PoolConfig::new(
        config.database_url.clone(),
        db::CONCERT.schema,
        config.database_max_connections,
    ))
    .await?;
    db::migrate(&pool, db::CONCERT.schema, migrator()).await?;

    let trigger = ShutdownTrigger::default();
    let ttl = config.hold_ttl;
    // Each kind of batch holds at most an eighth of the pool (two of the default 16), fewer
    // with a smaller pool, and the reads a quarter (see `spawn_reads`).
    let connections = config.database_max_connections;
    let (holds, hold_worker) = spawn_hold_writes(
        HOLD_LIMITS.within(connections, 8),
        pool.clone(),
        move |pool, requests| async move { store::hold_batch(&pool, ttl, &requests).await },
    );
    let (confirms, confirm_worker) = spawn_hold_writes(
        CONFIRM_LIMITS.within(connections, 8),
        pool.clone(),
        |pool, requests| async move { store::confirm_batch(&pool, &requests).await },
    );
    let (reads, read_worker) = spawn_reads(&pool);
    let background = vec![
        ("catalog reads", read_worker),
        ("hold batches", hold_worker),
        ("confirm batches", confirm_worker),
        (
            "hold sweeper",
            tokio::spawn(run_hold_sweeper(
                pool.clone(),
                config.hold_sweep_after,
                config.hold_sweep_every,
                trigger.subscribe(),
            )),
        ),
        (
            "line opener",
            tokio::spawn(lines::keep_every_line_open(
                pool.clone(),
                lines.clone(),
                trigger.subscribe(),
            )),
        ),
    ];
    let api = ConcertApi::new(ConcertState {
        pool,
        dates: Default::default(),
        tokens,
        hold_ttl: config.hold_ttl,
        holds,
        confirms,
        reads,
        lines,
    });
    let service = GrpcServer::new()
        .add_service(ConcertServiceServer::new(api.clone()))
        .add_service(ConcertInternalServiceServer::new(api.clone()))
        .add_service(ConcertAdminServiceServer::new(api))
        .spawn(port, trigger, background)?;
    tracing::info!(local_addr = %service.local_addr(), queue = %config.queue_url,
        hold_ttl = ?config.hold_ttl, hold_sweep_after = ?config.hold_sweep_after,
        "concert service started");
    Ok(service)
}

/// Holds one sweeper pass retires at most (one transaction each).
const SWEEP_CHUNK: i64 = 500;

/// Every `every`, retires the holds that ran out more than `after` ago, a chunk per
/// transaction until none is left. Every replica runs one; they skip each other's rows.
async fn run_hold_sweeper(pool: PgPool, after: Duration, every: Duration, shutdown: Shutdown) {
    shutdown
        .every(every, || async {
            loop {
                match store::retire_expired_holds(&pool, after, SWEEP_CHUNK).await {
                    Ok(retired) if retired < SWEEP_CHUNK as u64 => {
                        if retired > 0 {
                            tracing::debug!(retired, "expired holds retired");
                        }
                        break;
                    }
                    Ok(retired) => tracing::debug!(retired, "expired holds retired; more left"),
                    Err(error) => {
                        tracing::warn!(%error, "hold sweep failed; next pass retries");
                        break;
                    }
                }
            }
        })
        .await
}
