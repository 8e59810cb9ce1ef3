//! Wiring: pool, migrations, the queue client and the gRPC server of one concert process.

use std::time::Duration;

use stagedoor_proto::concert::v1::{
    concert_admin_service_server::ConcertAdminServiceServer,
    concert_internal_service_server::ConcertInternalServiceServer,
    concert_service_server::ConcertServiceServer,
};
use stagedoor_runtime::{
    auth::TokenValidator,
    db::{self, PoolConfig, StartupError},
    server::{GrpcServer, ServiceHandle},
    ShutdownTrigger,
};
use tokio::net::TcpListener;

use crate::{
    config::ConcertConfig,
    grpc::{ConcertApi, ConcertState},
};

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
    let api = ConcertApi::new(ConcertState {
        pool,
        dates: Default::default(),
        tokens,
        hold_ttl: config.hold_ttl,
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
    Ok(ServiceHandle::new(local_addr, trigger, server, Vec::new()))
}
