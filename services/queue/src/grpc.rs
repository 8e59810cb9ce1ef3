//! The queue's gRPC surface: QueueService (public) and QueueInternalService.
//! Handlers check input, call the store, and shape responses; nothing else lives here.

use std::{pin::Pin, sync::Arc, time::Duration};

use sqlx::PgPool;
use stagedoor_proto::queue::v1::{
    self as pb, queue_internal_service_server::QueueInternalService,
    queue_service_server::QueueService,
};
use stagedoor_runtime::{time, validate, ApiError, Shutdown};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    batcher::{EndBatcher, IssueBatcher, TicketReader},
    board::LineBoard,
    cache::{EndAlarm, WaitingCache},
    domain::{self, parse_token, QueueError, Ticket, TokenStatus},
    heartbeat::Heartbeats,
    store::{self, AdmissionPolicy},
};

/// Everything a handler needs, shared by both services.
pub struct QueueState {
    pub pool: PgPool,
    pub policy: AdmissionPolicy,
    pub batcher: IssueBatcher,
    /// CompleteToken's group commit.
    pub completer: EndBatcher,
    /// LeaveQueue's group commit: a queue of its own, so that a wave of fans leaving never
    /// fills the queue that payments' completions wait in.
    pub leaver: EndBatcher,
    /// Fresh reads of token rows, coalesced.
    pub reader: TicketReader,
    pub board: Arc<LineBoard>,
    pub heartbeats: Arc<Heartbeats>,
    pub waiting: WaitingCache,
    /// Which concerts have a line: IssueToken for one that has none never reaches a batch.
    pub open_lines: crate::open_lines::OpenLines,
    pub shutdown: Shutdown,
    /// A watcher's pause between position updates when far back (see `update_interval`).
    pub watch_interval: Duration,
    /// `QueueConfig::active_recheck`.
    pub active_recheck: Duration,
}

/// Implements both queue services over one shared state.
#[derive(Clone)]
pub struct QueueApi {
    state: Arc<QueueState>,
}

impl QueueApi {
    pub fn new(state: QueueState) -> Self {
        Self {
            state: Arc::new(state),
        }
    }

    /// Reads a token a client sent, or says why not.
    async fn ticket(&self, token: &str) -> Result<Ticket, QueueError> {
        let token = parse_token(token)?;
        self.state
            .reader
            .read(token)
            .await?
            .ok_or(QueueError::TokenNotFound)
    }

    /// A ticket as GetQueueStatus and WatchQueueStatus answer it: from this replica's memory
    /// of WAITING tickets when the cache's rules allow (`cache.rs`), else from its row.
    async fn current_ticket(&self, token: Uuid) -> Result<Ticket, QueueError> {
        let state = &self.state;
        if let Some(ticket) = state.waiting.lookup(token, &state.board) {
            return Ok(ticket);
        }
        let ticket = state
            .reader
            .read(token)
            .await?
            .ok_or(QueueError::TokenNotFound)?;
        state.waiting.remember(&ticket);
        Ok(ticket)
    }

    /// Notes that the fan behind a WAITING ticket is still there, when it is time to.
    fn keep_alive(&self, ticket: &Ticket) {
        if ticket.heartbeat_due {
            self.state.heartbeats.seen(ticket.token);
        }
    }

    fn to_proto(&self, ticket: &Ticket) -> pb::QueueTicket {
        ticket_to_proto(ticket, &self.state.board)
    }
}

fn ticket_to_proto(ticket: &Ticket, board: &LineBoard) -> pb::QueueTicket {
    let position = ticket.position();
    let estimated_wait = (ticket.status == TokenStatus::Waiting)
        .then(|| board.admission_rate(&ticket.concert_id))
        .flatten()
        .filter(|rate| *rate > 0.0)
        .map(|rate| time::duration(Duration::from_secs_f64((position + 1) as f64 / rate)));
    pb::QueueTicket {
        token: ticket.token.to_string(),
        concert_id: ticket.concert_id.clone(),
        user_id: ticket.user_id.clone(),
        status: ticket.status.to_proto() as i32,
        place: ticket.place,
        position,
        estimated_wait,
        expire_time: ticket.expire_time.map(time::timestamp),
        create_time: Some(time::timestamp(ticket.create_time)),
        admit_time: ticket.admit_time.map(time::timestamp),
    }
}

