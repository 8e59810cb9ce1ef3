//! `stagedoor load <scenario>`: the benchmark harness. Every figure in BENCHMARKS.md comes
//! from here, printed with the command that produced it.
//!
//! Unless the URLs of every service it needs are given (`--queue-url`, `--concert-url`,
//! `--point-url`), a scenario provisions a throwaway database, starts those services in this
//! process on free ports (real gRPC over loopback, each as its own role, concert checking
//! tokens with the queue over gRPC), runs, and drops the database.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use stagedoor_concert::ConcertConfig;
use stagedoor_payment::PaymentConfig;
use stagedoor_point::PointConfig;
use stagedoor_proto::{
    concert::v1::{
        self as concert_pb, concert_admin_service_client::ConcertAdminServiceClient,
        concert_service_client::ConcertServiceClient,
    },
    payment::v1::{self as payment_pb, payment_service_client::PaymentServiceClient},
    point::v1::{
        self as point, point_internal_service_client::PointInternalServiceClient,
        point_service_client::PointServiceClient,
    },
    queue::v1::{
        self as pb, queue_internal_service_client::QueueInternalServiceClient,
        queue_service_client::QueueServiceClient,
    },
};
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{auth::with_bearer, db};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

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
    /// Instances of each service started in this process, all on the one database (as
    /// replicas behind a load balancer would be); the connections are spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub replicas: u16,
    /// Load a running queue instead of starting one in this process (with the other URLs a
    /// scenario needs).
    #[arg(long)]
    pub queue_url: Option<String>,
    /// Load a running concert service (its QUEUE_URL must be the --queue-url given).
    #[arg(long)]
    pub concert_url: Option<String>,
    /// Load a running point service.
    #[arg(long)]
    pub point_url: Option<String>,
    /// Load a running payment service (its peers must be the other URLs given).
    #[arg(long)]
    pub payment_url: Option<String>,
    /// A Postgres superuser URL for the throwaway database of an in-process run. Unset: the
    /// server on 127.0.0.1:5432, or a throwaway cluster under target/ (as `up` and `demo`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// QUEUE_MAX_ACTIVE of an in-process queue.
    #[arg(long, default_value_t = 1000)]
    pub max_active: u32,
    /// QUEUE_ADMIT_RATE of an in-process queue.
    #[arg(long, default_value_t = 200)]
    pub admit_rate: u32,
}

