//! `stagedoor`: the command for people. `up` brings the services up against a local Postgres;
//! `load` runs the benchmark scenarios.

mod load;
mod mesh;
mod seed;
mod stats;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use stagedoor_concert::ConcertConfig;
use stagedoor_point::PointConfig;
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{config::parse_duration, db, telemetry};

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
    /// Load the demo catalog into a running concert service (idempotent).
    Seed {
        /// The concert service.
        #[arg(long, env = "CONCERT_URL", default_value = "http://127.0.0.1:50052")]
        concert_url: String,
    },
    /// Run a benchmark scenario and print throughput and p50/p99.
    Load {
        #[command(subcommand)]
        scenario: load::Scenario,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Admin connection used to create the database, roles and schemas.
    #[arg(long, env = "ADMIN_DATABASE_URL", default_value = mesh::DEFAULT_ADMIN_URL)]
    admin_url: String,
    /// The database the services share (each in its own schema, as its own role).
    #[arg(long, default_value = "stagedoor")]
    database: String,
    /// Where the queue service listens.
    #[arg(long, default_value = "0.0.0.0:50051")]
    queue_addr: SocketAddr,
    /// Where the concert service listens.
    #[arg(long, default_value = "0.0.0.0:50052")]
    concert_addr: SocketAddr,
    /// How long a hold keeps its seats.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    hold_ttl: Duration,
    /// Where the point service listens.
    #[arg(long, default_value = "0.0.0.0:50053")]
    point_addr: SocketAddr,
    /// Most tokens ACTIVE at once per concert.
    #[arg(long, default_value_t = 1000)]
    max_active: u32,
    /// Most fans admitted per second per concert.
    #[arg(long, default_value_t = 200)]
    admit_rate: u32,
    /// How long an admitted fan stays ACTIVE.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    active_ttl: Duration,
    /// How long a WAITING fan may stay silent before the token expires.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    idle_ttl: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Up(args) => {
            telemetry::init();
            up(args).await
        }
        Command::Seed { concert_url } => {
            telemetry::init();
            seed_and_show(&concert_url).await.map(|_| ())
        }
        Command::Load { scenario } => {
            telemetry::init();
            load::run(scenario).await
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stagedoor: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn up(args: UpArgs) -> Result<(), Box<dyn std::error::Error>> {
    let database = mesh::Database::provision(&args.admin_url, &args.database)
        .await
        .map_err(|error| {
            format!(
                "{error}\n  stagedoor needs a PostgreSQL it can administer: start one on 127.0.0.1:5432 \
                 (e.g. `pg_ctlcluster 15 main start`) or point ADMIN_DATABASE_URL at one."
            )
        })?;
    let mut queue = QueueConfig::for_database(database.url(db::QUEUE));
    queue.max_active = args.max_active;
    queue.admit_rate = args.admit_rate;
    queue.active_ttl = args.active_ttl;
    queue.idle_ttl = args.idle_ttl;
    queue.validate()?;
    let point = PointConfig::for_database(database.url(db::POINT));
    point.validate()?;
    let mut concert = ConcertConfig::new(database.url(db::CONCERT), String::new());
    concert.hold_ttl = args.hold_ttl;

    let queue = mesh::start_on(args.queue_addr, |listener| {
        stagedoor_queue::start(queue, listener)
    })
    .await?;
    let point = mesh::start_on(args.point_addr, |listener| {
        stagedoor_point::start(point, listener)
    })
    .await?;
    concert.queue_url = queue.url();
    concert.validate()?;
    let concert = mesh::start_on(args.concert_addr, |listener| {
        stagedoor_concert::start(concert, listener)
    })
    .await?;

    println!("stagedoor is up (database `{}`)", args.database);
    println!(
        "  queue    {}   stagedoor.queue.v1.QueueService, QueueInternalService",
        queue.url()
    );
    println!(
        "  concert  {}   stagedoor.concert.v1.ConcertService, ConcertInternalService, ConcertAdminService",
        concert.url()
    );
    println!(
        "  point    {}   stagedoor.point.v1.PointService, PointInternalService",
        point.url()
    );
    let seeded = seed_and_show(&concert.url()).await?;
    let demo_concert = seeded.concerts[0].0.clone();
    println!();
    println!("Try it (buf curl reads the API from server reflection; no proto files needed):");
    println!("  buf curl --protocol grpc --http2-prior-knowledge \\");
    println!("    -d '{{\"concert_id\":\"{demo_concert}\",\"user_id\":\"fan-1\"}}' \\");
    println!(
        "    {}/stagedoor.queue.v1.QueueService/IssueToken",
        queue.url()
    );
    println!("  buf curl --protocol grpc --http2-prior-knowledge \\");
    println!(
        "    -d '{{\"user_id\":\"fan-1\",\"amount\":\"50000\",\"request_id\":\"top-up-1\"}}' \\"
    );
    println!(
        "    {}/stagedoor.point.v1.PointService/ChargePoints",
        point.url()
    );
    println!();
    println!("Ctrl-C stops it.");
    stagedoor_runtime::shutdown::os_signal().await;
    println!("stopping: finishing calls in flight ...");
    // Stop in reverse order of dependency: nothing calls point or queue after this.
    for (name, service) in [("concert", concert), ("point", point), ("queue", queue)] {
        if let Err(error) = service.shutdown().await {
            eprintln!("stagedoor: {name} stopped with an error: {error}");
        }
    }
    println!("stagedoor stopped cleanly");
    Ok(())
}

/// Seeds the demo catalog (idempotent) and prints it.
async fn seed_and_show(concert_url: &str) -> Result<seed::Seeded, Box<dyn std::error::Error>> {
    let channel = tonic::transport::Channel::from_shared(concert_url.to_owned())?
        .connect()
        .await
        .map_err(|error| format!("cannot reach the concert service at {concert_url}: {error}"))?;
    let seeded = seed::seed(channel).await?;
    println!();
    println!("Demo catalog (ListConcerts needs no token; the rest needs an ACTIVE queue token):");
    for (concert_id, title, dates) in &seeded.concerts {
        println!("  {title:<16} {concert_id}   dates: {}", dates.join(" "));
    }
    Ok(seeded)
}
