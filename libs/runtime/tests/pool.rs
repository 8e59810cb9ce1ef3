//! The services' Postgres pool against the real server: a connection whose backend died is
//! never handed out for good. Idle ones are pinged first; busy ones are not pinged (a round
//! trip before every transaction), fail once, and are replaced.

use std::time::Duration;

use sqlx::PgPool;
use stagedoor_runtime::{
    db::{self, PoolConfig, QUEUE},
    error::ApiError,
};
use tonic_types::StatusExt;

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh database with the queue's role and schema, dropped when the test ends.
struct Database {
    admin_url: String,
    name: String,
}

impl Database {
    async fn create() -> Self {
        let admin_url = std::env::var("ADMIN_DATABASE_URL").unwrap_or_else(|_| ADMIN_URL.into());
        let name = format!("stagedoor_test_{}", uuid::Uuid::new_v4().simple());
        db::provision_database(&admin_url, &name)
            .await
            .expect("cannot create the test database (is Postgres up?)");
        Self { admin_url, name }
    }

    /// The queue role's pool, pinging connections idle for `idle_before_ping` or longer.
    async fn pool(&self, idle_before_ping: Duration) -> PgPool {
        let url = db::service_url(&self.admin_url, &self.name, QUEUE).unwrap();
        let config = PoolConfig {
            idle_before_ping,
            ..PoolConfig::new(url, QUEUE.schema, 1)
        };
        db::connect(&config).await.unwrap()
    }

    /// Ends the backend `pid` as a restart of Postgres or a cut connection would, and waits
    /// until it is gone.
    async fn terminate(&self, pid: i32) {
        let mut admin: sqlx::PgConnection =
            sqlx::Connection::connect(&self.admin_url).await.unwrap();
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert!(ended, "backend {pid} did not end");
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop is not async: drop the database from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(db::drop_database(&admin_url, &name))
        })
        .join();
    }
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
    for _ in 0..1_000 {
        if pool.num_idle() == 1 {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the connection did not come back to the pool");
}

#[tokio::test]
async fn an_idle_connection_that_died_is_replaced_before_anyone_uses_it() {
    let database = Database::create().await;
    let pool = database.pool(Duration::from_millis(100)).await;
    let first = idle_connection_of(&pool).await;
    database.terminate(first).await;
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
    let database = Database::create().await;
    // Never idle long enough to be pinged.
    let pool = database.pool(Duration::from_secs(3600)).await;
    let first = idle_connection_of(&pool).await;
    database.terminate(first).await;

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
