//! `stagedoor load <scenario>`: the benchmark harness. Every figure in BENCHMARKS.md comes
//! from here, printed with the command that produced it.
//!
//! Without `--queue-url` a scenario provisions a throwaway database, starts the services it
//! needs in this process on free ports (real gRPC over loopback), runs, and drops the
//! database. With `--queue-url` it loads a mesh that is already running.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use stagedoor_proto::queue::v1::{self as pb, queue_service_client::QueueServiceClient};
use stagedoor_queue::QueueConfig;
use tonic::transport::Channel;

use crate::{mesh, stats::Summary};

/// Settings every scenario shares.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Calls in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Load a running queue service instead of starting one in this process.
    #[arg(long, env = "QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Admin connection for the throwaway database of an in-process run.
    #[arg(long, env = "ADMIN_DATABASE_URL", default_value = mesh::DEFAULT_ADMIN_URL)]
    pub admin_url: String,
    /// QUEUE_MAX_ACTIVE of an in-process queue.
    #[arg(long, default_value_t = 1000)]
    pub max_active: u32,
    /// QUEUE_ADMIT_RATE of an in-process queue.
    #[arg(long, default_value_t = 200)]
    pub admit_rate: u32,
}

/// The scenarios.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Scenario {
    /// IssueToken throughput: distinct fans rushing one concert.
    IssueToken {
        /// Fans to issue tokens to.
        #[arg(long, default_value_t = 20_000)]
        fans: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// GetQueueStatus throughput with a long line (100,000 fans WAITING by default).
    QueueStatus {
        /// Fans WAITING in line while the polls run (the ACTIVE ones come on top).
        #[arg(long, default_value_t = 100_000)]
        waiting: usize,
        /// How long to poll.
        #[arg(long, default_value = "15s", value_parser = stagedoor_runtime::config::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        load: LoadArgs,
    },
}

/// Runs a scenario and prints its figures.
pub async fn run(scenario: Scenario) -> Result<(), Box<dyn std::error::Error>> {
    let load = match &scenario {
        Scenario::IssueToken { load, .. } | Scenario::QueueStatus { load, .. } => load.clone(),
    };
    let target = Target::start(&load).await?;
    let clients = target.clients(load.connections).await?;
    let concert = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    println!(
        "stagedoor load: {} connection(s), {} calls in flight, concert {concert}, {}",
        load.connections,
        load.concurrency,
        target.describe()
    );

    match scenario {
        Scenario::IssueToken { fans, .. } => {
            let (summary, _) = issue_and_keep(&clients, &concert, fans, load.concurrency).await;
            println!("{}", summary.line());
        }
        Scenario::QueueStatus {
            waiting, duration, ..
        } => {
            // Fill the line: the admitted fans plus `waiting` more.
            let fans = waiting + load.max_active as usize;
            println!("filling the line with {fans} fans ...");
            let (fill, tokens) = issue_and_keep(&clients, &concert, fans, load.concurrency).await;
            println!("{}", fill.line());
            let mut client = clients[0].clone();
            let last = pb::GetQueueStatusRequest {
                token: tokens.last().cloned().unwrap_or_default(),
            };
            let position = client
                .get_queue_status(last)
                .await?
                .into_inner()
                .ticket
                .map(|t| t.position)
                .unwrap_or(0);
            println!("the last fan has {position} fans ahead; one poll per fan, then polling for {duration:?} ...");
            let tokens = Arc::new(tokens);
            let poll = |tokens: Arc<Vec<String>>| {
                let clients = clients.clone();
                move |call: usize| {
                    let mut client = clients[call % clients.len()].clone();
                    // A stride through the line: consecutive polls ask for distant fans.
                    let token = tokens[(call.wrapping_mul(7_919)) % tokens.len()].clone();
                    async move {
                        client
                            .get_queue_status(pb::GetQueueStatusRequest { token })
                            .await
                            .map(|_| ())
                    }
                }
            };
            // First poll of every fan: the replica has not seen the token yet and reads it
            // from Postgres. Then the steady state of fans polling again and again.
            let cold = drive(
                "status-first",
                Some(tokens.len()),
                None,
                load.concurrency,
                poll(tokens.clone()),
            )
            .await;
            println!("{}", cold.line());
            let summary = drive(
                "status-steady",
                None,
                Some(duration),
                load.concurrency,
                poll(tokens),
            )
            .await;
            println!("{}", summary.line());
        }
    }
    target.stop().await;
    Ok(())
}

