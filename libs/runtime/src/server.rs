//! The gRPC server every service runs: its own services plus grpc.health.v1 and server
//! reflection (v1 and v1alpha, since grpcurl, buf curl and older tools ask for either), with
//! graceful shutdown.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_stream::StreamExt;
use tonic::{
    body::Body,
    server::NamedService,
    service::RoutesBuilder,
    transport::{
        server::{Connected, TcpConnectInfo, TcpIncoming},
        Server,
    },
};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    background::{Background, BackgroundFailure, Detached, NamedTask},
    Shutdown,
};

/// Why a server ended other than by being asked to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The transport failed (the listener, most likely).
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// One of the service's background tasks ended while it served (see
    /// [`crate::background`]); the server drained and stopped.
    #[error("{0}; the service stopped")]
    Background(#[from] BackgroundFailure),
}

/// HTTP/2 connection-level flow-control window of every server: how much request data one
/// connection may have sent that handlers have not read yet.
///
/// It also sets how many calls one connection may have waiting: h2 closes a connection with
/// ENHANCE_YOUR_CALM (`too_many_data_frames`) once its small unread DATA frames cost more
/// than half this window, about 200 bytes each. A unary call's request is one such frame, so
/// hyper's default 1 MiB window broke a connection carrying ~2,500 waiting calls, and every
/// call on it failed at once: a concert replica checking a rush's tokens with the queue did
/// that (`libs/runtime/tests/server.rs`). 16 MiB lets ~40,000 calls wait on one connection;
/// the memory it allows a client to park is the same 16 MiB of request bytes.
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// The connections `listener` accepts, with the socket options tonic's own `serve` would set
/// (it ignores its `tcp_nodelay` setting for a listener passed in, as ours is, so that tests
/// and `stagedoor up` can bind port 0 first). Without TCP_NODELAY, Nagle's algorithm holds
/// a small response back while an earlier one is unacknowledged.
fn accepted(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        // Finds clients that vanished without a FIN (a pulled cable, a killed NAT entry).
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// How often the server pings each connection's peer over HTTP/2, and how long it waits for
/// the answer before it closes the connection. A fan's phone that vanishes mid-watch (out of
/// coverage, an app killed without a goodbye, a NAT entry dropped) sends no FIN: without a
/// ping its watch streams stay open, keeping the fan alive for the waiting room, until TCP's
/// own keepalive gives up after some twelve minutes on Linux's defaults. With one, the
/// streams end within 40 s and the idle TTL starts counting. The pings also keep a quiet
/// stream's NAT entries and proxies from timing it out. Every HTTP/2 peer answers them by
/// itself, and a client's gRPC library does not limit pings from a server.
pub const KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(30),
    timeout: Duration::from_secs(10),
};

/// HTTP/2 keepalive pings: one every `interval` of silence, and the connection closed when
/// one is not answered within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// How long a stopping server lets calls in flight finish before it closes their
/// connections: longer than a unary call takes with the default settings (Pay's longest is
/// its 10 s of patience plus one 5 s call), shorter than the 30 s an orchestrator commonly
/// allows before it kills the process (docker-compose.yml sets `stop_grace_period: 30s`).
/// A call cut off here loses only its answer: a retry with the same request id gets it.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// The gRPC services of one process, built up before [`GrpcServer::serve`].
pub struct GrpcServer {
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    drain_limit: Duration,
    keepalive: Keepalive,
    detached: Detached,
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self {
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            drain_limit: DRAIN_LIMIT,
            keepalive: KEEPALIVE,
            detached: Detached::default(),
        }
    }
}

impl GrpcServer {
    /// An empty server; add services with [`GrpcServer::add_service`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The service's handlers start work on `detached` that outlives their calls: the handle
    /// [`GrpcServer::spawn`] returns aborts it with the rest ([`ServiceHandle::abort`]).
    pub fn owning(mut self, detached: &Detached) -> Self {
        self.detached = detached.clone();
        self
    }

