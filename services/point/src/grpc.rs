//! The wallet's gRPC surface: PointService (public) and PointInternalService.

use std::sync::Arc;

use sqlx::PgPool;
use stagedoor_proto::point::v1::{
    self as pb, point_internal_service_server::PointInternalService,
    point_service_server::PointService,
};
use stagedoor_runtime::{time, validate, ApiError};
use tonic::{Request, Response, Status};

use crate::{config::PointConfig, domain::PointError, store};

/// Everything a handler needs.
pub struct PointState {
    pub pool: PgPool,
    pub max_amount: i64,
    pub balance_cap: i64,
}

/// Implements both wallet services over one shared state.
#[derive(Clone)]
pub struct PointApi {
    state: Arc<PointState>,
}

impl PointApi {
    pub fn new(pool: PgPool, config: &PointConfig) -> Self {
        Self {
            state: Arc::new(PointState {
                pool,
                max_amount: config.max_amount,
                balance_cap: config.balance_cap,
            }),
        }
    }

    /// A charge's amount: 1 to the configured maximum of one charge. The maximum is
    /// `store::charge`'s to apply, after its look-up of an earlier charge under the key.
    fn charge_amount(&self, amount: i64) -> Result<i64, PointError> {
        at_least_one(amount, self.state.max_amount)
    }

    /// A spend's amount: 1 to the balance cap, which `store::spend` applies. A spend pays a
    /// whole hold (up to four seats), which may cost more than one charge may add, so the
    /// charge maximum does not apply; no wallet can hold more than the cap, so a larger
    /// spend could never succeed.
    fn spend_amount(&self, amount: i64) -> Result<i64, PointError> {
        at_least_one(amount, self.state.balance_cap)
    }
}

/// `amount` when it is at least 1, the bound no setting moves; `max` names the upper one in
/// the refusal.
fn at_least_one(amount: i64, max: i64) -> Result<i64, PointError> {
    if amount >= 1 {
        Ok(amount)
    } else {
        Err(PointError::AmountOutOfRange { amount, max })
    }
}

/// Page tokens are the last entry id of the previous page, sealed to the user whose history
/// it is; opaque to clients.
fn parse_page_token(token: &str, user_id: &str) -> Result<Option<i64>, PointError> {
    if token.is_empty() {
        return Ok(None);
    }
    validate::open_page_token(token, user_id)
        .and_then(|cursor| cursor.strip_prefix("e"))
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .map(Some)
        .ok_or(PointError::InvalidPageToken)
}

#[tonic::async_trait]
impl PointService for PointApi {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let request = request.into_inner();
        let user_id = validate::id("user_id", &request.user_id)?;
        // A user who never charged has no wallet yet: balance 0, no update_time.
        let wallet = store::balance(&self.state.pool, user_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetBalanceResponse {
            user_id: user_id.to_owned(),
            balance: wallet.map_or(0, |(balance, _)| balance),
            update_time: wallet.map(|(_, at)| time::timestamp(at)),
        }))
    }

    async fn charge_points(
        &self,
        request: Request<pb::ChargePointsRequest>,
    ) -> Result<Response<pb::ChargePointsResponse>, Status> {
        let request = request.into_inner();
        let user_id = validate::id("user_id", &request.user_id)?;
        let request_id = validate::id("request_id", &request.request_id)?;
        let amount = self.charge_amount(request.amount)?;
        let entry = store::charge(
            &self.state.pool,
            user_id,
            amount,
            request_id,
            self.state.max_amount,
            self.state.balance_cap,
        )
        .await?;
        Ok(Response::new(pb::ChargePointsResponse {
            entry: Some(entry.to_proto()),
        }))
    }

    async fn list_point_history(
        &self,
        request: Request<pb::ListPointHistoryRequest>,
    ) -> Result<Response<pb::ListPointHistoryResponse>, Status> {
        let request = request.into_inner();
        let user_id = validate::id("user_id", &request.user_id)?;
        let page_size = validate::page_size(request.page_size, 20, 100)?;
        let before = parse_page_token(&request.page_token, user_id)?;
        // One more than asked tells whether a next page exists.
        let mut entries = store::history(&self.state.pool, user_id, before, page_size + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if entries.len() as i64 > page_size {
            entries.truncate(page_size as usize);
            entries
                .last()
                .map(|entry| validate::seal_page_token(&format!("e{}", entry.entry_id), user_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPointHistoryResponse {
            entries: entries.iter().map(|entry| entry.to_proto()).collect(),
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl PointInternalService for PointApi {
    async fn spend_points(
        &self,
        request: Request<pb::SpendPointsRequest>,
    ) -> Result<Response<pb::SpendPointsResponse>, Status> {
        let request = request.into_inner();
        let user_id = validate::id("user_id", &request.user_id)?;
        let payment_id = validate::id("payment_id", &request.payment_id)?;
        let amount = self.spend_amount(request.amount)?;
        let entry = store::spend(
            &self.state.pool,
            user_id,
            amount,
            payment_id,
            self.state.balance_cap,
        )
        .await?;
        Ok(Response::new(pb::SpendPointsResponse {
            entry: Some(entry.to_proto()),
        }))
    }

    async fn refund_points(
        &self,
        request: Request<pb::RefundPointsRequest>,
    ) -> Result<Response<pb::RefundPointsResponse>, Status> {
        let request = request.into_inner();
        let payment_id = validate::id("payment_id", &request.payment_id)?;
        let entry = store::refund(&self.state.pool, payment_id).await?;
        Ok(Response::new(pb::RefundPointsResponse {
            entry: Some(entry.to_proto()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens() {
        let sealed = |cursor| validate::seal_page_token(cursor, "fan");
        assert_eq!(parse_page_token("", "fan").unwrap(), None);
        assert_eq!(parse_page_token(&sealed("e42"), "fan").unwrap(), Some(42));
        assert!(parse_page_token(&sealed("e42"), "another-fan").is_err());
        assert!(parse_page_token("e42", "fan").is_err());
        assert!(parse_page_token(&sealed("42"), "fan").is_err());
        assert!(parse_page_token(&sealed("e-1"), "fan").is_err());
        assert!(parse_page_token(&sealed("ezz"), "fan").is_err());
    }
}
