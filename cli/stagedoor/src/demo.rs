//! `stagedoor demo`: brings the mesh up on a fresh database and stages a sale.
//!
//! Every fan arrives the instant the sale opens, takes a queue token, watches the line (the
//! server stream) until admitted, browses the dates and seats, holds 1 to 4 free seats,
//! charges points when short and pays. Some fans abandon after browsing and leave the line
//! (LeaveQueue, which gives their place to the next fan at once), some walk away from a hold
//! and let it and their token expire, some double-click Pay. When the last seat is sold the
//! waiting fans go home.
//!
//! Then the verdict, checked through the services' own RPCs and a read-only audit of the
//! database: seats sold == seats of completed payments, no seat sold twice, points
//! conserved, the ACTIVE cap never exceeded, one payment per double click. Any failure makes
//! the command exit non-zero.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    process::ExitCode,
    str::FromStr,
    sync::{
        atomic::{AtomicI64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sqlx::{postgres::PgConnectOptions, PgPool};
use stagedoor_proto::{
    concert::v1::{
        self as concert_pb, concert_admin_service_client::ConcertAdminServiceClient,
        concert_service_client::ConcertServiceClient, SeatStatus,
    },
    payment::v1::{self as payment_pb, payment_service_client::PaymentServiceClient},
    point::v1::{self as point_pb, point_service_client::PointServiceClient},
    queue::v1::{self as queue_pb, queue_service_client::QueueServiceClient, TokenStatus},
};
use stagedoor_runtime::{auth::with_bearer, config::parse_duration, shutdown::StopSignals};
use tokio::sync::watch;
use tonic::{transport::Channel, Code, Status};

use crate::{
    load::connect,
    mesh::{Mesh, MeshOptions},
    stats::Summary,
};

/// Settings of a demo sale.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Fans who rush the sale.
    #[arg(long, default_value_t = 10_000)]
    pub fans: usize,
    /// Seats on sale, over one date (fewer than 100) or several.
    #[arg(long, default_value_t = 500)]
    pub seats: i32,
    /// Most fans ACTIVE (admitted) at once: the queue's cap.
    #[arg(long, default_value_t = 500)]
    pub cap: u32,
    /// Most fans admitted per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Seed of the fans' choices (random when not given; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A Postgres superuser URL. Unset: the server on 127.0.0.1:5432, or a throwaway
    /// cluster under target/ when none answers there.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How long a hold keeps its seats (short, so that expired holds come back in the demo).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub hold_ttl: Duration,
    /// Give up on selling out after this long (the verdict then fails, as it does when
    /// Ctrl-C ends the sale early).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Keep the demo's database afterwards (it is dropped by default). A throwaway cluster
    /// is removed on exit all the same, and the database with it.
    #[arg(long)]
    pub keep_database: bool,
}

/// Runs the demo; exit 0 on PASS, 1 on FAIL, 2 when it could not run.
pub async fn run(args: DemoArgs) -> ExitCode {
    match stage(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("stagedoor demo: {error}");
            ExitCode::from(2)
        }
    }
}

async fn stage(args: DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    if args.fans == 0 || !(1..=20_000).contains(&args.seats) || args.cap == 0 || args.rate == 0 {
        return Err("--fans, --cap and --rate must be above 0, --seats 1 to 20000".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_nanos() as u64)
            .unwrap_or(42)
    });
    let name = format!(
        "stagedoor_demo_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // Listened for from the start. Ctrl-C (or SIGTERM) before the sale stops there; during
    // it, it ends the sale early as --timeout does (the verdict says so), and a second one
    // stops waiting for the fans. Either way what follows still runs: the mesh stops, the
    // demo's database is dropped and a throwaway cluster removed. (Without a handler the
    // process died on the spot and left them all behind, the cluster still running.)
    let mut signals = StopSignals::new();
    // Not cut short by a first signal: it creates the database, which only this function
    // drops.
    let (found, stop_now) = crate::finish_starting(
        crate::database(args.database_url.as_deref(), &name),
        &mut signals,
    )
    .await?;
    let (postgres, database) = found?;
    if stop_now {
        discard(database, args.keep_database).await;
        return Err("stopped before the sale began".into());
    }
    let local = "127.0.0.1:0".parse()?;
    let options = MeshOptions {
        queue_addr: local,
        concert_addr: local,
        point_addr: local,
        payment_addr: local,
        from_environment: false,
        max_active: Some(args.cap),
        admit_rate: Some(args.rate),
        active_ttl: Some(Duration::from_secs(60)),
        idle_ttl: Some(Duration::from_secs(120)),
        hold_ttl: Some(args.hold_ttl),
    };
    let started = tokio::select! {
        started = Mesh::start(&database, &options) => started,
        () = signals.recv() => Err("stopped before the sale began".into()),
    };
    let mesh = match started {
        Ok(mesh) => mesh,
        Err(error) => {
            // Refused before the sale (too few connections free, a port taken, a stop
            // signal): the fresh database is nobody's, and must not be left behind.
            discard(database, args.keep_database).await;
            return Err(error);
        }
    };
    println!(
        "stagedoor demo: {} fans, {} seats, cap {} ACTIVE, {} admitted/s, seed {seed}",
        args.fans, args.seats, args.cap, args.rate
    );
    println!(
        "  mesh: queue {} · concert {} · point {} · payment {} · database `{name}` on {}",
        mesh.queue.url(),
        mesh.concert.url(),
        mesh.point.url(),
        mesh.payment.url(),
        postgres.describe()
    );
    let audit_options = PgConnectOptions::from_str(&postgres.admin_url)?
        .database(&name)
        // The audit reads; it must not be able to change what it judges.
        .options([("default_transaction_read_only", "on")]);
    let outcome = sale(&args, seed, &mesh, audit_options, &mut signals).await;
    tokio::select! {
        _ = mesh.shutdown() => {}
        () = signals.recv() => eprintln!("stagedoor demo: not waiting for the services to drain"),
    }
    discard(database, args.keep_database).await;
    drop(postgres);
    let report = outcome?;
    report.print();
    // The payment service ran in this process: where its Pay calls spent their time.
    crate::load::print_hops(report.sale_time);
    if let Some(path) = &args.json {
        std::fs::write(path, report.json(&args, seed))
            .map_err(|error| format!("writing {}: {error}", path.display()))?;
        println!("summary written to {}", path.display());
    }
    Ok(report.passed())
}

/// Drops the demo's database, unless `--keep-database` asked to keep it; a failure is said,
/// not fatal (the demo's outcome stands).
async fn discard(database: crate::mesh::Database, keep: bool) {
    if keep {
        return;
    }
    if let Err(error) = database.drop_database().await {
        eprintln!("stagedoor demo: the demo database was not dropped: {error}");
    }
}