    /// Replaces [`DRAIN_LIMIT`], the time calls in flight get once shutdown begins.
    pub fn drain_limit(mut self, limit: Duration) -> Self {
        self.drain_limit = limit;
        self
    }

    /// Replaces [`KEEPALIVE`], how peers that vanished are found.
    pub fn keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Adds a generated tonic service. Its name is reported SERVING by grpc.health.v1 while
    /// the server runs, and NOT_SERVING from the moment shutdown begins.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Starts serving on `listener` in a task of its own: what every service's `start` ends
    /// with. `trigger` stops the server (see [`GrpcServer::serve`]) and `background`, the
    /// service's other tasks, which must watch the same trigger to leave when it fires. The
    /// handle owns all of them, so a service is stopped, awaited or aborted as one; and a
    /// background task that ends while the service serves stops the server
    /// ([`ServerError::Background`]).
    pub fn spawn(
        self,
        port: impl Into<Port>,
        trigger: crate::ShutdownTrigger,
        background: Vec<NamedTask>,
    ) -> Result<ServiceHandle, crate::db::StartupError> {
        // From here on the service can answer: connections are accepted (see `Port`).
        let listener = port
            .into()
            .listen()
            .map_err(crate::db::StartupError::Listen)?;
        let local_addr = listener.local_addr().map_err(|error| {
            crate::db::StartupError::Listen(std::io::Error::new(
                error.kind(),
                format!("cannot read the listener's address: {error}"),
            ))
        })?;
        let detached = self.detached.clone();
        let (server, health) = self.with_health();
        let leaving = crate::ShutdownTrigger::default();
        let (background, failure) = Background::watch(background, trigger.subscribe());
        // The server fires the service's own trigger when a task failed, so that its streams
        // end and its other tasks leave as on any stop; held weakly, so that dropping the
        // handle still fires it (the service never outlives its owner).
        let trigger = std::sync::Arc::new(trigger);
        let stop_service = {
            let trigger = std::sync::Arc::downgrade(&trigger);
            move || {
                if let Some(trigger) = trigger.upgrade() {
                    trigger.fire();
                }
            }
        };
        // A receiver whose supervisor ended without a failure (every task left after the
        // stop) never resolves: that is no reason to stop.
        let background_failed = async move {
            match failure.await {
                Ok(failure) => failure,
                Err(_) => std::future::pending().await,
            }
        };
        let server = tokio::spawn(server.serve_reporting(
            listener,
            trigger.subscribe(),
            health,
            leaving.subscribe(),
            background_failed,
            stop_service,
        ));
        Ok(ServiceHandle {
            local_addr,
            trigger,
            leaving,
            server,
            ended: None,
            background,
            detached,
        })
    }

    /// Adds grpc.health.v1 to the routes, and returns the reporter that sets its statuses.
    fn with_health(mut self) -> (Self, HealthReporter) {
        let (reporter, service) = tonic_health::server::health_reporter();
        self.routes.add_service(service);
        (self, reporter)
    }

