//! Wiring: pool, migrations and the gRPC server of one point process.

use stagedoor_proto::point::v1::{
    point_internal_service_server::PointInternalServiceServer,
    point_service_server::PointServiceServer,
};
use stagedoor_runtime::{
    db::{self, PoolConfig, StartupError},
    server::{GrpcServer, Port, ServiceHandle},
    ShutdownTrigger,
};

use crate::{config::PointConfig, grpc::PointApi};

/// The point service's migrations, embedded in the binary: a fresh `Migrator` each time, since
/// `db::migrate` sets how it locks.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// Connects, migrates and starts serving on `port`.
pub async fn start(
    config: PointConfig,
    port: impl Into<Port>,
) -> Result<ServiceHandle, StartupError> {
    let pool = db::connect(&PoolConfig::new(
        config.database_url.clone(),
        db::POINT.schema,
        config.database_max_connections,
    ))
    .await?;
    db::migrate(&pool, db::POINT.schema, migrator()).await?;

    let api = PointApi::new(pool, &config);
    let trigger = ShutdownTrigger::default();
    let service = GrpcServer::new()
        .add_service(PointServiceServer::new(api.clone()))
        .add_service(PointInternalServiceServer::new(api))
        .spawn(port, trigger, Vec::new())?;
    tracing::info!(local_addr = %service.local_addr(), max_amount = config.max_amount,
        balance_cap = config.balance_cap, "point service started");
    Ok(service)
}