// ---------------------------------------------------------------------------------------
// The sale.

/// What every fan shares: clients, the sale's catalog, live counters and the stop signal.
struct Sale {
    seed: u64,
    queues: Vec<QueueServiceClient<Channel>>,
    concerts: Vec<ConcertServiceClient<Channel>>,
    points: Vec<PointServiceClient<Channel>>,
    payments: Vec<PaymentServiceClient<Channel>>,
    concert_id: String,
    total_seats: i64,
    /// How long an admitted fan keeps looking while every seat is held or taken.
    patience: Duration,
    live: Live,
    rpcs: Mutex<HashMap<&'static str, RpcTimes>>,
    /// Receipts: `(schedule_id, seat, payment_id)` of every seat a fan was told is theirs.
    receipts: Mutex<Vec<(String, i32, String)>>,
    /// Fans who charged points (their balances are checked afterwards).
    charged_users: Mutex<HashSet<String>>,
    /// Things a fan saw that must never happen.
    violations: Mutex<Vec<String>>,
    /// Fires when the sale is over (sold out or timed out): waiting fans go home.
    stop: watch::Sender<bool>,
    /// What ended the sale before it was over by itself (`--timeout`, a stop signal).
    cut_short_by: std::sync::OnceLock<&'static str>,
    opened: Instant,
    sold_out_after: Mutex<Option<Duration>>,
    /// For each admitted fan who watched the line: how long after its admission the stream
    /// told it (the waiting room's own latency, beside the RPCs').
    admission_heard: Mutex<Vec<Duration>>,
}

/// Counters the progress bars and the summary read.
#[derive(Default)]
struct Live {
    waiting: AtomicI64,
    active: AtomicI64,
    admitted: AtomicUsize,
    seats_sold: AtomicI64,
    payments: AtomicUsize,
    payments_failed: AtomicUsize,
    abandoned: AtomicUsize,
    holds_left_to_expire: AtomicUsize,
    double_clicks: AtomicUsize,
    went_home: AtomicUsize,
    left_queue: AtomicUsize,
    points_charged: AtomicI64,
}

#[derive(Default)]
struct RpcTimes {
    latencies: Vec<Duration>,
    /// Definite refusals (SEAT_UNAVAILABLE and the like): answers, timed like successes.
    refused: usize,
    /// Failures nobody asked for: UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, ...
    failed: usize,
}

impl Sale {
    /// Notes how late an ACTIVE ticket reached its fan, from its `admit_time` (the queue's
    /// clock and this one are the same machine's).
    fn heard_of_admission(&self, ticket: &queue_pb::QueueTicket) {
        let Some(admit_time) = ticket.admit_time else {
            return;
        };
        let admitted_at = std::time::UNIX_EPOCH
            + Duration::new(
                admit_time.seconds.max(0) as u64,
                admit_time.nanos.max(0) as u32,
            );
        let heard = std::time::SystemTime::now()
            .duration_since(admitted_at)
            .unwrap_or_default();
        self.admission_heard
            .lock()
            .expect("admission times")
            .push(heard);
    }

    /// Times one RPC and files it under `rpc`.
    async fn call<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let answer = call.await;
        let elapsed = started.elapsed();
        let mut rpcs = self.rpcs.lock().expect("rpc stats");
        let times = rpcs.entry(rpc).or_default();
        match &answer {
            Ok(_) => times.latencies.push(elapsed),
            Err(status) if is_refusal(status) => {
                times.latencies.push(elapsed);
                times.refused += 1;
            }
            Err(_) => times.failed += 1,
        }
        answer.map(tonic::Response::into_inner)
    }

    /// Files the error that ended a WatchQueueStatus stream, as [`Sale::call`] files a
    /// unary call's.
    fn stream_ended_by(&self, status: Status) {
        let mut rpcs = self.rpcs.lock().expect("rpc stats");
        let times = rpcs.entry("queue.WatchQueueStatus").or_default();
        if is_refusal(&status) {
            times.refused += 1;
        } else {
            times.failed += 1;
        }
    }

    fn violation(&self, what: String) {
        self.violations.lock().expect("violations").push(what);
    }

    /// Ends the sale before it is over by itself: fans in line go home, and the verdict
    /// names `why` (the first reason, if two come).
    fn cut_short(&self, why: &'static str) {
        let _ = self.cut_short_by.set(why);
        self.stop.send_replace(true);
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// A refusal is the service answering "no" on purpose; anything else is a failure.
fn is_refusal(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::Aborted
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange
    )
}

