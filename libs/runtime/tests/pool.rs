//! The services' Postgres pool against the real server: a connection whose backend died is
//! never handed out for good. Idle ones are pinged first; busy ones are not pinged (a round
//! trip before every transaction), fail once, and are replaced.

use std::time::Duration;

use sqlx::PgPool;
use stagedoor_runtime::{
    db::{self, PoolConfig, QUEUE},
    error::ApiError,
};
use stagedoor_testkit::{eventually, reason, TestDatabase};

/// The queue role's pool on `database`, pinging connections idle for `idle_before_ping` or
/// longer.
async fn pool(database: &TestDatabase, idle_before_ping: Duration) -> PgPool {
    let config = PoolConfig {
        idle_before_ping,
        ..PoolConfig::new(database.url(QUEUE), QUEUE.schema, 1)
    };
    db::connect(&config).await.unwrap()
}

/// Ends the backend `pid` as a restart of Postgres or a cut connection would, and waits
/// until it is gone.
async fn terminate(database: &TestDatabase, pid: i32) {
    let admin = database.admin().await;
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(ended, "backend {pid} did not end");
    admin.close().await;
}

async fn backend_pid(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
}

/// The pool's one connection of `backend_pid`, back in the pool. sqlx takes a connection
/// back on a task of its own, after pinging it: a backend ended before that ping would be
/// caught there, not by what the tests look at.
async fn idle_connection_of(pool: &PgPool) -> i32 {
    let pid = backend_pid(pool).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the connection comes back to the pool",
        || async { (pool.num_idle() == 1).then_some(()) },
    )
    .await;
    pid
}

#[tokio::test]
async fn an_idle_connection_that_died_is_replaced_before_anyone_uses_it() {
    let database = TestDatabase::create().await;
    let pool = pool(&database, Duration::from_millis(100)).await;
    let first = idle_connection_of(&pool).await;
    terminate(&database, first).await;
    // Idle past the threshold: the pool pings it, finds it dead and opens another.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = backend_pid(&pool)
        .await
        .expect("the dead connection was handed out");
    assert_ne!(first, second);
    pool.close().await;
}

#[tokio::test]
async fn a_busy_connection_that_died_fails_one_statement_and_is_replaced() {
    let database = TestDatabase::create().await;
    // Never idle long enough to be pinged.
    let pool = pool(&database, Duration::from_secs(3600)).await;
    let first = idle_connection_of(&pool).await;
    terminate(&database, first).await;

    // Not pinged, so its first statement meets the dead backend (Postgres said 57P01,
    // admin_shutdown, before closing it, as it does to every connection when it restarts).
    let failed = backend_pid(&pool)
        .await
        .expect_err("a busy connection is not pinged");
    // Callers hear that the database is away, and may retry: not INTERNAL.
    let status = tonic::Status::from(ApiError::from(failed));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "DATABASE_UNAVAILABLE");
    let second = backend_pid(&pool)
        .await
        .expect("the dead connection stayed in the pool");
    assert_ne!(first, second);
    pool.close().await;
}
