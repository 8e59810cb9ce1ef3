//! Coalescing concurrent calls into batches: one SQL statement or transaction for whatever
//! arrived together, instead of one per call.
//!
//! On two cores the cost of a small query is mostly not the query: it is the round trip, the
//! protocol, the backend waking up and planning. When hundreds of fans call at once, doing
//! their identical lookups as one `= ANY($1)` (or their writes as one transaction) divides
//! that fixed cost by the batch size. Under light load a batch is a single call that goes
//! straight through, so nobody waits for company.
//!
//! A [`Batcher`] is a handle to one worker task. The worker waits for a free slot (at most
//! [`BatchLimits::concurrent`] batches run at once), then takes every call queued since the
//! previous batch, up to [`BatchLimits::max_batch`]. While all slots are busy, calls pile up
//! and the next batch takes them all: batches grow with load by themselves. A
//! [`KeyedBatcher`] does the same per key (one batch of a key at a time, keys independent),
//! for work that takes a lock per key; [`SharedReads`] shares one read among the callers of
//! a key.

use std::{future::Future, pin::Pin, sync::Arc};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::ApiError;

/// How big a batch may grow and how many run at once.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most calls in one batch.
    pub max_batch: usize,
    /// Batches running at once: 1 for work that takes one lock anyway (the calls would only
    /// queue behind each other inside Postgres); more for reads, so one slow batch does not
    /// hold back the next. For a [`KeyedBatcher`], across keys (a key never runs two): each
    /// running batch holds a pooled connection, so keep it well under the pool's size.
    pub concurrent: usize,
    /// Calls that may wait for the worker before callers are slowed down (back pressure).
    /// For a [`KeyedBatcher`], calls that may wait for one key; past that, callers are
    /// refused at once (UNAVAILABLE / OVERLOADED) rather than kept waiting behind a stuck key.
    pub queue_depth: usize,
}

impl BatchLimits {
    /// For lookups that take no lock: big batches, several at once, so one slow read does not
    /// hold back the next.
    pub const READS: BatchLimits = BatchLimits {
        max_batch: 1_000,
        concurrent: 4,
        queue_depth: 20_000,
    };

    /// These limits with at most one `share`-th of a pool of `pool` connections in running
    /// batches (at least one batch): a service started with a small pool (`stagedoor up` on
    /// a crowded server) keeps connections for the rest of its work.
    pub fn within(self, pool: u32, share: u32) -> Self {
        let most = usize::try_from(pool / share.max(1))
            .unwrap_or(usize::MAX)
            .max(1);
        Self {
            concurrent: self.concurrent.min(most),
            ..self
        }
    }
}

/// The work of one batch: an answer per input, in the order of the inputs.
pub type BatchFuture<O> = Pin<Box<dyn Future<Output = Vec<Result<O, ApiError>>> + Send>>;

struct Call<I, O> {
    input: I,
    reply: oneshot::Sender<Result<O, ApiError>>,
}

/// Handle to one batching worker; cheap to clone. The worker runs until every handle is
/// dropped, then finishes the batches in flight, so calls accepted during a graceful shutdown
/// still get their answers.
pub struct Batcher<I, O> {
    calls: mpsc::Sender<Call<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the worker; `work` runs each batch. The handle returned with it ends once the
    /// last batch has answered.
    pub fn spawn<F>(limits: BatchLimits, work: F) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: Fn(Vec<I>) -> BatchFuture<O> + Send + Sync + 'static,
    {
        assert!(limits.max_batch > 0 && limits.concurrent > 0 && limits.queue_depth > 0);
        let (calls, receiver) = mpsc::channel(limits.queue_depth);
        let worker = tokio::spawn(run(receiver, limits, Arc::new(work)));
        (Self { calls }, worker)
    }

    /// Queues one call and waits for its answer. The caller going away does not cancel it:
    /// the batch does the work all the same, and a retry sees it done.
    pub async fn call(&self, input: I) -> Result<O, ApiError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ApiError::shutting_down("the service is shutting down; retry");
        self.calls
            .send(Call { input, reply })
            .await
            .map_err(|_| stopped())?;
        // A dropped reply means the batch's task died (a panic): the work may or may not have
        // happened, which UNAVAILABLE tells a client (retry with the same key).
        answer.await.map_err(|_| stopped())?
    }
}

