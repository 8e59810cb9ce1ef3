//! The concerts' waiting rooms. The queue takes fans only for a concert whose line is open,
//! and only this service knows which ids are concerts: it opens a concert's line (the queue's
//! OpenLines) before the concert exists for anyone, and every replica re-opens the lines of
//! every concert when it starts and every few minutes after (concerts made before lines were
//! opened at creation, or by a replica of an older version during a rolling upgrade, or a
//! queue database restored from an older backup). Deploy the queue before the concert
//! service: an older queue has no OpenLines, and CreateConcert is QUEUE_UNAVAILABLE until it
//! does.

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

/// A pass that fails is retried after this long at first and twice as long after each
/// failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Time between two passes that succeeded. A pass is one read of the concert ids and one
/// OpenLines call per thousand concerts: nothing, next to a sale.
const REOPEN_EVERY: Duration = Duration::from_secs(300);

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
                    // UNIMPLEMENTED: a queue of a version without OpenLines, mid-upgrade.
                    code if client::peer_unreachable(code) || code == Code::Unimplemented => {
                        ApiError::new(
                            Code::Unavailable,
                            "QUEUE_UNAVAILABLE",
                            "the queue service cannot open the concert's waiting room right \
                             now; retry with the same request_id",
                        )
                    }
                    code => ApiError::internal(format!(
                        "OpenLines failed: {code:?}: {}",
                        status.message()
                    )),
                })?;
        }
        Ok(())
    }
}

/// Opens the line of every concert in the catalog, at once and then every [`REOPEN_EVERY`],
/// until the service shuts down (a pass in progress is dropped then). Opening an open line
/// changes nothing, so every replica runs it.
pub async fn keep_every_line_open(pool: PgPool, lines: QueueLines, shutdown: Shutdown) {
    let stopped = shutdown.wait();
    tokio::pin!(stopped);
    let mut retry = RETRY_FIRST;
    loop {
        let pass = async {
            let ids = store::concert_ids(&pool).await.map_err(ApiError::from)?;
            lines.open(&ids).await.map(|()| ids.len())
        };
        let pause = tokio::select! {
            _ = &mut stopped => return,
            outcome = pass => match outcome {
                Ok(concerts) => {
                    tracing::debug!(concerts, "every concert's waiting room is open");
                    retry = RETRY_FIRST;
                    REOPEN_EVERY
                }
                Err(error) => {
                    tracing::warn!(error = %error.message(), retry_in = ?retry,
                        "cannot open the concerts' waiting rooms now");
                    let pause = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    pause
                }
            },
        };
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
