//! Postgres: each service connects as its own role, into its own schema, and runs its own
//! migrations there at start-up. Provisioning (creating the roles and schemas) is an admin's
//! job, done once by `stagedoor up`, the docker-compose init step or the test kit.

use std::{str::FromStr, time::Duration};

use sqlx::{
    migrate::{Migrate, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, Connection, Executor, PgConnection, PgPool,
};

/// A service's database identity: the role it logs in as and the schema it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSchema {
    /// Postgres role (login) of the service.
    pub role: &'static str,
    /// Schema that role owns and the service's tables live in.
    pub schema: &'static str,
}

/// The queue service's role and schema.
pub const QUEUE: ServiceSchema = ServiceSchema {
    role: "stagedoor_queue",
    schema: "queue",
};
/// The concert service's role and schema.
pub const CONCERT: ServiceSchema = ServiceSchema {
    role: "stagedoor_concert",
    schema: "concert",
};
/// The point service's role and schema.
pub const POINT: ServiceSchema = ServiceSchema {
    role: "stagedoor_point",
    schema: "point",
};
/// The payment service's role and schema.
pub const PAYMENT: ServiceSchema = ServiceSchema {
    role: "stagedoor_payment",
    schema: "payment",
};
/// Every service, in start-up order.
pub const ALL_SERVICES: [ServiceSchema; 4] = [QUEUE, CONCERT, POINT, PAYMENT];

/// Pool settings of a service.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// `postgres://role@host:port/database` of the service's own role.
    pub url: String,
    /// The schema to work in: it becomes the connections' `search_path`.
    pub schema: &'static str,
    /// Most connections this process opens.
    pub max_connections: u32,
    /// How long a call waits for a free connection before failing with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// A connection idle longer than this is pinged before it is handed out (see
    /// [`IDLE_BEFORE_PING`]); one in use more recently is handed out as it is.
    pub idle_before_ping: Duration,
}

impl PoolConfig {
    /// A service's pool with the usual wait for a connection ([`ACQUIRE_TIMEOUT`]).
    pub fn new(url: impl Into<String>, schema: &'static str, max_connections: u32) -> Self {
        Self {
            url: url.into(),
            schema,
            max_connections,
            acquire_timeout: ACQUIRE_TIMEOUT,
            idle_before_ping: IDLE_BEFORE_PING,
        }
    }
}

/// How long a call waits for a pooled connection by default. A rush queues its calls in the
/// services' batchers, not on the pool, so a wait this long means Postgres is stuck or gone:
/// the call fails with UNAVAILABLE (DATABASE_UNAVAILABLE) rather than hang.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a pooled connection may sit idle before it is pinged on its way out.
///
/// sqlx pings every connection before handing it out by default: one more round trip to
/// Postgres before every transaction, a wait in front of every batch, and about 3 % of the
/// demo process's CPU in a rush (BENCHMARKS.md, session of 2026-12-04). sqlx also pings each
/// connection it takes back; that one is not configurable, and runs after the caller has its
/// answer. A connection in use a moment ago is very likely alive; one that sat idle may have
/// been cut by a firewall, a proxy or a restart of Postgres, and is the one worth checking.
/// The price: after Postgres restarts, each connection used within this window fails its
/// next statement once (DATABASE_UNAVAILABLE, which clients may retry) and is then closed by
/// the pool and replaced.
pub const IDLE_BEFORE_PING: Duration = Duration::from_secs(10);