async fn run<I, O, F>(mut receiver: mpsc::Receiver<Call<I, O>>, limits: BatchLimits, work: Arc<F>)
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> BatchFuture<O> + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.concurrent));
    let mut calls = Vec::with_capacity(limits.max_batch);
    // Each batch is a task of its own, owned by this set: aborting the worker (a crash drill,
    // `ServiceHandle::abort`) drops the set, which aborts the batches in flight as a killed
    // process would stop them, rather than letting them commit afterwards.
    let mut batches = tokio::task::JoinSet::new();
    loop {
        while let Some(ended) = batches.try_join_next() {
            log_panic(ended);
        }
        // A slot first, calls second: while every slot is busy the calls wait in the channel,
        // and the batch that takes the freed slot takes them all.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if receiver.recv_many(&mut calls, limits.max_batch).await == 0 {
            break;
        }
        let (inputs, replies): (Vec<I>, Vec<_>) =
            calls.drain(..).map(|call| (call.input, call.reply)).unzip();
        let batch = work(inputs);
        batches.spawn(async move {
            answer_each(replies, batch.await);
            drop(slot);
        });
    }
    // Every handle is gone: wait for the batches still running before reporting the end.
    while let Some(ended) = batches.join_next().await {
        log_panic(ended);
    }
}

/// A batch (or a keyed driver) that panicked failed its callers with UNAVAILABLE; the panic
/// is a bug, and is logged as one.
fn log_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended {
        if error.is_panic() {
            tracing::error!(%error, "a batch panicked; its callers were told UNAVAILABLE");
        }
    }
}

/// Hands each caller of a batch its answer, in order.
fn answer_each<O>(
    replies: Vec<oneshot::Sender<Result<O, ApiError>>>,
    answers: Vec<Result<O, ApiError>>,
) {
    let mut answers = answers.into_iter();
    for reply in replies {
        let answer = answers.next().unwrap_or_else(|| {
            Err(ApiError::internal(
                "a batch answered fewer calls than it took",
            ))
        });
        // The caller may have gone away; the work is done all the same.
        let _ = reply.send(answer);
    }
}

/// Group commit per key: like [`Batcher`], but a batch holds the calls of one key only, at
/// most one batch of a key runs at a time, and keys do not queue behind each other. A caller
/// who arrives while its key's batch runs queues for the next batch of that key, which
/// starts as soon as the current one ends and takes every call queued meanwhile (up to
/// `max_batch`). At most `concurrent` batches run at once across keys (each holds a pooled
/// connection); a key with `queue_depth` calls waiting refuses more.
///
/// For work that takes a lock per key anyway (the queue's line row): one transaction per key
/// at a time is all the lock allows, and a batch of one key must not wait behind another
/// key's slow batch. (With one worker for all keys, a rush on one concert's line held up
/// IssueToken for every other concert on the replica.)
pub struct KeyedBatcher<K, I, O> {
    inner: Arc<KeyedInner<K, I, O>>,
}

type KeyedWork<K, I, O> = Box<dyn Fn(K, Vec<I>) -> BatchFuture<O> + Send + Sync>;

struct KeyedInner<K, I, O> {
    work: KeyedWork<K, I, O>,
    waiting: KeyQueues<K, Call<I, O>>,
    /// A permit per batch running, across keys.
    running: Arc<Semaphore>,
    /// Hands each key's driver to the task that [`KeyedBatcher::spawn`] returns, which runs
    /// them all: aborting that task (a crash drill, `ServiceHandle::abort`) stops every
    /// batch, as a killed process would. The channel closes with the last handle and the
    /// last driver, which ends the task.
    drivers: mpsc::UnboundedSender<KeyDriver>,
}

type KeyDriver = Pin<Box<dyn Future<Output = ()> + Send>>;