    /// Serves on `listener` until `shutdown` fires, then stops accepting connections and waits
    /// for calls in flight to finish, for the drain limit at most: server streams should end
    /// on the same signal themselves, and whatever is still open then (a stream whose client
    /// stopped reading, a load balancer's grpc.health.v1 Watch) has its connection closed.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), ServerError> {
        let (server, health) = self.with_health();
        let leaving = shutdown.clone();
        server
            .serve_reporting(
                listener,
                shutdown,
                health,
                leaving,
                std::future::pending(),
                || {},
            )
            .await
    }

    /// [`GrpcServer::serve`], its health statuses set through `health`: SERVING at first,
    /// NOT_SERVING once `leaving` or `shutdown` fires (see [`ServiceHandle::leave_rotation`]).
    /// `background_failed` resolving stops the server as `shutdown` would (`stop_service`
    /// fires the service's own signal, which its streams and tasks watch), and it ends with
    /// that failure.
    async fn serve_reporting(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
        health: HealthReporter,
        leaving: Shutdown,
        background_failed: impl Future<Output = BackgroundFailure>,
        stop_service: impl FnOnce(),
    ) -> Result<(), ServerError> {
        let Self {
            mut routes,
            service_names,
            drain_limit,
            keepalive,
            detached: _,
        } = self;
        let local_addr: Option<SocketAddr> = listener.local_addr().ok();

        report(&health, &service_names, ServingStatus::Serving).await;
        // Out of the balancers' rotation once asked to leave (a stop says so through
        // `stopping` below). Run by this future, after the SERVING above, so a leave requested
        // the moment the server was spawned is never overwritten by it; and dropped with it,
        // so a server aborted as a crash drill says nothing, as a killed process would not.
        let out_of_rotation = {
            let (health, names) = (health.clone(), service_names.clone());
            async move {
                leaving.wait().await;
                report(&health, &names, ServingStatus::NotServing).await;
            }
        };

        // Reflection advertises exactly what this process serves (the descriptor set holds
        // every stagedoor contract), and resolves google.rpc error details for clients.
        let mut advertised: Vec<&str> = service_names.clone();
        advertised.extend([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        let reflection = || {
            advertised.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(stagedoor_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                |builder, name| builder.with_service_name(*name),
            )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .expect("the stagedoor descriptor set is generated at build time and valid");
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .expect("the stagedoor descriptor set is generated at build time and valid");
        routes
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        tracing::info!(addr = ?local_addr, services = ?service_names, "gRPC server listening");
        // The server stops when asked to, or when a background task failed: a replica that
        // can no longer do its whole job leaves rather than answer half of it.
        let (stop, stopped) = crate::ShutdownTrigger::new();
        let drain_started = stopped.clone();
        let stop_cause = async move {
            let failure = tokio::select! {
                // A failure reported just before a stop signal is still a failure: the exit
                // code must say so.
                biased;
                failure = background_failed => {
                    tracing::error!(%failure, "stopping the service");
                    stop_service();
                    Some(failure)
                }
                () = shutdown.wait() => None,
            };
            stop.fire();
            failure
        };
        // Stopped without leaving the rotation first (`ServiceHandle::shutdown`, `serve`, a
        // failure): say NOT_SERVING before the listener closes all the same.
        let stopping = async move {
            stopped.wait().await;
            report(&health, &service_names, ServingStatus::NotServing).await;
        };
        // tonic's graceful shutdown waits for every call without limit, and runs each
        // connection in a task of its own, which dropping `serving` would leave running. So
        // every connection's socket is wrapped to fail once `closing` fires, and it fires when
        // the drain limit has passed: the connections still open end, and `serving` with them.
        let (closing, closed) = crate::ShutdownTrigger::new();
        let incoming = accepted(listener)
            .map(move |accepted| accepted.map(|socket| Closable::new(socket, closed.clone())));
        let serving = Server::builder()
            .initial_connection_window_size(CONNECTION_WINDOW)
            // No cap on a connection's open streams (tonic's default, said here so that it
            // stays): a BFF multiplexes its fans over a few connections and every waiting
            // fan's watch holds a stream, so a cap like hyper's own 200 would queue the next
            // watch, and every call behind it on that connection, until a watch ended.
            .max_concurrent_streams(None)
            // hyper's guard against a peer that makes the server reset stream after stream
            // (RUSTSEC-2024-0003; HTTP/2 "rapid reset" and "MadeYouReset" attacks): 1,024
            // such resets and the connection gets a GOAWAY. tonic passes `None` by default,
            // which switches the guard off.
            .http2_max_local_error_reset_streams(Some(1_024))
            .http2_keepalive_interval(Some(keepalive.interval))
            .http2_keepalive_timeout(Some(keepalive.timeout))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, stopping);
        tokio::pin!(serving);
        let drained = async {
            drain_started.wait().await;
            tokio::time::sleep(drain_limit).await;
        };
        // The leave report runs beside the server until the drain starts (NOT_SERVING is
        // said by `stopping` then) and never ends it: the server's end, a failure included,
        // ends both.
        let reporting = async {
            out_of_rotation.await;
            std::future::pending::<()>().await
        };
        let served = async {
            tokio::select! {
                served = &mut serving => served,
                () = reporting => unreachable!("reporting never ends"),
                () = drained => {
                    tracing::warn!(?drain_limit,
                        "calls still open after the drain limit; closing their connections");
                    closing.fire();
                    serving.await
                }
            }
        };
        tokio::pin!(served, stop_cause);
        let failure = tokio::select! {
            // Ended before any stop: the transport failed.
            result = &mut served => return result.map_err(ServerError::from),
            failure = &mut stop_cause => failure,
        };
        let drained = served.await;
        match failure {
            Some(failure) => Err(failure.into()),
            None => drained.map_err(ServerError::from),
        }
    }
}

/// Sets the grpc.health.v1 status of every service in `names`, and of the empty name, the whole
/// server (what `grpc_health_probe` and most balancers ask by default).
async fn report(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
    health.set_service_status("", status).await;
}

/// An accepted connection's socket that fails every read and write once `closed` resolves
/// (see [`GrpcServer::serve`]), an idle connection included.
struct Closable {
    socket: TcpStream,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    is_closed: bool,
}

impl Closable {
    fn new(socket: TcpStream, closed: crate::Shutdown) -> Self {
        Self {
            socket,
            closed: Box::pin(closed.wait()),
            is_closed: false,
        }
    }

    /// The answer of an IO call that `io` made. The signal is polled only when the socket
    /// has nothing to do (`Pending`), which registers the waker of an idle connection with
    /// it; a busy connection pays nothing per read or write, and meets the error at its
    /// next wait.
    fn answer<T>(
        &mut self,
        cx: &mut Context<'_>,
        io: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if !self.is_closed {
            match io(Pin::new(&mut self.socket), cx) {
                Poll::Pending if self.closed.as_mut().poll(cx).is_ready() => {
                    self.is_closed = true;
                }
                answer => return answer,
            }
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the server's drain limit passed",
        )))
    }
}

