//! Test helpers shared by every service's tests.
//!
//! [`TestDatabase`] creates a fresh database on the real Postgres for one test, provisioned
//! exactly as in production (one role and one schema per service), and drops it afterwards.
//! Tests then start the real services on `127.0.0.1:0` against it and talk gRPC to them.
//!
//! The admin connection comes from `ADMIN_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`).

use std::str::FromStr;

use sqlx::{postgres::PgConnectOptions, PgPool};
use stagedoor_runtime::{
    db::{self, ServiceSchema},
    server::ServiceHandle,
};
use tonic::transport::Channel;

/// Admin URL used when `ADMIN_DATABASE_URL` is not set.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database that lives as long as one test.
pub struct TestDatabase {
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates `stagedoor_test_<random>` with every service's role and schema.
    pub async fn create() -> Self {
        let admin_url =
            std::env::var("ADMIN_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
        let name = format!("stagedoor_test_{}", uuid::Uuid::new_v4().simple());
        db::provision_database(&admin_url, &name)
            .await
            .unwrap_or_else(|error| {
                panic!("cannot create test database (is Postgres up?): {error}")
            });
        Self { name, admin_url }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// URL of a service's own role on this database (what its `DATABASE_URL` would be).
    pub fn url(&self, service: ServiceSchema) -> String {
        db::service_url(&self.admin_url, &self.name, service).expect("admin URL parses")
    }

    /// Runs a service's `migrator` in its schema as its own role, as the service does when
    /// it starts: for tests that shape a schema before (or without) starting the service.
    pub async fn migrate(&self, service: ServiceSchema, migrator: sqlx::migrate::Migrator) {
        let pool = self.service_pool(service, 1).await;
        db::migrate(&pool, service.schema, migrator)
            .await
            .unwrap_or_else(|error| panic!("migrations of {}: {error}", service.schema));
        pool.close().await;
    }

    /// A pool of `service`'s own role in its own schema, opened as the service opens its own:
    /// for tests that call a service's store directly.
    pub async fn service_pool(&self, service: ServiceSchema, connections: u32) -> PgPool {
        db::connect(&db::PoolConfig::new(
            self.url(service),
            service.schema,
            connections,
        ))
        .await
        .expect("the service's role connects")
    }

    /// A superuser pool on this database, for the test's own reads and audits.
    pub async fn admin(&self) -> PgPool {
        let options = self.admin_options();
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("admin connection to the test database")
    }

    /// The one row of a parameterless query, read as the superuser: counts and counters a
    /// test compares before and after a call (a one-column row is a 1-tuple).
    pub async fn row<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let admin = self.admin().await;
        let row = sqlx::query_as(sql)
            .fetch_one(&admin)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
        admin.close().await;
        row
    }

    fn admin_options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.admin_url)
            .expect("ADMIN_DATABASE_URL parses")
            .database(&self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside async, possibly inside a runtime that must not be blocked on:
        // do the DROP on a thread of its own with a small runtime, and wait for it.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            // FORCE closes the connections of services the test left running.
            runtime.block_on(db::drop_database(&admin_url, &name))
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!(
                "warning: test database {} was not dropped: {error}",
                self.name
            );
        }
    }
}

/// Starts a service the way its binary does, on `127.0.0.1:0`, and connects a channel to it.
pub async fn serve<F, Fut>(start: F) -> (ServiceHandle, Channel)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<ServiceHandle, db::StartupError>>,
{
    stagedoor_runtime::telemetry::init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let handle = start(listener).await.expect("the service starts");
    let channel = stagedoor_runtime::client::endpoint(&handle.url())
        .expect("service URL")
        .connect()
        .await
        .expect("the service accepts connections");
    (handle, channel)
}

/// The `google.rpc.ErrorInfo` reason of a failed call; checks that the detail is there and
/// that its domain is stagedoor's.
pub fn reason(status: &tonic::Status) -> String {
    let info = error_info(status);
    assert_eq!(info.domain, stagedoor_runtime::DOMAIN);
    info.reason
}

/// One entry of a failed call's `google.rpc.ErrorInfo` metadata (`payment_id`, `status`, ...).
pub fn detail(status: &tonic::Status, key: &str) -> Option<String> {
    error_info(status).metadata.remove(key)
}