/// Issues `fans` tokens and returns the timings and the tokens in place order.
async fn issue_and_keep(
    clients: &[QueueServiceClient<Channel>],
    concert: &str,
    fans: usize,
    concurrency: usize,
) -> (Summary, Vec<String>) {
    let issued = Arc::new(std::sync::Mutex::new(Vec::with_capacity(fans)));
    let summary = drive("issue-token", Some(fans), None, concurrency, {
        let (clients, concert, issued) = (clients.to_vec(), concert.to_owned(), issued.clone());
        move |call| {
            let mut client = clients[call % clients.len()].clone();
            let (concert, issued) = (concert.clone(), issued.clone());
            async move {
                let ticket = client
                    .issue_token(pb::IssueTokenRequest {
                        concert_id: concert,
                        user_id: format!("fan-{call}"),
                    })
                    .await?
                    .into_inner()
                    .ticket
                    .unwrap_or_default();
                issued
                    .lock()
                    .expect("token list")
                    .push((ticket.place, ticket.token));
                Ok(())
            }
        }
    })
    .await;
    let mut tokens = std::mem::take(&mut *issued.lock().expect("token list"));
    tokens.sort_unstable();
    (
        summary,
        tokens.into_iter().map(|(_, token)| token).collect(),
    )
}

/// Runs `call(0), call(1), ...` with `concurrency` calls in flight, until `total` calls or
/// `duration`, whichever comes first, timing each call.
pub async fn drive<F, Fut>(
    name: &str,
    total: Option<usize>,
    duration: Option<Duration>,
    concurrency: usize,
    call: F,
) -> Summary
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let (next, call) = (next.clone(), call.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|total| index >= total)
                    || deadline.is_some_and(|deadline| Instant::now() >= deadline)
                {
                    break;
                }
                let began = Instant::now();
                match call(index).await {
                    Ok(()) => latencies.push(began.elapsed()),
                    Err(status) => errors.push(status),
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut worker_latencies, worker_errors) = worker.await.expect("load worker");
        latencies.append(&mut worker_latencies);
        if let Some(first) = worker_errors.first() {
            if errors == 0 {
                eprintln!("{name}: first error: {first:?}");
            }
        }
        errors += worker_errors.len();
    }
    Summary {
        name: name.to_owned(),
        elapsed: started.elapsed(),
        latencies,
        errors,
    }
}

/// What a run loads: an in-process queue on a throwaway database, or a running one.
enum Target {
    InProcess {
        service: stagedoor_runtime::server::ServiceHandle,
        database: mesh::Database,
    },
    Remote(String),
}

impl Target {
    async fn start(load: &LoadArgs) -> Result<Self, Box<dyn std::error::Error>> {
        if let Some(url) = &load.queue_url {
            return Ok(Self::Remote(url.clone()));
        }
        let name = format!("stagedoor_load_{}", uuid::Uuid::new_v4().simple());
        let database = mesh::Database::provision(&load.admin_url, &name).await?;
        let mut config = QueueConfig::for_database(database.url(stagedoor_runtime::db::QUEUE));
        config.max_active = load.max_active;
        config.admit_rate = load.admit_rate;
        config.database_max_connections = 16;
        let service = mesh::start_queue(config, "127.0.0.1:0".parse()?).await?;
        Ok(Self::InProcess { service, database })
    }

    fn url(&self) -> String {
        match self {
            Self::InProcess { service, .. } => service.url(),
            Self::Remote(url) => url.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::InProcess { service, .. } => {
                format!(
                    "in-process queue at {} on a throwaway database",
                    service.url()
                )
            }
            Self::Remote(url) => format!("queue at {url}"),
        }
    }

    async fn clients(
        &self,
        connections: usize,
    ) -> Result<Vec<QueueServiceClient<Channel>>, tonic::transport::Error> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let channel = Channel::from_shared(self.url())
                .expect("service URL")
                .connect()
                .await?;
            clients.push(QueueServiceClient::new(channel));
        }
        Ok(clients)
    }

    async fn stop(self) {
        if let Self::InProcess { service, database } = self {
            let _ = service.shutdown().await;
            if let Err(error) = database.drop_database().await {
                eprintln!("warning: the throwaway database was not dropped: {error}");
            }
        }
    }
}