#[tonic::async_trait]
impl QueueService for QueueApi {
    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let request = request.into_inner();
        let concert_id = validate::id("concert_id", &request.concert_id)?;
        let user_id = validate::id("user_id", &request.user_id)?;
        // A concert with no line is refused before the line batches (see `open_lines`); the
        // batch checks again under the line lock.
        if !self.state.open_lines.is_open(concert_id).await? {
            return Err(QueueError::ConcertNotFound(concert_id.to_owned()).into());
        }

        // New fans and refreshes alike go through the batch: it finds a live token under
        // the line lock, so a refresh costs one slot in a shared transaction, not a query
        // of its own.
        let ticket = self.state.batcher.issue(concert_id, user_id).await?;
        // The issuing transaction has just read or written the row: a fan who polls or
        // watches next (every fan in a rush) is answered from memory, not by reading it again.
        self.state.waiting.remember(&ticket);
        self.keep_alive(&ticket);
        Ok(Response::new(pb::IssueTokenResponse {
            ticket: Some(self.to_proto(&ticket)),
        }))
    }

    async fn get_queue_status(
        &self,
        request: Request<pb::GetQueueStatusRequest>,
    ) -> Result<Response<pb::GetQueueStatusResponse>, Status> {
        let token = parse_token(&request.into_inner().token)?;
        let ticket = self.current_ticket(token).await?;
        self.keep_alive(&ticket);
        Ok(Response::new(pb::GetQueueStatusResponse {
            ticket: Some(self.to_proto(&ticket)),
        }))
    }

    type WatchQueueStatusStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchQueueStatusResponse, Status>> + Send>>;

    async fn watch_queue_status(
        &self,
        request: Request<pb::WatchQueueStatusRequest>,
    ) -> Result<Response<Self::WatchQueueStatusStream>, Status> {
        // A bad or unknown token fails the call itself, before any message is streamed.
        let token = parse_token(&request.into_inner().token)?;
        // Set before the ticket is read, so that a leave through this replica between the
        // read and the stream's start still rings it.
        let ended_here = self.state.waiting.alarm(token);
        let ticket = self.current_ticket(token).await?;
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(watch(self.state.clone(), ticket, ended_here, sender));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn leave_queue(
        &self,
        request: Request<pb::LeaveQueueRequest>,
    ) -> Result<Response<pb::LeaveQueueResponse>, Status> {
        // Read fresh (not from the replica's view): the line to lock is the token's, and a
        // token that has ended is answered as it is, without locking anything.
        let ticket = self.ticket(&request.into_inner().token).await?;
        // On a task of its own: the leave commits even if the client hangs up meanwhile (its
        // batch runs apart from this call), and then this replica must still answer the
        // token's polls from the row from now on and end its watches of the token.
        let state = self.state.clone();
        let ended = tokio::spawn(async move {
            let ticket = if ticket.status.is_final() {
                ticket
            } else {
                // Group-committed with the line's other leaves (see `batcher`).
                state.leaver.leave(&ticket.concert_id, ticket.token).await?
            };
            state.waiting.ended_here(ticket.token);
            Ok::<_, ApiError>(ticket)
        });
        let ticket = ended.await.map_err(|failed| {
            ApiError::internal(format!("LeaveQueue's task failed: {failed}"))
        })??;
        Ok(Response::new(pb::LeaveQueueResponse {
            ticket: Some(self.to_proto(&ticket)),
        }))
    }
}

