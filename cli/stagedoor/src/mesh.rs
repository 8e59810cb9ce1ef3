//! Bringing services up in this process against a local Postgres: provisioning (database,
//! roles, schemas) and start-up. Each service still serves real gRPC on its own port and
//! talks to its peers over gRPC, with its own role and schema, exactly as when run apart.

use std::{net::SocketAddr, time::Duration};

use stagedoor_concert::ConcertConfig;
use stagedoor_payment::PaymentConfig;
use stagedoor_point::PointConfig;
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{
    db::{self, StartupError},
    server::{self, ServiceHandle},
};

/// A provisioned database: every service's role and schema exist in it.
pub struct Database {
    pub admin_url: String,
    pub name: String,
}

impl Database {
    /// Creates `name` when missing and provisions every service's role and schema in it.
    pub async fn provision(admin_url: &str, name: &str) -> Result<Self, StartupError> {
        db::provision_database(admin_url, name).await?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `DATABASE_URL` of a service's own role on this database.
    pub fn url(&self, service: db::ServiceSchema) -> String {
        db::service_url(&self.admin_url, &self.name, service).expect("admin URL was parsed before")
    }

    /// Drops the database (for throwaway load runs), closing whatever is still connected.
    pub async fn drop_database(self) -> Result<(), sqlx::Error> {
        db::drop_database(&self.admin_url, &self.name).await
    }
}

/// Starts a service on `addr` (port 0 picks a free one) the way its binary does.
pub async fn start_on<F, Fut>(
    addr: SocketAddr,
    start: F,
) -> Result<ServiceHandle, Box<dyn std::error::Error>>
where
    F: FnOnce(server::Port) -> Fut,
    Fut: std::future::Future<Output = Result<ServiceHandle, StartupError>>,
{
    let port = server::bind(addr).await?;
    Ok(start(port).await?)
}

/// How to run the four services.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub queue_addr: SocketAddr,
    pub concert_addr: SocketAddr,
    pub point_addr: SocketAddr,
    pub payment_addr: SocketAddr,
    /// Start from the settings each service's own binary would read from the environment
    /// (`up`: an operator's `QUEUE_TICK` or `PAYMENT_LEASE` applies as it would to the
    /// binary), or from the built-in defaults (the demo, whose run must not depend on what a
    /// shell happened to export). The fields below override either.
    pub from_environment: bool,
    pub max_active: Option<u32>,
    pub admit_rate: Option<u32>,
    pub active_ttl: Option<Duration>,
    pub idle_ttl: Option<Duration>,
    pub hold_ttl: Option<Duration>,
}

impl MeshOptions {
    /// A service's settings as `from_environment` says. Its database, address and peers are
    /// set by [`Mesh::start`] afterwards, whatever `DATABASE_URL` or `LISTEN_ADDR` say.
    fn settings<C: clap::Parser>(
        &self,
        binary: &str,
        defaults: impl FnOnce() -> C,
    ) -> Result<C, Box<dyn std::error::Error>> {
        if self.from_environment {
            // The address and the shutdown delay are given on the command line, which clap
            // ranks above the environment: a LISTEN_ADDR or SHUTDOWN_DELAY meant for
            // something else (Go's `:8080`, say) is then never parsed, as `up` promises to
            // ignore them. The values are unused.
            let ignored = ["--listen-addr", "127.0.0.1:0", "--shutdown-delay", "0s"];
            C::try_parse_from(std::iter::once(binary).chain(ignored)).map_err(|error| {
                format!("{binary}'s settings from the environment: {error}").into()
            })
        } else {
            Ok(defaults())
        }
    }
}

/// Connections the mesh leaves free for its caller (the demo's audit pool, a psql).
const SPARE_CONNECTIONS: i64 = 4;
/// The smallest pool a service is started with: fewer, and one slow statement stalls it.
const MIN_POOL: i64 = 4;