impl<K, I, O> Clone for KeyedBatcher<K, I, O> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K, I, O> KeyedBatcher<K, I, O>
where
    K: Eq + std::hash::Hash + Clone + Send + Sync + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    /// Batches by key; `work(key, inputs)` runs each batch. The task returned with it ends
    /// once every handle is dropped and the last batch has answered.
    pub fn spawn<F>(limits: BatchLimits, work: F) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: Fn(K, Vec<I>) -> BatchFuture<O> + Send + Sync + 'static,
    {
        assert!(limits.max_batch > 0 && limits.concurrent > 0 && limits.queue_depth > 0);
        let (drivers, mut started) = mpsc::unbounded_channel::<KeyDriver>();
        let inner = Arc::new(KeyedInner {
            work: Box::new(work),
            waiting: KeyQueues::new(limits.max_batch, limits.queue_depth),
            running: Arc::new(Semaphore::new(limits.concurrent)),
            drivers,
        });
        let finished = tokio::spawn(async move {
            // Each driver is a task of its own; the set only owns them, so that dropping it
            // (this task aborted) aborts them.
            let mut drivers = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    driver = started.recv() => match driver {
                        Some(driver) => {
                            drivers.spawn(driver);
                        }
                        // Every handle and every driver is gone.
                        None => break,
                    },
                    Some(ended) = drivers.join_next(), if !drivers.is_empty() => log_panic(ended),
                }
            }
        });
        (Self { inner }, finished)
    }

    /// Queues one call for `key`'s next batch and waits for its answer. As with
    /// [`Batcher::call`], the caller going away does not cancel the work.
    pub async fn call(&self, key: K, input: I) -> Result<O, ApiError> {
        let (reply, answer) = oneshot::channel();
        match self.inner.waiting.enqueue(&key, Call { input, reply }) {
            Enqueued::Queued => {}
            Enqueued::Drive(first) => {
                // This caller found the key idle: its batches run on a task of their own until
                // nobody is waiting, so that this caller's going away stops nothing.
                let (inner, driven) = (self.inner.clone(), key.clone());
                // The key is busy from here on. Should the driver be dropped before it first
                // runs (the batcher's task aborted with it still in the channel, or the send
                // below failing), this frees the key; once it runs, `drive` frees it.
                let unstarted = Unstarted {
                    inner: self.inner.clone(),
                    key: Some(key.clone()),
                };
                let driver = Box::pin(async move {
                    unstarted.runs();
                    let run = |key, calls: Vec<Call<I, O>>| {
                        let (inputs, replies): (Vec<I>, Vec<_>) = calls
                            .into_iter()
                            .map(|call| (call.input, call.reply))
                            .unzip();
                        let batch = (inner.work)(key, inputs);
                        let running = inner.running.clone();
                        async move {
                            let _slot = running.acquire().await;
                            answer_each(replies, batch.await);
                        }
                    };
                    inner.waiting.drive(driven, first, run).await
                });
                // Refused once the batcher's task was aborted: the driver, and this caller's
                // reply with it, are dropped unrun (and `unstarted` frees the key).
                let _ = self.inner.drivers.send(driver);
            }
            Enqueued::Full => {
                return Err(ApiError::new(
                    tonic::Code::Unavailable,
                    "OVERLOADED",
                    "too many calls are waiting for this line; retry shortly",
                ))
            }
        }
        // A dropped reply means the batch's task died (a panic): UNAVAILABLE, as for Batcher.
        answer
            .await
            .map_err(|_| ApiError::shutting_down("the service is shutting down; retry"))?
    }
}

/// A key's driver that has not run yet: dropped so, it frees the key, and the callers queued
/// for it are dropped with their replies (they hear UNAVAILABLE) instead of waiting forever
/// for a run that will never come.
struct Unstarted<K: Eq + std::hash::Hash + Clone, I, O> {
    inner: Arc<KeyedInner<K, I, O>>,
    /// `None` once the driver runs.
    key: Option<K>,
}

impl<K: Eq + std::hash::Hash + Clone, I, O> Unstarted<K, I, O> {
    /// The driver runs: from here on [`KeyQueues::drive`] frees the key.
    fn runs(mut self) {
        self.key = None;
    }
}

impl<K: Eq + std::hash::Hash + Clone, I, O> Drop for Unstarted<K, I, O> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.inner.waiting.keys().remove(&key);
        }
    }
}

/// The callers of each key, queued behind the key's run in flight: what [`SharedReads`] and
/// [`KeyedBatcher`] are made of. A key in the map has a run in flight, driven by one task,
/// and holds the callers for the run after it; an idle key is absent.
struct KeyQueues<K, W> {
    keys: std::sync::Mutex<std::collections::HashMap<K, Vec<W>>>,
    /// Most callers one run takes; the rest wait for the run after.
    max_run: usize,
    /// Most callers waiting for one key's next runs.
    max_queued: usize,
}

/// What [`KeyQueues::enqueue`] did with a caller.
enum Enqueued<W> {
    /// Queued behind the key's run in flight.
    Queued,
    /// The key was idle: it is now busy, and the caller must [`KeyQueues::drive`] this run.
    Drive(Vec<W>),
    /// The key already has `max_queued` callers waiting; the caller was dropped.
    Full,
}

impl<K: Eq + std::hash::Hash + Clone, W> KeyQueues<K, W> {
    fn new(max_run: usize, max_queued: usize) -> Self {
        Self {
            keys: Default::default(),
            max_run,
            max_queued,
        }
    }

