//! A shutdown signal that every part of a service can wait on.
//!
//! One [`ShutdownTrigger`] owns the signal; any number of [`Shutdown`] clones observe it. The
//! gRPC server stops accepting calls when it fires, background loops leave at their next
//! tick, and long-lived server streams end so that graceful shutdown is not held open by a
//! client that never hangs up.

use tokio::sync::watch;

/// Fires the shutdown signal. Dropping it fires the signal too, so a service never outlives
/// whatever owns its trigger.
#[derive(Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

/// Observes the shutdown signal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl ShutdownTrigger {
    /// A new, unfired signal and its first observer.
    pub fn new() -> (Self, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (Self { sender }, Shutdown { receiver })
    }

    /// Fires the signal. Firing twice is harmless.
    pub fn fire(&self) {
        self.sender.send_replace(true);
    }

    /// Another observer of this signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }
}

/// A new, unfired signal with no observer yet ([`ShutdownTrigger::subscribe`] makes them),
/// for code that hands the trigger on before anyone watches it.
impl Default for ShutdownTrigger {
    fn default() -> Self {
        Self::new().0
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.sender.send_replace(true);
    }
}

impl Shutdown {
    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once the signal fires (at once if it already has).
    pub async fn wait(mut self) {
        // An error means the trigger is gone, which counts as fired.
        let _ = self.receiver.wait_for(|fired| *fired).await;
    }

    /// Runs `work` every `period` until the signal fires: the background loops of the
    /// services (admission ticks, board refreshes, heartbeat flushes, the hold sweeper). A
    /// run that overruns its period delays the next one rather than bunching runs up, and
    /// the signal is only looked at between runs, so a run in progress finishes.
    pub async fn every<F, Fut>(self, period: std::time::Duration, mut work: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let stopped = self.wait();
        tokio::pin!(stopped);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = &mut stopped => return,
            }
            work().await;
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, the signals an operator or an orchestrator sends to stop a
/// process, listened for from the moment this is made until it is dropped.
///
/// Make it once, early, and wait on it as often as needed: a signal that arrives while nobody
/// is waiting is kept for the next [`StopSignals::recv`]. (Listening afresh for each wait
/// would drop a signal sent in between, and once tokio has installed its handler the
/// process no longer dies of the signal by default: it would simply be lost.)
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Starts listening. A signal that cannot be listened for is logged and left out; with
    /// neither, Ctrl-C is waited for tokio's portable way.
    pub fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(listening) => Some(listening),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for {name}");
                    None
                }
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on the next SIGINT or SIGTERM (at once for one that came since the last).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.interrupt.is_none() && self.terminate.is_none() {
                // Nothing to listen for (already logged): never resolves, rather than
                // pretending a signal came.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
                return;
            }
            tokio::select! {
                () = next(&mut self.interrupt) => {}
                () = next(&mut self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Where requests to stop a running service come from: [`StopSignals`] for a binary; a
/// channel (an unbounded receiver of `()`) for a test or an embedding program.
pub trait StopRequests {
    /// Resolves on the next request (never, once no more can come).
    fn next(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

impl StopRequests for StopSignals {
    fn next(&mut self) -> impl std::future::Future<Output = ()> + Send {
        self.recv()
    }
}

impl StopRequests for tokio::sync::mpsc::UnboundedReceiver<()> {
    async fn next(&mut self) {
        if self.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

impl Default for StopSignals {
    fn default() -> Self {
        Self::new()
    }
}