/// The most connections each of the pools about to start (`configured`: their sizes as
/// configured) may open: what the server has free, shared equally, less the spare. Four
/// pools of 16 are 64 connections at the height of a sale; on a server with Postgres's
/// default of 100 that other clients share (an application, a test run, a second demo that
/// has already grown its pools), pools of 16 would run into "too many clients", which a pool
/// only reports as a timeout after waiting for a connection (DATABASE_UNAVAILABLE, and calls
/// seconds slow). Smaller pools only make calls queue. Best effort: a client that starts at
/// the same moment, or has not opened its connections yet, is not seen.
pub async fn pool_cap(
    admin_url: &str,
    configured: &[u32],
) -> Result<u32, Box<dyn std::error::Error>> {
    let (free, max_connections) = db::free_connections(admin_url).await?;
    let needed: i64 = configured
        .iter()
        .map(|pool| i64::from(*pool).min(MIN_POOL))
        .sum::<i64>()
        + SPARE_CONNECTIONS;
    if free < needed {
        return Err(format!(
            "Postgres accepts only {} more connections (max_connections = {max_connections}, \
             the rest are in use); the services need at least {needed}. Stop other clients \
             of this server, or raise its max_connections.",
            free.max(0)
        )
        .into());
    }
    let share = (free - SPARE_CONNECTIONS) / configured.len().max(1) as i64;
    let cap = u32::try_from(share.max(1)).unwrap_or(u32::MAX);
    if configured.iter().any(|pool| *pool > cap) {
        println!(
            "  Postgres has {free} connections free (max_connections = {max_connections}): \
             each service's pool is capped at {cap}"
        );
    }
    Ok(cap)
}

/// The four services running in this process, each on its own port with its own role.
pub struct Mesh {
    pub queue: ServiceHandle,
    pub concert: ServiceHandle,
    pub point: ServiceHandle,
    pub payment: ServiceHandle,
}

impl Mesh {
    /// Starts queue, point, concert and payment (in that order: each after what it calls).
    pub async fn start(
        database: &Database,
        options: &MeshOptions,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        // Every service's settings first, so that a variable that does not parse is refused
        // before any service starts.
        let mut queue = options.settings("stagedoor-queue", || QueueConfig::for_database(""))?;
        let mut point = options.settings("stagedoor-point", || PointConfig::for_database(""))?;
        let mut concert = options.settings("stagedoor-concert", || ConcertConfig::new("", ""))?;
        let mut payment =
            options.settings("stagedoor-payment", || PaymentConfig::new("", "", "", ""))?;
        let pools = [
            &mut queue.database_max_connections,
            &mut point.database_max_connections,
            &mut concert.database_max_connections,
            &mut payment.database_max_connections,
        ];
        let configured: Vec<u32> = pools.iter().map(|pool| **pool).collect();
        let cap = pool_cap(&database.admin_url, &configured).await?;
        for pool in pools {
            *pool = (*pool).min(cap);
        }
        queue.database_url = database.url(db::QUEUE);
        queue.max_active = options.max_active.unwrap_or(queue.max_active);
        queue.admit_rate = options.admit_rate.unwrap_or(queue.admit_rate);
        queue.active_ttl = options.active_ttl.unwrap_or(queue.active_ttl);
        queue.idle_ttl = options.idle_ttl.unwrap_or(queue.idle_ttl);
        queue.validate()?;
        point.database_url = database.url(db::POINT);
        point.validate()?;
        let queue = start_on(options.queue_addr, |listener| {
            stagedoor_queue::start(queue, listener)
        })
        .await?;
        let point = start_on(options.point_addr, |listener| {
            stagedoor_point::start(point, listener)
        })
        .await?;
        concert.database_url = database.url(db::CONCERT);
        concert.queue_url = queue.url();
        concert.hold_ttl = options.hold_ttl.unwrap_or(concert.hold_ttl);
        concert.validate()?;
        let concert = start_on(options.concert_addr, |listener| {
            stagedoor_concert::start(concert, listener)
        })
        .await?;
        payment.database_url = database.url(db::PAYMENT);
        payment.queue_url = queue.url();
        payment.concert_url = concert.url();
        payment.point_url = point.url();
        payment.validate()?;
        let payment = start_on(options.payment_addr, |listener| {
            stagedoor_payment::start(payment, listener)
        })
        .await?;
        Ok(Self {
            queue,
            concert,
            point,
            payment,
        })
    }

    /// Resolves when one of the services has ended without being asked to (its transport or
    /// a background task failed: `ServiceHandle::ended`), with its name. Cancel-safe.
    pub async fn ended(&mut self) -> &'static str {
        tokio::select! {
            () = self.queue.ended() => "queue",
            () = self.concert.ended() => "concert",
            () = self.point.ended() => "point",
            () = self.payment.ended() => "payment",
        }
    }

    /// Graceful stop, callers first: nothing calls a service after it stopped.
    pub async fn shutdown(self) -> bool {
        let mut clean = true;
        for (name, service) in [
            ("payment", self.payment),
            ("concert", self.concert),
            ("point", self.point),
            ("queue", self.queue),
        ] {
            if let Err(error) = service.shutdown().await {
                eprintln!("stagedoor: {name} stopped with an error: {error}");
                clean = false;
            }
        }
        clean
    }
}
