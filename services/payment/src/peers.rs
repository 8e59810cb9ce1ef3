//! The three services the saga calls, each call with a deadline, and the one rule that
//! decides what a failed call means.
//!
//! A call either did its step, was **refused** (the callee answered and said no: the step
//! did not happen and will not happen if asked again), or has an **unknown** outcome (it
//! timed out, the peer was down, the connection broke, the peer failed internally). Only a
//! refusal may lead to compensation; an unknown outcome is asked again with the same key.

use std::time::{Duration, Instant};

use stagedoor_proto::{
    concert::v1::{
        self as concert_pb, concert_internal_service_client::ConcertInternalServiceClient,
    },
    point::v1::{self as point_pb, point_internal_service_client::PointInternalServiceClient},
    queue::v1::{self as queue_pb, queue_internal_service_client::QueueInternalServiceClient},
};
use stagedoor_runtime::client::peer_channel;
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;

use crate::hops::{Hop, HOPS};

/// How a call to a peer ended, when it did not succeed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The peer said no, for good: `reason` is its ErrorInfo reason.
    Refused { reason: String, message: String },
    /// Nobody knows whether the step happened: ask again with the same key.
    Unknown(String),
}

impl Failure {
    fn of(status: tonic::Status) -> Self {
        match status.code() {
            // The callee answered and refused: nothing happened, and asking again with the
            // same key gets the same answer.
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::Unauthenticated => Self::Refused {
                reason: status
                    .get_details_error_info()
                    .map(|info| info.reason)
                    .unwrap_or_else(|| canonical_name(status.code())),
                message: status.message().to_owned(),
            },
            // Timeouts, a peer down or restarting, a lost race (ABORTED, or ALREADY_EXISTS:
            // a concurrent call with the same key wrote first, libs/runtime/src/error.rs), an
            // internal error: the step may or may not have happened. Taking ALREADY_EXISTS
            // for a no would refund a payment whose seat a concurrent ConfirmHold sold.
            _ => Self::Unknown(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

/// A status code's canonical gRPC name (`FAILED_PRECONDITION`), the reason recorded for a
/// refusal that came without an ErrorInfo (from a proxy, say): `failure_reason` is read by
/// clients as an UPPER_SNAKE name. tonic's `Debug` spells the code in CamelCase.
fn canonical_name(code: Code) -> String {
    let mut name = String::new();
    for (index, letter) in format!("{code:?}").chars().enumerate() {
        if letter.is_ascii_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(letter.to_ascii_uppercase());
    }
    name
}

/// Clients of the queue, concert and point services. Cheap to clone.
#[derive(Clone)]
pub struct Peers {
    queue: QueueInternalServiceClient<Channel>,
    concert: ConcertInternalServiceClient<Channel>,
    point: PointInternalServiceClient<Channel>,
    deadline: Duration,
}

impl Peers {
    pub fn new(
        queue_url: &str,
        concert_url: &str,
        point_url: &str,
        deadline: Duration,
    ) -> Result<Self, String> {
        Ok(Self {
            queue: QueueInternalServiceClient::new(peer_channel("QUEUE_URL", queue_url, deadline)?),
            concert: ConcertInternalServiceClient::new(peer_channel(
                "CONCERT_URL",
                concert_url,
                deadline,
            )?),
            point: PointInternalServiceClient::new(peer_channel("POINT_URL", point_url, deadline)?),
            deadline,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.deadline);
        request
    }

    pub async fn get_hold(&self, hold_id: &str) -> Result<concert_pb::Hold, Failure> {
        let started = Instant::now();
        let answer = self
            .concert
            .clone()
            .get_hold(self.request(concert_pb::GetHoldRequest {
                hold_id: hold_id.to_owned(),
            }))
            .await;
        HOPS.record(Hop::GetHold, started);
        let hold = answer.map_err(Failure::of)?.into_inner().hold;
        hold.ok_or_else(|| Failure::Unknown("GetHold answered without a hold".into()))
    }

    /// Spends the payment's points; the ledger entry's balance after the spend.
    pub async fn spend(
        &self,
        user_id: &str,
        amount: i64,
        payment_id: &str,
    ) -> Result<i64, Failure> {
        let started = Instant::now();
        let answer = self
            .point
            .clone()
            .spend_points(self.request(point_pb::SpendPointsRequest {
                user_id: user_id.to_owned(),
                amount,
                payment_id: payment_id.to_owned(),
            }))
            .await;
        HOPS.record(Hop::Spend, started);
        let entry = answer.map_err(Failure::of)?.into_inner().entry;
        entry
            .map(|entry| entry.balance_after)
            .ok_or_else(|| Failure::Unknown("SpendPoints answered without an entry".into()))
    }

    pub async fn refund(&self, payment_id: &str) -> Result<(), Failure> {
        let started = Instant::now();
        let answer = self
            .point
            .clone()
            .refund_points(self.request(point_pb::RefundPointsRequest {
                payment_id: payment_id.to_owned(),
            }))
            .await;
        HOPS.record(Hop::Refund, started);
        answer.map(drop).map_err(Failure::of)
    }

    pub async fn confirm(&self, hold_id: &str, payment_id: &str) -> Result<(), Failure> {
        let started = Instant::now();
        let answer = self
            .concert
            .clone()
            .confirm_hold(self.request(concert_pb::ConfirmHoldRequest {
                hold_id: hold_id.to_owned(),
                payment_id: payment_id.to_owned(),
            }))
            .await;
        HOPS.record(Hop::Confirm, started);
        answer.map(drop).map_err(Failure::of)
    }

    /// Marks the token DONE; DONE and EXPIRED both count as done (the queue says so).
    pub async fn complete_token(&self, token: &str) -> Result<queue_pb::TokenStatus, Failure> {
        let started = Instant::now();
        let answer = self
            .queue
            .clone()
            .complete_token(self.request(queue_pb::CompleteTokenRequest {
                token: token.to_owned(),
            }))
            .await;
        HOPS.record(Hop::CompleteToken, started);
        Ok(answer.map_err(Failure::of)?.into_inner().status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_definite_no_is_a_refusal() {
        let refusal = stagedoor_runtime::ApiError::new(
            Code::FailedPrecondition,
            "INSUFFICIENT_BALANCE",
            "short",
        );
        assert!(matches!(
            Failure::of(refusal.into()),
            Failure::Refused { reason, .. } if reason == "INSUFFICIENT_BALANCE"
        ));
        // A refusal without an ErrorInfo is named by its code, as gRPC spells it.
        assert!(matches!(
            Failure::of(tonic::Status::new(Code::FailedPrecondition, "no detail")),
            Failure::Refused { reason, .. } if reason == "FAILED_PRECONDITION"
        ));
        // A unique violation the peer did not handle: a concurrent call may have done it.
        let raced = stagedoor_runtime::ApiError::new(Code::AlreadyExists, "ALREADY_EXISTS", "x");
        assert!(matches!(Failure::of(raced.into()), Failure::Unknown(_)));
        for code in [
            Code::Aborted,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
        ] {
            assert!(matches!(
                Failure::of(tonic::Status::new(code, "")),
                Failure::Unknown(_)
            ));
        }
    }
}
