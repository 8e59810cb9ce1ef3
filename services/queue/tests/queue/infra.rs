use stagedoor_proto::queue::v1::{
    queue_internal_service_server::QueueInternalServiceServer,
    queue_service_server::QueueServiceServer,
};
use stagedoor_queue::grpc::QueueApi;
use stagedoor_runtime::db;
use stagedoor_testkit::TestDatabase;
use tokio_stream::StreamExt;
use tonic::server::NamedService;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::{config, start, Queue};

async fn channel(queue: &Queue) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(queue.handle.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn health_reports_serving() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let mut health = HealthClient::new(channel(&queue).await);
    for service in [
        "",
        <QueueServiceServer<QueueApi> as NamedService>::NAME,
        <QueueInternalServiceServer<QueueApi> as NamedService>::NAME,
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_queue_services_in_both_versions() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let expected = [
        "stagedoor.queue.v1.QueueService",
        "stagedoor.queue.v1.QueueInternalService",
    ];

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(&queue).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&queue).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "stagedoor.queue.v1.QueueService".into(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "v1alpha reflection resolves the queue service: {response:?}"
    );
}

#[tokio::test]
async fn the_queue_role_cannot_touch_other_schemas() {
    let database = TestDatabase::create().await;
    // Another service's table, as that service's migrations would make it.
    let admin = database.admin().await;
    sqlx::query("CREATE TABLE concert.seats (seat_number int)")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE concert.seats OWNER TO stagedoor_concert")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;

    let queue_role = sqlx::PgPool::connect(&database.url(db::QUEUE))
        .await
        .unwrap();
    for statement in [
        "SELECT * FROM concert.seats",
        "INSERT INTO concert.seats VALUES (1)",
        "CREATE TABLE concert.stolen (id int)",
        "CREATE TABLE point.stolen (id int)",
        "CREATE TABLE public.stolen (id int)",
    ] {
        let error = sqlx::query(statement)
            .execute(&queue_role)
            .await
            .unwrap_err();
        assert_eq!(
            stagedoor_runtime::error::sqlstate(&error).as_deref(),
            Some("42501"),
            "`{statement}` must be refused with insufficient_privilege, got {error}"
        );
    }
    // Its own schema is its to use.
    sqlx::query("CREATE TABLE queue.scratch (id int)")
        .execute(&queue_role)
        .await
        .unwrap();
    queue_role.close().await;
}

/// Migrates as one replica of the queue does when it starts, on a pool of its own.
async fn migrate_url(database_url: String) -> Result<(), db::StartupError> {
    let pool = db::connect(&db::PoolConfig::new(database_url, db::QUEUE.schema, 2)).await?;
    let migrated = db::migrate(&pool, db::QUEUE.schema, stagedoor_queue::app::migrator()).await;
    pool.close().await;
    migrated
}

/// A fresh database with the queue's schema migrated, then `statements` run on it as the
/// superuser (the state a test starts from), and that superuser's pool.
async fn migrated_then(statements: &[&str]) -> (TestDatabase, sqlx::PgPool) {
    let database = TestDatabase::create().await;
    database
        .migrate(db::QUEUE, stagedoor_queue::app::migrator())
        .await;
    let admin = database.admin().await;
    for statement in statements {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    (database, admin)
}

/// Is the queue's admissions index (built CONCURRENTLY by migration 0003) there and valid,
/// and is 0003 recorded as applied?
async fn admissions_index_is_valid_and_recorded(database: &TestDatabase) -> (bool, bool) {
    database
        .row(
            "SELECT coalesce((SELECT indisvalid FROM pg_index
                               WHERE indexrelid = to_regclass('queue.tokens_admitted_by_time')),
                             false),
                    EXISTS (SELECT 1 FROM queue._sqlx_migrations WHERE version = 3 AND success)",
        )
        .await
}

/// A rolling upgrade whose migration builds an index CONCURRENTLY, started on two replicas
/// at once while a replica of the previous version is writing. The build waits for every
/// older snapshot of the database; a second replica blocked inside `pg_advisory_lock` (sqlx's
/// own migration lock) held one while waiting for the builder's lock, and Postgres broke that
/// deadlock by failing one of the two start-ups. Both must start, and the index be valid.
#[tokio::test]
async fn two_replicas_migrating_while_an_index_builds_both_start() {
    // The database as the version before migration 0003 left it.
    let (database, admin) = migrated_then(&[
        "DROP INDEX queue.tokens_admitted_by_time",
        "DELETE FROM queue._sqlx_migrations WHERE version = 3",
    ])
    .await;
    // The old version's replica, in the middle of a write to `tokens`: the build waits for it.
    let mut writer = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE queue.tokens IN ROW EXCLUSIVE MODE")
        .execute(&mut *writer)
        .await
        .unwrap();

    let first = tokio::spawn({
        let database_url = database.url(db::QUEUE);
        async move { migrate_url(database_url).await }
    });
    // The first replica's index build waits for the writer.
    let index_build = stagedoor_testkit::LockWaiters {
        query_contains: Some("CREATE INDEX CONCURRENTLY"),
        ..Default::default()
    };
    stagedoor_testkit::until_lock_waiters(
        &admin,
        index_build,
        1,
        std::time::Duration::from_secs(20),
    )
    .await;
    let second = tokio::spawn({
        let database_url = database.url(db::QUEUE);
        async move { migrate_url(database_url).await }
    });
    // The second replica asks for the migration lock before the writer lets the build go on.
    until_the_migration_lock_is_asked_for(&admin).await;
    writer.commit().await.unwrap();

    for (replica, started) in [("first", first), ("second", second)] {
        let migrated = tokio::time::timeout(std::time::Duration::from_secs(30), started)
            .await
            .unwrap_or_else(|_| panic!("the {replica} replica's migrations are stuck"))
            .unwrap();
        if let Err(error) = migrated {
            panic!("the {replica} replica failed to start: {error}");
        }
    }
    admin.close().await;
    assert_eq!(
        admissions_index_is_valid_and_recorded(&database).await,
        (true, true)
    );
}

