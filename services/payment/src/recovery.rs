//! The recovery worker: finishes or compensates every payment left mid-flight.
//!
//! A payment is left mid-flight when its driver stopped before DONE: the process crashed or
//! was stopped, or a peer was unreachable and the driver released the payment with a
//! backoff. Either way its lease runs out, and the worker of whichever replica claims it
//! first (FOR UPDATE SKIP LOCKED, see `store::claim_due`) drives it from its recorded step.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use stagedoor_runtime::Shutdown;
use tokio::task::JoinSet;

use crate::{
    saga::{Driven, Saga},
    store,
};

/// Payments claimed per round; a full round is followed by another at once.
const CLAIM_BATCH: i64 = 64;

/// Runs until `shutdown` fires, scanning every `interval`.
pub async fn run(saga: Arc<Saga>, interval: Duration, shutdown: Shutdown) {
    loop {
        // Each claimed payment's lease started after this (see `Saga::drive`).
        let asked_at = Instant::now();
        let claimed = match store::claim_due(&saga.pool, saga.settings.lease, CLAIM_BATCH).await {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "recovery scan failed; will retry");
                Vec::new()
            }
        };
        let full = claimed.len() as i64 == CLAIM_BATCH;
        if !claimed.is_empty() {
            tracing::info!(payments = claimed.len(), "recovering unfinished payments");
        }
        // Each payment on its own task: one payment's slow peer does not hold up the rest.
        // Patience zero: one attempt per step, then back off until the next round.
        let mut drives = JoinSet::new();
        for payment in claimed {
            let saga = saga.clone();
            drives.spawn(async move {
                let payment_id = payment.payment_id;
                match saga.drive(payment, asked_at, Duration::ZERO).await {
                    Ok(Driven::Settled(payment)) => {
                        tracing::info!(%payment_id, status = %payment.status, "payment recovered")
                    }
                    Ok(other) => tracing::debug!(%payment_id, ?other, "payment still pending"),
                    Err(error) => {
                        tracing::warn!(%payment_id, %error, "recovery failed; will retry")
                    }
                }
            });
        }
        while let Some(drove) = drives.join_next().await {
            if let Err(error) = drove {
                // A bug: the payment stays leased until its lease runs out, then the next
                // round tries it again.
                tracing::error!(%error, "a recovery drive panicked");
            }
        }

        if full && !shutdown.is_fired() {
            continue;
        }
        tokio::select! {
            _ = shutdown.clone().wait() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
