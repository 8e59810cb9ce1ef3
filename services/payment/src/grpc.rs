//! The payment service's gRPC surface: Pay starts (or replays) a saga, GetPayment and
//! ListPayments read the record.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use stagedoor_proto::{
    concert::v1::{Hold, HoldStatus},
    payment::v1::{self as pb, payment_service_server::PaymentService},
};
use stagedoor_runtime::{
    auth::{bearer_token, Fan, TokenValidator},
    background::Detached,
    time, validate, ApiError,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    domain::{PaymentError, Status as PaymentStatus},
    hops::{Hop, HOPS},
    peers::Failure,
    saga::{Driven, Saga},
    store::{self, InsertRefused, NewPayment, PaymentRow},
};

/// Everything a handler needs.
pub struct PaymentState {
    pub pool: PgPool,
    pub saga: Arc<Saga>,
    /// Asks the queue on every Pay (no cache: a token completed a moment ago must not pay
    /// again).
    pub tokens: TokenValidator,
    /// How long Pay waits for a saga that a peer is holding up.
    pub patience: Duration,
    /// Where Pay runs its sagas, apart from the call (see `pay`).
    pub sagas: Detached,
}

#[derive(Clone)]
pub struct PaymentApi {
    state: Arc<PaymentState>,
}

/// Longest pause between two reads of a payment someone else is driving.
const MAX_POLL: Duration = Duration::from_millis(200);

impl PaymentApi {
    pub fn new(state: PaymentState) -> Self {
        Self {
            state: Arc::new(state),
        }
    }

    /// A Pay whose request id was seen before: the same answer, never a second charge.
    async fn replay(
        &self,
        existing: PaymentRow,
        hold_id: Uuid,
    ) -> Result<pb::PayResponse, PaymentError> {
        if existing.hold_id != hold_id {
            return Err(PaymentError::IdempotencyKeyReused {
                request_id: existing.request_id,
                payment_id: existing.payment_id.to_string(),
            });
        }
        self.answer_when_settled(existing).await
    }

    /// The answer for a payment, waiting (up to the patience) while another call or
    /// replica is still driving it.
    async fn answer_when_settled(
        &self,
        payment: PaymentRow,
    ) -> Result<pb::PayResponse, PaymentError> {
        let give_up_at = Instant::now() + self.state.patience;
        let mut pause = Duration::from_millis(10);
        let mut payment = payment;
        while payment.status() == PaymentStatus::Pending && Instant::now() + pause < give_up_at {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
            payment = store::by_id(&self.state.pool, payment.payment_id)
                .await?
                .ok_or_else(|| PaymentError::PaymentNotFound(payment.payment_id.to_string()))?;
        }
        answer(payment)
    }