/// Waits (20 s at most) until a queue replica asks for its schema's migration lock: its
/// session's last statement names the lock (it polls, so the statement is there between
/// tries too).
async fn until_the_migration_lock_is_asked_for(admin: &sqlx::PgPool) {
    stagedoor_testkit::eventually(
        std::time::Duration::from_secs(20),
        "a replica asks for the migration lock",
        || async {
            let asking: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND usename = 'stagedoor_queue'
                    AND query LIKE '%stagedoor migrations of%'",
            )
            .fetch_one(admin)
            .await
            .unwrap();
            (asking > 0).then_some(())
        },
    )
    .await;
}

/// A replica killed (or failed) while building an index CONCURRENTLY leaves the index INVALID:
/// Postgres keeps it, writes it and never reads it, and the migration's `IF NOT EXISTS` would
/// then skip it for good. The next start rebuilds it, and drops what an interrupted REINDEX
/// CONCURRENTLY leaves behind.
#[tokio::test]
async fn indexes_an_interrupted_build_left_invalid_are_repaired_at_start() {
    // The state a build killed mid-way leaves: the index there but invalid, the migration not
    // recorded, and a transient copy of an interrupted reindex beside it.
    let (database, admin) = migrated_then(&[
        "DELETE FROM queue._sqlx_migrations WHERE version = 3",
        "CREATE INDEX tokens_admitted_by_time_ccnew ON queue.tokens (concert_id, admit_time)",
        "UPDATE pg_index SET indisvalid = false
          WHERE indexrelid IN ('queue.tokens_admitted_by_time'::regclass,
                               'queue.tokens_admitted_by_time_ccnew'::regclass)",
    ])
    .await;
    admin.close().await;
    assert_eq!(
        admissions_index_is_valid_and_recorded(&database).await,
        (false, false)
    );

    let _queue = start(config(&database)).await;
    assert_eq!(
        admissions_index_is_valid_and_recorded(&database).await,
        (true, true)
    );
    let (leftovers,): (i64,) = database
        .row("SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_ccnew%'")
        .await;
    assert_eq!(leftovers, 0, "the interrupted reindex's copy is dropped");
}

/// A migration that a newer version of the queue applied, as sqlx records it.
const A_NEWER_VERSIONS_MIGRATION: &str = "INSERT INTO queue._sqlx_migrations
        (version, description, success, checksum, execution_time)
     VALUES (99990101000000, 'a later version''s migration', true, '\\x00', 1)";

/// A rolling upgrade: the new version's first replica has migrated, and a replica of the
/// previous version restarts (or a rollback starts one). sqlx refuses a database holding a
/// migration it does not know; every old replica would then fail to start until the upgrade
/// ended. It starts, serves, and leaves the newer migration recorded.
#[tokio::test]
async fn a_replica_of_the_previous_version_starts_on_a_newer_schema() {
    let (database, admin) = migrated_then(&[A_NEWER_VERSIONS_MIGRATION]).await;
    admin.close().await;

    let queue = start(config(&database)).await;
    let mut health = HealthClient::new(channel(&queue).await);
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let (recorded,): (bool,) = database
        .row("SELECT EXISTS (SELECT 1 FROM queue._sqlx_migrations WHERE version = 99990101000000)")
        .await;
    assert!(recorded, "the newer version's migration stays recorded");
}

/// What the tolerance above must not let through: a migration this replica knows whose file
/// changed after it was applied means the schema is not what the code was written for.
#[tokio::test]
async fn a_migration_changed_after_it_was_applied_is_still_refused() {
    let (database, admin) = migrated_then(&[
        A_NEWER_VERSIONS_MIGRATION,
        "UPDATE queue._sqlx_migrations SET checksum = '\\x00' WHERE version = 1",
    ])
    .await;
    admin.close().await;

    let refused = migrate_url(database.url(db::QUEUE)).await.unwrap_err();
    assert!(
        matches!(
            refused,
            db::StartupError::Migrate {
                source: sqlx::migrate::MigrateError::VersionMismatch(1),
                ..
            }
        ),
        "got {refused}"
    );
}