/// Errors of start-up: they stop the process with a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid DATABASE_URL: {0}")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot connect to Postgres at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "schema `{schema}` does not exist or role `{role}` does not own it; \
         provision the database first (`stagedoor up` does it, or see README \"Provisioning\")"
    )]
    SchemaMissing { schema: String, role: String },
    #[error("migrations of schema `{schema}` failed: {source}")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "schema `{schema}` was migrated by a newer version of this service that this one cannot \
         run beside (its migration {version}: {reason}); run that version or a later one"
    )]
    SchemaTooNew {
        schema: String,
        version: i64,
        reason: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("provisioning failed: {0}")]
    Provision(#[source] sqlx::Error),
    /// The port could not be listened on, or its address read (the error says which).
    #[error("{0}")]
    Listen(#[source] std::io::Error),
}

impl StartupError {
    /// A failure of `schema`'s migrations.
    fn migrate(schema: &str, source: sqlx::migrate::MigrateError) -> Self {
        StartupError::Migrate {
            schema: schema.into(),
            source,
        }
    }

    /// A failure of a statement run beside `schema`'s migrations, under their lock.
    fn beside_migrations(schema: &str, error: sqlx::Error) -> Self {
        Self::migrate(schema, sqlx::migrate::MigrateError::Execute(error))
    }
}

/// Opens the service's pool. Every connection's `search_path` is the service's schema alone,
/// so unqualified table names can only ever mean the service's own tables.
///
/// A note on plans, for every service: sqlx prepares each statement once per connection and
/// Postgres settles on a generic plan after five runs. A plan chosen while a table was nearly
/// empty survives the rush that fills it until autovacuum analyzes again, so a statement whose
/// plan depends on table size must either have an index that matches it exactly or be sent
/// unprepared (`.persistent(false)`, planned for its parameters every time).
pub async fn connect(config: &PoolConfig) -> Result<PgPool, StartupError> {
    let options = PgConnectOptions::from_str(&config.url)
        .map_err(StartupError::BadUrl)?
        .options([("search_path", config.schema)])
        .log_statements(tracing::log::LevelFilter::Trace);
    let idle_before_ping = config.idle_before_ping;
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(move |connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= idle_before_ping {
                    // A dead connection fails the ping: the pool closes it and tries another.
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| StartupError::Connect {
            url: redact(&config.url),
            source,
        })
}

/// Runs the service's migrations inside its schema (sqlx's bookkeeping table included).
///
/// Replicas starting together take turns through an advisory lock of the service's schema
/// (services sharing a database do not wait for each other). The lock is *polled*, never
/// waited for inside a statement: a `CREATE INDEX CONCURRENTLY` waits for every transaction
/// of the database whose snapshot is older than its build, and a replica blocked inside
/// `SELECT pg_advisory_lock(..)` holds such a snapshot while it waits for the lock the builder
/// holds. Postgres breaks that deadlock by failing one of them, so sqlx's own lock (blocking,
/// one per database) made a replica or a neighbouring service fail its start-up whenever
/// another one was building an index.
///
/// Under the lock, before migrating, indexes an interrupted build left INVALID are repaired
/// (see [`repair_invalid_indexes`]).
pub async fn migrate(
    pool: &PgPool,
    schema: &'static str,
    mut migrator: Migrator,
) -> Result<(), StartupError> {
    let connect_error = |source| StartupError::Connect {
        url: "(pool)".into(),
        source,
    };
    let (role, owns): (String, bool) = sqlx::query_as(
        "SELECT current_user::text,
                coalesce((SELECT nspowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
                          FROM pg_namespace WHERE nspname = $1), false)",
    )
    .bind(schema)
    .fetch_one(pool)
    .await
    .map_err(connect_error)?;
    if !owns {
        return Err(StartupError::SchemaMissing {
            schema: schema.into(),
            role,
        });
    }
    // The session lock lives and dies with this one connection, which never goes back to the
    // pool: whatever happens below (an error, a panic, a cancelled start-up), closing or
    // dropping it releases the lock.
    let mut conn = pool.acquire().await.map_err(connect_error)?.detach();
    take_migration_lock(&mut conn, schema)
        .await
        .map_err(connect_error)?;
    // A replica of the previous version restarting in the middle of a rolling upgrade finds
    // migrations it does not know, applied by the newer version. sqlx refuses such a
    // database by default, and the old replicas would then crash-loop for the whole
    // upgrade. Migrations are written to keep the previous version working (README,
    // "Upgrading"), so the replica starts and says what it found, unless the schema's floor
    // says it must not (see [`SCHEMA_FLOOR`]): that is checked first, before this replica
    // touches anything (not even the index repairs below) of a schema it may not know. A
    // migration this replica knows whose file changed since it was applied (a checksum
    // mismatch) stays refused.
    check_schema_floor(&mut conn, schema, &migrator).await?;
    repair_invalid_indexes(&mut conn, schema)
        .await
        .map_err(|error| StartupError::beside_migrations(schema, error))?;
    // Our lock already serialises the replicas; sqlx's must not be taken as well.
    migrator.set_locking(false);
    migrator.set_ignore_missing(true);
    // `run_direct` is `run` on a connection we hold (sqlx's own way around `run(&mut conn)`
    // failing its `Send` proof when a start-up future is spawned).
    migrator
        .run_direct(&mut conn)
        .await
        .map_err(|error| StartupError::migrate(schema, error))?;
    check_floor_recorded(&mut conn, schema).await?;
    // Closing ends the session, and with it the lock.
    conn.close().await.map_err(connect_error)
}

/// The schema's floor. A row says: a replica must know migration `version` to run on this
/// schema. The migration that creates the need inserts it, in its own transaction (so not in
/// a `-- no-transaction` migration), naming an applied migration:
///
/// - one that the previous version cannot run beside (it drops or renames what the old code
///   uses, adds a column the old code does not fill, changes what a column means) names
///   itself;
/// - one that removes what an older release used (the "contract" half of a change made in
///   two releases) names the first migration of the release that stopped using it, so that
///   replicas from before that release refuse, and the one just before it does not.
///
/// ```sql
/// INSERT INTO _stagedoor_schema_floor (version, reason)
/// VALUES (4, 'tokens.place is gone; replicas before migration 4 still read it')
/// ON CONFLICT (version) DO NOTHING;
/// ```
///
/// A replica that does not know that migration then refuses to start, as sqlx refuses any
/// unknown migration, rather than run on a schema it would break. A release with such a
/// migration is not a rolling upgrade: replicas already running are not stopped by it, so
/// the older ones are stopped first (README, "Upgrading"). A release that only stopped using
/// something ships a migration all the same (an empty one will do), for the floor to name.
///
/// A deferred trigger checks at commit that each row names a migration recorded as applied:
/// sqlx records a migration in its own transaction, so a floor row naming itself passes,
/// while a typo (or a floor written by a `-- no-transaction` migration, whose statements
/// commit one by one before its record) rolls the migration back whole, and its file can
/// still be fixed. Made by every start, under the migration lock (two sessions creating them
/// at once would collide in the catalog), before the migrations, so that they can write to
/// it.
const SCHEMA_FLOOR: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS _stagedoor_schema_floor (
         version     bigint PRIMARY KEY,
         reason      text NOT NULL,
         create_time timestamptz NOT NULL DEFAULT now()
     )",
    "CREATE OR REPLACE FUNCTION _stagedoor_floor_names_an_applied_migration()
     RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
     BEGIN
         IF NOT EXISTS (SELECT 1 FROM _sqlx_migrations
                         WHERE version = NEW.version AND success) THEN
             RAISE EXCEPTION 'the schema floor must name an applied migration; % is none',
                 NEW.version
                 USING HINT = 'insert the floor row in the migration it names (or a later '
                              'one), in a migration that runs in a transaction';
         END IF;
         RETURN NULL;
     END $$",
    // Constraint triggers have no CREATE OR REPLACE.
    "DO $$ BEGIN
         IF NOT EXISTS (SELECT 1 FROM pg_trigger
                         WHERE tgrelid = '_stagedoor_schema_floor'::regclass
                           AND tgname = 'floor_names_an_applied_migration') THEN
             CREATE CONSTRAINT TRIGGER floor_names_an_applied_migration
                 AFTER INSERT OR UPDATE ON _stagedoor_schema_floor
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                 EXECUTE FUNCTION _stagedoor_floor_names_an_applied_migration();
         END IF;
     END $$",
];

/// Refuses a schema whose floor (see [`SCHEMA_FLOOR`]) is above every migration `migrator`
/// has, when the schema has migrations `migrator` does not know.
async fn check_schema_floor(
    conn: &mut PgConnection,
    schema: &str,
    migrator: &Migrator,
) -> Result<(), StartupError> {
    for statement in SCHEMA_FLOOR {
        sqlx::query(statement)
            .execute(&mut *conn)
            .await
            .map_err(|error| StartupError::beside_migrations(schema, error))?;
    }
    let newer = migrations_unknown_to(conn, migrator)
        .await
        .map_err(|error| StartupError::migrate(schema, error))?;
    if newer.is_empty() {
        return Ok(());
    }
    let newest_known = migrator.iter().map(|migration| migration.version).max();
    let floor: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, reason FROM _stagedoor_schema_floor
          WHERE version > $1 ORDER BY version LIMIT 1",
    )
    .bind(newest_known.unwrap_or(0))
    .fetch_optional(&mut *conn)
    .await
    .map_err(|error| StartupError::beside_migrations(schema, error))?;
    if let Some((version, reason)) = floor {
        return Err(StartupError::SchemaTooNew {
            schema: schema.into(),
            version,
            reason,
        });
    }
    tracing::warn!(
        schema,
        ?newer,
        "the schema has migrations of a newer version of this service; starting on it"
    );
    Ok(())
}