async fn sale(
    args: &DemoArgs,
    seed: u64,
    mesh: &Mesh,
    audit_options: PgConnectOptions,
    signals: &mut StopSignals,
) -> Result<Report, Box<dyn std::error::Error>> {
    // Fans spread over many HTTP/2 connections, as many phones (or a BFF's pool) would
    // arrive: a hundred fans per connection, each holding its watch stream there.
    let queue_connections = (args.fans / 100).clamp(1, 128);
    let queues = connect(&mesh.queue.url(), queue_connections).await?;
    let concerts = connect(&mesh.concert.url(), 8).await?;
    let points = connect(&mesh.point.url(), 4).await?;
    let payments = connect(&mesh.payment.url(), 8).await?;
    let (concert_id, dates) = catalog(&concerts[0], args.seats).await?;
    println!(
        "  concert {concert_id}: {} date(s), {} seats",
        dates.len(),
        args.seats
    );

    let audit = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(audit_options)
        .await?;
    let (stop, _) = watch::channel(false);
    let sale = Arc::new(Sale {
        seed,
        queues: queues.into_iter().map(QueueServiceClient::new).collect(),
        concerts: concerts
            .into_iter()
            .map(ConcertServiceClient::new)
            .collect(),
        points: points.into_iter().map(PointServiceClient::new).collect(),
        payments: payments
            .into_iter()
            .map(PaymentServiceClient::new)
            .collect(),
        concert_id,
        total_seats: i64::from(args.seats),
        // Seats held when a fan starts looking are back within one hold TTL; a fan who
        // looks for two sees them come back, as a fan refreshing the page would.
        patience: args.hold_ttl * 2,
        live: Live::default(),
        rpcs: Mutex::new(HashMap::new()),
        receipts: Mutex::new(Vec::new()),
        charged_users: Mutex::new(HashSet::new()),
        violations: Mutex::new(Vec::new()),
        stop,
        cut_short_by: std::sync::OnceLock::new(),
        opened: Instant::now(),
        sold_out_after: Mutex::new(None),
        admission_heard: Mutex::new(Vec::new()),
    });

    let progress = tokio::spawn(show_progress(
        sale.clone(),
        args.fans as u64,
        u64::from(args.cap),
    ));

    stagedoor_payment::hops::HOPS.reset();
    // The sale opens: every fan at once.
    let mut fans = Vec::with_capacity(args.fans);
    for index in 0..args.fans {
        let sale = sale.clone();
        fans.push(tokio::spawn(async move { fan(&sale, index).await }));
    }
    let timeout = tokio::spawn({
        let (sale, timeout) = (sale.clone(), args.timeout);
        async move {
            tokio::time::sleep(timeout).await;
            // Not once the sale is over (sold out): the last fans may still be paying.
            if !sale.stopped() {
                sale.cut_short("--timeout");
            }
        }
    });
    let every_fan_done = async {
        for fan in fans {
            if let Err(error) = fan.await {
                sale.violation(format!("a fan's task failed: {error}"));
            }
        }
    };
    tokio::pin!(every_fan_done);
    tokio::select! {
        () = &mut every_fan_done => {}
        () = signals.recv() => {
            sale.cut_short("a stop signal");
            eprintln!("stagedoor demo: stopping the sale (again to stop at once) ...");
            tokio::select! {
                () = &mut every_fan_done => {}
                () = signals.recv() => {
                    timeout.abort();
                    return Err("stopped before the fans were done; no verdict".into());
                }
            }
        }
    }
    let sale_time = sale.opened.elapsed();
    timeout.abort();
    sale.stop.send_replace(true);
    let _ = progress.await;

    // Its calls wait as long as the services take: a signal stops waiting for them (the
    // handler installed above would otherwise leave only SIGKILL, and the mess behind).
    let judged = async {
        let peak = peak_active(&audit, &sale.concert_id).await?;
        let checks = verdict(&sale, &audit, &dates, peak, args.cap).await?;
        Ok::<_, Box<dyn std::error::Error>>((checks, peak))
    };
    let (checks, peak) = tokio::select! {
        judged = judged => judged?,
        () = signals.recv() => return Err("stopped during the verdict; no verdict".into()),
    };
    audit.close().await;
    let sold_out_after = *sale.sold_out_after.lock().expect("sold out time");
    let rpcs = std::mem::take(&mut *sale.rpcs.lock().expect("rpc stats"));
    let admission_heard = Summary {
        name: "admission heard".into(),
        elapsed: sale_time,
        latencies: std::mem::take(&mut *sale.admission_heard.lock().expect("admission times")),
        errors: 0,
    };
    Ok(Report {
        sale_time,
        sold_out_after,
        fans: args.fans,
        seats: sale.total_seats,
        admitted: sale.live.admitted.load(Ordering::Relaxed),
        payments: sale.live.payments.load(Ordering::Relaxed),
        payments_failed: sale.live.payments_failed.load(Ordering::Relaxed),
        seats_sold: sale.live.seats_sold.load(Ordering::Relaxed),
        abandoned: sale.live.abandoned.load(Ordering::Relaxed),
        holds_left_to_expire: sale.live.holds_left_to_expire.load(Ordering::Relaxed),
        double_clicks: sale.live.double_clicks.load(Ordering::Relaxed),
        went_home: sale.live.went_home.load(Ordering::Relaxed),
        left_queue: sale.live.left_queue.load(Ordering::Relaxed),
        max_active: peak,
        rpcs,
        admission_heard,
        checks,
    })
}

/// The concert on sale: dates of at most 1,000 seats (two when there are 100 or more), the
/// first fifth of each date VIP at 150,000 won, the rest R at 90,000.
async fn catalog(
    concert: &Channel,
    seats: i32,
) -> Result<(String, Vec<String>), Box<dyn std::error::Error>> {
    let mut admin = ConcertAdminServiceClient::new(concert.clone());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let created = admin
        .create_concert(concert_pb::CreateConcertRequest {
            title: "Opening Night".into(),
            artist: "The Stagedoor Orchestra".into(),
            request_id: format!("demo-{run}"),
        })
        .await?
        .into_inner()
        .concert
        .ok_or("CreateConcert answered without a concert")?;
    let date_count = if seats >= 100 {
        ((seats + 999) / 1_000).max(2)
    } else {
        1
    };
    let mut dates = Vec::new();
    for date in 0..date_count {
        let count = seats / date_count + i32::from(date < seats % date_count);
        let vip = (count / 5).max(1);
        let mut sections = vec![concert_pb::PriceSection {
            name: "VIP".into(),
            first_seat: 1,
            last_seat: vip,
            price: 150_000,
        }];
        if count > vip {
            sections.push(concert_pb::PriceSection {
                name: "R".into(),
                first_seat: vip + 1,
                last_seat: count,
                price: 90_000,
            });
        }
        let schedule = admin
            .add_schedule(concert_pb::AddScheduleRequest {
                concert_id: created.concert_id.clone(),
                start_time: Some(crate::seed::days_ahead(30 + i64::from(date))),
                venue: "Stagedoor Arena".into(),
                seat_count: count,
                sections,
                request_id: format!("demo-{run}-{date}"),
            })
            .await?
            .into_inner()
            .schedule
            .ok_or("AddSchedule answered without a date")?;
        dates.push(schedule.schedule_id);
    }
    Ok((created.concert_id, dates))
}

/// A fan's pause before looking again when nothing was free.
const LOOK_AGAIN: Duration = Duration::from_millis(200);

/// What a fan does with their visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persona {
    /// Holds seats and pays (charging points first when short).
    Buyer { double_click: bool },
    /// Browses the seats and leaves the line.
    Abandons,
    /// Holds seats and walks away without a word: the hold expires and the seats come back,
    /// and the token keeps its slot until its window runs out.
    LetsHoldExpire,
}

/// How an admitted fan's visit ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Paid: the payment made the token DONE.
    Paid,
    /// Presses "leave" (LeaveQueue): done browsing, out of patience, or refused at Pay.
    Leaves,
    /// Closes the tab, or the sale ended: the token is left to run out.
    WalksAway,
}

