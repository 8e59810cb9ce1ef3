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

/// Managed Postgres servers refuse connections without TLS, and their URLs say
/// `sslmode=require` (or `verify-full`): the services must speak TLS, not refuse the URL.
/// The test's server must have TLS on, as Debian's package sets it up (with a self-signed
/// certificate), and be reached over TCP.
#[tokio::test]
async fn a_url_that_asks_for_tls_gets_it_and_verify_full_checks_the_server() {
    let database = TestDatabase::create().await;
    let admin = database.admin().await;
    let (tls_on, server_addr): (String, Option<String>) =
        sqlx::query_as("SELECT current_setting('ssl'), host(inet_server_addr())")
            .fetch_one(&admin)
            .await
            .unwrap();
    admin.close().await;
    assert_eq!(
        tls_on, "on",
        "this test needs a Postgres with TLS on (`ssl = on` and a certificate)"
    );
    let server_addr =
        server_addr.expect("this test needs the admin URL to reach Postgres over TCP");

    let plain = database.url(QUEUE);
    let separator = if plain.contains('?') { '&' } else { '?' };
    let config = PoolConfig::new(
        format!("{plain}{separator}sslmode=require"),
        QUEUE.schema,
        1,
    );
    let pool = db::connect(&config)
        .await
        .unwrap_or_else(|error| panic!("sslmode=require: {error}"));
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted, "the connection asked for TLS went in clear text");
    pool.close().await;

    // `verify-full` checks the server's certificate: one made for a host name (or
    // self-signed) does not pass for the server's bare IP address.
    let mut by_address = url::Url::parse(&plain).unwrap();
    let host = if server_addr.contains(':') {
        format!("[{server_addr}]")
    } else {
        server_addr
    };
    by_address.set_host(Some(&host)).unwrap();
    let verified = PoolConfig::new(
        format!("{by_address}{separator}sslmode=verify-full"),
        QUEUE.schema,
        1,
    );
    let refused = db::connect(&verified)
        .await
        .expect_err("verify-full accepted a certificate not made for the address");
    assert!(
        refused.to_string().contains("certificate"),
        "not refused for its certificate: {refused}"
    );
}