/// How long a watcher waits between two position updates, given `far`, the pause of a fan
/// 1,000 or more places back (`QUEUE_WATCH_INTERVAL`, 2 s by default). Fans near the head get
/// quicker updates; fans far back don't need ten a second, and 100,000 watchers must not wake
/// on every admission. None of them waits out its pause to hear of its own admission: the
/// board wakes a watcher when the line's pointer reaches its place.
///
/// Every update is a message the service encodes and a client decodes, so the cadence is the
/// waiting room's main cost while a line moves. In the demo's rush (9,500 fans watching a
/// line that moves a few places at a time), updates every 500 ms up to 10,000 places back
/// were 130,000 messages in an 8.5 s sale; every 2 s from 1,000 back, they are about 40,000
/// in 6 s, and the demo's process burns a fifth less CPU per second of sale. A fan 1,000
/// places back waits seconds at least; an update every 2 s is still more than hosted waiting
/// rooms give (they refresh every 20 to 30 s).
fn update_interval(position: i64, far: Duration) -> Duration {
    match position {
        0..=99 => far / 20,
        100..=999 => far / 4,
        _ => far,
    }
}

/// Drives one WatchQueueStatus stream: sends the ticket whenever its status or position
/// changes, until the token ends, the client hangs up or the service shuts down.
async fn watch(
    state: Arc<QueueState>,
    mut ticket: Ticket,
    ended_here: EndAlarm,
    sender: mpsc::Sender<Result<pb::WatchQueueStatusResponse, Status>>,
) {
    let mut line = state.board.subscribe(&ticket.concert_id);
    let mut sent: Option<(TokenStatus, i64)> = None;
    // An open stream is a fan still waiting, but it is noted for the heartbeat coarsely, as
    // a poll is: whenever the last write is a heartbeat period old, looked at when the stream
    // opens, at each periodic check of the row and when the fan goes away. So when a stream
    // ends, its fan's last write is at most a period old, which the sweeper allows for
    // (`QueueConfig::ghost_after`): the idle TTL counts from the stream's end. Noting every
    // watcher on every wake wrote every waiting row at every flush (10,000 watchers: 10,000
    // row writes every 2 s in the demo, each locking rows that admission then waited for),
    // and noting every stream's end wrote a row per fan whenever a sale ended or a
    // connection dropped.
    let heartbeat_every = state.policy.heartbeat_every;
    // When the fan was last written as seen (or noted, to be written), by this clock.
    let mut noted_at = tokio::time::Instant::now()
        .checked_sub(ticket.seen_ago)
        .unwrap_or_else(tokio::time::Instant::now);
    let note_if_due = |ticket: &Ticket, noted_at: &mut tokio::time::Instant| {
        if ticket.status == TokenStatus::Waiting
            && (ticket.heartbeat_due || noted_at.elapsed() >= heartbeat_every)
        {
            state.heartbeats.seen(ticket.token);
            *noted_at = tokio::time::Instant::now();
        }
    };
    // When the stream last checked the ticket against its row (its first message may come
    // from a cache entry verified up to one period earlier).
    let mut verified_at = tokio::time::Instant::now();
    // `ended_here` rings if the fan leaves through this replica: the stream ends with
    // EXPIRED at once.
    let mut rung = false;
    // Resolves when this replica's board sees the admission pointer reach the fan's place.
    // Registered once per stream and kept across pauses; `None` once it has fired.
    let mut reached = (ticket.status == TokenStatus::Waiting)
        .then(|| state.board.reached(&ticket.concert_id, ticket.place));
    // While a needed read of the row fails for a moment (the database away or busy): when it
    // is tried again, the pause before the one after, and since when reads have failed.
    let mut retry: Option<ReadRetry> = None;
    let stopped = state.shutdown.clone().wait();
    tokio::pin!(stopped);
    loop {
        let current = (ticket.status, ticket.position());
        if sent != Some(current) {
            let message = pb::WatchQueueStatusResponse {
                ticket: Some(ticket_to_proto(&ticket, &state.board)),
            };
            if !deliver(&sender, stopped.as_mut(), Ok(message)).await {
                return note_if_due(&ticket, &mut noted_at);
            }
            sent = Some(current);
        }
        if ticket.status.is_final() {
            return; // ends the stream cleanly after the terminal status
        }
        note_if_due(&ticket, &mut noted_at);
        ticket.heartbeat_due = false;

        // Wait for something that can change the ticket. A WAITING ticket moves with its
        // line; an ACTIVE one ends at its window's end or when its fan pays, which a slow
        // re-read notices (ACTIVE watchers are few, and must not read on every admission).
        let waiting = ticket.status == TokenStatus::Waiting;
        let pause = tokio::time::sleep(update_interval(ticket.position(), state.watch_interval));
        let recheck = if waiting {
            // Due from the last check, not from this wake: a line that moves just often
            // enough to wake the watcher must not put the check off period after period.
            (verified_at + state.policy.heartbeat_every)
                .saturating_duration_since(tokio::time::Instant::now())
        } else {
            // An ACTIVE token ends by its window (timed below), through this replica (its
            // alarm) or through another one, which only a re-read finds.
            state.active_recheck
        };
        tokio::select! {
            _ = &mut stopped => return say_shutting_down(&sender),
            _ = sender.closed() => return note_if_due(&ticket, &mut noted_at),
            // While a failed read waits for its retry, only the retry's timer (or a leave
            // here) reads again: a window already past would otherwise wake the watch every
            // 20 ms, a line on the move every pause, and each wake would read at once.
            _ = async {
                pause.await;
                let _ = line.changed().await;
            }, if waiting && retry.is_none() => {}
            // The fan's own admission (or skip) ends the pause at once.
            _ = async {
                if let Some(reached) = reached.as_mut() {
                    let _ = reached.await;
                }
            }, if waiting && reached.is_some() && retry.is_none() => reached = None,
            _ = ended_here.rung() => rung = true,
            _ = tokio::time::sleep(window_end(&ticket)), if retry.is_none() => {}
            _ = tokio::time::sleep(recheck), if retry.is_none() => {}
            _ = tokio::time::sleep_until(retry.map_or_else(tokio::time::Instant::now, |retry| retry.due)),
                if retry.is_some() => {}
        }

        let counters = *line.borrow_and_update();
        // Nothing but a periodic check could tell this watch anything new: still WAITING,
        // still behind the admission pointer, no leave here, and no failed read to try again.
        let behind = ticket.status == TokenStatus::Waiting
            && counters.admitted_through < ticket.place
            && !rung
            && retry.is_none();
        if behind && verified_at.elapsed() < state.policy.heartbeat_every {
            // Still behind the admission pointer: the position follows from the board alone.
            ticket.admitted_through = ticket.admitted_through.max(counters.admitted_through);
            continue;
        }
        // Admitted, skipped, completed, expired or left: only the row can say which. A WAITING
        // ticket is also checked once per `heartbeat_every` (the trust window of a cached
        // poll), however far back: its fan may have left through another replica, or been
        // expired as a ghost, and the stream must end with EXPIRED rather than count down
        // to a place nobody will take. One batched row read per watcher per period (30 s by
        // default) is a small price beside the updates the stream sends.
        verified_at = tokio::time::Instant::now();
        match state.reader.read(ticket.token).await {
            Ok(Some(fresh)) => {
                rung = false;
                retry = None;
                // The row may have been written since (a poll, another replica's watch).
                if let Some(written) = tokio::time::Instant::now().checked_sub(fresh.seen_ago) {
                    noted_at = noted_at.max(written);
                }
                ticket = fresh;
                // Noted at the loop's top when due: the stream was open all along.
            }
            Ok(None) => return,
            // A periodic check that fails is tried again next period: far-back watchers
            // must not all lose their streams to one slow moment of the database. The
            // position still follows the board meanwhile.
            Err(error) if behind => {
                tracing::warn!(token = %logged(ticket.token), %error, "a watch's periodic check failed; trying again next period");
                ticket.admitted_through = ticket.admitted_through.max(counters.admitted_through);
                // The stream is open all the same: its fan is there.
                note_if_due(&ticket, &mut noted_at);
            }
            // The row is needed now (the fan was admitted, its window may have ended, it may
            // have paid or left) and the database is away or busy for a moment: try again
            // shortly. Ending the stream would send every watcher of the sale back to open a
            // new one at the same moment, against the same database. A database away for a
            // heartbeat period ends the stream with its error after all.
            Err(error)
                if matches!(
                    error.code(),
                    tonic::Code::Unavailable | tonic::Code::Aborted
                ) && retry
                    .is_none_or(|retry| retry.failing_since.elapsed() < heartbeat_every) =>
            {
                tracing::warn!(token = %logged(ticket.token), %error, "a watch's read failed; trying again shortly");
                retry = Some(ReadRetry::after(retry));
                note_if_due(&ticket, &mut noted_at);
            }
            Err(error) => {
                deliver(&sender, stopped.as_mut(), Err(error.into())).await;
                return;
            }
        }
    }
}