/// After the migrations, when every one this replica knows is applied: a floor row naming
/// none that is was slipped past its trigger (see [`SCHEMA_FLOOR`]) or its migration's
/// record was deleted. Said now, rather than left for a rollback to trip over.
async fn check_floor_recorded(conn: &mut PgConnection, schema: &str) -> Result<(), StartupError> {
    let unrecorded: Option<i64> = sqlx::query_scalar(
        "SELECT f.version FROM _stagedoor_schema_floor f
          WHERE NOT EXISTS (SELECT 1 FROM _sqlx_migrations m
                             WHERE m.version = f.version AND m.success)
          ORDER BY f.version LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|error| StartupError::beside_migrations(schema, error))?;
    match unrecorded {
        Some(version) => Err(StartupError::Config(format!(
            "schema `{schema}`'s _stagedoor_schema_floor names migration {version}, which is \
             not recorded as applied: a floor row must name an applied migration"
        ))),
        None => Ok(()),
    }
}

/// The versions applied to the schema that `migrator` does not have, in order.
async fn migrations_unknown_to(
    conn: &mut PgConnection,
    migrator: &Migrator,
) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
    // The bookkeeping table as sqlx makes it (IF NOT EXISTS; `run_direct` asks again).
    conn.ensure_migrations_table().await?;
    let known: std::collections::HashSet<i64> =
        migrator.iter().map(|migration| migration.version).collect();
    let mut unknown: Vec<i64> = conn
        .list_applied_migrations()
        .await?
        .into_iter()
        .map(|applied| applied.version)
        .filter(|version| !known.contains(version))
        .collect();
    unknown.sort_unstable();
    Ok(unknown)
}