    async fn pay(&self, request: Request<pb::PayRequest>) -> Result<pb::PayResponse, PaymentError> {
        let token = bearer_token(request.metadata())?;
        let hold_id = parse_uuid("hold_id", &request.get_ref().hold_id)?;
        let request_id = validate::id("request_id", &request.get_ref().request_id)?;

        // The token must be ACTIVE right now (asked, never cached), and the hold is needed
        // next: neither answer depends on the other, so both are asked at once. A refused
        // token makes the hold's answer moot.
        let hold_key = hold_id.to_string();
        let started = Instant::now();
        let (fan, hold) = tokio::join!(
            async {
                let fan = self.state.tokens.fan(request.metadata()).await;
                HOPS.record(Hop::ValidateToken, started);
                fan
            },
            self.state.saga.peers.get_hold(&hold_key),
        );
        let fan = match fan {
            Ok(fan) => fan,
            // A replay presenting the token that paid: that token is DONE by now, so the
            // queue refuses it; holding it is proof enough that this is the same fan. (A
            // double click also lands here when its twin paid and completed the token
            // between our call and the queue's answer.)
            Err(refused) => {
                return match store::by_request_and_token(&self.state.pool, request_id, &token)
                    .await?
                {
                    Some(existing) => self.replay(existing, hold_id).await,
                    None => Err(self.naming_its_payment(refused, &token).await?.into()),
                }
            }
        };

        let new = match new_payment(&fan, hold, hold_id, request_id, &token) {
            Ok(new) => new,
            Err(refused) => return self.replay_or(|| refused, &fan, request_id, hold_id).await,
        };
        // From the INSERT on, the work runs on its own task: a client that hangs up drops this
        // handler, not the saga, which must never stop half-way because nobody is listening
        // any more. Were the INSERT awaited here, a hang-up just after it committed would
        // leave the payment recorded, leased to a drive that never ran, until its lease ran
        // out and recovery took it (PAYMENT_LEASE, 30 s by default).
        let saga = self.state.saga.clone();
        let patience = self.state.patience;
        let recorded = self
            .state
            .sagas
            .spawn(async move {
                let started = Instant::now();
                let inserted = saga.writes.insert(new).await;
                HOPS.record(Hop::Record, started);
                let driven: Result<Result<(Uuid, Driven), InsertRefused>, ApiError> =
                    match inserted? {
                        Ok(payment) => {
                            let payment_id = payment.payment_id;
                            Ok(Ok((
                                payment_id,
                                saga.drive(payment, started, patience).await?,
                            )))
                        }
                        Err(refused) => Ok(Err(refused)),
                    };
                driven
            })
            .await
            .map_err(ApiError::internal)?;
        let (payment_id, driven) = match recorded? {
            Ok(driven) => driven,
            // The request id was used before (an earlier Pay, or its twin a moment ago):
            // answer as its replay.
            Err(InsertRefused::RequestUsed) => {
                let refused = || ApiError::internal("request id conflict without a payment").into();
                return self.replay_or(refused, &fan, request_id, hold_id).await;
            }
            // Another request id already pays this hold: only one payment of a hold may
            // charge. (Postgres may name this rule first even when the request id was used
            // too, hence `replay_or`.)
            Err(InsertRefused::HoldTaken) => {
                let payment_id = store::live_for_hold(&self.state.pool, hold_id)
                    .await?
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                let refused = PaymentError::HoldAlreadyPaying {
                    hold_id: hold_id.to_string(),
                    payment_id,
                };
                return self.replay_or(|| refused, &fan, request_id, hold_id).await;
            }
            // This token already pays for another hold (a Pay of another date sent at the
            // same moment): one admission buys one hold, whoever's INSERT came first.
            Err(InsertRefused::TokenTaken) => {
                let payment_id = store::live_for_token(&self.state.pool, &token)
                    .await?
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                let refused = PaymentError::TokenAlreadyPaying { payment_id };
                return self.replay_or(|| refused, &fan, request_id, hold_id).await;
            }
        };
        match driven {
            Driven::Settled(payment) => answer(payment),
            Driven::Deferred(_) | Driven::Crashed => {
                Err(PaymentError::InProgress(payment_id.to_string()))
            }
            Driven::Elsewhere => {
                let payment = store::by_id(&self.state.pool, payment_id)
                    .await?
                    .ok_or_else(|| PaymentError::PaymentNotFound(payment_id.to_string()))?;
                self.answer_when_settled(payment).await
            }
        }
    }

    /// The queue's refusal of a token, naming the payment that used the token up when one
    /// did: a second tab's Pay or a late double click with a fresh request id finds the token
    /// DONE, and with the payment's id the client can show the receipt (GetPayment).
    async fn naming_its_payment(
        &self,
        refused: ApiError,
        token: &str,
    ) -> Result<ApiError, PaymentError> {
        if refused.reason() != "TOKEN_NOT_ACTIVE" {
            return Ok(refused);
        }
        Ok(
            match store::live_for_token(&self.state.pool, token).await? {
                Some(payment_id) => refused.with_metadata("payment_id", payment_id.to_string()),
                None => refused,
            },
        )
    }

    /// A fresh Pay was refused; but if this fan used this request id before, the answer is
    /// that payment's, whatever the hold looks like now (a replay of a paid hold finds it
    /// SOLD, and must still get its receipt). Only refusals pay for this read: a smooth Pay
    /// learns of an earlier use of its request id from its INSERT. `refused` is made only
    /// when there is no such payment (an internal error logs itself when made).
    async fn replay_or(
        &self,
        refused: impl FnOnce() -> PaymentError,
        fan: &Fan,
        request_id: &str,
        hold_id: Uuid,
    ) -> Result<pb::PayResponse, PaymentError> {
        match store::by_user_request(&self.state.pool, &fan.user_id, request_id).await? {
            Some(existing) => self.replay(existing, hold_id).await,
            None => Err(refused()),
        }
    }
}

