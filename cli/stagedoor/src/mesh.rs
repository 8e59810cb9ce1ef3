//! Bringing services up in this process against a local Postgres: provisioning (database,
//! roles, schemas) and start-up. Each service still serves real gRPC on its own port and
//! talks to its peers over gRPC, with its own role and schema, exactly as when run apart.

use std::{net::SocketAddr, str::FromStr};

use sqlx::postgres::PgConnectOptions;
use stagedoor_runtime::{
    db::{self, StartupError},
    server::{self, ServiceHandle},
};

/// Where the admin connection goes when `ADMIN_DATABASE_URL` is not set.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A provisioned database: every service's role and schema exist in it.
pub struct Database {
    pub admin_url: String,
    pub name: String,
}

impl Database {
    /// Creates `name` when missing and provisions every service's role and schema in it.
    pub async fn provision(admin_url: &str, name: &str) -> Result<Self, StartupError> {
        db::ensure_database(admin_url, name).await?;
        let options = PgConnectOptions::from_str(admin_url)
            .map_err(StartupError::BadUrl)?
            .database(name);
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| StartupError::Connect {
                url: db::redact(admin_url),
                source,
            })?;
        for service in db::ALL_SERVICES {
            db::provision(&admin, service).await?;
        }
        admin.close().await;
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
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<ServiceHandle, StartupError>>,
{
    let listener = server::bind(addr).await?;
    Ok(start(listener).await?)
}