/// How often a replica asks again for the lock another replica holds while it migrates.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(100);

/// Takes the session-level advisory lock of `schema`'s migrations, asking every
/// [`MIGRATION_LOCK_POLL`] until it is free. Between two asks the connection is idle and
/// holds no snapshot, so another replica's `CREATE INDEX CONCURRENTLY` never waits for it.
async fn take_migration_lock(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    let started = std::time::Instant::now();
    let mut said_so = false;
    loop {
        let taken: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtext('stagedoor migrations of ' || $1))",
        )
        .bind(schema)
        .fetch_one(&mut *conn)
        .await?;
        if taken {
            return Ok(());
        }
        if !said_so && started.elapsed() > Duration::from_secs(2) {
            tracing::info!(
                schema,
                "waiting for another replica to finish its migrations"
            );
            said_so = true;
        }
        tokio::time::sleep(MIGRATION_LOCK_POLL).await;
    }
}

/// Repairs the indexes of `schema` that an interrupted concurrent build left INVALID (a
/// replica killed or failed during `CREATE INDEX CONCURRENTLY` or `REINDEX CONCURRENTLY`).
/// Postgres keeps such an index, writes to it and never reads it; the migration that builds
/// it with `IF NOT EXISTS` would see it there next time and record itself as applied, leaving
/// the statements it was made for without their index for good. So, as Postgres's manual
/// advises: an index is rebuilt in place (`REINDEX INDEX CONCURRENTLY`), and the transient
/// copy of an interrupted reindex (suffixed `_ccnew` or `_ccold`) is dropped.
///
/// Runs under the migration lock, where no migration of this schema is building anything.
async fn repair_invalid_indexes(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    // An index some session is building right now is invalid too, until its build ends: one
    // of ours (a replica of an older version, which migrates under another lock) shows in
    // the progress view, and is left to finish.
    let invalid: Vec<(String, bool)> = sqlx::query_as(
        "SELECT format('%I.%I', n.nspname, c.relname), c.relname ~ '_cc(new|old)[0-9]*$'
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND NOT i.indisvalid
            AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                             WHERE p.index_relid = i.indexrelid
                               AND p.datname = current_database())",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    for (index, transient) in invalid {
        // `index` was quoted by Postgres's own `format('%I')`.
        let statement = if transient {
            format!("DROP INDEX CONCURRENTLY IF EXISTS {index}")
        } else {
            format!("REINDEX INDEX CONCURRENTLY {index}")
        };
        tracing::warn!(%index, %statement, "repairing an index an interrupted build left invalid");
        // A repair that fails (a unique index over rows that are not unique, say) fails again
        // at every start: the service starts without it, as it ran before, and says so,
        // rather than every replica refusing to start.
        if let Err(error) = conn.execute(statement.as_str()).await {
            tracing::error!(%index, %error, "cannot repair the index; starting without it");
        }
    }
    Ok(())
}

