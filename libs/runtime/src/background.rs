//! A service's background tasks (admission ticks, batch workers, sweepers, recovery), watched
//! while the service serves.
//!
//! Each task is meant to run until the service stops. One that ends before (a panic, a loop
//! that returned) leaves a replica that still answers and still reports SERVING, yet no longer
//! admits anyone, sweeps holds or finishes payments, and nothing would tell an operator or a
//! balancer. So the first such end is a failure of the whole service: the server reports
//! NOT_SERVING, tells the service's streams and other tasks to stop, drains and ends with
//! [`crate::server::ServerError::Background`], and the binary exits non-zero for its
//! supervisor to restart it.
//!
//! What is watched is each task itself. Work a task runs on tasks of its own (a batch, one
//! payment's recovery drive) fails alone when it panics: its callers hear UNAVAILABLE, or the
//! payment waits for the next round, and the panic is logged where that work is awaited.

use std::any::Any;

use tokio::{
    sync::oneshot,
    task::{AbortHandle, JoinError, JoinHandle, JoinSet},
};

use crate::Shutdown;

/// A background task and the name it is reported under (`"admission ticks"`).
pub type NamedTask = (&'static str, JoinHandle<()>);

/// How a background task ended while its service was serving.
#[derive(Debug, Clone, thiserror::Error)]
#[error("background task `{task}` {how}")]
pub struct BackgroundFailure {
    /// The name the task was started under.
    pub task: &'static str,
    /// `panicked: <message>` or `returned`.
    pub how: String,
}

/// The tasks of one service, awaited by a supervisor task of their own.
pub(crate) struct Background {
    supervisor: JoinHandle<()>,
    tasks: Vec<AbortHandle>,
}

impl Background {
    /// Starts watching `tasks`. The first to end before `shutdown` fires is sent through the
    /// returned receiver; ends after it are the normal way out and are not reported.
    pub(crate) fn watch(
        tasks: Vec<NamedTask>,
        shutdown: Shutdown,
    ) -> (Self, oneshot::Receiver<BackgroundFailure>) {
        let (failed, failure) = oneshot::channel();
        let aborts = tasks.iter().map(|(_, task)| task.abort_handle()).collect();
        let supervisor = tokio::spawn(supervise(tasks, shutdown, failed));
        let background = Self {
            supervisor,
            tasks: aborts,
        };
        (background, failure)
    }

    /// Waits until every task has ended.
    pub(crate) async fn wait(self) {
        // The supervisor only awaits the tasks; it cannot panic, and is aborted only with them.
        let _ = self.supervisor.await;
    }

    /// Stops every task at once (a crash drill).
    pub(crate) fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
        self.supervisor.abort();
    }
}

async fn supervise(
    tasks: Vec<NamedTask>,
    shutdown: Shutdown,
    failed: oneshot::Sender<BackgroundFailure>,
) {
    let mut running = JoinSet::new();
    for (name, task) in tasks {
        running.spawn(async move { (name, task.await) });
    }
    let mut failed = Some(failed);
    while let Some(Ok((task, ended))) = running.join_next().await {
        // Nobody left to tell once the server has ended (its receiver is dropped), as when a
        // failure already stopped it: the batch workers then end too, fed no more.
        let nobody_listens = failed.as_ref().is_none_or(|failed| failed.is_closed());
        let how = match ended {
            Ok(()) if shutdown.is_fired() || nobody_listens => continue,
            Ok(()) => "returned".to_owned(),
            // Aborted with the whole service (`ServiceHandle::abort`): nobody to tell.
            Err(error) if error.is_cancelled() => continue,
            Err(error) => format!("panicked: {}", panic_message(error)),
        };
        // A panic is a bug even after the stop, where it used to be discarded without a word.
        tracing::error!(task, %how, "background task ended");
        // A panic during the stop is logged only: the stop is already under way.
        if shutdown.is_fired() {
            continue;
        }
        if let Some(failed) = failed.take() {
            let _ = failed.send(BackgroundFailure { task, how });
        }
    }
}

/// The message a panic was raised with, when it was a string (as `panic!` and `expect` make).
fn panic_message(error: JoinError) -> String {
    let payload: Box<dyn Any + Send> = error.into_panic();
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a non-string payload".to_owned()
    }
}

/// Work a service's handlers start and must not cancel when their caller hangs up (a
/// payment's saga: a client that goes away drops its handler, never the saga), owned by the
/// service all the same, so that a crash drill ([`crate::server::ServiceHandle::abort`]) stops
/// it with everything else, as a killed process would. A graceful stop does not touch it:
/// the process ends after the drain, and what was cut off is recovery's to finish.
#[derive(Clone, Default)]
pub struct Detached {
    tasks: std::sync::Arc<std::sync::Mutex<DetachedTasks>>,
}

#[derive(Default)]
struct DetachedTasks {
    running: Vec<AbortHandle>,
    /// Set by a crash drill: a handler still finishing then starts nothing that runs on.
    aborted: bool,
    /// How many were running after the last sweep of finished ones: sweeping again only once
    /// as many more were added keeps the cost per task constant.
    swept_at: usize,
}

impl Detached {
    /// Starts `work` on a task of its own, as `tokio::spawn` does.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = tokio::spawn(work);
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tasks.aborted {
            task.abort();
            return task;
        }
        if tasks.running.len() >= 2 * tasks.swept_at.max(64) {
            tasks.running.retain(|task| !task.is_finished());
            tasks.swept_at = tasks.running.len();
        }
        tasks.running.push(task.abort_handle());
        task
    }

    /// Stops every task at once (a crash drill).
    pub(crate) fn abort(&self) {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tasks.aborted = true;
        for task in tasks.running.drain(..) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash drill stops the work running, and whatever a handler still finishing starts
    /// after it never runs.
    #[tokio::test]
    async fn detached_work_stops_with_an_abort_and_none_starts_after_it() {
        let detached = Detached::default();
        let running = detached.spawn(std::future::pending::<()>());
        detached.abort();
        assert!(running.await.unwrap_err().is_cancelled());

        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let late = detached.spawn({
            let ran = ran.clone();
            async move { ran.store(true, std::sync::atomic::Ordering::SeqCst) }
        });
        assert!(late.await.unwrap_err().is_cancelled());
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