/// How a token appears in logs: its first 8 hex digits, enough to follow one fan through the
/// log lines and useless as the bearer credential the whole token is (whoever reads the logs
/// must not be able to pay with a fan's token).
fn logged(token: Uuid) -> String {
    let mut hex = token.simple().to_string();
    hex.truncate(8);
    format!("{hex}…")
}

/// A watch's read of its row to be tried again (see `watch`).
#[derive(Clone, Copy)]
struct ReadRetry {
    due: tokio::time::Instant,
    pause: Duration,
    failing_since: tokio::time::Instant,
}

impl ReadRetry {
    /// First pause after a failed read; doubled after each failure in a row, up to
    /// [`READ_RETRY_MAX`].
    const FIRST: Duration = Duration::from_millis(100);

    /// The retry after one more failure, `previous` the one that just failed, if any.
    fn after(previous: Option<ReadRetry>) -> Self {
        let now = tokio::time::Instant::now();
        let (pause, failing_since) = match previous {
            Some(previous) => (
                (previous.pause * 2).min(READ_RETRY_MAX),
                previous.failing_since,
            ),
            None => (Self::FIRST, now),
        };
        Self {
            due: now + pause,
            pause,
            failing_since,
        }
    }
}

/// Longest pause between two tries of a watch's failed read.
const READ_RETRY_MAX: Duration = Duration::from_secs(2);