/// A release whose migration cannot run beside the previous version: that migration writes
/// the schema's floor, in its own transaction, and a replica of the previous version then
/// refuses to start, naming it, rather than serve on a schema it would break. The newer
/// version starts again on it as usual. Written first with a typo in the floor's version,
/// the migration rolls back whole at its commit, and the corrected file then runs.
#[tokio::test]
async fn a_migration_that_writes_the_floor_stops_older_replicas() {
    let dir = std::env::temp_dir().join(format!("stagedoor-migrations-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let ours = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for file in std::fs::read_dir(&ours).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), dir.join(file.file_name())).unwrap();
    }
    let write_migration_4 = |floor: &str| {
        std::fs::write(
            dir.join("0004_a_column_the_previous_version_does_not_fill.sql"),
            format!(
                "ALTER TABLE tokens ADD COLUMN seen_from text NOT NULL;
                 INSERT INTO _stagedoor_schema_floor (version, reason)
                 VALUES ({floor}, 'tokens.seen_from has no default; the previous version \
                                   does not fill it')
                 ON CONFLICT (version) DO NOTHING;"
            ),
        )
        .unwrap()
    };

    let database = TestDatabase::create().await;
    let migrate_next_release = || async {
        let next_release = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
        let pool = database.service_pool(db::QUEUE, 2).await;
        let migrated = db::migrate(&pool, db::QUEUE.schema, next_release).await;
        pool.close().await;
        migrated
    };
    write_migration_4("40");
    let typo = migrate_next_release().await.unwrap_err();
    assert!(
        typo.to_string().contains("must name an applied migration"),
        "got {typo}"
    );
    let (recorded, column): (bool, bool) = database
        .row(
            "SELECT EXISTS (SELECT 1 FROM queue._sqlx_migrations WHERE version = 4),
                    EXISTS (SELECT 1 FROM information_schema.columns
                             WHERE table_schema = 'queue' AND column_name = 'seen_from')",
        )
        .await;
    assert_eq!((recorded, column), (false, false), "rolled back whole");

    write_migration_4("4");
    migrate_next_release()
        .await
        .expect("the next release migrates");
    let refused = migrate_url(database.url(db::QUEUE)).await.unwrap_err();
    assert!(
        matches!(&refused, db::StartupError::SchemaTooNew { version: 4, .. }),
        "got {refused}"
    );
    migrate_next_release()
        .await
        .expect("the next release starts again on its own schema");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A floor row must name a migration the schema has recorded: one that names another (a
/// typo, a version of the wrong scheme) is refused at its commit, so the migration that wrote
/// it rolls back whole and can be fixed. One slipped past that check (its trigger disabled)
/// is refused at the next start. A floor at a migration the replica knows stops nothing.
#[tokio::test]
async fn a_floor_must_name_an_applied_migration() {
    let (database, admin) =
        migrated_then(
            &["INSERT INTO queue._stagedoor_schema_floor (version, reason)
         VALUES (1, 'a floor the replica is above')"],
        )
        .await;
    migrate_url(database.url(db::QUEUE))
        .await
        .expect("a floor at a known migration stops nothing");

    let typo = "INSERT INTO queue._stagedoor_schema_floor (version, reason)
                VALUES (20270101000000, 'meant to be 4')";
    let refused = sqlx::query(typo).execute(&admin).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("must name an applied migration"),
        "got {refused}"
    );

    for statement in [
        "ALTER TABLE queue._stagedoor_schema_floor DISABLE TRIGGER USER",
        typo,
        "ALTER TABLE queue._stagedoor_schema_floor ENABLE TRIGGER USER",
    ] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    admin.close().await;
    let refused = migrate_url(database.url(db::QUEUE)).await.unwrap_err();
    assert!(
        refused.to_string().contains("20270101000000"),
        "got {refused}"
    );
}

/// A replica waiting for another's migrations (here: for the migration lock this test holds)
/// has bound its port but does not listen on it yet: a connection is refused, not accepted
/// and left unanswered, so that a TCP probe or a connection-level balancer does not count it
/// ready while it may wait minutes behind an index build. Once migrated, it serves.
#[tokio::test]
async fn a_replica_still_migrating_refuses_connections() {
    let database = TestDatabase::create().await;
    let admin = database.admin().await;
    let mut lock = admin.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('stagedoor migrations of queue'))")
        .execute(&mut *lock)
        .await
        .unwrap();

    let port = stagedoor_runtime::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = port.local_addr().unwrap();
    let starting = tokio::spawn(stagedoor_queue::start(config(&database), port));
    until_the_migration_lock_is_asked_for(&admin).await;
    let refused = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("a replica still migrating accepted a connection");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    sqlx::query("SELECT pg_advisory_unlock(hashtext('stagedoor migrations of queue'))")
        .execute(&mut *lock)
        .await
        .unwrap();
    drop(lock);
    let handle = tokio::time::timeout(std::time::Duration::from_secs(30), starting)
        .await
        .expect("the replica starts once the lock is free")
        .unwrap()
        .unwrap();
    assert_eq!(handle.local_addr(), addr);
    let channel = tonic::transport::Channel::from_shared(handle.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let serving = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);
    admin.close().await;
}