/// Settings of the wallet scenarios.
#[derive(Debug, Clone, clap::Args)]
pub struct WalletArgs {
    /// Calls to make.
    #[arg(long, default_value_t = 50_000)]
    pub calls: usize,
    /// Wallets the calls are spread over (1: every call on one hot wallet).
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// What `stagedoor load` runs: a scenario that measures one part, or the whole rush.
#[derive(Debug, clap::Subcommand)]
pub enum LoadCommand {
    #[command(flatten)]
    Scenario(Scenario),
    /// The whole sale under load: the demo's rush (10,000 fans for 500 seats by default),
    /// its time to sell out, throughput and p50/p99 of every RPC, and its verdict. The same
    /// code as `stagedoor demo`: one harness, whichever name it is called by.
    Rush(crate::demo::DemoArgs),
}

/// The scenarios that measure one part of the mesh.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Scenario {
    /// IssueToken throughput: distinct fans rushing one concert (or several at once).
    IssueToken {
        /// Fans to issue tokens to.
        #[arg(long, default_value_t = 20_000)]
        fans: usize,
        /// Concerts on sale at once, each with its own line; fan n queues for concert
        /// n mod `concerts`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
        concerts: u16,
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
    /// ChargePoints throughput, spread over `--users` wallets (`--users 1`: one hot wallet).
    Charge(WalletArgs),
    /// SpendPoints throughput (wallets are charged first), spread over `--users` wallets.
    Spend(WalletArgs),
    /// HoldSeats throughput, every fan holding a different seat (dates of 1,000 seats).
    HoldSpread {
        /// Holds to make (one fan, one token, one seat each).
        #[arg(long, default_value_t = 20_000)]
        holds: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Fans racing for ONE seat, all at once: one winner, and how long losing takes.
    HoldRace {
        /// Fans in the race.
        #[arg(long, default_value_t = 1_000)]
        fans: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// ListAvailableSeats throughput on a 50-seat date (token checked on every call).
    ListSeats {
        /// How long to call.
        #[arg(long, default_value = "10s", value_parser = stagedoor_runtime::config::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Pay end to end across the four services: every fan holds one seat and has the
    /// points; the Pay calls alone are timed, then the share of each hop is printed.
    Pay {
        /// Payments to make (one fan, one token, one seat each).
        #[arg(long, default_value_t = 5_000)]
        payments: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// grpc.health.v1 Check on the queue: the gRPC stack alone, no database, the floor under
    /// every other figure (`--concurrency 10000 --connections 100`: ten thousand at once).
    Health {
        /// Checks to make.
        #[arg(long, default_value_t = 10_000)]
        calls: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The queue's ValidateToken alone: the hop every token-bearing call pays.
    ValidateToken {
        /// How long to call.
        #[arg(long, default_value = "10s", value_parser = stagedoor_runtime::config::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        load: LoadArgs,
    },
}

impl Scenario {
    fn load(&self) -> &LoadArgs {
        match self {
            Self::IssueToken { load, .. }
            | Self::QueueStatus { load, .. }
            | Self::HoldSpread { load, .. }
            | Self::HoldRace { load, .. }
            | Self::ListSeats { load, .. }
            | Self::Pay { load, .. }
            | Self::Health { load, .. }
            | Self::ValidateToken { load, .. } => load,
            Self::Charge(wallet) | Self::Spend(wallet) => &wallet.load,
        }
    }

    /// The services the scenario needs running.
    fn services(&self) -> &'static [Service] {
        match self {
            Self::IssueToken { .. }
            | Self::QueueStatus { .. }
            | Self::ValidateToken { .. }
            | Self::Health { .. } => &[Service::Queue],
            Self::Charge(_) | Self::Spend(_) => &[Service::Point],
            Self::HoldSpread { .. } | Self::HoldRace { .. } | Self::ListSeats { .. } => {
                &[Service::Queue, Service::Concert]
            }
            Self::Pay { .. } => &[
                Service::Queue,
                Service::Concert,
                Service::Point,
                Service::Payment,
            ],
        }
    }

    /// ACTIVE tokens the scenario needs at once (the in-process queue's cap must allow it).
    fn active_fans(&self) -> u32 {
        match self {
            Self::HoldSpread { holds, .. } => *holds as u32,
            Self::HoldRace { fans, .. } => *fans as u32,
            Self::Pay { payments, .. } => *payments as u32,
            _ => 0,
        }
    }
}

/// Runs a scenario and prints its figures.
pub async fn run(scenario: Scenario) -> Result<(), Box<dyn std::error::Error>> {
    let load = scenario.load().clone();
    // Listened for from the start: Ctrl-C (or SIGTERM) ends the run, and whatever way it
    // ends, an error included, the services it started stop and its throwaway database and
    // cluster go. (Without a handler the process died on the spot and left them behind.)
    let mut signals = stagedoor_runtime::shutdown::StopSignals::new();
    // Not cut short by a first signal: it creates the database that `stop` drops.
    let (started, stop_now) = crate::finish_starting(
        Target::start(&load, scenario.services(), scenario.active_fans()),
        &mut signals,
    )
    .await?;
    let target = started?;
    if stop_now {
        target.stop().await;
        return Err("stopped before the run began".into());
    }
    let outcome = tokio::select! {
        biased;
        () = signals.recv() => Err("stopped by a signal before the run was over".into()),
        outcome = run_on(scenario, &load, &target) => outcome,
    };
    target.stop().await;
    outcome
}

/// The scenario's run against services already up.
async fn run_on(
    scenario: Scenario,
    load: &LoadArgs,
    target: &Target,
) -> Result<(), Box<dyn std::error::Error>> {
    // The first service a scenario needs is the one it mostly calls (the queue for every
    // scenario that needs tokens).
    let channels = target
        .channels(scenario.services()[0], load.connections)
        .await?;
    let clients = clients_of(&channels, QueueServiceClient::new);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let concert = format!("bench-{run_id}");
    let lines: Vec<String> = match scenario {
        Scenario::IssueToken { concerts, .. } if concerts > 1 => (0..concerts)
            .map(|line| format!("{concert}-{line}"))
            .collect(),
        _ => vec![concert.clone()],
    };
    if matches!(
        scenario,
        Scenario::IssueToken { .. } | Scenario::QueueStatus { .. } | Scenario::ValidateToken { .. }
    ) {
        // These scenarios queue for concerts no concert service knows: their lines are
        // opened the way the concert service opens a new concert's.
        QueueInternalServiceClient::new(channels[0].clone())
            .open_lines(pb::OpenLinesRequest {
                concert_ids: lines.clone(),
            })
            .await?;
    }
    println!(
        "stagedoor load: {} connection(s), {} calls in flight, {}",
        channels.len(),
        load.concurrency,
        target.describe()
    );

    match scenario {
        Scenario::IssueToken { fans, .. } => {
            let (summary, _) = issue_and_keep(&clients, &lines, fans, load.concurrency).await;
            println!("{}", summary.line());
        }
        Scenario::QueueStatus {
            waiting, duration, ..
        } => {
            // Fill the line: the admitted fans plus `waiting` more.
            let fans = waiting + load.max_active as usize;
            println!("filling the line with {fans} fans ...");
            let (fill, tokens) = issue_and_keep(&clients, &lines, fans, load.concurrency).await;
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
        Scenario::Charge(wallet) => {
            let clients = clients_of(&channels, PointServiceClient::new);
            let users = wallet.users.max(1);
            let summary = charges(
                "charge",
                clients,
                &run_id,
                users,
                wallet.calls,
                |_| 1_000,
                load.concurrency,
            )
            .await;
            println!("{}", summary.line());
        }
        Scenario::Spend(wallet) => {
            let public = clients_of(&channels, PointServiceClient::new);
            let internal = clients_of(&channels, PointInternalServiceClient::new);
            let users = wallet.users.max(1);
            // Every wallet gets enough for its share of the spends (in charges of at most
            // the default POINT_MAX_AMOUNT).
            let per_user = (wallet.calls.div_ceil(users) as i64) * 1_000;
            let top_ups = (per_user as usize).div_ceil(1_000_000);
            println!("charging {users} wallet(s) with {per_user} each ...");
            let top_up =
                move |call: usize| (per_user - (call / users) as i64 * 1_000_000).min(1_000_000);
            let setup = charges(
                "top-up",
                public,
                &run_id,
                users,
                users * top_ups,
                top_up,
                load.concurrency,
            )
            .await;
            println!("{}", setup.line());
            let summary = drive(
                "spend",
                Some(wallet.calls),
                None,
                load.concurrency,
                move |call| {
                    let mut client = internal[call % internal.len()].clone();
                    let run_id = run_id.clone();
                    async move {
                        client
                            .spend_points(point::SpendPointsRequest {
                                user_id: format!("fan-{run_id}-{}", call % users),
                                amount: 1_000,
                                payment_id: format!("payment-{run_id}-{call}"),
                            })
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await;
            println!("{}", summary.line());
        }
        Scenario::HoldSpread { holds, .. } => {
            let seats =
                ConcertRun::prepare(target, load, &clients, holds.div_ceil(1_000), 1_000, holds)
                    .await?;
            let (publics, tokens, dates) =
                (seats.publics, Arc::new(seats.tokens), Arc::new(seats.dates));
            let summary = drive(
                "hold-spread",
                Some(holds),
                None,
                load.concurrency,
                move |call| {
                    let mut client = publics[call % publics.len()].clone();
                    let request = spread_hold(call, &dates, &tokens);
                    async move { client.hold_seats(request).await.map(|_| ()) }
                },
            )
            .await;
            println!("{}", summary.line());
        }
        Scenario::HoldRace { fans, .. } => {
            let seats = ConcertRun::prepare(target, load, &clients, 1, 50, fans).await?;
            let (publics, tokens, dates) = (seats.publics, Arc::new(seats.tokens), seats.dates);
            let winners = Arc::new(AtomicUsize::new(0));
            // Everyone at once: as many in flight as there are fans.
            let summary = drive("hold-race", Some(fans), None, fans, {
                let winners = winners.clone();
                move |call| {
                    let mut client = publics[call % publics.len()].clone();
                    let winners = winners.clone();
                    let request = with_bearer(
                        concert_pb::HoldSeatsRequest {
                            schedule_id: dates[0].clone(),
                            seat_numbers: vec![7],
                            request_id: format!("race-{call}"),
                        },
                        &tokens[call],
                    );
                    async move {
                        match client.hold_seats(request).await {
                            Ok(_) => {
                                winners.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            }
                            // Losing the race is the expected answer, timed like a win.
                            Err(status) if status.code() == tonic::Code::Aborted => Ok(()),
                            Err(status) => Err(status),
                        }
                    }
                }
            })
            .await;
            println!("{}", summary.line());
            println!("winners: {} of {fans}", winners.load(Ordering::Relaxed));
        }
        Scenario::ListSeats { duration, .. } => {
            let seats = ConcertRun::prepare(target, load, &clients, 1, 50, 1).await?;
            let (publics, token, date) = (
                seats.publics,
                seats.tokens[0].clone(),
                seats.dates[0].clone(),
            );
            let summary = drive(
                "list-seats",
                None,
                Some(duration),
                load.concurrency,
                move |call| {
                    let mut client = publics[call % publics.len()].clone();
                    let request = with_bearer(
                        concert_pb::ListAvailableSeatsRequest {
                            schedule_id: date.clone(),
                        },
                        &token,
                    );
                    async move { client.list_available_seats(request).await.map(|_| ()) }
                },
            )
            .await;
            println!("{}", summary.line());
        }
        Scenario::Pay { payments, .. } => {
            let seats = ConcertRun::prepare(
                target,
                load,
                &clients,
                payments.div_ceil(1_000),
                1_000,
                payments,
            )
            .await?;
            let (publics, tokens, dates) =
                (seats.publics, Arc::new(seats.tokens), Arc::new(seats.dates));
            // Setup, timed but not the figure: every fan holds their own seat ...
            let holds = Arc::new(std::sync::Mutex::new(vec![None; payments]));
            let setup = drive("setup-hold", Some(payments), None, load.concurrency, {
                let (tokens, holds) = (tokens.clone(), holds.clone());
                move |call| {
                    let mut client = publics[call % publics.len()].clone();
                    let holds = holds.clone();
                    let request = spread_hold(call, &dates, &tokens);
                    async move {
                        let hold = client.hold_seats(request).await?.into_inner().hold;
                        holds.lock().expect("holds")[call] = hold;
                        Ok(())
                    }
                }
            })
            .await;
            println!("{}", setup.line());
            let holds: Arc<Vec<concert_pb::Hold>> = Arc::new(
                std::mem::take(&mut *holds.lock().expect("holds"))
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect(),
            );
            // ... and has exactly the points it costs.
            let points = clients_of(
                &target.channels(Service::Point, load.connections).await?,
                PointServiceClient::new,
            );
            let setup = drive("setup-charge", Some(payments), None, load.concurrency, {
                let holds = holds.clone();
                move |call| {
                    let mut client = points[call % points.len()].clone();
                    let request = point::ChargePointsRequest {
                        user_id: holds[call].user_id.clone(),
                        amount: holds[call].total_price,
                        request_id: format!("pay-setup-{call}"),
                    };
                    async move { client.charge_points(request).await.map(|_| ()) }
                }
            })
            .await;
            println!("{}", setup.line());
            let payers = clients_of(
                &target.channels(Service::Payment, load.connections).await?,
                PaymentServiceClient::new,
            );
            stagedoor_payment::hops::HOPS.reset();
            let summary = drive("pay", Some(payments), None, load.concurrency, move |call| {
                let mut client = payers[call % payers.len()].clone();
                let request = with_bearer(
                    payment_pb::PayRequest {
                        hold_id: holds[call].hold_id.clone(),
                        request_id: format!("pay-{call}"),
                    },
                    &tokens[call],
                );
                async move { client.pay(request).await.map(|_| ()) }
            })
            .await;
            println!("{}", summary.line());
            if target.database.is_some() {
                print_hops(summary.elapsed);
            }
        }
        Scenario::ValidateToken { duration, .. } => {
            let (_, tokens) = issue_and_keep(&clients, &lines, 1, 1).await;
            let internals = clients_of(&channels, QueueInternalServiceClient::new);
            let token = tokens[0].clone();
            let summary = drive(
                "validate-token",
                None,
                Some(duration),
                load.concurrency,
                move |call| {
                    let mut client = internals[call % internals.len()].clone();
                    let request = pb::ValidateTokenRequest {
                        token: token.clone(),
                    };
                    async move { client.validate_token(request).await.map(|_| ()) }
                },
            )
            .await;
            println!("{}", summary.line());
        }
        Scenario::Health { calls, .. } => {
            let checks = clients_of(&channels, HealthClient::new);
            let summary = drive("health", Some(calls), None, load.concurrency, move |call| {
                let mut client = checks[call % checks.len()].clone();
                async move {
                    let request = HealthCheckRequest {
                        service: "stagedoor.queue.v1.QueueService".into(),
                    };
                    let answer = client.check(request).await?.into_inner();
                    // A NOT_SERVING answer is no success of the stack under load.
                    match answer.status() {
                        ServingStatus::Serving => Ok(()),
                        status => Err(tonic::Status::unavailable(format!("{status:?}"))),
                    }
                }
            })
            .await;
            println!("{}", summary.line());
        }
    }
    Ok(())
}

/// Where Pay's time went, hop by hop, as measured inside the in-process payment service.
/// Hops overlap across concurrent calls, so shares are of the summed hop time.
pub fn print_hops(elapsed: Duration) {
    let hops = stagedoor_payment::hops::HOPS.snapshot();
    let total: f64 = hops.iter().map(|(_, seconds, _)| seconds).sum();
    println!(
        "where Pay's time goes (summed over calls, {:.1} s of wall clock):",
        elapsed.as_secs_f64()
    );
    for (hop, seconds, calls) in hops {
        if calls == 0 {
            continue;
        }
        println!(
            "  {:<22} {:>7} calls  mean {:>7.2} ms  share {:>5.1} %",
            hop.name(),
            calls,
            seconds * 1e3 / calls as f64,
            if total > 0.0 {
                seconds / total * 100.0
            } else {
                0.0
            }
        );
    }
}

/// Issues `fans` tokens, fan n for concert n mod `concerts.len()`, and returns the timings
/// and the tokens in place order.
async fn issue_and_keep(
    clients: &[QueueServiceClient<Channel>],
    concerts: &[String],
    fans: usize,
    concurrency: usize,
) -> (Summary, Vec<String>) {
    let issued = Arc::new(std::sync::Mutex::new(Vec::with_capacity(fans)));
    let summary = drive("issue-token", Some(fans), None, concurrency, {
        let (clients, concerts, issued) = (clients.to_vec(), concerts.to_vec(), issued.clone());
        move |call| {
            let mut client = clients[call % clients.len()].clone();
            let (concert, issued) = (concerts[call % concerts.len()].clone(), issued.clone());
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

/// `calls` ChargePoints spread round-robin over `users` wallets of this run, call `n`
/// charging `amount(n)` with its own request id.
async fn charges(
    name: &str,
    clients: Vec<PointServiceClient<Channel>>,
    run_id: &str,
    users: usize,
    calls: usize,
    amount: impl Fn(usize) -> i64 + Clone + Send + Sync + 'static,
    concurrency: usize,
) -> Summary {
    let (run_id, prefix) = (run_id.to_owned(), name.to_owned());
    drive(name, Some(calls), None, concurrency, move |call| {
        let mut client = clients[call % clients.len()].clone();
        let request = point::ChargePointsRequest {
            user_id: format!("fan-{run_id}-{}", call % users),
            amount: amount(call),
            request_id: format!("{prefix}-{call}"),
        };
        async move { client.charge_points(request).await.map(|_| ()) }
    })
    .await
}

/// `count` (at least one) HTTP/2 connections to the service at `url`, so that calls spread
/// over several connections as they would from many clients.
pub async fn connect(url: &str, count: usize) -> Result<Vec<Channel>, tonic::transport::Error> {
    let mut channels = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        channels.push(stagedoor_runtime::client::endpoint(url)?.connect().await?);
    }
    Ok(channels)
}

/// gRPC clients of one kind over the run's connections.
fn clients_of<C>(channels: &[Channel], new: impl Fn(Channel) -> C) -> Vec<C> {
    channels.iter().cloned().map(new).collect()
}

/// What the concert scenarios start from: a catalog, ACTIVE fans of it, and clients.
struct ConcertRun {
    publics: Vec<ConcertServiceClient<Channel>>,
    dates: Vec<String>,
    /// One token per fan, in place order.
    tokens: Vec<String>,
}

impl ConcertRun {
    /// A concert with `dates` dates of `seats` seats, and `fans` tokens for it (the
    /// in-process queue admits them all at once; see `Scenario::active_fans`).
    async fn prepare(
        target: &Target,
        load: &LoadArgs,
        queue: &[QueueServiceClient<Channel>],
        dates: usize,
        seats: i32,
        fans: usize,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let concert = target.channels(Service::Concert, load.connections).await?;
        let (concert_id, dates) = catalog(&concert[0], dates, seats).await?;
        let (fill, tokens) = issue_and_keep(
            queue,
            std::slice::from_ref(&concert_id),
            fans,
            load.concurrency,
        )
        .await;
        println!("{}", fill.line());
        Ok(Self {
            publics: clients_of(&concert, ConcertServiceClient::new),
            dates,
            tokens,
        })
    }
}

/// Fan `call`'s hold of a seat nobody else wants: seat `call % 1000 + 1` of date
/// `call / 1000` (dates of 1,000 seats, see `ConcertRun::prepare`).
fn spread_hold(
    call: usize,
    dates: &[String],
    tokens: &[String],
) -> tonic::Request<concert_pb::HoldSeatsRequest> {
    with_bearer(
        concert_pb::HoldSeatsRequest {
            schedule_id: dates[call / 1_000].clone(),
            seat_numbers: vec![(call % 1_000) as i32 + 1],
            request_id: format!("hold-{call}"),
        },
        &tokens[call],
    )
}

/// A concert with `dates` dates of `seats` seats each, through the admin service.
async fn catalog(
    concert: &Channel,
    dates: usize,
    seats: i32,
) -> Result<(String, Vec<String>), tonic::Status> {
    let mut admin = ConcertAdminServiceClient::new(concert.clone());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let created = admin
        .create_concert(concert_pb::CreateConcertRequest {
            title: "Load Test Live".into(),
            artist: "The Benchmarks".into(),
            request_id: format!("load-{run}"),
        })
        .await?
        .into_inner()
        .concert
        .unwrap_or_default();
    let mut schedule_ids = Vec::with_capacity(dates);
    for date in 0..dates {
        let schedule = admin
            .add_schedule(concert_pb::AddScheduleRequest {
                concert_id: created.concert_id.clone(),
                start_time: Some(crate::seed::days_ahead(30 + date as i64)),
                venue: "Loopback Arena".into(),
                seat_count: seats,
                sections: Vec::new(),
                request_id: format!("load-{run}-{date}"),
            })
            .await?
            .into_inner()
            .schedule
            .unwrap_or_default();
        schedule_ids.push(schedule.schedule_id);
    }
    Ok((created.concert_id, schedule_ids))
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
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    // One closure shared by every worker: it holds the run's clients, and cloning it per
    // worker (`--concurrency 10000`) took a quarter of the load process's CPU.
    let call = Arc::new(call);
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

/// A service a scenario loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Queue,
    Concert,
    Point,
    Payment,
}

/// What a run loads: services started in this process on a throwaway database, or running
/// ones given by URL.
struct Target {
    urls: Vec<(Service, String)>,
    running: Vec<stagedoor_runtime::server::ServiceHandle>,
    /// The throwaway database of an in-process run, and the Postgres it lives in (kept
    /// until the end: a throwaway cluster is removed when it is dropped).
    database: Option<(mesh::Database, crate::pg::Postgres)>,
}

impl Target {
    async fn start(
        load: &LoadArgs,
        needs: &[Service],
        active_fans: u32,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let given = |service| match service {
            Service::Queue => load.queue_url.clone(),
            Service::Concert => load.concert_url.clone(),
            Service::Point => load.point_url.clone(),
            Service::Payment => load.payment_url.clone(),
        };
        if needs.iter().all(|service| given(*service).is_some()) {
            if load.replicas > 1 {
                return Err(
                    "--replicas starts services in this process; the services given \
                            by URL are loaded as they run (put them behind a balancer instead)"
                        .into(),
                );
            }
            return Ok(Self {
                urls: needs
                    .iter()
                    .map(|service| (*service, given(*service).unwrap_or_default()))
                    .collect(),
                running: Vec::new(),
                database: None,
            });
        }
        let name = format!("stagedoor_load_{}", uuid::Uuid::new_v4().simple());
        let (postgres, database) = crate::database(load.database_url.as_deref(), &name).await?;
        let local: std::net::SocketAddr = "127.0.0.1:0".parse()?;
        let mut target = Self {
            urls: Vec::new(),
            running: Vec::new(),
            database: None,
        };
        // Everything started from here on is undone if a later step fails: the services
        // already running are stopped and the throwaway database dropped.
        let started: Result<(), Box<dyn std::error::Error>> = async {
            // Every pool gets its share of what the server has free (see mesh::pool_cap).
            let pools = needs.len() * usize::from(load.replicas);
            // (Every service's default pool is the same size; the queue's stands for all.)
            let default_pool = QueueConfig::for_database("").database_max_connections;
            let cap = mesh::pool_cap(&database.admin_url, &vec![default_pool; pools]).await?;
            let pool_size = cap.min(default_pool);
            for service in needs {
                // Replicas of one service share its database; replica i reaches replica i of
                // each peer (the peers' own count wrapping), so service-to-service calls spread
                // over the replicas as the load's own calls do.
                for replica in 0..usize::from(load.replicas) {
                    let handle = match service {
                        Service::Queue => {
                            let mut config = QueueConfig::for_database(database.url(db::QUEUE));
                            config.database_max_connections = pool_size;
                            config.max_active = load.max_active.max(active_fans);
                            config.admit_rate = if active_fans > 0 {
                                1_000_000
                            } else {
                                load.admit_rate
                            };
                            mesh::start_on(local, |listener| {
                                stagedoor_queue::start(config, listener)
                            })
                            .await?
                        }
                        Service::Concert => {
                            let mut config = ConcertConfig::new(
                                database.url(db::CONCERT),
                                target.url_of(Service::Queue, replica),
                            );
                            config.database_max_connections = pool_size;
                            mesh::start_on(local, |listener| {
                                stagedoor_concert::start(config, listener)
                            })
                            .await?
                        }
                        Service::Point => {
                            let mut config = PointConfig::for_database(database.url(db::POINT));
                            config.database_max_connections = pool_size;
                            mesh::start_on(local, |listener| {
                                stagedoor_point::start(config, listener)
                            })
                            .await?
                        }
                        Service::Payment => {
                            let mut config = PaymentConfig::new(
                                database.url(db::PAYMENT),
                                target.url_of(Service::Queue, replica),
                                target.url_of(Service::Concert, replica),
                                target.url_of(Service::Point, replica),
                            );
                            config.database_max_connections = pool_size;
                            mesh::start_on(local, |listener| {
                                stagedoor_payment::start(config, listener)
                            })
                            .await?
                        }
                    };
                    target.urls.push((*service, handle.url()));
                    target.running.push(handle);
                }
            }
            Ok(())
        }
        .await;
        if let Err(error) = started {
            for handle in target.running.drain(..) {
                handle.abort();
            }
            if let Err(drop_error) = database.drop_database().await {
                eprintln!("stagedoor load: the load database was not dropped: {drop_error}");
            }
            return Err(error);
        }
        target.database = Some((database, postgres));
        Ok(target)
    }

    /// The URLs of `service`'s instances, in start order.
    fn urls_of(&self, service: Service) -> Vec<&str> {
        self.urls
            .iter()
            .filter(|(s, _)| *s == service)
            .map(|(_, url)| url.as_str())
            .collect()
    }

    /// The URL of `service`'s instance `replica`, wrapping over the instances started.
    fn url_of(&self, service: Service, replica: usize) -> String {
        let urls = self.urls_of(service);
        urls.get(replica % urls.len().max(1))
            .map(|url| url.to_string())
            .unwrap_or_default()
    }

    fn describe(&self) -> String {
        let services: Vec<String> = self
            .urls
            .iter()
            .map(|(s, url)| format!("{s:?} at {url}"))
            .collect();
        let place = match &self.database {
            Some((database, _)) => format!("in-process, throwaway database `{}`", database.name),
            None => "running".to_owned(),
        };
        format!("{} ({place})", services.join(", "))
    }

    /// `connections` HTTP/2 connections to `service` (at least one per replica), dealt
    /// round robin over its replicas, so that `clients[call % len]` alternates between them.
    async fn channels(
        &self,
        service: Service,
        connections: usize,
    ) -> Result<Vec<Channel>, Box<dyn std::error::Error>> {
        let urls = self.urls_of(service);
        if urls.is_empty() {
            return Err(format!("no {service:?} service in this run").into());
        }
        let mut channels = Vec::new();
        for index in 0..connections.max(urls.len()) {
            channels.append(&mut connect(urls[index % urls.len()], 1).await?);
        }
        Ok(channels)
    }

    async fn stop(self) {
        for service in self.running.into_iter().rev() {
            let _ = service.shutdown().await;
        }
        if let Some((database, postgres)) = self.database {
            if let Err(error) = database.drop_database().await {
                eprintln!("warning: the throwaway database was not dropped: {error}");
            }
            drop(postgres);
        }
    }
}