/// One fan's visit, start to end.
async fn fan(sale: &Sale, index: usize) {
    let mut rng = Rng::new(sale.seed, index as u64);
    let user_id = format!("fan-{index:05}");
    let persona = match rng.below(100) {
        0..=7 => Persona::Abandons,
        8..=14 => Persona::LetsHoldExpire,
        roll => Persona::Buyer {
            double_click: roll >= 85,
        },
    };
    let mut queue = sale.queues[index % sale.queues.len()].clone();
    let Ok(ticket) = sale
        .call(
            "queue.IssueToken",
            queue.issue_token(queue_pb::IssueTokenRequest {
                concert_id: sale.concert_id.clone(),
                user_id: user_id.clone(),
            }),
        )
        .await
        .map(|response| response.ticket.unwrap_or_default())
    else {
        return;
    };
    if ticket.status() == TokenStatus::Waiting {
        sale.live.waiting.fetch_add(1, Ordering::Relaxed);
        let admitted = wait_for_admission(sale, &mut queue, &ticket.token).await;
        sale.live.waiting.fetch_sub(1, Ordering::Relaxed);
        if !admitted {
            sale.live.went_home.fetch_add(1, Ordering::Relaxed);
            return;
        }
    } else if ticket.status() != TokenStatus::Active {
        // A new fan's first ticket is WAITING or ACTIVE, nothing else.
        sale.violation(format!(
            "IssueToken answered {:?} for {user_id}",
            ticket.status()
        ));
        return;
    }
    sale.live.admitted.fetch_add(1, Ordering::Relaxed);
    sale.live.active.fetch_add(1, Ordering::Relaxed);
    let exit = shop(sale, &mut rng, &user_id, &ticket.token, persona).await;
    // A fan who leaves gives the slot to the next fan in line now, instead of holding it
    // until the token's window ends (which, before LeaveQueue, kept the last fans waiting
    // while the last seats came back from expired holds). Not once the sale is over: then
    // nobody is waiting for the slot.
    if exit == Exit::Leaves && !sale.stopped() {
        let left = sale
            .call(
                "queue.LeaveQueue",
                queue.leave_queue(queue_pb::LeaveQueueRequest {
                    token: ticket.token.clone(),
                }),
            )
            .await;
        if left.is_ok() {
            sale.live.left_queue.fetch_add(1, Ordering::Relaxed);
        }
    }
    sale.live.active.fetch_sub(1, Ordering::Relaxed);
}

/// Watches the fan's place in line until ACTIVE (true), or until the sale is over or the
/// token ends (false).
async fn wait_for_admission(
    sale: &Sale,
    queue: &mut QueueServiceClient<Channel>,
    token: &str,
) -> bool {
    let mut stop = sale.stop.subscribe();
    let Ok(mut updates) = sale
        .call(
            "queue.WatchQueueStatus",
            queue.watch_queue_status(queue_pb::WatchQueueStatusRequest {
                token: token.to_owned(),
            }),
        )
        .await
    else {
        return false;
    };
    loop {
        tokio::select! {
            update = updates.message() => match update {
                Ok(Some(update)) => match update.ticket {
                    Some(ticket) if ticket.status() == TokenStatus::Active => {
                        sale.heard_of_admission(&ticket);
                        return true;
                    }
                    Some(ticket) if ticket.status() == TokenStatus::Waiting => {}
                    _ => return false,
                },
                Ok(None) => return false,
                // A stream cut short is a failed call too, though only its opening is timed.
                Err(status) => {
                    sale.stream_ended_by(status);
                    return false;
                }
            },
            _ = stop.wait_for(|stopped| *stopped) => return false,
        }
    }
}

/// An admitted fan: browse, hold, (charge,) pay. Says how the visit ended.
async fn shop(sale: &Sale, rng: &mut Rng, user_id: &str, token: &str, persona: Persona) -> Exit {
    let mut concert = sale.concerts[rng.below(sale.concerts.len() as u64) as usize].clone();
    // A fan who finds nothing free looks again, pausing like a person refreshing the page,
    // until their patience runs out. (Counting looks instead of time made fans give up
    // faster the faster the services answered: the last seats then came back from expired
    // holds after every admitted fan had left, and waited for tokens to time out.)
    let give_up_at = Instant::now() + sale.patience;
    loop {
        if sale.stopped() {
            return Exit::WalksAway;
        }
        if Instant::now() >= give_up_at {
            return Exit::Leaves;
        }
        let Ok(dates) = sale
            .call(
                "concert.ListAvailableDates",
                concert.list_available_dates(with_bearer(
                    concert_pb::ListAvailableDatesRequest {
                        concert_id: sale.concert_id.clone(),
                    },
                    token,
                )),
            )
            .await
        else {
            return Exit::Leaves;
        };
        if dates.schedules.is_empty() {
            // Every seat SOLD or held: held ones may come back when their hold expires.
            tokio::time::sleep(LOOK_AGAIN).await;
            continue;
        }
        let date = &dates.schedules[rng.below(dates.schedules.len() as u64) as usize];
        let Ok(seats) = sale
            .call(
                "concert.ListAvailableSeats",
                concert.list_available_seats(with_bearer(
                    concert_pb::ListAvailableSeatsRequest {
                        schedule_id: date.schedule_id.clone(),
                    },
                    token,
                )),
            )
            .await
        else {
            return Exit::Leaves;
        };
        let mut free: Vec<(i32, i64)> = seats
            .seats
            .iter()
            .filter(|seat| seat.status() == SeatStatus::Available)
            .map(|seat| (seat.seat_number, seat.price))
            .collect();
        if free.is_empty() {
            tokio::time::sleep(LOOK_AGAIN).await;
            continue;
        }
        if persona == Persona::Abandons {
            sale.live.abandoned.fetch_add(1, Ordering::Relaxed);
            return Exit::Leaves;
        }
        let want = (1 + rng.below(4) as usize).min(free.len());
        let mut chosen = Vec::with_capacity(want);
        for _ in 0..want {
            chosen.push(free.swap_remove(rng.below(free.len() as u64) as usize));
        }
        let seat_numbers: Vec<i32> = chosen.iter().map(|(seat, _)| *seat).collect();
        let hold = sale
            .call(
                "concert.HoldSeats",
                concert.hold_seats(with_bearer(
                    concert_pb::HoldSeatsRequest {
                        schedule_id: date.schedule_id.clone(),
                        seat_numbers,
                        request_id: format!("hold-{}", rng.next()),
                    },
                    token,
                )),
            )
            .await;
        let hold = match hold {
            Ok(response) => response.hold.unwrap_or_default(),
            // Someone was quicker: look again.
            Err(status) if status.code() == Code::Aborted => continue,
            Err(_) => return Exit::Leaves,
        };
        match persona {
            Persona::LetsHoldExpire => {
                sale.live
                    .holds_left_to_expire
                    .fetch_add(1, Ordering::Relaxed);
                return Exit::WalksAway;
            }
            Persona::Buyer { double_click } => {
                if pay(sale, rng, user_id, token, &hold, double_click).await {
                    return Exit::Paid;
                }
                // Refused: give the seats back before leaving, as the proto advises, rather
                // than keep them from other fans until the hold expires.
                let _ = sale
                    .call(
                        "concert.ReleaseHold",
                        concert.release_hold(with_bearer(
                            concert_pb::ReleaseHoldRequest {
                                hold_id: hold.hold_id.clone(),
                            },
                            token,
                        )),
                    )
                    .await;
                return Exit::Leaves;
            }
            Persona::Abandons => unreachable!("abandoning fans left before holding"),
        }
    }
}

