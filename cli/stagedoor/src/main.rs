//! `stagedoor`: the command for people. `up` brings the four services up against a local
//! Postgres; `demo` stages a sale and checks the result; `load` runs the benchmark scenarios;
//! `health` probes a service.

mod demo;
mod load;
mod mesh;
mod pg;
mod seed;
mod stats;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use stagedoor_runtime::{config::parse_duration, telemetry};

#[global_allocator]
static ALLOCATOR: stagedoor_runtime::Allocator = stagedoor_runtime::Allocator;

#[derive(Debug, Parser)]
#[command(
    name = "stagedoor",
    version,
    about = "stagedoor: a concert ticketing backend that survives the minute a sale opens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Provision the database and run the services until Ctrl-C.
    Up(UpArgs),
    /// Load the demo catalog into a running concert service (idempotent within a month: its
    /// dates are the month after next).
    Seed {
        /// The concert service.
        #[arg(long, env = "CONCERT_URL", default_value = "http://127.0.0.1:50052")]
        concert_url: String,
    },
    /// Bring the mesh up and stage a sale: fans rush, queue, hold, pay; then a verdict.
    Demo(demo::DemoArgs),
    /// Check a service's grpc.health.v1 status (exit 0 when SERVING): for health probes.
    Health {
        /// The service, e.g. http://127.0.0.1:50051.
        url: String,
    },
    /// Run a benchmark scenario and print throughput and p50/p99.
    Load {
        #[command(subcommand)]
        command: load::LoadCommand,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// A Postgres superuser URL to provision into. Unset: the server on 127.0.0.1:5432, or
    /// a throwaway cluster under target/ when none answers there.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The database the services share (each in its own schema, as its own role).
    #[arg(long, default_value = "stagedoor")]
    database: String,
    /// Where the queue service listens. Every port also serves the internal and admin APIs
    /// (README, "What to expose"), so the mesh listens on loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:50051")]
    queue_addr: SocketAddr,
    /// Where the concert service listens.
    #[arg(long, default_value = "127.0.0.1:50052")]
    concert_addr: SocketAddr,
    /// Where the point service listens.
    #[arg(long, default_value = "127.0.0.1:50053")]
    point_addr: SocketAddr,
    /// Where the payment service listens.
    #[arg(long, default_value = "127.0.0.1:50054")]
    payment_addr: SocketAddr,
    /// How long a hold keeps its seats [default: CONCERT_HOLD_TTL, else 5m].
    ///
    /// Every other setting of the services comes from the environment variables their own
    /// binaries read (README "Configuration"): QUEUE_TICK, PAYMENT_LEASE, POINT_MAX_AMOUNT, ...
    /// `DATABASE_URL`, `LISTEN_ADDR` and `SHUTDOWN_DELAY` are the exceptions: `up` gives each
    /// service its own role on `--database` and the address of its flag here, and stops at
    /// once on Ctrl-C (no balancer routes to it).
    #[arg(long, value_parser = parse_duration)]
    hold_ttl: Option<Duration>,
    /// Most tokens ACTIVE at once per concert [default: QUEUE_MAX_ACTIVE, else 1000].
    #[arg(long)]
    max_active: Option<u32>,
    /// Most fans admitted per second per concert [default: QUEUE_ADMIT_RATE, else 200].
    #[arg(long)]
    admit_rate: Option<u32>,
    /// How long an admitted fan stays ACTIVE [default: QUEUE_ACTIVE_TTL, else 30m].
    #[arg(long, value_parser = parse_duration)]
    active_ttl: Option<Duration>,
    /// How long a WAITING fan may stay silent before the token expires, give or take a few
    /// heartbeat flushes [default: QUEUE_IDLE_TTL, else 2m].
    #[arg(long, value_parser = parse_duration)]
    idle_ttl: Option<Duration>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Up(args) => {
            telemetry::init();
            up(args).await
        }
        Command::Demo(args)
        | Command::Load {
            command: load::LoadCommand::Rush(args),
        } => {
            telemetry::init_with_default("warn");
            return demo::run(args).await;
        }
        Command::Seed { concert_url } => {
            telemetry::init();
            seed_and_show(&concert_url).await.map(|_| ())
        }
        Command::Load {
            command: load::LoadCommand::Scenario(scenario),
        } => {
            telemetry::init();
            load::run(scenario).await
        }
        Command::Health { url } => return health(&url).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stagedoor: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a start-up to its end though a stop signal comes meanwhile: what it creates (a
/// database) must exist whole to be cleaned up. Says whether a signal came, for the caller to
/// stop at once and clean up; a second signal gives up on the start-up there and then, for a
/// start-up that hangs (what it made is then left behind, as the message says).
pub async fn finish_starting<T>(
    start: impl std::future::Future<Output = T>,
    signals: &mut stagedoor_runtime::shutdown::StopSignals,
) -> Result<(T, bool), Box<dyn std::error::Error>> {
    tokio::pin!(start);
    tokio::select! {
        started = &mut start => return Ok((started, false)),
        () = signals.recv() => {}
    }
    eprintln!("stagedoor: stopping once start-up is done (again to stop at once) ...");
    tokio::select! {
        started = &mut start => Ok((started, true)),
        () = signals.recv() => Err(
            "stopped during start-up; what it had made (a database, services) may be left".into()
        ),
    }
}

/// Finds a Postgres and provisions `database` in it, with a message that says what to do
/// when that fails.
pub async fn database(
    database_url: Option<&str>,
    database: &str,
) -> Result<(pg::Postgres, mesh::Database), Box<dyn std::error::Error>> {
    let postgres = pg::locate(database_url)?;
    let provisioned = mesh::Database::provision(&postgres.admin_url, database)
        .await
        .map_err(|error| {
            format!(
                "{error}\n  stagedoor needs a PostgreSQL it can administer ({}): start one on \
                 127.0.0.1:5432 (e.g. `pg_ctlcluster 15 main start`) or set DATABASE_URL to \
                 a superuser's URL, with its password where the server asks for one \
                 (postgres://postgres:PASSWORD@127.0.0.1:5432/postgres).",
                postgres.describe()
            )
        })?;
    Ok((postgres, provisioned))
}

async fn up(args: UpArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Listened for from here on, so that no Ctrl-C is lost between two waits. One during
    // start-up (a throwaway cluster starting, migrations waiting for another replica's,
    // the seeding) stops there: what was started is dropped, a throwaway cluster included.
    let mut signals = stagedoor_runtime::shutdown::StopSignals::new();
    let (postgres, mut mesh) = tokio::select! {
        started = start_up(&args) => started?,
        () = signals.recv() => {
            println!("stagedoor: stopped during start-up");
            return Ok(());
        }
    };
    println!("Ctrl-C stops it.");
    tokio::select! {
        () = signals.recv() => {
            println!("stopping: finishing calls in flight (Ctrl-C again to stop at once) ...");
        }
        // A mesh with one service down would answer half a journey: stop it all, and say why
        // (its error is printed by the shutdown below), rather than run on until Ctrl-C.
        service = mesh.ended() => {
            println!("stagedoor: the {service} service stopped on its own; stopping the others ...");
        }
    }
    // The services stop one after another, payment first, so the sagas in flight can still
    // reach their peers; each may take its drain limit when clients keep streams open. A
    // second signal gives up on them (a payment cut short is finished by recovery on the
    // next start), still stopping a throwaway Postgres below.
    let stopped: Result<(), Box<dyn std::error::Error>> = tokio::select! {
        clean = mesh.shutdown() => if clean {
            println!("stagedoor stopped cleanly");
            Ok(())
        } else {
            Err("a service stopped with an error (above)".into())
        },
        () = signals.recv() => Err("stopped at once; calls still in flight were cut off".into()),
    };
    drop(postgres);
    stopped
}

/// `up` until the mesh serves: Postgres found (or started), the services started on their
/// ports, the demo catalog seeded, and where everything listens printed.
async fn start_up(args: &UpArgs) -> Result<(pg::Postgres, mesh::Mesh), Box<dyn std::error::Error>> {
    let (postgres, database) = database(args.database_url.as_deref(), &args.database).await?;
    let mesh = mesh::Mesh::start(
        &database,
        &mesh::MeshOptions {
            queue_addr: args.queue_addr,
            concert_addr: args.concert_addr,
            point_addr: args.point_addr,
            payment_addr: args.payment_addr,
            from_environment: true,
            max_active: args.max_active,
            admit_rate: args.admit_rate,
            active_ttl: args.active_ttl,
            idle_ttl: args.idle_ttl,
            hold_ttl: args.hold_ttl,
        },
    )
    .await?;

    println!(
        "stagedoor is up (database `{}` on {})",
        args.database,
        postgres.describe()
    );
    let services = [
        ("queue", &mesh.queue, "QueueService, QueueInternalService"),
        (
            "concert",
            &mesh.concert,
            "ConcertService, ConcertInternalService, ConcertAdminService",
        ),
        ("point", &mesh.point, "PointService, PointInternalService"),
        ("payment", &mesh.payment, "PaymentService"),
    ];
    for (name, handle, apis) in services {
        println!("  {name:<8} {}   stagedoor.{name}.v1: {apis}", handle.url());
    }
    let seeded = seed_and_show(&mesh.concert.url()).await?;
    let demo_concert = seeded.concerts[0].0.clone();
    let (queue, point) = (mesh.queue.url(), mesh.point.url());
    println!();
    println!("Try it (buf curl reads the API from server reflection; README \"The journey\" has every step):");
    println!("  buf curl --protocol grpc --http2-prior-knowledge \\");
    println!("    -d '{{\"concert_id\":\"{demo_concert}\",\"user_id\":\"fan-1\"}}' \\");
    println!("    {queue}/stagedoor.queue.v1.QueueService/IssueToken");
    println!("  buf curl --protocol grpc --http2-prior-knowledge \\");
    println!(
        "    -d '{{\"user_id\":\"fan-1\",\"amount\":\"500000\",\"request_id\":\"top-up-1\"}}' \\"
    );
    println!("    {point}/stagedoor.point.v1.PointService/ChargePoints");
    println!();
    Ok((postgres, mesh))
}

/// `stagedoor health <url>`: grpc.health.v1 Check of the whole server; exit 0 when SERVING.
/// Container health checks call it, so it answers within two seconds either way.
async fn health(url: &str) -> ExitCode {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    // The services serve plain HTTP/2 (TLS, where wanted, ends at the gateway in front).
    if !url.starts_with("http://") {
        eprintln!("{url}: not a service URL; give one such as http://127.0.0.1:50051");
        return ExitCode::FAILURE;
    }
    let check = async {
        let channel = stagedoor_runtime::client::endpoint(url)?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await?;
        let response = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(response.into_inner().status())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("{url}: SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            eprintln!("{url}: {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            eprintln!("{url}: {}", with_causes(error.as_ref()));
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{url}: no answer within 2 s");
            ExitCode::FAILURE
        }
    }
}

/// `error` and each error it was caused by, outermost first: tonic's transport errors say
/// only "transport error" at the top, and the cause ("Connection refused", "dns error") is
/// what tells an operator what to fix.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        // Some layers repeat their cause's text in their own.
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = inner.source();
    }
    text
}

/// Seeds the demo catalog (idempotent) and prints it.
async fn seed_and_show(concert_url: &str) -> Result<seed::Seeded, Box<dyn std::error::Error>> {
    let channel = stagedoor_runtime::client::endpoint(concert_url)?
        .connect()
        .await
        .map_err(|error| {
            format!(
                "cannot reach the concert service at {concert_url}: {}",
                with_causes(&error)
            )
        })?;
    let seeded = seed::seed(channel).await?;
    println!();
    println!("Demo catalog (ListConcerts needs no token; the rest needs an ACTIVE queue token):");
    for (concert_id, title, dates) in &seeded.concerts {
        println!("  {title:<16} {concert_id}   dates: {}", dates.join(" "));
    }
    Ok(seeded)
}

#[cfg(test)]
mod help {
    use clap::CommandFactory;

    #[test]
    fn no_subcommand_prints_the_database_password() {
        let shown = stagedoor_runtime::config::secrets_shown_in_help(&super::Cli::command());
        assert!(shown.is_empty(), "--help prints the value of {shown:?}");
    }
}
