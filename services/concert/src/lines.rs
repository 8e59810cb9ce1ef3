//! The concerts' waiting rooms. The queue takes fans only for a concert whose line is open,
//! and only this service knows which ids are concerts: it opens a concert's line (the queue's
//! OpenLines) before the concert exists for anyone, and at start-up re-opens the lines of
//! every concert it has (concerts made before lines were opened at creation, or a queue
//! database restored from an older backup).

use std::time::Duration;

use sqlx::PgPool;
use stagedoor_proto::queue::v1::{
    queue_internal_service_client::QueueInternalServiceClient, OpenLinesRequest,
};
use stagedoor_runtime::{client, ApiError, Shutdown};
use tonic::{transport::Channel, Code};

use crate::store;

/// Most ids one OpenLines call takes (the queue's limit).
const OPEN_CHUNK: usize = 1_000;

/// The start-up pass retries a queue that does not answer yet, waiting this long at first
/// and twice as long after each failure, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Opens concerts' lines at the queue; cheap to clone.
#[derive(Clone)]
pub struct QueueLines {
    queue: QueueInternalServiceClient<Channel>,
}

impl QueueLines {
    /// Lines at the queue of `queue_url`, connected on first use; every call has `deadline`.
    pub fn new(queue_url: &str, deadline: Duration) -> Result<Self, String> {
        let channel = client::peer_channel("QUEUE_URL", queue_url, deadline)?;
        Ok(Self {
            queue: QueueInternalServiceClient::new(channel),
        })
    }

    /// Opens the lines of `concert_ids` (idempotent). A queue that cannot be reached is
    /// UNAVAILABLE / QUEUE_UNAVAILABLE: the caller may retry.
    pub async fn open(&self, concert_ids: &[String]) -> Result<(), ApiError> {
        for chunk in concert_ids.chunks(OPEN_CHUNK) {
            self.queue
                .clone()
                .open_lines(OpenLinesRequest {
                    concert_ids: chunk.to_vec(),
                })
                .await
                .map_err(|status| match status.code() {
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown => ApiError::new(
                        Code::Unavailable,
                        "QUEUE_UNAVAILABLE",
                        "the queue service cannot open the concert's waiting room right \
                             now; retry with the same request_id",
                    ),
                    code => ApiError::internal(format!(
                        "OpenLines failed: {code:?}: {}",
                        status.message()
                    )),
                })?;
        }
        Ok(())
    }
}

/// Opens the line of every concert in the catalog, retrying until the queue has answered
/// once (or the service shuts down). Every replica runs it when it starts; opening an open
/// line changes nothing.
pub async fn open_every_line(pool: PgPool, lines: QueueLines, shutdown: Shutdown) {
    let stopped = shutdown.wait();
    tokio::pin!(stopped);
    let mut pause = RETRY_FIRST;
    loop {
        let opened = match store::concert_ids(&pool).await {
            Ok(ids) if ids.is_empty() => return,
            Ok(ids) => lines.open(&ids).await.map(|()| ids.len()),
            Err(error) => Err(ApiError::from(error)),
        };
        match opened {
            Ok(count) => {
                tracing::info!(concerts = count, "every concert's waiting room is open");
                return;
            }
            Err(error) => tracing::warn!(
                error = %error.message(),
                retry_in = ?pause,
                "cannot open the concerts' waiting rooms yet"
            ),
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}