impl AsyncRead for Closable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut()
            .answer(cx, |socket, cx| socket.poll_read(cx, buf))
    }
}

impl AsyncWrite for Closable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .answer(cx, |socket, cx| socket.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .answer(cx, |socket, cx| socket.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut()
            .answer(cx, |socket, cx| socket.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

impl Connected for Closable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.socket.connect_info()
    }
}

/// The port a service is started on: listening already, or bound and not yet listening.
///
/// A binary binds its port before it connects to Postgres and migrates (a busy port fails
/// the start at once, before any migration), but listens only once it can answer, when
/// [`GrpcServer::spawn`] serves it. Until then a connection is refused, not accepted and left
/// unanswered: a TCP health probe or a connection-level balancer (a cloud network load
/// balancer checks TCP by default) would otherwise count a replica still migrating, maybe
/// for minutes behind an index build, as ready, and clients' calls to it would wait out
/// their deadlines.
#[derive(Debug)]
pub enum Port {
    /// Accepting connections: tests hand over a listener on port 0 whose address they read.
    Listening(TcpListener),
    /// Bound by [`bind`], refusing connections until [`Port::listen`].
    Bound(TcpSocket),
}

impl From<TcpListener> for Port {
    fn from(listener: TcpListener) -> Self {
        Self::Listening(listener)
    }
}

impl Port {
    /// The address bound (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Listening(listener) => listener.local_addr(),
            Self::Bound(socket) => socket.local_addr(),
        }
    }

    /// Starts accepting connections (a no-op for a listener).
    pub fn listen(self) -> std::io::Result<TcpListener> {
        match self {
            Self::Listening(listener) => Ok(listener),
            Self::Bound(socket) => {
                let addr = socket.local_addr()?;
                // tokio's own backlog for `TcpListener::bind`; the kernel caps it at
                // net.core.somaxconn.
                socket.listen(1024).map_err(|error| {
                    std::io::Error::new(error.kind(), format!("cannot listen on {addr}: {error}"))
                })
            }
        }
    }
}