/// Creates `database` (when missing) through an admin connection to any database of the
/// cluster. Postgres has no `CREATE DATABASE IF NOT EXISTS`, so a concurrent creator's
/// duplicate error counts as success.
pub async fn ensure_database(admin_url: &str, database: &str) -> Result<(), StartupError> {
    let mut admin = connect_admin(admin_url, |options| options).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&mut admin)
            .await
            .map_err(StartupError::Provision)?;
    if !exists {
        let created = admin
            .execute(format!("CREATE DATABASE {}", quote_ident(database)).as_str())
            .await;
        match created {
            Ok(_) => {}
            // 42P04 duplicate_database, or 23505 when two creators race on the catalog.
            Err(error)
                if matches!(
                    crate::error::sqlstate(&error).as_deref(),
                    Some("42P04") | Some(crate::error::UNIQUE_VIOLATION)
                ) => {}
            Err(error) => return Err(StartupError::Provision(error)),
        }
    }
    Ok(())
}

/// Creates `database` (when missing) and every service's role and schema in it: what
/// `stagedoor up`, the demo, the load runs and each test's database start from. Each role
/// this creates gets [`role_password`].
pub async fn provision_database(admin_url: &str, database: &str) -> Result<(), StartupError> {
    ensure_database(admin_url, database).await?;
    let mut admin = connect_admin(admin_url, |options| {
        // Provisioning sends role passwords: no statement of this connection is logged.
        options.database(database).disable_statement_logging()
    })
    .await?;
    for service in ALL_SERVICES {
        let password = role_password(admin_url, service);
        provision(&mut admin, service, password.as_deref()).await?;
    }
    let _ = admin.close().await;
    Ok(())
}

/// One connection as the admin of `admin_url`, with `adjust` applied to its options (another
/// database, no statement logging); errors name the URL without its password.
async fn connect_admin(
    admin_url: &str,
    adjust: impl FnOnce(PgConnectOptions) -> PgConnectOptions,
) -> Result<sqlx::PgConnection, StartupError> {
    let options = PgConnectOptions::from_str(admin_url).map_err(StartupError::BadUrl)?;
    adjust(options)
        .connect()
        .await
        .map_err(|source| StartupError::Connect {
            url: redact(admin_url),
            source,
        })
}

/// How many more connections the server behind `admin_url` accepts from roles that are not
/// superusers (every service's role), and its `max_connections`. Connections beyond it are
/// refused ("too many clients"), which a pool reports as a timeout after waiting for them:
/// anything that starts several pools on a shared server sizes them from this first.
pub async fn free_connections(admin_url: &str) -> Result<(i64, i64), StartupError> {
    let mut admin = connect_admin(admin_url, |options| options).await?;
    // Slots kept for superusers (and, from Postgres 16, for pg_use_reserved_connections)
    // are not for the services; every client backend, this one included, takes one. An
    // admin without pg_read_all_stats sees other roles' sessions with a NULL backend_type:
    // they are counted too (a background worker among them only makes the answer safer).
    let free = sqlx::query_as(
        "SELECT current_setting('max_connections')::int8
                - current_setting('superuser_reserved_connections')::int8
                - coalesce(current_setting('reserved_connections', true), '0')::int8
                - (SELECT count(*) FROM pg_stat_activity
                    WHERE backend_type = 'client backend' OR backend_type IS NULL),
                current_setting('max_connections')::int8",
    )
    .fetch_one(&mut admin)
    .await
    .map_err(StartupError::Provision);
    let _ = admin.close().await;
    free
}