/// Sends one item of a watch; false when the stream is over: the client went away, or this
/// replica began stopping first. A client that stops reading fills the stream's buffer and
/// the send waits; shutdown must not wait with it.
async fn deliver(
    sender: &mpsc::Sender<Result<pb::WatchQueueStatusResponse, Status>>,
    stopped: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    item: Result<pb::WatchQueueStatusResponse, Status>,
) -> bool {
    tokio::select! {
        delivered = sender.send(item) => delivered.is_ok(),
        () = stopped => {
            say_shutting_down(sender);
            false
        }
    }
}

/// Ends a watch because this replica is stopping: the client is told to watch again (a load
/// balancer sends that call to another replica). Only if the stream's buffer has room: a
/// client that stopped reading is not waited for, and its stream ends without the error
/// after what was buffered (or is closed at the drain limit if it never reads again).
fn say_shutting_down(sender: &mpsc::Sender<Result<pb::WatchQueueStatusResponse, Status>>) {
    let message = "the queue service is shutting down; watch again";
    let _ = sender.try_send(Err(ApiError::shutting_down(message).into()));
}

/// How long after a window's end (by this host's clock) a watcher re-reads the ticket.
const PAST_WINDOW_MARGIN: Duration = Duration::from_millis(20);
/// How often a watcher re-reads a ticket still ACTIVE this long after its window ended by
/// this host's clock.
const PAST_WINDOW_RECHECK: Duration = Duration::from_millis(250);

