//! Wiring: pool, migrations, background loops and the gRPC server of one queue process.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use stagedoor_proto::queue::v1::{
    queue_internal_service_server::QueueInternalServiceServer,
    queue_service_server::QueueServiceServer,
};
use stagedoor_runtime::{
    batch::BatchLimits,
    db::{self, PoolConfig, StartupError},
    server::{GrpcServer, Port, ServiceHandle},
    Shutdown, ShutdownTrigger,
};

use crate::{
    batcher::{self, EndBatcher, IssueBatcher, TicketReader},
    board::LineBoard,
    cache::WaitingCache,
    config::QueueConfig,
    grpc::{QueueApi, QueueState},
    heartbeat::Heartbeats,
    store::{self, AdmissionPolicy},
};

/// The queue's migrations, embedded in the binary: a fresh `Migrator` each time, since
/// `db::migrate` sets how it locks.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// How often each replica refreshes its view of the busy lines.
const BOARD_REFRESH: Duration = Duration::from_millis(100);

/// Connects, migrates and starts serving on `port`.
pub async fn start(
    config: QueueConfig,
    port: impl Into<Port>,
) -> Result<ServiceHandle, StartupError> {
    let pool = db::connect(&PoolConfig::new(
        config.database_url.clone(),
        db::QUEUE.schema,
        config.database_max_connections,
    ))
    .await?;
    db::migrate(&pool, db::QUEUE.schema, migrator()).await?;

    let policy = AdmissionPolicy::from(&config);
    let (trigger, shutdown) = ShutdownTrigger::new();
    let board = Arc::new(LineBoard::default());
    let heartbeats = Arc::new(Heartbeats::default());
    // Each kind of batch may hold a share of the pool at once (four of the default 16, two
    // for leaves), fewer with a smaller pool, so that batches never take every connection.
    let connections = config.database_max_connections;
    let (batcher, batch_worker) = IssueBatcher::spawn_issue(
        pool.clone(),
        policy.clone(),
        batcher::LINE_LIMITS.within(connections, 4),
    );
    let (completer, complete_worker) = EndBatcher::spawn_end(
        pool.clone(),
        policy.clone(),
        batcher::LINE_LIMITS.within(connections, 4),
    );
    let (leaver, leave_worker) = EndBatcher::spawn_end(
        pool.clone(),
        policy.clone(),
        batcher::LEAVE_LIMITS.within(connections, 8),
    );
    let (reader, read_worker) = TicketReader::spawn(
        pool.clone(),
        policy.clone(),
        BatchLimits::READS.within(connections, 4),
    );

    let background = vec![
        ("issue batches", batch_worker),
        ("complete batches", complete_worker),
        ("leave batches", leave_worker),
        ("ticket reads", read_worker),
        (
            "admission ticks",
            tokio::spawn(run_admitter(
                pool.clone(),
                policy.clone(),
                config.tick,
                trigger.subscribe(),
            )),
        ),
        (
            "line board refresher",
            tokio::spawn({
                let (board, pool, shutdown) = (board.clone(), pool.clone(), trigger.subscribe());
                async move { board.run_refresher(pool, BOARD_REFRESH, shutdown).await }
            }),
        ),
        (
            "heartbeat flusher",
            tokio::spawn({
                let (heartbeats, pool) = (heartbeats.clone(), pool.clone());
                let (period, shutdown) = (config.heartbeat_flush(), trigger.subscribe());
                async move { heartbeats.run_flusher(pool, period, shutdown).await }
            }),
        ),
    ];

    // A cached WAITING ticket is re-read from Postgres after a quarter of the idle TTL, the
    // same period as its heartbeat.
    let waiting = WaitingCache::new(policy.heartbeat_every, policy.heartbeat_every);
    let open_lines = crate::open_lines::OpenLines::new(pool.clone());
    let api = QueueApi::new(QueueState {
        pool,
        policy,
        batcher,
        completer,
        leaver,
        reader,
        board,
        heartbeats,
        waiting,
        open_lines,
        shutdown,
        watch_interval: config.watch_interval,
        active_recheck: config.active_recheck,
    });
    let service = GrpcServer::new()
        .add_service(QueueServiceServer::new(api.clone()))
        .add_service(QueueInternalServiceServer::new(api))
        .spawn(port, trigger, background)?;
    tracing::info!(local_addr = %service.local_addr(), max_active = config.max_active,
        admit_rate = config.admit_rate, "queue service started");
    Ok(service)
}

/// Background admission and expiry: every tick, each busy line is swept and admitted. Any
/// number of replicas may run this: a line locked by one is skipped by the others.
async fn run_admitter(pool: PgPool, policy: AdmissionPolicy, tick: Duration, shutdown: Shutdown) {
    shutdown
        .every(tick, || async {
            let lines = match store::busy_lines(&pool).await {
                Ok(lines) => lines,
                Err(error) => {
                    tracing::warn!(%error, "cannot list busy lines");
                    return;
                }
            };
            for concert_id in lines {
                match store::sweep_and_admit(&pool, &policy, &concert_id).await {
                    Ok(0) => {}
                    Ok(admitted) => tracing::debug!(%concert_id, admitted, "admitted"),
                    Err(error) => tracing::warn!(%concert_id, %error, "admission tick failed"),
                }
            }
        })
        .await
}