/// Drops `database` through an admin connection, closing whatever is still connected to it
/// (`WITH (FORCE)`): for throwaway databases of tests and load runs.
pub async fn drop_database(admin_url: &str, database: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnectOptions::from_str(admin_url)?.connect().await?;
    admin
        .execute(
            format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(database)
            )
            .as_str(),
        )
        .await?;
    Ok(())
}

/// Creates a service's login role (cluster-wide, once) and its schema in the database the
/// admin is connected to, owned by that role. Nobody else gets any right on the schema,
/// so a service's role can neither read nor write another service's tables.
///
/// `password` (see [`role_password`]) is given to a role this call creates. A role that
/// exists keeps its password: roles are shared by the whole cluster, and one made by hand or
/// by docker-compose's init script belongs to whoever made it. The statement carries the
/// password's SCRAM secret, never the password itself (see [`scram_secret`]); the admin
/// connection does not log it either (`ConnectOptions::disable_statement_logging`).
async fn provision(
    admin: &mut sqlx::PgConnection,
    service: ServiceSchema,
    password: Option<&str>,
) -> Result<(), StartupError> {
    let role = quote_ident(service.role);
    let create = match password {
        // Postgres stores a password given in this form as it is: the statement (which a
        // server with `log_statement = 'ddl'` writes to its log) never holds the password.
        Some(password) => format!(
            "CREATE ROLE {role} LOGIN PASSWORD {}",
            quote_literal(&scram_secret(password, uuid::Uuid::new_v4().as_bytes()))
        ),
        None => format!("CREATE ROLE {role} LOGIN"),
    };
    // Roles are shared by every database of the cluster and parallel provisioners (tests,
    // replicas) may race to create one: losing that race is fine. (The body's quote tag
    // cannot occur in a SCRAM secret: its `$`s are followed by digits or base64 that ends
    // in `=`, never by `role$`.)
    let create_role = format!(
        "DO $role$ BEGIN
             {create};
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
         END $role$"
    );
    (&mut *admin)
        .execute(create_role.as_str())
        .await
        .map_err(StartupError::Provision)?;
    let create_schema = format!(
        "CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {role}",
        quote_ident(service.schema)
    );
    match (&mut *admin).execute(create_schema.as_str()).await {
        Ok(_) => Ok(()),
        Err(error) if crate::error::is_unique_violation(&error, None) => Ok(()),
        Err(error) => Err(StartupError::Provision(error)),
    }
}

/// The SCRAM-SHA-256 secret of `password` with `salt`, as Postgres stores it in
/// `pg_authid.rolpassword` (RFC 5802 and 7677, 4,096 iterations as Postgres's default):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64. Postgres first
/// normalizes a password with SASLprep, which leaves the ASCII of [`role_password`]'s hex
/// digits as they are; a password with other characters would need it here too.
fn scram_secret(password: &str, salt: &[u8]) -> String {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    const ITERATIONS: u32 = 4096;
    let hmac = |key: &[u8], parts: &[&[u8]]| -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    };
    // Hi(password, salt, i): PBKDF2 with HMAC-SHA-256, one block.
    let mut block = hmac(password.as_bytes(), &[salt, &1u32.to_be_bytes()]);
    let mut salted = block;
    for _ in 1..ITERATIONS {
        block = hmac(password.as_bytes(), &[&block]);
        for (byte, next) in salted.iter_mut().zip(block) {
            *byte ^= next;
        }
    }
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, &[b"Server Key"]);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