/// Time left in an ACTIVE window (a long time for any other status).
fn window_end(ticket: &Ticket) -> Duration {
    match (ticket.status, ticket.expire_time) {
        (TokenStatus::Active, Some(end)) => {
            let left = end - chrono::Utc::now();
            match (left.to_std(), (-left).to_std()) {
                // A little past the end, so the database agrees the window has passed.
                (Ok(left), _) => left + PAST_WINDOW_MARGIN,
                // Just past (the row was read as the window ended): the margin again.
                (_, Ok(past)) if past < PAST_WINDOW_RECHECK => PAST_WINDOW_MARGIN,
                // Long past by this host's clock, yet the row still read ACTIVE: the
                // database's clock is behind this one. Re-read at a calm pace until it catches
                // up, not every 20 ms for as long as the skew lasts.
                _ => PAST_WINDOW_RECHECK,
            }
        }
        _ => Duration::from_secs(24 * 3600),
    }
}

/// Most tokens one ValidateTokens call may ask about.
const MAX_TOKENS_PER_VALIDATION: usize = 1_000;

/// ValidateToken's answer for a token's row (`None`: never issued).
fn validation(ticket: Option<Ticket>) -> Result<pb::ValidateTokenResponse, QueueError> {
    let ticket = ticket.ok_or(QueueError::TokenNotFound)?;
    if ticket.status != TokenStatus::Active {
        return Err(QueueError::TokenNotActive(ticket.status));
    }
    Ok(pb::ValidateTokenResponse {
        user_id: ticket.user_id,
        concert_id: ticket.concert_id,
        expire_time: ticket.expire_time.map(time::timestamp),
    })
}