/// Binds `addr` without listening yet (see [`Port`]), with an error that names the address
/// (a busy port is the usual cause).
///
/// SO_REUSEADDR, as `TcpListener::bind` sets it: a restarted replica may bind its port while
/// its predecessor's connections linger in TIME_WAIT. Linux still refuses the bind while
/// another socket *listens* on the port, so a running server is found at once; two replicas
/// starting together on one port are told apart only when the second listens.
pub async fn bind(addr: SocketAddr) -> std::io::Result<Port> {
    let bound = (|| {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(socket)
    })();
    bound.map(Port::Bound).map_err(|error: std::io::Error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {addr}: {error}"))
    })
}

/// How [`ServiceHandle::run_until_stopped`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every call in flight finished (or the drain limit closed what was left).
    Cleanly,
    /// Another stop signal came during the drain: calls in flight were cut off.
    Forced,
}

/// A service running in this process: its gRPC server and background tasks, made by
/// [`GrpcServer::spawn`].
///
/// Tests start services on `127.0.0.1:0` and read [`ServiceHandle::local_addr`]; binaries
/// wait on [`ServiceHandle::wait`] after wiring OS signals to the trigger.
pub struct ServiceHandle {
    local_addr: SocketAddr,
    /// Shared (weakly) with the server's task, which fires it when a background task failed.
    trigger: std::sync::Arc<crate::ShutdownTrigger>,
    /// Takes the server out of the balancers' rotation (NOT_SERVING) while it still serves.
    leaving: crate::ShutdownTrigger,
    server: tokio::task::JoinHandle<Result<(), ServerError>>,
    /// How the server ended, once [`ServiceHandle::ended`] saw it end.
    ended: Option<Result<(), ServerError>>,
    background: Background,
    /// Work the handlers started that outlives their calls (see [`GrpcServer::owning`]).
    detached: Detached,
}

impl ServiceHandle {
    /// Where the server listens (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>` for a tonic client; `0.0.0.0` is replaced by the loopback address.
    pub fn url(&self) -> String {
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// A fresh observer of this service's shutdown signal.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.trigger.subscribe()
    }