/// Charges what the fan is short of, then pays (twice at once with one request id for a
/// double-clicker). True when the fan paid.
async fn pay(
    sale: &Sale,
    rng: &mut Rng,
    user_id: &str,
    token: &str,
    hold: &concert_pb::Hold,
    double_click: bool,
) -> bool {
    let mut point = sale.points[rng.below(sale.points.len() as u64) as usize].clone();
    let Ok(balance) = sale
        .call(
            "point.GetBalance",
            point.get_balance(point_pb::GetBalanceRequest {
                user_id: user_id.to_owned(),
            }),
        )
        .await
    else {
        return false;
    };
    if balance.balance < hold.total_price {
        // Short: charge the difference and a little more, as people do.
        let amount = hold.total_price - balance.balance + 10_000 * rng.below(5) as i64;
        let charged = sale
            .call(
                "point.ChargePoints",
                point.charge_points(point_pb::ChargePointsRequest {
                    user_id: user_id.to_owned(),
                    amount,
                    request_id: format!("top-up-{}", rng.next()),
                }),
            )
            .await;
        if charged.is_err() {
            return false;
        }
        sale.live
            .points_charged
            .fetch_add(amount, Ordering::Relaxed);
        sale.charged_users
            .lock()
            .expect("charged users")
            .insert(user_id.to_owned());
    }
    let request_id = format!("pay-{}", rng.next());
    let pay_once = || {
        let mut payment = sale.payments[connection_for(&hold.hold_id, sale.payments.len())].clone();
        let request = with_bearer(
            payment_pb::PayRequest {
                hold_id: hold.hold_id.clone(),
                request_id: request_id.clone(),
            },
            token,
        );
        async move { sale.call("payment.Pay", payment.pay(request)).await }
    };
    let paid = if double_click {
        sale.live.double_clicks.fetch_add(1, Ordering::Relaxed);
        let (first, second) = tokio::join!(pay_once(), pay_once());
        match (&first, &second) {
            (Ok(a), Ok(b))
                if a.payment.as_ref().map(|p| &p.payment_id)
                    != b.payment.as_ref().map(|p| &p.payment_id) =>
            {
                sale.violation(format!("{user_id}: one double click, two payments"));
            }
            (Ok(_), Err(status)) | (Err(status), Ok(_)) => {
                sale.violation(format!(
                    "{user_id}: one double click, a receipt and {status:?}"
                ));
            }
            _ => {}
        }
        first
    } else {
        pay_once().await
    };
    match paid.map(|response| response.payment.unwrap_or_default()) {
        Ok(payment) => {
            let seats = payment.seat_numbers.len() as i64;
            {
                let mut receipts = sale.receipts.lock().expect("receipts");
                for seat in &payment.seat_numbers {
                    receipts.push((
                        payment.schedule_id.clone(),
                        *seat,
                        payment.payment_id.clone(),
                    ));
                }
            }
            sale.live.payments.fetch_add(1, Ordering::Relaxed);
            let sold = sale.live.seats_sold.fetch_add(seats, Ordering::Relaxed) + seats;
            if sold >= sale.total_seats {
                let mut sold_out = sale.sold_out_after.lock().expect("sold out time");
                sold_out.get_or_insert(sale.opened.elapsed());
                // Sold out: the fans still in line go home.
                sale.stop.send_replace(true);
            }
            true
        }
        Err(_) => {
            sale.live.payments_failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Spreads a hold's Pay calls over the payment connections (both clicks of a double click
/// on the same one, as a browser would).
fn connection_for(hold_id: &str, len: usize) -> usize {
    hold_id.bytes().map(usize::from).sum::<usize>() % len
}

/// The most tokens of the concert that were ACTIVE at once, read from the tokens themselves:
/// each admitted token was ACTIVE from its `admit_time` until its `end_time` (or still is).
/// Both are stamped with `statement_timestamp()` by statements that hold the line's lock
/// (admission, completion, leave, expiry), so they come in the order those changes were
/// made, and the count between any two of them is exact: no moment goes unseen, as one
/// between two samples of a sampler would. At equal times ends count before admissions
/// (they are never one statement), and fans admitted by one statement count together.
async fn peak_active(audit: &PgPool, concert_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(max(active), 0)::int8 FROM (
             SELECT sum(change) OVER (ORDER BY at, change ROWS UNBOUNDED PRECEDING) AS active
               FROM (SELECT admit_time AS at, 1 AS change FROM queue.tokens
                      WHERE concert_id = $1 AND admit_time IS NOT NULL
                     UNION ALL
                     SELECT end_time, -1 FROM queue.tokens
                      WHERE concert_id = $1 AND admit_time IS NOT NULL
                        AND end_time IS NOT NULL) AS changes) AS running",
    )
    .bind(concert_id)
    .fetch_one(audit)
    .await
}

/// Live bars on the terminal (hidden when stderr is not one).
async fn show_progress(sale: Arc<Sale>, fans: u64, cap: u64) {
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>12} {bar:40.cyan/blue} {pos:>6}/{len:<6} {msg}")
            .expect("template")
            .progress_chars("█▉▊▋▌▍▎▏ ");
    let bar = |label: &str, len: u64| {
        let bar = bars.add(ProgressBar::new(len));
        bar.set_style(style.clone());
        bar.set_prefix(label.to_owned());
        bar
    };
    let waiting = bar("waiting", fans);
    let active = bar("active", cap);
    let sold = bar("seats sold", sale.total_seats as u64);
    let payments = bar("payments", sale.total_seats as u64);
    let mut stop = sale.stop.subscribe();
    loop {
        let live = &sale.live;
        waiting.set_position(live.waiting.load(Ordering::Relaxed).max(0) as u64);
        active.set_position(live.active.load(Ordering::Relaxed).max(0) as u64);
        active.set_message(format!(
            "{} admitted",
            live.admitted.load(Ordering::Relaxed)
        ));
        sold.set_position(live.seats_sold.load(Ordering::Relaxed).max(0) as u64);
        payments.set_position(live.payments.load(Ordering::Relaxed) as u64);
        payments.set_message(format!(
            "{} failed",
            live.payments_failed.load(Ordering::Relaxed)
        ));
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    for bar in [waiting, active, sold, payments] {
        bar.finish();
    }
}

// ---------------------------------------------------------------------------------------
// The verdict.

/// One invariant and whether it held.
struct Check {
    name: &'static str,
    passed: bool,
    detail: String,
}

fn check(name: &'static str, passed: bool, detail: String) -> Check {
    Check {
        name,
        passed,
        detail,
    }
}

async fn verdict(
    sale: &Sale,
    audit: &PgPool,
    dates: &[String],
    peak_active: i64,
    cap: u32,
) -> Result<Vec<Check>, Box<dyn std::error::Error>> {
    let receipts = std::mem::take(&mut *sale.receipts.lock().expect("receipts"));
    let mut checks = Vec::new();

    // What the services say, through their own RPCs: every receipt's payment is COMPLETED
    // and names the seat; every charged fan's balance is what the ledger says.
    let mut payment = sale.payments[0].clone();
    let mut receipt_ids: Vec<&String> = receipts.iter().map(|(_, _, id)| id).collect();
    receipt_ids.sort();
    receipt_ids.dedup();
    let mut not_completed = 0;
    for payment_id in &receipt_ids {
        let read = payment
            .get_payment(payment_pb::GetPaymentRequest {
                payment_id: (*payment_id).clone(),
            })
            .await?
            .into_inner()
            .payment
            .unwrap_or_default();
        if read.status() != payment_pb::PaymentStatus::Completed {
            not_completed += 1;
        }
    }
    checks.push(check(
        "every receipt is a COMPLETED payment (GetPayment)",
        not_completed == 0,
        format!(
            "{} payments read, {not_completed} not COMPLETED",
            receipt_ids.len()
        ),
    ));

    // Seats: sold in the concert schema == seats of COMPLETED payments == seats on receipts.
    let (seats_sold, seats_paid, payments_completed): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM concert.seats
                  WHERE schedule_id = ANY($1) AND sold_to_payment IS NOT NULL),
                (SELECT coalesce(sum(cardinality(seat_numbers)), 0)::bigint
                   FROM payment.payments WHERE status = 'COMPLETED'),
                (SELECT count(*) FROM payment.payments WHERE status = 'COMPLETED')",
    )
    .bind(dates)
    .fetch_one(audit)
    .await?;
    checks.push(check(
        "seats sold == seats of completed payments",
        seats_sold == seats_paid && seats_paid == receipts.len() as i64,
        format!(
            "{seats_sold} SOLD in concert, {seats_paid} in {payments_completed} completed payments, {} on receipts",
            receipts.len()
        ),
    ));
    checks.push(check(
        "payments completed == receipts handed out",
        payments_completed as usize == receipt_ids.len(),
        format!(
            "{payments_completed} completed, {} receipts",
            receipt_ids.len()
        ),
    ));

    // No seat sold twice: not on the receipts, not in the concert's confirmed holds, and
    // each sold seat names the payment of the hold that bought it.
    let distinct: HashSet<(&String, i32)> = receipts
        .iter()
        .map(|(date, seat, _)| (date, *seat))
        .collect();
    let (double_holds, mismatched): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (
                    SELECT h.schedule_id, seat FROM concert.holds h, unnest(h.seat_numbers) seat
                     WHERE h.status = 'CONFIRMED'
                     GROUP BY 1, 2 HAVING count(*) > 1) twice),
                (SELECT count(*) FROM concert.holds h, unnest(h.seat_numbers) seat
                  WHERE h.status = 'CONFIRMED'
                    AND NOT EXISTS (SELECT 1 FROM concert.seats s
                                     WHERE s.schedule_id = h.schedule_id
                                       AND s.seat_number = seat
                                       AND s.sold_to_payment = h.payment_id))",
    )
    .fetch_one(audit)
    .await?;
    checks.push(check(
        "no seat sold twice",
        distinct.len() == receipts.len() && double_holds == 0 && mismatched == 0,
        format!(
            "{} receipt seats, {} distinct; {double_holds} seats in two confirmed holds; {mismatched} sold to another payment",
            receipts.len(),
            distinct.len()
        ),
    ));

    // Points: charged - spent + refunded == the sum of balances, by the ledger and by the
    // point service's own GetBalance of every fan who charged.
    let (charged, spent, refunded, balances): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(amount) FILTER (WHERE kind = 'CHARGE'), 0)::bigint,
                coalesce(-sum(amount) FILTER (WHERE kind = 'SPEND'), 0)::bigint,
                coalesce(sum(amount) FILTER (WHERE kind = 'REFUND'), 0)::bigint,
                (SELECT coalesce(sum(balance), 0)::bigint FROM point.wallets)
           FROM point.ledger",
    )
    .fetch_one(audit)
    .await?;
    let charged_users: Vec<String> = sale
        .charged_users
        .lock()
        .expect("charged users")
        .iter()
        .cloned()
        .collect();
    let mut point = sale.points[0].clone();
    let mut balances_by_rpc = 0;
    for user_id in charged_users {
        balances_by_rpc += point
            .get_balance(point_pb::GetBalanceRequest { user_id })
            .await?
            .into_inner()
            .balance;
    }
    checks.push(check(
        "points conserved (charged - spent + refunded == sum of balances)",
        charged - spent + refunded == balances
            && balances == balances_by_rpc
            && charged == sale.live.points_charged.load(Ordering::Relaxed),
        format!(
            "{charged} - {spent} + {refunded} = {}; balances {balances} (GetBalance: {balances_by_rpc}); fans charged {}",
            charged - spent + refunded,
            sale.live.points_charged.load(Ordering::Relaxed)
        ),
    ));

    checks.push(points_against_payments(audit).await?);

    let sold = format!(
        "{} of {} seats sold",
        sale.live.seats_sold.load(Ordering::Relaxed),
        sale.total_seats
    );
    checks.push(check(
        "the sale ended by itself (sold out, or every fan done) within --timeout",
        sale.cut_short_by.get().is_none(),
        match sale.cut_short_by.get() {
            Some(why) => format!("cut short by {why} with {sold}"),
            None => sold,
        },
    ));

    checks.push(check(
        "ACTIVE cap never exceeded",
        peak_active <= i64::from(cap),
        format!(
            "at most {peak_active} ACTIVE at once (cap {cap}), counted from every token's \
             admission and end"
        ),
    ));

    let violations = std::mem::take(&mut *sale.violations.lock().expect("violations"));
    checks.push(check(
        "fans saw nothing impossible (one payment per double click)",
        violations.is_empty(),
        if violations.is_empty() {
            format!(
                "{} double clicks, each one payment",
                sale.live.double_clicks.load(Ordering::Relaxed)
            )
        } else {
            violations.join("; ")
        },
    ));

    let failed_calls: usize = sale
        .rpcs
        .lock()
        .expect("rpc stats")
        .values()
        .map(|times| times.failed)
        .sum();
    checks.push(check(
        "no call failed (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED ...)",
        failed_calls == 0,
        format!("{failed_calls} failed calls"),
    ));
    Ok(checks)
}