/// The payment to record for `fan`'s Pay of the hold GetHold described, or why the
/// hold cannot be paid by this fan now.
fn new_payment(
    fan: &Fan,
    hold: Result<Hold, Failure>,
    hold_id: Uuid,
    request_id: &str,
    token: &str,
) -> Result<NewPayment, PaymentError> {
    let hold = match hold {
        Ok(hold) => hold,
        Err(Failure::Refused { reason, .. }) if reason == "HOLD_NOT_FOUND" => {
            return Err(PaymentError::HoldNotFound(hold_id.to_string()))
        }
        Err(Failure::Refused { reason, message }) => {
            return Err(ApiError::internal(format!("GetHold refused: {reason}: {message}")).into())
        }
        Err(Failure::Unknown(cause)) => {
            tracing::warn!(%cause, "GetHold failed");
            return Err(PaymentError::ConcertUnavailable);
        }
    };
    // A hold of another fan is NOT_FOUND to this one, as in the concert service.
    if hold.user_id != fan.user_id {
        return Err(PaymentError::HoldNotFound(hold_id.to_string()));
    }
    if hold.concert_id != fan.concert_id {
        return Err(PaymentError::WrongConcert {
            token_concert: fan.concert_id.clone(),
            concert: hold.concert_id,
        });
    }
    match hold.status() {
        // Retired by the concert's sweeper: ConfirmHold refuses it whatever became of its
        // seats, so spending first would only end in a refund (or, for a fan short of
        // points, in INSUFFICIENT_BALANCE for a hold nobody could sell any more).
        HoldStatus::Expired if hold.retired => {
            return Err(PaymentError::HoldExpired(hold_id.to_string()))
        }
        // An expired hold may still be paid: ConfirmHold sells it if no seat of it was
        // taken since, and otherwise the saga refunds (the rule documented in the proto).
        HoldStatus::Held | HoldStatus::Expired => {}
        other => {
            return Err(PaymentError::HoldNotHeld {
                hold_id: hold.hold_id,
                status: other
                    .as_str_name()
                    .trim_start_matches("HOLD_STATUS_")
                    .to_owned(),
                payment_id: hold.payment_id,
            })
        }
    }
    let start_time = hold
        .start_time
        .as_ref()
        .and_then(time::from_timestamp)
        .ok_or_else(|| ApiError::internal("GetHold answered without a start time"))?;
    Ok(NewPayment {
        payment_id: Uuid::new_v4(),
        user_id: fan.user_id.clone(),
        request_id: request_id.to_owned(),
        hold_id,
        concert_id: hold.concert_id,
        schedule_id: hold.schedule_id,
        seat_numbers: hold.seat_numbers,
        amount: hold.total_price,
        start_time,
        token: token.to_owned(),
    })
}

/// What Pay says about a payment: the receipt, the failure, or "still in progress".
fn answer(payment: PaymentRow) -> Result<pb::PayResponse, PaymentError> {
    match payment.status() {
        PaymentStatus::Completed => Ok(pb::PayResponse {
            payment: Some(to_proto(&payment)),
        }),
        PaymentStatus::Failed => Err(PaymentError::Failed {
            payment_id: payment.payment_id.to_string(),
            reason: payment.failure_reason,
            message: payment.failure_message,
            amount: payment.amount,
        }),
        PaymentStatus::Pending => Err(PaymentError::InProgress(payment.payment_id.to_string())),
    }
}

fn to_proto(payment: &PaymentRow) -> pb::Payment {
    let status = match payment.status() {
        PaymentStatus::Pending => pb::PaymentStatus::Pending,
        PaymentStatus::Completed => pb::PaymentStatus::Completed,
        PaymentStatus::Failed => pb::PaymentStatus::Failed,
    };
    pb::Payment {
        payment_id: payment.payment_id.to_string(),
        user_id: payment.user_id.clone(),
        hold_id: payment.hold_id.to_string(),
        concert_id: payment.concert_id.clone(),
        schedule_id: payment.schedule_id.clone(),
        seat_numbers: payment.seat_numbers.clone(),
        amount: payment.amount,
        status: status as i32,
        failure_reason: payment.failure_reason.clone(),
        balance_after: payment.balance_after,
        request_id: payment.request_id.clone(),
        create_time: Some(time::timestamp(payment.create_time)),
        complete_time: payment.complete_time.map(time::timestamp),
        start_time: Some(time::timestamp(payment.start_time)),
    }
}

