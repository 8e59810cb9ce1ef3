//! Wiring: pool, migrations, the peers, the recovery worker and the gRPC server of one
//! payment process.

use std::{sync::Arc, time::Duration};

use stagedoor_proto::payment::v1::payment_service_server::PaymentServiceServer;
use stagedoor_runtime::{
    auth::TokenValidator,
    background::Detached,
    db::{self, PoolConfig, StartupError},
    server::{GrpcServer, Port, ServiceHandle},
    ShutdownTrigger,
};

use crate::{
    config::PaymentConfig,
    grpc::{PaymentApi, PaymentState},
    peers::Peers,
    recovery,
    saga::{Saga, SagaSettings},
    writes::PaymentWrites,
};

/// The payment service's migrations, embedded in the binary: a fresh `Migrator` each time, since
/// `db::migrate` sets how it locks.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// Connects, migrates, starts the recovery worker and serves on `port`.
pub async fn start(
    config: PaymentConfig,
    port: impl Into<Port>,
) -> Result<ServiceHandle, StartupError> {
    config.validate().map_err(StartupError::Config)?;
    // Pay asks the queue every time: a token completed a moment ago must not pay twice.
    let tokens = TokenValidator::new(&config.queue_url, Duration::ZERO, config.call_deadline)
        .map_err(StartupError::Config)?;
    let peers = Peers::new(
        &config.queue_url,
        &config.concert_url,
        &config.point_url,
        config.call_deadline,
    )
    .map_err(StartupError::Config)?;
    let pool = db::connect(&PoolConfig::new(
        config.database_url.clone(),
        db::PAYMENT.schema,
        config.database_max_connections,
    ))
    .await?;
    db::migrate(&pool, db::PAYMENT.schema, migrator()).await?;

    let trigger = ShutdownTrigger::default();
    let (writes, mut background) = PaymentWrites::spawn(pool.clone(), config.lease);
    let saga = Arc::new(Saga {
        pool: pool.clone(),
        writes,
        peers,
        settings: SagaSettings {
            lease: config.lease,
            call_deadline: config.call_deadline,
            retry_base: config.recovery_interval,
            retry_max: config.retry_max,
            fault: config.fault,
        },
    });
    background.push((
        "payment recovery",
        tokio::spawn(recovery::run(
            saga.clone(),
            config.recovery_interval,
            trigger.subscribe(),
        )),
    ));
    let sagas = Detached::default();
    let api = PaymentApi::new(PaymentState {
        pool,
        saga,
        tokens,
        patience: config.pay_patience,
        sagas: sagas.clone(),
    });
    let service = GrpcServer::new()
        .owning(&sagas)
        .add_service(PaymentServiceServer::new(api))
        .spawn(port, trigger, background)?;
    tracing::info!(local_addr = %service.local_addr(), queue = %config.queue_url,
        concert = %config.concert_url, point = %config.point_url, fault = ?config.fault,
        "payment service started");
    Ok(service)
}