/// Points against payments: "points conserved" holds the wallets to their own ledger, this
/// holds the ledger to the sale, so that a fan who lost points fails the verdict. Every
/// spend is either a COMPLETED payment's, of its amount, or refunded in full; nothing is
/// refunded to a COMPLETED payment; and what stays spent is what the completed payments
/// cost.
async fn points_against_payments(audit: &PgPool) -> Result<Check, sqlx::Error> {
    let (spent, refunded, paid, unaccounted, refunded_completed): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT coalesce(-sum(amount), 0)::bigint
                       FROM point.ledger WHERE kind = 'SPEND'),
                    (SELECT coalesce(sum(amount), 0)::bigint
                       FROM point.ledger WHERE kind = 'REFUND'),
                    (SELECT coalesce(sum(amount), 0)::bigint
                       FROM payment.payments WHERE status = 'COMPLETED'),
                    (SELECT count(*) FROM point.ledger s
                      WHERE s.kind = 'SPEND'
                        AND NOT EXISTS (SELECT 1 FROM payment.payments p
                                         WHERE p.payment_id::text = s.payment_id
                                           AND p.status = 'COMPLETED'
                                           AND p.amount = -s.amount)
                        AND NOT EXISTS (SELECT 1 FROM point.ledger r
                                         WHERE r.kind = 'REFUND'
                                           AND r.payment_id = s.payment_id
                                           AND r.amount = -s.amount)),
                    (SELECT count(*) FROM point.ledger r
                       JOIN payment.payments p ON p.payment_id::text = r.payment_id
                      WHERE r.kind = 'REFUND' AND p.status = 'COMPLETED')",
        )
        .fetch_one(audit)
        .await?;
    Ok(check(
        "points taken only for seats sold (spent - refunded == completed payments)",
        spent - refunded == paid && unaccounted == 0 && refunded_completed == 0,
        format!(
            "{spent} - {refunded} = {}; completed payments {paid}; {unaccounted} spends neither \
             paid for seats nor refunded; {refunded_completed} refunds of completed payments",
            spent - refunded
        ),
    ))
}