/// The `google.rpc.ErrorInfo` detail every stagedoor error carries.
fn error_info(status: &tonic::Status) -> tonic_types::ErrorInfo {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

/// Waits for something a background task does (an admission tick, a sweeper, a recovery
/// worker): asks `probe` every 20 ms until it answers `Some`, and returns that answer.
/// Panics naming `what` once `within` has passed, a probe that hangs included, so a test
/// that waits never waits forever.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Some(answer)) => return answer,
            Ok(None) if tokio::time::Instant::now() < deadline => {}
            _ => panic!("still waiting after {within:?}: {what}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Which of a test database's sessions [`until_lock_waiters`] counts: those waiting for a
/// lock (`wait_event_type = 'Lock'`), narrowed by whatever is set here.
#[derive(Debug, Clone, Copy, Default)]
pub struct LockWaiters<'a> {
    /// Sessions of this role only (`stagedoor_concert`, ...).
    pub role: Option<&'a str>,
    /// Waiting for this kind of lock only (`transactionid` for a row another transaction
    /// wrote, `advisory`, `relation`, ...).
    pub wait_event: Option<&'a str>,
    /// Running a statement whose text contains this.
    pub query_contains: Option<&'a str>,
}

/// How many sessions of `admin`'s database, other than the probe's own, wait for a lock as
/// `which` narrows them.
pub async fn lock_waiters(admin: &PgPool, which: LockWaiters<'_>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND wait_event_type = 'Lock'
            AND ($1::text IS NULL OR usename = $1)
            AND ($2::text IS NULL OR wait_event = $2)
            AND ($3::text IS NULL OR strpos(query, $3) > 0)",
    )
    .bind(which.role)
    .bind(which.wait_event)
    .bind(which.query_contains)
    .fetch_one(admin)
    .await
    .unwrap_or_else(|error| panic!("reading pg_stat_activity: {error}"))
}

/// Waits (within `within`) until exactly `count` sessions wait for a lock as `which` narrows
/// them ([`lock_waiters`]): a call the test parked behind a lock it holds has got that far,
/// however slow the machine. Then the test can act on the parked call (release the lock, let
/// time pass) knowing where the call stands.
pub async fn until_lock_waiters(
    admin: &PgPool,
    which: LockWaiters<'_>,
    count: i64,
    within: std::time::Duration,
) {
    let what = format!("{count} session(s) waiting for a lock: {which:?}");
    eventually(within, &what, || async {
        (lock_waiters(admin, which).await == count).then_some(())
    })
    .await
}

/// A row-level policy on a table, forced on its owner: a service's own role owns its tables,
/// and an owner skips policies unless forced. Every row the service's statements read or
/// write must pass `using`, an SQL condition on the row. Tests use one to hide rows from the
/// service, or, through a SECURITY DEFINER function in the condition, to hold, record or fail
/// the service's reads at a point they choose; [`RowPolicy::remove`] takes it away again.
pub struct RowPolicy {
    table: String,
    name: String,
}

impl RowPolicy {
    /// Puts policy `name` on `table` (`schema.table`); rows written must pass too only where
    /// `using` says (the policy's WITH CHECK is `true`).
    pub async fn force(admin: &PgPool, table: &str, name: &str, using: &str) -> RowPolicy {
        execute_each(
            admin,
            [
                format!("CREATE POLICY {name} ON {table} USING ({using}) WITH CHECK (true)"),
                format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"),
                format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"),
            ],
        )
        .await;
        RowPolicy {
            table: table.to_owned(),
            name: name.to_owned(),
        }
    }

    /// [`RowPolicy::force`] with a condition that runs `body`, the body of a plpgsql function
    /// (`BEGIN ... RETURN true; END`, a `DECLARE` section before it if needed) made for it as
    /// `schema.name()`. It runs with its creator's rights (SECURITY DEFINER), so it may use
    /// what the test made (a sequence, a table) that the service's role may not.
    pub async fn checked_by(admin: &PgPool, table: &str, name: &str, body: &str) -> RowPolicy {
        let schema = table.split('.').next().unwrap_or(table);
        let function = format!(
            "CREATE FUNCTION {schema}.{name}() RETURNS boolean LANGUAGE plpgsql
               SECURITY DEFINER AS $$ {body} $$"
        );
        execute_each(admin, [function]).await;
        Self::force(admin, table, name, &format!("{schema}.{name}()")).await
    }