    /// Graceful stop: no new calls, calls in flight finish, background tasks leave.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.trigger.fire();
        self.wait().await
    }

    /// Waits until the service stops (after its trigger fired, e.g. by an OS signal, or on
    /// its own: see [`ServiceHandle::ended`]). Its background tasks are then stopped and
    /// awaited too.
    pub async fn wait(mut self) -> Result<(), ServerError> {
        self.ended().await;
        self.trigger.fire();
        self.background.wait().await;
        self.ended.take().unwrap_or(Ok(()))
    }

    /// Resolves once the server has ended: asked to stop, or on its own when its transport
    /// or a background task failed ([`ServerError`]). Cancel-safe, so it can be raced against
    /// stop signals; [`ServiceHandle::wait`] then returns how it ended.
    pub async fn ended(&mut self) {
        if self.ended.is_some() {
            return;
        }
        let ended = match (&mut self.server).await {
            Ok(result) => result,
            // A panic of the server is this process's, and must not pass for a clean stop
            // (exit 0) with a supervisor that restarts failures.
            Err(join_error) if join_error.is_panic() => {
                std::panic::resume_unwind(join_error.into_panic())
            }
            Err(_) => Ok(()),
        };
        self.ended = Some(ended);
    }

    /// Leaves the load balancers' rotation: grpc.health.v1 reports NOT_SERVING at once while
    /// the server goes on answering, new connections included, for `not_serving_for` (or
    /// until `cut_short` resolves, or the server ends on its own: a failure).
    /// [`ServiceHandle::shutdown`] then drains it.
    ///
    /// Balancers learn of a stopping replica from its health (a Watch at once, a Check at
    /// their next probe) while an orchestrator sends SIGTERM at the same time: a server that
    /// closed its listener on the signal would refuse the calls still routed to it meanwhile.
    pub async fn leave_rotation(
        &mut self,
        not_serving_for: Duration,
        cut_short: impl Future<Output = ()>,
    ) {
        self.leaving.fire();
        if !not_serving_for.is_zero() {
            tracing::info!(?not_serving_for, "reporting NOT_SERVING before draining");
            tokio::select! {
                () = tokio::time::sleep(not_serving_for) => {}
                () = cut_short => tracing::info!("another stop signal; draining now"),
                () = self.ended() => {}
            }
        }
    }

    /// Runs until a stop is requested (SIGINT or SIGTERM, for a binary), then leaves the
    /// rotation for `not_serving_for` and shuts down gracefully. Another request during the
    /// NOT_SERVING period cuts it short; one during the drain stops without waiting for the
    /// calls in flight ([`Stopped::Forced`]): it returns at once, leaving the server and its
    /// tasks to the end of the process (a binary exits then). Returns early, with its
    /// failure, if the server ends on its own, before the stop or during the NOT_SERVING
    /// period.
    pub async fn run_until_stopped(
        mut self,
        mut stops: impl crate::shutdown::StopRequests,
        not_serving_for: Duration,
    ) -> Result<Stopped, ServerError> {
        tokio::select! {
            () = stops.next() => {}
            () = self.ended() => return self.wait().await.map(|()| Stopped::Cleanly),
        }
        tracing::info!("stop signal received");
        self.leave_rotation(not_serving_for, stops.next()).await;
        if self.ended.is_some() {
            return self.wait().await.map(|()| Stopped::Cleanly);
        }
        tokio::select! {
            stopped = self.shutdown() => stopped.map(|()| Stopped::Cleanly),
            () = stops.next() => {
                tracing::warn!("another stop signal; not waiting for the calls still in flight");
                Ok(Stopped::Forced)
            }
        }
    }

    /// Crash: stops everything at once, mid-call, as a killed process would. For failure drills.
    pub fn abort(self) {
        self.server.abort();
        self.background.abort();
        self.detached.abort();
    }
}

/// The body of every service binary after its configuration is parsed: bind, start, serve
/// until SIGINT/SIGTERM, leave the rotation and shut down gracefully. Failures print one line
/// (no stack trace) and give a non-zero exit code.
///
/// A signal during start-up (connecting, waiting for another replica's migrations) stops the
/// process at once: as a container's PID 1 it would otherwise ignore SIGTERM until killed.
pub async fn run_binary<F, Fut>(
    name: &str,
    listen_addr: SocketAddr,
    settings: &crate::config::ServerSettings,
    start: F,
) -> std::process::ExitCode
where
    F: FnOnce(Port) -> Fut,
    Fut: std::future::Future<Output = Result<ServiceHandle, crate::db::StartupError>>,
{
    use std::process::ExitCode;
    let mut signals = crate::shutdown::StopSignals::new();
    let port = match bind(listen_addr).await {
        Ok(port) => port,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let started = tokio::select! {
        started = start(port) => started,
        () = signals.recv() => {
            eprintln!("{name}: stopped during start-up");
            return ExitCode::FAILURE;
        }
    };
    let service = match started {
        Ok(service) => service,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match service
        .run_until_stopped(signals, settings.shutdown_delay)
        .await
    {
        Ok(Stopped::Cleanly) => ExitCode::SUCCESS,
        Ok(Stopped::Forced) => {
            eprintln!("{name}: stopped before the calls in flight finished");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}