#[tonic::async_trait]
impl QueueInternalService for QueueApi {
    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let ticket = self.ticket(&request.into_inner().token).await?;
        Ok(Response::new(validation(Some(ticket))?))
    }

    async fn validate_tokens(
        &self,
        request: Request<pb::ValidateTokensRequest>,
    ) -> Result<Response<pb::ValidateTokensResponse>, Status> {
        let tokens = request.into_inner().tokens;
        validate::item_count("tokens", tokens.len(), MAX_TOKENS_PER_VALIDATION, "tokens")?;
        let parsed: Vec<Result<Uuid, QueueError>> =
            tokens.iter().map(|token| parse_token(token)).collect();
        let ids: Vec<Uuid> = parsed
            .iter()
            .filter_map(|id| id.as_ref().ok())
            .copied()
            .collect();
        // Fresh reads, like ValidateToken's: one statement for the whole call.
        let mut tickets = self.state.reader.read_many(&ids).await?.into_iter();
        let validations = parsed
            .into_iter()
            .map(|id| {
                let ticket = id.map(|_| tickets.next().expect("one ticket read per parsed token"));
                // Whose token it is, when it was issued but is not ACTIVE: the other services
                // let such a token act on what its fan already has (ReleaseHold).
                // With the end of its active window, if it had one: how long ago it could
                // last have made a hold.
                let owner = match &ticket {
                    Ok(Some(ticket)) if ticket.status != TokenStatus::Active => {
                        let mut owner = vec![
                            ("user_id".to_owned(), ticket.user_id.clone()),
                            ("concert_id".to_owned(), ticket.concert_id.clone()),
                        ];
                        if let Some(end) = ticket.expire_time {
                            owner.push(("expire_time".to_owned(), end.to_rfc3339()));
                        }
                        owner
                    }
                    _ => Vec::new(),
                };
                let result = match ticket.and_then(validation) {
                    Ok(valid) => pb::token_validation::Result::Valid(valid),
                    Err(refused) => {
                        let refused = ApiError::from(refused);
                        pb::token_validation::Result::Refused(pb::TokenRefusal {
                            code: refused.code() as i32,
                            reason: refused.reason().to_owned(),
                            message: refused.message().to_owned(),
                            metadata: refused
                                .metadata()
                                .iter()
                                .map(|(key, value)| (key.to_string(), value.clone()))
                                .chain(owner)
                                .collect(),
                        })
                    }
                };
                pb::TokenValidation {
                    result: Some(result),
                }
            })
            .collect();
        Ok(Response::new(pb::ValidateTokensResponse { validations }))
    }

    async fn complete_token(
        &self,
        request: Request<pb::CompleteTokenRequest>,
    ) -> Result<Response<pb::CompleteTokenResponse>, Status> {
        let token: Uuid = domain::parse_token(&request.into_inner().token)?;
        // Read fresh (not from the replica's view): only the row says whether it is ACTIVE.
        let ticket = self
            .state
            .reader
            .read(token)
            .await?
            .ok_or(QueueError::TokenNotFound)?;
        let status = match ticket.status {
            TokenStatus::Waiting => return Err(QueueError::TokenNotActive(ticket.status).into()),
            // Already ended: completing again changes nothing.
            TokenStatus::Done | TokenStatus::Expired => ticket.status,
            // Group-committed with the other completions of this line (see `batcher`).
            TokenStatus::Active => {
                self.state
                    .completer
                    .complete(&ticket.concert_id, token)
                    .await?
            }
        };
        // The token's watches on this replica hear of its end now, as after LeaveQueue,
        // instead of at their next re-read of an ACTIVE token (`QueueConfig::active_recheck`).
        self.state.waiting.ended_here(token);
        Ok(Response::new(pb::CompleteTokenResponse {
            status: status.to_proto() as i32,
        }))
    }

    async fn open_lines(
        &self,
        request: Request<pb::OpenLinesRequest>,
    ) -> Result<Response<pb::OpenLinesResponse>, Status> {
        let concert_ids = request.into_inner().concert_ids;
        validate::item_count(
            "concert_ids",
            concert_ids.len(),
            MAX_LINES_PER_OPENING,
            "ids",
        )?;
        for concert_id in &concert_ids {
            validate::id("concert_ids", concert_id)?;
        }
        let opened = store::open_lines(&self.state.pool, &self.state.policy, &concert_ids)
            .await
            .map_err(QueueError::from)?;
        Ok(Response::new(pb::OpenLinesResponse {
            opened_count: opened as i32,
        }))
    }
}

/// Most lines one OpenLines call may open.
const MAX_LINES_PER_OPENING: usize = 1_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn active_until(end: chrono::DateTime<chrono::Utc>) -> Ticket {
        Ticket {
            token: Uuid::new_v4(),
            concert_id: "c".into(),
            user_id: "fan".into(),
            place: 1,
            status: TokenStatus::Active,
            create_time: end,
            admit_time: Some(end),
            expire_time: Some(end),
            admitted_through: 1,
            heartbeat_due: false,
            seen_ago: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn logs_name_a_token_by_a_prefix_that_is_no_credential() {
        let token = Uuid::parse_str("0123abcd-0000-4000-8000-000000000000").unwrap();
        assert_eq!(logged(token), "0123abcd…");
    }

    #[test]
    fn a_window_past_by_this_clock_is_rechecked_calmly() {
        let ahead = active_until(chrono::Utc::now() + chrono::Duration::seconds(10));
        let left = window_end(&ahead);
        assert!(left > Duration::from_secs(9) && left <= Duration::from_millis(10_020));
        // The database still says ACTIVE although this clock says the window ended: a skew,
        // waited out at PAST_WINDOW_RECHECK, not re-read every 20 ms.
        let past = active_until(chrono::Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(window_end(&past), PAST_WINDOW_RECHECK);
        // Only just past (the row was read as the window ended): the usual margin.
        let just_past = active_until(chrono::Utc::now() - chrono::Duration::milliseconds(5));
        assert_eq!(window_end(&just_past), PAST_WINDOW_MARGIN);
    }
}