/// The password of `service`'s role on the cluster the admin reaches with `admin_url`: none
/// when the admin URL carries none (trust or peer auth, a developer's machine), else one
/// derived from the admin's password and the role's name.
///
/// Derived, not random: every provisioner of the cluster (tests in parallel, a second `up`)
/// sets the same value, so none locks out connections another one made; and only whoever
/// knows the admin's password can work it out.
fn role_password(admin_url: &str, service: ServiceSchema) -> Option<String> {
    use sha2::{Digest, Sha256};
    let admin = url::Url::parse(admin_url).ok()?;
    // The URL keeps it percent-encoded; `p%21ss` and `p!ss` are one password (sqlx decodes).
    let admin_password = admin.password().filter(|password| !password.is_empty())?;
    let admin_password = percent_encoding::percent_decode_str(admin_password).collect::<Vec<u8>>();
    let digest = Sha256::new()
        .chain_update("stagedoor role password\0")
        .chain_update(admin_password)
        .chain_update("\0")
        .chain_update(service.role)
        .finalize();
    Some(digest.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The URL of `service`'s own role on the cluster and database of `admin_url`: the admin's
/// host (or Unix socket directory), port and TLS parameters (`sslmode`, `sslrootcert`, ...),
/// the role's name and [`role_password`]. Other parameters stay behind: `user`, `password` or
/// `dbname` there would override the role and the database.
pub fn service_url(
    admin_url: &str,
    database: &str,
    service: ServiceSchema,
) -> Result<String, StartupError> {
    let options = PgConnectOptions::from_str(admin_url).map_err(StartupError::BadUrl)?;
    let credentials = match role_password(admin_url, service) {
        // Hex digits: nothing to percent-encode.
        Some(password) => format!("{}:{password}", service.role),
        None => service.role.to_owned(),
    };
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    if let Ok(admin) = url::Url::parse(admin_url) {
        kept.extend_pairs(
            admin
                .query_pairs()
                .filter(|(key, _)| key.starts_with("ssl")),
        );
    }
    // An admin on a Unix socket (`?host=/var/run/postgresql`, or the directory as the URL's
    // host): the roles go the same way, not over TCP. The directory goes in `host=`, which
    // wins over the URL's host (a path cannot be one).
    // A URL with no host at all takes sqlx's default, which is the socket directory when
    // `/var/run/postgresql` exists (or PGHOST): a host that is a path is a socket too.
    let socket = match options.get_socket() {
        Some(socket) => Some(socket.to_string_lossy().into_owned()),
        None => Some(options.get_host().to_owned()).filter(|host| host.starts_with('/')),
    };
    let host = match socket {
        Some(socket) => {
            kept.append_pair("host", &socket);
            "localhost".to_owned()
        }
        None => options.get_host().to_owned(),
    };
    let kept = kept.finish();
    let parameters = if kept.is_empty() {
        String::new()
    } else {
        format!("?{kept}")
    };
    Ok(format!(
        "postgres://{credentials}@{host}:{}/{database}{parameters}",
        options.get_port(),
    ))
}

/// Single-quotes an SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Double-quotes an SQL identifier. Identifiers here come from constants and test names, but
/// quoting keeps a surprising name from ever becoming SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An `int4[]` as Postgres's text literal (`{1,2,3}`). Batched statements pass one array per
/// row this way, as a `text[]` element cast back with `::int4[]`, because `unnest` cannot
/// take an array of arrays whose lengths differ.
pub fn int4_array_literal(numbers: &[i32]) -> String {
    let numbers: Vec<String> = numbers.iter().map(i32::to_string).collect();
    format!("{{{}}}", numbers.join(","))
}

/// A database URL without its password, for messages and logs: the one after the user name,
/// and a `password=` parameter, which sqlx reads too.
///
/// Read as text, not parsed: a password with an unencoded `/` ends a URL parser's
/// authority early (the URL then has no credentials at all, the password sits in its path),
/// yet sqlx connects with such a URL and its errors print it. So the credentials are what
/// lies between `://` and the last `@` before the query. (A password with an unencoded `?`
/// or `#` makes a URL sqlx refuses before connecting, so it is never printed from here.)
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let head = match (head.find("://"), head.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            match head[scheme_end + 3..at].split_once(':') {
                Some((user, _)) => {
                    format!("{}{user}:***{}", &head[..scheme_end + 3], &head[at..])
                }
                None => head.to_owned(),
            }
        }
        _ => head.to_owned(),
    };
    let Some(query) = query else {
        return head;
    };
    let parameters: Vec<String> = query
        .split('&')
        .map(|parameter| match parameter.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => parameter.to_owned(),
        })
        .collect();
    format!("{head}?{}", parameters.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example (password "pencil", its salt): the ServerKey below signs that
    /// exchange's AuthMessage into the RFC's ServerSignature `6rriTRBi...`, checked with
    /// Python's hashlib and hmac when this test was written.
    #[test]
    fn scram_secret_matches_rfc_7677() {
        use base64::{engine::general_purpose::STANDARD, Engine};
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        assert_eq!(
            scram_secret("pencil", &salt),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
             WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
             wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        // sqlx also takes the password as a parameter.
        assert_eq!(
            redact("postgres://u@h/d?sslmode=require&password=secret"),
            "postgres://u@h/d?sslmode=require&password=***"
        );
        assert_eq!(
            redact("postgres://u:one@h/d?PASSWORD=two"),
            "postgres://u:***@h/d?PASSWORD=***"
        );
        // Unencoded, a `/` in the password ends a URL parser's authority.
        assert_eq!(
            redact("postgres://u:/s3cret@db/app"),
            "postgres://u:***@db/app"
        );
        // An `@` in the query is no user's: the password parameter is still masked, and the
        // other parameters are left as written.
        assert_eq!(
            redact("postgres://db/app?user=admin@srv&password=secret&host=/run/pg"),
            "postgres://db/app?user=admin@srv&password=***&host=/run/pg"
        );
    }

    #[test]
    fn writes_int_array_literals() {
        assert_eq!(int4_array_literal(&[]), "{}");
        assert_eq!(int4_array_literal(&[7]), "{7}");
        assert_eq!(int4_array_literal(&[1, -2, 30]), "{1,-2,30}");
    }

    #[test]
    fn roles_get_passwords_where_the_admin_has_one() {
        let trust = "postgres://postgres@127.0.0.1:5432/postgres";
        assert_eq!(role_password(trust, QUEUE), None);
        assert_eq!(
            service_url(trust, "stagedoor", QUEUE).unwrap(),
            "postgres://stagedoor_queue@127.0.0.1:5432/stagedoor"
        );

        let scram = "postgres://postgres:s3cret@db.internal:6432/postgres?sslmode=require&user=x&dbname=y&password=z";
        let queue = role_password(scram, QUEUE).unwrap();
        assert_eq!(queue.len(), 64);
        assert_eq!(role_password(scram, QUEUE).as_ref(), Some(&queue), "stable");
        assert_ne!(
            role_password(scram, CONCERT).unwrap(),
            queue,
            "one per role"
        );
        let other_admin = "postgres://postgres:other@db.internal:6432/postgres";
        assert_ne!(role_password(other_admin, QUEUE).unwrap(), queue);
        let encoded = "postgres://postgres:s3cr%65t@db.internal:6432/postgres";
        assert_eq!(
            role_password(encoded, QUEUE).unwrap(),
            queue,
            "decoded first"
        );
        assert_eq!(
            service_url(scram, "stagedoor", QUEUE).unwrap(),
            format!(
                "postgres://stagedoor_queue:{queue}@db.internal:6432/stagedoor?sslmode=require"
            )
        );
    }

    #[test]
    fn roles_reach_a_unix_socket_the_way_the_admin_does() {
        let mut admins = vec![
            (
                "postgres:///postgres?host=/var/run/postgresql",
                "/var/run/postgresql".to_owned(),
            ),
            (
                "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/postgres",
                "/var/run/postgresql".to_owned(),
            ),
        ];
        // No host: sqlx's default, which is a socket directory where it finds a server's
        // socket file (as on a Debian machine with Postgres running), else localhost.
        let default_host = PgConnectOptions::from_str("postgres:///postgres")
            .unwrap()
            .get_host()
            .to_owned();
        if default_host.starts_with('/') {
            admins.push(("postgres:///postgres", default_host));
        }
        for (admin, directory) in admins {
            let url = service_url(admin, "stagedoor", QUEUE).unwrap();
            let options = PgConnectOptions::from_str(&url).unwrap();
            assert_eq!(
                options.get_socket().map(|socket| socket.as_path()),
                Some(std::path::Path::new(&directory)),
                "{admin} -> {url}"
            );
            assert_eq!(options.get_username(), "stagedoor_queue");
            assert_eq!(options.get_database(), Some("stagedoor"));
        }
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("queue"), "\"queue\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