    /// Takes the policy away, and row-level security off the table (with no policy left,
    /// row-level security would hide every row).
    pub async fn remove(self, admin: &PgPool) {
        let RowPolicy { table, name } = self;
        execute_each(
            admin,
            [
                format!("ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"),
                format!("ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY"),
                format!("DROP POLICY {name} ON {table}"),
            ],
        )
        .await;
    }
}

/// Runs each of a test's set-up `statements` in order on `admin`, failing the test with the
/// statement that failed.
async fn execute_each(admin: &PgPool, statements: impl IntoIterator<Item = String>) {
    for statement in statements {
        sqlx::query(&statement)
            .execute(admin)
            .await
            .unwrap_or_else(|error| panic!("{statement}: {error}"));
    }
}

/// Holds chosen writes to a table inside Postgres until the test opens it: a trigger makes
/// each matching row's INSERT or UPDATE wait on an advisory lock the gate holds, so a
/// transaction can be stopped at a point the test picks (holding its locks, its snapshot
/// taken) rather than at a time it guesses. Each gate has a trigger and a key of its own
/// (left in place when opened); create any other trigger on the table first (DDL on it
/// waits for a parked transaction).
pub struct RowGate {
    admin: PgPool,
    lock: sqlx::pool::PoolConnection<sqlx::Postgres>,
    key: i64,
}

/// Advisory lock keys of [`RowGate`]s: one per gate, so that gates of one test (whose
/// triggers stay behind when opened) never hold each other's rows.
static GATE_KEYS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(4242);

impl RowGate {
    /// Closes a gate on inserts into `table` (`schema.table`) whose row matches `when`, a
    /// trigger condition on `NEW` (`NEW.concert_id = 'a'`; `true` for every insert).
    pub async fn on_insert(database: &TestDatabase, table: &str, when: &str) -> RowGate {
        Self::close(database, table, "INSERT", when).await
    }

    /// Closes a gate on updates of `table` whose rows match `when`, a trigger condition on
    /// `OLD` and `NEW` (`NEW.status = 'EXPIRED'`).
    pub async fn on_update(database: &TestDatabase, table: &str, when: &str) -> RowGate {
        Self::close(database, table, "UPDATE", when).await
    }

    async fn close(database: &TestDatabase, table: &str, event: &str, when: &str) -> RowGate {
        let schema = table.split('.').next().unwrap_or(table);
        let key = GATE_KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let admin = database.admin().await;
        execute_each(
            &admin,
            [
                format!(
                    "CREATE FUNCTION {schema}.row_gate_{key}() RETURNS trigger LANGUAGE plpgsql AS
                       $$ BEGIN
                            PERFORM pg_advisory_lock_shared({key});
                            PERFORM pg_advisory_unlock_shared({key});
                            RETURN NEW;
                          END $$"
                ),
                format!(
                    "CREATE TRIGGER row_gate_{key} BEFORE {event} ON {table} FOR EACH ROW
                       WHEN ({when}) EXECUTE FUNCTION {schema}.row_gate_{key}()"
                ),
            ],
        )
        .await;
        let mut lock = admin.acquire().await.expect("a connection for the gate");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *lock)
            .await
            .expect("the gate's lock");
        RowGate { admin, lock, key }
    }

    /// Waits (20 s at most) until `count` transactions are parked at this gate (waiting on
    /// its key: an advisory lock of a key under 2^32 is `classid` 0, `objid` the key).
    pub async fn until_parked(&self, count: i64) {
        let what = format!("{count} transaction(s) parked at the gate");
        eventually(std::time::Duration::from_secs(20), &what, || async {
            let parked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                  WHERE d.datname = current_database() AND l.locktype = 'advisory'
                    AND NOT l.granted AND l.classid = 0 AND l.objid::int8 = $1
                    AND l.objsubid = 1",
            )
            .bind(self.key)
            .fetch_one(&self.admin)
            .await
            .expect("pg_locks");
            (parked == count).then_some(())
        })
        .await
    }

    /// Lets the parked writes, and every later one, through.
    pub async fn open(mut self) {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut *self.lock)
            .await
            .expect("the gate opens");
    }
}