fn parse_uuid(field: &'static str, text: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text).map_err(|_| {
        ApiError::invalid_field(
            field,
            format!("{field} must be a UUID, as every id stagedoor issues is"),
        )
    })
}

/// Page tokens are `<create_time in µs>.<payment id>` of the previous page's last payment
/// (Postgres keeps microseconds, so the cursor is exact), sealed to the user whose payments
/// they list; opaque to clients.
fn parse_page_token(
    token: &str,
    user_id: &str,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, Uuid)>, PaymentError> {
    if token.is_empty() {
        return Ok(None);
    }
    let (micros, id) = validate::open_page_token(token, user_id)
        .and_then(|cursor| cursor.split_once('.'))
        .ok_or(PaymentError::InvalidPageToken)?;
    let micros: i64 = micros.parse().map_err(|_| PaymentError::InvalidPageToken)?;
    let at = chrono::DateTime::from_timestamp_micros(micros)
        .and_then(time::in_range)
        .ok_or(PaymentError::InvalidPageToken)?;
    let id = Uuid::try_parse(id).map_err(|_| PaymentError::InvalidPageToken)?;
    Ok(Some((at, id)))
}

fn page_token(payment: &PaymentRow, user_id: &str) -> String {
    let cursor = format!(
        "{}.{}",
        payment.create_time.timestamp_micros(),
        payment.payment_id.simple()
    );
    validate::seal_page_token(&cursor, user_id)
}

/// Most payments of one ListPayments page.
const MAX_PAGE: i64 = 100;
const DEFAULT_PAGE: i64 = 20;

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn pay(
        &self,
        request: Request<pb::PayRequest>,
    ) -> Result<Response<pb::PayResponse>, Status> {
        Ok(Response::new(PaymentApi::pay(self, request).await?))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::GetPaymentResponse>, Status> {
        let payment_id = parse_uuid("payment_id", &request.get_ref().payment_id)?;
        let payment = store::by_id(&self.state.pool, payment_id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| PaymentError::PaymentNotFound(payment_id.to_string()))?;
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(to_proto(&payment)),
        }))
    }

    async fn list_payments(
        &self,
        request: Request<pb::ListPaymentsRequest>,
    ) -> Result<Response<pb::ListPaymentsResponse>, Status> {
        let request = request.into_inner();
        let user_id = validate::id("user_id", &request.user_id)?;
        let page_size = validate::page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        let after = parse_page_token(&request.page_token, user_id)?;
        // One more than asked: whether there is a next page, without counting.
        let mut payments = store::list(&self.state.pool, user_id, after, page_size + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if payments.len() as i64 > page_size {
            payments.truncate(page_size as usize);
            payments
                .last()
                .map(|last| page_token(last, user_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPaymentsResponse {
            payments: payments.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let sealed = |cursor: &str| validate::seal_page_token(cursor, "fan");
        assert_eq!(parse_page_token("", "fan").unwrap(), None);
        let id = Uuid::new_v4();
        let token = sealed(&format!("1700000000123456.{}", id.simple()));
        let (at, parsed) = parse_page_token(&token, "fan").unwrap().unwrap();
        assert_eq!(at.timestamp_micros(), 1_700_000_000_123_456);
        assert_eq!(parsed, id);
        // Another fan's listing is not continued by this token.
        assert!(parse_page_token(&token, "another-fan").is_err());
        assert!(parse_page_token(&format!("1700000000123456.{}", id.simple()), "fan").is_err());
        assert!(parse_page_token(&sealed("12.not-a-uuid"), "fan").is_err());
        assert!(parse_page_token(&sealed("x.y"), "fan").is_err());
        assert!(parse_page_token(&sealed("12"), "fan").is_err());
        // An instant chrono can hold and Postgres cannot is a bad token, not a query.
        let ancient = sealed(&format!("-8000000000000000000.{}", id.simple()));
        assert!(parse_page_token(&ancient, "fan").is_err());
    }
}