    /// The map, even if a panic poisoned its lock: every change to it is a single insert,
    /// push or removal, so it is never left half done, and one panic must not jam every key.
    fn keys(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<K, Vec<W>>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `waiter` for the next run of `key`.
    fn enqueue(&self, key: &K, waiter: W) -> Enqueued<W> {
        let mut keys = self.keys();
        match keys.get_mut(key) {
            Some(queued) if queued.len() >= self.max_queued => Enqueued::Full,
            Some(queued) => {
                queued.push(waiter);
                Enqueued::Queued
            }
            None => {
                keys.insert(key.clone(), Vec::new());
                Enqueued::Drive(vec![waiter])
            }
        }
    }

    /// Runs `run` for `first`, then for whoever queued meanwhile, until nobody did; then
    /// marks the key idle.
    async fn drive<F, Fut>(&self, key: K, first: Vec<W>, run: F)
    where
        F: Fn(K, Vec<W>) -> Fut,
        Fut: Future<Output = ()>,
    {
        // Frees the key if this task dies mid-run (a panic): the callers queued for the next
        // run are dropped, which fails their calls instead of leaving them waiting forever,
        // and later calls start afresh.
        struct Release<'a, K: Eq + std::hash::Hash + Clone, W> {
            queues: &'a KeyQueues<K, W>,
            key: &'a K,
            done: bool,
        }
        impl<K: Eq + std::hash::Hash + Clone, W> Drop for Release<'_, K, W> {
            fn drop(&mut self) {
                if !self.done {
                    self.queues.keys().remove(self.key);
                }
            }
        }
        let mut release = Release {
            queues: self,
            key: &key,
            done: false,
        };
        let mut waiting = first;
        loop {
            run(key.clone(), waiting).await;
            let mut keys = self.keys();
            let queued = keys.get_mut(&key).map(std::mem::take).unwrap_or_default();
            if queued.is_empty() {
                keys.remove(&key);
                release.done = true;
                return;
            }
            waiting = queued;
            if waiting.len() > self.max_run {
                // The rest stay queued, in arrival order, for the run after this one.
                let rest = waiting.split_off(self.max_run);
                keys.insert(key.clone(), rest);
            }
        }
    }
}

/// Reads by key that callers asking at the same moment share, at most one read per key in
/// flight: a caller who arrives while its key is being read waits for the NEXT read, which
/// starts as soon as the current one ends and answers everyone who queued meanwhile. So every
/// answer comes from a read that started after its call arrived (nobody gets an older
/// answer than they asked for), and a key asked for N times a second costs at most one read
/// per read-time, however large N grows. Different keys are read independently.
///
/// (A batch worker that reads each distinct key of whatever queued up is weaker here: with
/// several batches in flight, one key was read by several of them at once, each for a few
/// callers. In the demo's rush, 8,000 ListAvailableDates took 4,700 reads.)
pub struct SharedReads<K, V> {
    inner: Arc<SharedInner<K, V>>,
}

type SharedRead<V> = Pin<Box<dyn Future<Output = Result<V, ApiError>> + Send>>;

struct SharedInner<K, V> {
    read: Box<dyn Fn(K) -> SharedRead<V> + Send + Sync>,
    /// Keys with a read in flight, and the callers queued for the read after it.
    waiting: KeyQueues<K, SharedReply<V>>,
}

type SharedReply<V> = oneshot::Sender<Result<Arc<V>, ApiError>>;

impl<K, V> Clone for SharedReads<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> SharedReads<K, V>
where
    K: Eq + std::hash::Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Shared reads of whatever `read` reads by key.
    pub fn new<F, Fut, E>(read: F) -> Self
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<ApiError>,
    {
        let read = move |key: K| {
            let read = read(key);
            Box::pin(async move { read.await.map_err(Into::into) }) as SharedRead<V>
        };
        Self {
            inner: Arc::new(SharedInner {
                read: Box::new(read),
                // One read answers every caller queued for it, however many.
                waiting: KeyQueues::new(usize::MAX, usize::MAX),
            }),
        }
    }

    /// The value of `key`, from a read that starts after this call.
    pub async fn call(&self, key: K) -> Result<Arc<V>, ApiError> {
        let (reply, answer) = oneshot::channel();
        // Nobody is ever refused (no limit on callers queued for one read).
        if let Enqueued::Drive(first) = self.inner.waiting.enqueue(&key, reply) {
            // This caller found the key idle: it drives the reads of this key until nobody
            // is waiting, on a task of its own so that its going away stops nothing.
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let run = |key, replies: Vec<SharedReply<V>>| {
                    let read = (inner.read)(key);
                    async move {
                        let answer = read.await.map(Arc::new);
                        for reply in replies {
                            // The caller may have gone away; that is fine.
                            let _ = reply.send(answer.clone());
                        }
                    }
                };
                inner.waiting.drive(key, first, run).await
            });
        }
        answer
            .await
            .map_err(|_| ApiError::shutting_down("the read was abandoned; retry"))?
    }
}