// ---------------------------------------------------------------------------------------
// The summary.

struct Report {
    sale_time: Duration,
    sold_out_after: Option<Duration>,
    fans: usize,
    seats: i64,
    admitted: usize,
    payments: usize,
    payments_failed: usize,
    seats_sold: i64,
    abandoned: usize,
    holds_left_to_expire: usize,
    double_clicks: usize,
    went_home: usize,
    /// Admitted fans who pressed "leave" (LeaveQueue answered; their token may have ended
    /// already).
    left_queue: usize,
    max_active: i64,
    rpcs: HashMap<&'static str, RpcTimes>,
    /// How long after admission each watching fan heard of it.
    admission_heard: Summary,
    checks: Vec<Check>,
}

impl Report {
    fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.passed)
    }

    /// RPC names in a stable order with their summaries.
    fn rpc_summaries(&self) -> Vec<(&'static str, Summary, usize)> {
        let mut names: Vec<&&'static str> = self.rpcs.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let times = &self.rpcs[*name];
                (
                    *name,
                    Summary {
                        name: name.to_string(),
                        elapsed: self.sale_time,
                        latencies: times.latencies.clone(),
                        errors: times.failed,
                    },
                    times.refused,
                )
            })
            .collect()
    }

    fn print(&self) {
        println!();
        match self.sold_out_after {
            Some(after) => println!(
                "SOLD OUT in {:.2} s: {} seats, {} payments",
                after.as_secs_f64(),
                self.seats_sold,
                self.payments
            ),
            None => println!(
                "not sold out after {:.2} s: {} of {} seats sold",
                self.sale_time.as_secs_f64(),
                self.seats_sold,
                self.seats
            ),
        }
        println!(
            "  fans {} · admitted {} · paid {} · payments refused {} · abandoned {} · holds left to expire {} · double clicks {} · left the line {} · went home from the line {} · max ACTIVE {}",
            self.fans,
            self.admitted,
            self.payments,
            self.payments_failed,
            self.abandoned,
            self.holds_left_to_expire,
            self.double_clicks,
            self.left_queue,
            self.went_home,
            self.max_active
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "  admission heard on the watch stream: p50 {:.2} ms, p99 {:.2} ms after it happened ({} fans)",
            ms(self.admission_heard.quantile(0.50)),
            ms(self.admission_heard.quantile(0.99)),
            self.admission_heard.latencies.len()
        );
        println!();
        println!(
            "  {:<28} {:>7} {:>8} {:>6} {:>9} {:>10} {:>10}",
            "rpc", "calls", "refused", "failed", "per s", "p50 ms", "p99 ms"
        );
        for (name, summary, refused) in self.rpc_summaries() {
            println!(
                "  {:<28} {:>7} {:>8} {:>6} {:>9.0} {:>10.2} {:>10.2}",
                name,
                summary.latencies.len() + summary.errors,
                refused,
                summary.errors,
                summary.throughput(),
                ms(summary.quantile(0.50)),
                ms(summary.quantile(0.99))
            );
        }
        println!();
        for check in &self.checks {
            println!(
                "  [{}] {}: {}",
                if check.passed { "ok" } else { "FAIL" },
                check.name,
                check.detail
            );
        }
        println!();
        println!("VERDICT: {}", if self.passed() { "PASS" } else { "FAIL" });
    }

    /// The summary for machines (hand-written: one fixed shape, no serde for ten lines).
    fn json(&self, args: &DemoArgs, seed: u64) -> String {
        let seconds = |d: Duration| format!("{:.4}", d.as_secs_f64());
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        let rpcs: Vec<String> = self
            .rpc_summaries()
            .into_iter()
            .map(|(name, summary, refused)| {
                format!(
                    "{{\"rpc\":{},\"calls\":{},\"refused\":{refused},\"failed\":{},\"per_second\":{:.1},\"p50_ms\":{},\"p99_ms\":{}}}",
                    json_string(name),
                    summary.latencies.len() + summary.errors,
                    summary.errors,
                    summary.throughput(),
                    ms(summary.quantile(0.50)),
                    ms(summary.quantile(0.99))
                )
            })
            .collect();
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|check| {
                format!(
                    "{{\"name\":{},\"passed\":{},\"detail\":{}}}",
                    json_string(check.name),
                    check.passed,
                    json_string(&check.detail)
                )
            })
            .collect();
        format!(
            "{{\"verdict\":\"{}\",\"fans\":{},\"seats\":{},\"cap\":{},\"rate\":{},\"seed\":{seed},\
             \"sale_seconds\":{},\"sold_out_seconds\":{},\"seats_sold\":{},\"payments\":{},\
             \"payments_refused\":{},\"admitted\":{},\"abandoned\":{},\"holds_left_to_expire\":{},\
             \"double_clicks\":{},\"left_queue\":{},\"went_home\":{},\"max_active\":{},\"admission_heard_p50_ms\":{},\
             \"admission_heard_p99_ms\":{},\"rpcs\":[{}],\"checks\":[{}]}}\n",
            if self.passed() { "PASS" } else { "FAIL" },
            self.fans,
            self.seats,
            args.cap,
            args.rate,
            seconds(self.sale_time),
            self.sold_out_after
                .map(seconds)
                .unwrap_or_else(|| "null".into()),
            self.seats_sold,
            self.payments,
            self.payments_failed,
            self.admitted,
            self.abandoned,
            self.holds_left_to_expire,
            self.double_clicks,
            self.left_queue,
            self.went_home,
            self.max_active,
            ms(self.admission_heard.quantile(0.50)),
            ms(self.admission_heard.quantile(0.99)),
            rpcs.join(","),
            checks.join(",")
        )
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// SplitMix64: the fans' dice. Seeded per fan, so a `--seed` replays the same choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Self(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn dice_are_seeded_and_in_range() {
        let rolls = |seed| {
            let mut rng = Rng::new(seed, 7);
            (0..100).map(|_| rng.below(4)).collect::<Vec<_>>()
        };
        assert_eq!(rolls(1), rolls(1));
        assert_ne!(rolls(1), rolls(2));
        assert!(rolls(3).iter().all(|roll| *roll < 4));
    }

    /// The peak is exact at the edges: an end and an admission at the same instant do not
    /// overlap, fans admitted by one statement count together, and tokens never admitted,
    /// or of another concert, count for nothing.
    #[tokio::test]
    async fn the_peak_of_active_tokens_is_counted_from_admissions_and_ends() {
        use stagedoor_runtime::db;
        let database = stagedoor_testkit::TestDatabase::create().await;
        database
            .migrate(db::QUEUE, stagedoor_queue::app::migrator())
            .await;
        let admin = database.admin().await;
        sqlx::query("INSERT INTO queue.lines (concert_id) VALUES ('c'), ('other')")
            .execute(&admin)
            .await
            .unwrap();
        let place = std::sync::atomic::AtomicI64::new(0);
        // A token of `concert`, admitted and ended that many seconds after a fixed instant.
        let token = |concert: &'static str, admitted: Option<i32>, ended: Option<i32>| {
            let admin = admin.clone();
            let place = place.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                sqlx::query(
                    "INSERT INTO queue.tokens
                         (token, concert_id, user_id, place, status, admit_time, end_time)
                     SELECT gen_random_uuid(), $1, 'fan-' || $2, $2,
                            CASE WHEN $3::int IS NULL THEN 'WAITING'
                                 WHEN $4::int IS NULL THEN 'ACTIVE' ELSE 'DONE' END,
                            t + make_interval(secs => $3), t + make_interval(secs => $4)
                       FROM (SELECT timestamptz '2026-01-01 10:00Z' AS t) AS base",
                )
                .bind(concert)
                .bind(place)
                .bind(admitted)
                .bind(ended)
                .execute(&admin)
                .await
                .unwrap();
            }
        };
        let peak = || peak_active(&admin, "c");
        token("c", Some(0), Some(2)).await;
        token("c", Some(1), Some(3)).await;
        token("c", Some(2), None).await; // admitted as the first one ended
        token("c", Some(4), None).await;
        token("c", None, None).await; // never admitted
        token("other", Some(1), Some(3)).await;
        assert_eq!(peak().await.unwrap(), 2);
        // One more admitted in the same statement as the second, for long.
        token("c", Some(1), Some(9)).await;
        assert_eq!(peak().await.unwrap(), 3);
        admin.close().await;
    }

    /// The check passes a ledger whose every spend was paid for or refunded, and fails one
    /// with points kept by a FAILED payment, which "points conserved" alone cannot see
    /// (the wallets still equal their ledger).
    #[tokio::test]
    async fn points_kept_by_a_failed_payment_fail_the_verdict() {
        use stagedoor_runtime::db;
        let database = stagedoor_testkit::TestDatabase::create().await;
        database
            .migrate(db::POINT, stagedoor_point::app::migrator())
            .await;
        database
            .migrate(db::PAYMENT, stagedoor_payment::app::migrator())
            .await;
        let admin = database.admin().await;
        let payment = |status: &'static str, amount: i64| {
            let id = uuid::Uuid::new_v4();
            let admin = admin.clone();
            async move {
                sqlx::query(
                    "INSERT INTO payment.payments
                         (payment_id, user_id, request_id, hold_id, concert_id, schedule_id,
                          seat_numbers, amount, start_time, token, token_sha256, step, status,
                          complete_time)
                     VALUES ($1, 'fan', $1::text, gen_random_uuid(), 'c', 'd', '{1}', $2,
                             now(), NULL, sha256($1::text::bytea), 'DONE', $3, now())",
                )
                .bind(id)
                .bind(amount)
                .bind(status)
                .execute(&admin)
                .await
                .unwrap();
                id.to_string()
            }
        };
        let ledger = |kind: &'static str, amount: i64, balance_after: i64, payment_id: String| {
            let admin = admin.clone();
            async move {
                sqlx::query(
                    "INSERT INTO point.ledger (user_id, kind, amount, balance_after, payment_id)
                     VALUES ('fan', $1, $2, $3, $4)",
                )
                .bind(kind)
                .bind(amount)
                .bind(balance_after)
                .bind(payment_id)
                .execute(&admin)
                .await
                .unwrap();
            }
        };
        sqlx::query("INSERT INTO point.wallets (user_id, balance) VALUES ('fan', 0)")
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO point.ledger (user_id, kind, amount, balance_after, request_id)
             VALUES ('fan', 'CHARGE', 10000, 10000, 'top-up')",
        )
        .execute(&admin)
        .await
        .unwrap();
        let sold = payment("COMPLETED", 3_000).await;
        ledger("SPEND", -3_000, 7_000, sold).await;
        let refunded = payment("FAILED", 2_000).await;
        ledger("SPEND", -2_000, 5_000, refunded.clone()).await;
        ledger("REFUND", 2_000, 7_000, refunded).await;
        let passed = points_against_payments(&admin).await.unwrap();
        assert!(passed.passed, "{}", passed.detail);

        let kept = payment("FAILED", 1_000).await;
        ledger("SPEND", -1_000, 6_000, kept).await;
        let failed = points_against_payments(&admin).await.unwrap();
        assert!(!failed.passed, "{}", failed.detail);
        assert!(
            failed.detail.contains("1 spends neither"),
            "{}",
            failed.detail
        );
        admin.close().await;
    }
}