/// The answers of a batched lookup by key (`WHERE id = ANY($1)`): for each key asked, in
/// order, the row with that key or `None`; a key asked twice gets the row twice. A failed
/// lookup fails every call.
pub fn rows_by_key<K, R, E>(
    keys: &[K],
    rows: Result<Vec<R>, E>,
    key_of: impl Fn(&R) -> K,
) -> Vec<Result<Option<R>, ApiError>>
where
    K: Eq + std::hash::Hash,
    R: Clone,
    E: Into<ApiError>,
{
    match rows {
        Ok(rows) => {
            let by_key: std::collections::HashMap<K, R> =
                rows.into_iter().map(|row| (key_of(&row), row)).collect();
            keys.iter()
                .map(|key| Ok(by_key.get(key).cloned()))
                .collect()
        }
        Err(error) => fail_all(keys.len(), error),
    }
}

/// The same error for every call of a batch whose shared work failed (a lost connection, say).
pub fn fail_all<O>(count: usize, error: impl Into<ApiError>) -> Vec<Result<O, ApiError>> {
    let error = error.into();
    (0..count).map(|_| Err(error.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn limits_within_a_pool_keep_connections_for_other_work() {
        let reads = BatchLimits::READS;
        assert_eq!(
            reads.within(16, 4).concurrent,
            4,
            "the default pool: as before"
        );
        assert_eq!(reads.within(64, 4).concurrent, 4, "never more than asked");
        assert_eq!(reads.within(5, 4).concurrent, 1);
        assert_eq!(reads.within(2, 8).concurrent, 1, "at least one batch");
        assert_eq!(reads.within(5, 4).max_batch, reads.max_batch);
    }

    fn limits(max_batch: usize, concurrent: usize) -> BatchLimits {
        BatchLimits {
            max_batch,
            concurrent,
            queue_depth: 10_000,
        }
    }

    #[tokio::test]
    async fn every_call_gets_its_own_answer_and_busy_slots_make_batches_grow() {
        let batches = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let (batcher, worker) = Batcher::spawn(limits(100, 1), {
            let (batches, largest) = (batches.clone(), largest.clone());
            move |inputs: Vec<u32>| -> BatchFuture<u32> {
                batches.fetch_add(1, Ordering::SeqCst);
                largest.fetch_max(inputs.len(), Ordering::SeqCst);
                Box::pin(async move {
                    // Long enough that the other callers queue up behind this batch.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    inputs.into_iter().map(|n| Ok(n * 2)).collect()
                })
            }
        });
        let calls: Vec<_> = (0..500u32)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.call(n).await.unwrap()) })
            })
            .collect();
        for call in calls {
            let (n, answer) = call.await.unwrap();
            assert_eq!(answer, n * 2, "call {n} got another call's answer");
        }
        let batches = batches.load(Ordering::SeqCst);
        assert!(batches >= 5, "500 calls at most 100 per batch: {batches}");
        assert!(batches < 500, "calls were never coalesced");
        assert!(largest.load(Ordering::SeqCst) > 1);
        drop(batcher);
        worker.await.unwrap();
    }

    /// A batch of one key that cannot finish (it waits for the test) holds up neither another
    /// key nor the callers of its own key, who queue into one next batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keyed_batches_run_one_at_a_time_per_key_and_never_wait_for_another_key() {
        let (release, released) = tokio::sync::watch::channel(false);
        // Every batch started, as (key, inputs).
        type Started = Arc<std::sync::Mutex<Vec<(&'static str, Vec<u32>)>>>;
        let batches: Started = Default::default();
        let limits = BatchLimits {
            max_batch: 100,
            concurrent: 4,
            queue_depth: 250,
        };
        let (batcher, finished) = KeyedBatcher::spawn(limits, {
            let batches = batches.clone();
            move |key: &'static str, inputs: Vec<u32>| -> BatchFuture<u32> {
                batches.lock().unwrap().push((key, inputs.clone()));
                let mut released = released.clone();
                Box::pin(async move {
                    if key == "stuck" {
                        let _ = released.wait_for(|released| *released).await;
                    }
                    inputs.into_iter().map(|n| Ok(n + 1)).collect()
                })
            }
        });
        let call = |key: &'static str, n: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.call(key, n).await.unwrap() })
        };
        let stuck_first = call("stuck", 0);
        let seen = |batches: &Started| batches.lock().unwrap().len();
        while seen(&batches) == 0 {
            tokio::task::yield_now().await;
        }
        // While "stuck" runs: its next callers queue (one by one, so that the arrival order
        // is known), and another key goes straight through.
        let queued = || batcher.inner.waiting.keys()["stuck"].len();
        let mut stuck_rest = Vec::new();
        for n in 1..=250 {
            stuck_rest.push(call("stuck", n));
            while queued() < n as usize {
                tokio::task::yield_now().await;
            }
        }
        for n in 0..20 {
            assert_eq!(call("free", n).await.unwrap(), n + 1);
        }
        // Past its queue depth, a key refuses at once instead of keeping callers waiting.
        let refused = batcher.call("stuck", 999).await.unwrap_err();
        assert_eq!(
            (refused.code(), refused.reason()),
            (tonic::Code::Unavailable, "OVERLOADED")
        );
        assert!(!stuck_first.is_finished());
        assert_eq!(
            batches
                .lock()
                .unwrap()
                .iter()
                .filter(|(key, _)| *key == "stuck")
                .count(),
            1,
            "a second batch of a key started while its first was running"
        );

        release.send(true).unwrap();
        assert_eq!(stuck_first.await.unwrap(), 1);
        for (n, call) in (1..=250).zip(stuck_rest) {
            assert_eq!(
                call.await.unwrap(),
                n + 1,
                "call {n} got another call's answer"
            );
        }
        // The 250 who queued went in batches of at most 100, in arrival order.
        let stuck: Vec<Vec<u32>> = batches
            .lock()
            .unwrap()
            .iter()
            .filter(|(key, _)| *key == "stuck")
            .map(|(_, inputs)| inputs.clone())
            .collect();
        assert_eq!(stuck.len(), 4, "{stuck:?}");
        assert!(stuck.iter().all(|inputs| inputs.len() <= 100));
        assert_eq!(
            stuck[1..].concat(),
            (1..=250).collect::<Vec<u32>>(),
            "the queued callers kept their order"
        );

        until_idle(&batcher.inner.waiting).await;
        drop(batcher);
        finished.await.unwrap();
    }

    /// Keys are independent, but no more than `concurrent` batches run at once (each holds
    /// a pooled connection): a made-up key per call must not open a transaction per call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keyed_batches_run_at_most_concurrent_at_once_across_keys() {
        let (release, released) = tokio::sync::watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let (batcher, _finished) = KeyedBatcher::spawn(limits(100, 1), {
            let started = started.clone();
            move |_key: u32, inputs: Vec<u32>| -> BatchFuture<u32> {
                let (started, mut released) = (started.clone(), released.clone());
                Box::pin(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ = released.wait_for(|released| *released).await;
                    inputs.into_iter().map(Ok).collect()
                })
            }
        });
        let calls: Vec<_> = (0..3u32)
            .map(|key| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.call(key, key).await.unwrap() })
            })
            .collect();
        while started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "a second key ran past the cap"
        );
        release.send(true).unwrap();
        for (key, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), key as u32);
        }
        assert_eq!(started.load(Ordering::SeqCst), 3);
    }

    /// Waits (boundedly) for every key to be forgotten: a driver forgets its key just after
    /// answering the last caller, so the caller may look first.
    async fn until_idle<K: Eq + std::hash::Hash + Clone, W>(queues: &KeyQueues<K, W>) {
        let forgotten = async {
            while !queues.keys().is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), forgotten)
            .await
            .expect("idle keys are forgotten");
    }

    /// `ServiceHandle::abort` (a crash drill) aborts the task `spawn` returned: the batches
    /// in flight stop as in a killed process, and their callers hear UNAVAILABLE.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aborting_a_keyed_batcher_stops_its_batches_like_a_crash() {
        let parked = Arc::new(Parked::new());
        let (batcher, task) = KeyedBatcher::spawn(limits(100, 4), {
            let parked = parked.clone();
            move |_key: u8, inputs: Vec<u32>| parked.batch(inputs)
        });
        let call = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call(1, 7).await }
        });
        parked.until_started().await;
        task.abort();
        parked.assert_crashed(call).await;
        // Later calls fail at once rather than queueing for a driver that will never run.
        let after = tokio::time::timeout(std::time::Duration::from_secs(5), batcher.call(1, 8))
            .await
            .expect("a call after the abort hung");
        assert_eq!(after.unwrap_err().code(), tonic::Code::Unavailable);
    }

    /// A driver still in the channel when the task is aborted never runs: its key must not
    /// stay busy, or every later call of the key would queue behind it for good. (On one
    /// thread, with the call polled by hand, the batcher's task cannot have taken the
    /// driver before the abort.)
    #[tokio::test(flavor = "current_thread")]
    async fn aborting_a_keyed_batcher_before_its_driver_runs_frees_the_key() {
        let parked = Arc::new(Parked::new());
        let (batcher, task) = KeyedBatcher::spawn(limits(100, 4), {
            let parked = parked.clone();
            move |_key: u8, inputs: Vec<u32>| parked.batch(inputs)
        });
        // Polled once, here: the call finds the key idle, sends its driver and waits for
        // its answer, and this task goes on without yielding to the batcher's.
        let mut first = Box::pin(batcher.call(1, 7));
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(first.as_mut().poll(&mut context).is_pending());
        assert!(!batcher.inner.waiting.keys().is_empty(), "the key is busy");
        task.abort();
        assert_eq!(first.await.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(parked.started.load(Ordering::SeqCst), 0, "the driver ran");
        let after = tokio::time::timeout(std::time::Duration::from_secs(5), batcher.call(1, 8))
            .await
            .expect("a call after the abort hung behind a driver that never ran");
        assert_eq!(after.unwrap_err().code(), tonic::Code::Unavailable);
    }

    /// The same for a [`Batcher`] (the payment's writes, the concert's hold batches): a batch
    /// in flight when the worker is aborted never finishes its work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aborting_a_batcher_stops_its_batches_like_a_crash() {
        let parked = Arc::new(Parked::new());
        let (batcher, worker) = Batcher::spawn(limits(100, 2), {
            let parked = parked.clone();
            move |inputs: Vec<u32>| parked.batch(inputs)
        });
        let call = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call(7).await }
        });
        parked.until_started().await;
        worker.abort();
        parked.assert_crashed(call).await;
    }

    /// Batches that start, then wait to be released before they answer: what a crash drill
    /// finds in flight.
    struct Parked {
        release: tokio::sync::watch::Sender<bool>,
        started: Arc<AtomicUsize>,
        finished: Arc<AtomicUsize>,
    }

    impl Parked {
        fn new() -> Self {
            Self {
                release: tokio::sync::watch::channel(false).0,
                started: Default::default(),
                finished: Default::default(),
            }
        }

        /// The work of one batch: counted in, parked until released, counted out.
        fn batch(&self, inputs: Vec<u32>) -> BatchFuture<u32> {
            let (started, finished) = (self.started.clone(), self.finished.clone());
            let mut released = self.release.subscribe();
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|released| *released).await;
                finished.fetch_add(1, Ordering::SeqCst);
                inputs.into_iter().map(Ok).collect()
            })
        }

        async fn until_started(&self) {
            while self.started.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        }

        /// After the abort: `call` fails with UNAVAILABLE, and its batch never finishes, not
        /// even once released.
        async fn assert_crashed(&self, call: tokio::task::JoinHandle<Result<u32, ApiError>>) {
            // A bound only so that a regression fails instead of hanging the run.
            let crashed = tokio::time::timeout(std::time::Duration::from_secs(5), call)
                .await
                .expect("the batch outlived the abort")
                .unwrap()
                .unwrap_err();
            assert_eq!(crashed.code(), tonic::Code::Unavailable);
            self.release.send_replace(true);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(self.finished.load(Ordering::SeqCst), 0, "the batch ran on");
        }
    }

    #[tokio::test]
    async fn a_keyed_batch_that_panics_fails_its_callers_and_frees_the_key() {
        let batches = Arc::new(AtomicUsize::new(0));
        let (batcher, _finished) = KeyedBatcher::spawn(limits(100, 1), {
            let batches = batches.clone();
            move |_key: u8, inputs: Vec<u32>| -> BatchFuture<u32> {
                let first = batches.fetch_add(1, Ordering::SeqCst) == 0;
                Box::pin(async move {
                    assert!(!first, "the first batch dies");
                    inputs.into_iter().map(Ok).collect()
                })
            }
        });
        let failed = batcher.call(1, 7).await.unwrap_err();
        assert_eq!(failed.code(), tonic::Code::Unavailable);
        assert_eq!(batcher.call(1, 8).await.unwrap(), 8, "the key works again");
    }

    /// Many callers of few keys: reads are shared, never two of one key at once, and every
    /// answer comes from a read that started after its call (the value read is a version
    /// number the test bumps; each caller notes the version before calling).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn shared_reads_are_fresh_and_one_per_key_at_a_time() {
        let version = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let in_flight: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>> =
            Default::default();
        let shared = SharedReads::new({
            let (version, reads, in_flight) = (version.clone(), reads.clone(), in_flight.clone());
            move |key: u32| {
                let (version, reads, in_flight) =
                    (version.clone(), reads.clone(), in_flight.clone());
                async move {
                    reads.fetch_add(1, Ordering::SeqCst);
                    let overlapping = {
                        let mut in_flight = in_flight.lock().unwrap();
                        let count = in_flight.entry(key).or_insert(0);
                        *count += 1;
                        *count
                    };
                    assert_eq!(overlapping, 1, "two reads of key {key} at once");
                    let seen = version.load(Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    *in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
                    Ok::<_, ApiError>((key, seen))
                }
            }
        });
        let calls: Vec<_> = (0..600u32)
            .map(|n| {
                let (shared, version) = (shared.clone(), version.clone());
                tokio::spawn(async move {
                    if n % 50 == 0 {
                        version.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(u64::from(n % 20))).await;
                    let asked_at = version.load(Ordering::SeqCst);
                    let (key, seen) = *shared.call(n % 3).await.unwrap();
                    assert_eq!(key, n % 3, "call {n} got another key's value");
                    assert!(seen >= asked_at, "call {n} got a read older than itself");
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let reads = reads.load(Ordering::SeqCst);
        assert!(
            reads < 200,
            "600 calls of 3 keys were barely shared: {reads} reads"
        );
        until_idle(&shared.inner.waiting).await;
    }

    #[tokio::test]
    async fn a_read_that_panics_fails_its_callers_and_frees_the_key() {
        let calls = Arc::new(AtomicUsize::new(0));
        let shared = SharedReads::new({
            let calls = calls.clone();
            move |key: u32| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        panic!("the first read of {key} dies");
                    }
                    Ok::<_, ApiError>(key * 10)
                }
            }
        });
        let failed = shared.call(7).await.unwrap_err();
        assert_eq!(failed.code(), tonic::Code::Unavailable);
        assert_eq!(
            *shared.call(7).await.unwrap(),
            70,
            "the key is readable again"
        );
    }

    #[test]
    fn rows_by_key_answers_each_key_asked_in_order() {
        let rows = Ok::<_, ApiError>(vec![(2, "two"), (1, "one")]);
        let answers = rows_by_key(&[1, 3, 2, 1], rows, |row| row.0);
        let answers: Vec<_> = answers
            .into_iter()
            .map(|a| a.unwrap().map(|r| r.1))
            .collect();
        assert_eq!(answers, [Some("one"), None, Some("two"), Some("one")]);

        let failed = rows_by_key(
            &[1, 2],
            Err::<Vec<(u32, u32)>, _>(ApiError::internal("gone")),
            |r| r.0,
        );
        assert!(failed.iter().all(|answer| answer.is_err()));
    }

    #[tokio::test]
    async fn a_batch_that_answers_short_fails_the_rest_instead_of_hanging() {
        let (batcher, _worker) = Batcher::spawn(limits(10, 2), |_inputs: Vec<u32>| {
            Box::pin(async { Vec::<Result<u32, ApiError>>::new() }) as BatchFuture<u32>
        });
        let error = batcher.call(1).await.unwrap_err();
        assert_eq!(error.reason(), "INTERNAL");
    }

    /// A graceful shutdown drops the last handle (the server's routes) while calls it accepted
    /// still wait in the channel for a slot: they are answered all the same.
    #[tokio::test]
    async fn calls_accepted_before_the_last_handle_drops_are_answered() {
        let (release, released) = tokio::sync::watch::channel(false);
        let (started, mut batch_started) = mpsc::unbounded_channel();
        let (batcher, worker) = Batcher::spawn(limits(10, 1), move |inputs: Vec<u32>| {
            let mut released = released.clone();
            let _ = started.send(());
            Box::pin(async move {
                let _ = released.wait_for(|released| *released).await;
                inputs.into_iter().map(Ok).collect()
            }) as BatchFuture<u32>
        });
        // The calls go in through the handle's sender rather than `call`, whose future would
        // keep the handle alive until answered. The first call's batch takes the only slot
        // and waits; the second is accepted into the channel behind it.
        let (first_reply, first_answer) = oneshot::channel();
        let first = Call {
            input: 1,
            reply: first_reply,
        };
        batcher.calls.send(first).await.unwrap();
        batch_started.recv().await.unwrap();
        let (reply, answer) = oneshot::channel();
        batcher.calls.send(Call { input: 7, reply }).await.unwrap();
        drop(batcher);
        release.send(true).unwrap();
        assert_eq!(first_answer.await.unwrap().unwrap(), 1);
        assert_eq!(
            answer.await.unwrap().unwrap(),
            7,
            "the queued call was answered"
        );
        worker.await.unwrap();
    }
}
