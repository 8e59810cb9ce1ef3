//! The shared gRPC server under a burst: many calls at once over ONE connection, as a
//! service replica's calls to another (a thousand fans' token checks) or a BFF's arrive.

use std::time::Duration;

use stagedoor_runtime::{
    server::{GrpcServer, Keepalive},
    ShutdownTrigger,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// HTTP/2 peers (h2) close a connection with ENHANCE_YOUR_CALM when too many small DATA
/// frames sit unread, a budget of half the connection window. Every unary call's request is
/// one small frame at the server, and its response one at the client. The server's default
/// 1 MiB window broke a connection carrying ~2,500 pending calls, and tonic's default 5 MiB
/// client window broke this test's 35,000 ("connection closed"): every call on the
/// connection failed at once. Both ends now use the 16 MiB window of `server.rs`, the
/// client's through `client::endpoint`, which every stagedoor client uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_five_thousand_concurrent_calls_on_one_connection_all_succeed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    let server = tokio::spawn(GrpcServer::new().serve(listener, shutdown));
    let channel = stagedoor_runtime::client::endpoint(&format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(35_000));
    let calls: Vec<_> = (0..35_000)
        .map(|_| {
            let (mut health, start) = (HealthClient::new(channel.clone()), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
            })
        })
        .collect();
    let mut failures = 0;
    let mut first_failure = None;
    for call in calls {
        if let Err(status) = call.await.unwrap() {
            failures += 1;
            first_failure.get_or_insert(status);
        }
    }
    assert_eq!(failures, 0, "first failure: {first_failure:?}");

    trigger.fire();
    server.await.unwrap().unwrap();
}

/// Graceful shutdown waits for calls in flight, but a stream that never ends would hold it
/// open for ever: tonic's own shutdown has no limit. grpc.health.v1's Watch is such a stream
/// (it reports NOT_SERVING and stays open), and load balancers hold one to every replica;
/// a fan's client that stops reading its WatchQueueStatus is another. Past its drain limit
/// the server closes what is left.
#[tokio::test]
async fn shutdown_closes_streams_still_open_after_the_drain_limit() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    let server = tokio::spawn(
        GrpcServer::new()
            .drain_limit(std::time::Duration::from_millis(300))
            .serve(listener, shutdown),
    );
    let mut watch = watch_serving(&format!("http://{addr}")).await;

    trigger.fire();
    // The watcher hears NOT_SERVING first, so it can move away before the stream is closed.
    let stopping = watch.message().await.unwrap().unwrap();
    assert_eq!(stopping.status, 2, "NOT_SERVING");
    // Not a speed check: a bound so that a server that never stops fails instead of hanging.
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), server).await;
    stopped
        .expect("the server stops although the watcher never hung up")
        .unwrap()
        .unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(30), watch.message()).await;
    assert!(
        matches!(closed, Ok(Err(_)) | Ok(Ok(None))),
        "the watcher's stream is closed: {closed:?}"
    );
}

/// A grpc.health.v1 Watch of the whole server, as a balancer holds one, past its first
/// answer: SERVING.
async fn watch_serving(url: &str) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let channel = stagedoor_runtime::client::endpoint(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = watch.message().await.unwrap().unwrap();
    assert_eq!(serving.status, 1, "SERVING");
    watch
}

/// The grpc.health.v1 status of the whole server, asked on a connection of its own (as a
/// balancer's probe would); `None` when the server no longer takes connections.
async fn probe(url: &str) -> Option<ServingStatus> {
    let channel = stagedoor_runtime::client::endpoint(url)
        .unwrap()
        .connect()
        .await
        .ok()?;
    // A connection the kernel accepted as the listener closed is refused its call: that
    // counts as closed too.
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?
        .into_inner();
    Some(answer.status())
}

/// Waits (20 s at most) until a fresh probe of `url` answers `expected`.
async fn until_probe(url: &str, expected: Option<ServingStatus>) {
    let answered = async {
        while probe(url).await != expected {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), answered)
        .await
        .unwrap_or_else(|_| panic!("the server never answered {expected:?}"));
}

/// A server on port 0 with `background` tasks, an hour's drain limit (only a forced stop, or
/// the end of every stream, ends a drain in these tests) and its URL.
fn spawn_server(
    listener: tokio::net::TcpListener,
    trigger: ShutdownTrigger,
    background: Vec<stagedoor_runtime::background::NamedTask>,
) -> (stagedoor_runtime::server::ServiceHandle, String) {
    let server = GrpcServer::new()
        .drain_limit(std::time::Duration::from_secs(3_600))
        .spawn(listener, trigger, background)
        .unwrap();
    let url = server.url();
    (server, url)
}

/// An orchestrator sends SIGTERM while the balancers are still routing calls to the replica;
/// they learn it is going from its health. So a stopping server first reports NOT_SERVING and
/// goes on answering, new connections included, for its NOT_SERVING period (an hour here);
/// another stop request cuts the period short and it drains; a third, during the drain,
/// stops without waiting for what is still open (`Stopped::Forced`, exit status 1).
#[tokio::test]
async fn a_stopping_server_reports_not_serving_while_it_still_answers() {
    use stagedoor_runtime::server::Stopped;
    let bound = std::time::Duration::from_secs(30);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server, url) = spawn_server(listener, ShutdownTrigger::default(), Vec::new());
    // A balancer's Watch: it holds the drain open, as a client still reading would.
    let mut watch = watch_serving(&url).await;
    let (stop, stops) = tokio::sync::mpsc::unbounded_channel();
    let running =
        tokio::spawn(server.run_until_stopped(stops, std::time::Duration::from_secs(3_600)));

    stop.send(()).unwrap();
    let leaving = tokio::time::timeout(bound, watch.message())
        .await
        .expect("the watcher hears of the stop")
        .unwrap()
        .unwrap();
    assert_eq!(leaving.status, 2, "NOT_SERVING");
    assert_eq!(
        probe(&url).await,
        Some(ServingStatus::NotServing),
        "during the period a new connection is answered, with NOT_SERVING"
    );

    stop.send(()).unwrap();
    until_probe(&url, None).await; // the period cut short: the listener closed
    assert!(!running.is_finished(), "the watch holds the drain open");
    stop.send(()).unwrap();
    let stopped = tokio::time::timeout(bound, running)
        .await
        .expect("a third request stops at once")
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::Forced);

    // Asked to stop the moment it was spawned: NOT_SERVING, whatever the order of the two
    // tasks (the server's own future reports both, SERVING first, so the order cannot be
    // reversed; this checks the outcome). With nothing open, its drain ends cleanly.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server, url) = spawn_server(listener, ShutdownTrigger::default(), Vec::new());
    let (stop, stops) = tokio::sync::mpsc::unbounded_channel();
    stop.send(()).unwrap();
    let running =
        tokio::spawn(server.run_until_stopped(stops, std::time::Duration::from_secs(3_600)));
    until_probe(&url, Some(ServingStatus::NotServing)).await;
    stop.send(()).unwrap();
    let stopped = tokio::time::timeout(bound, running)
        .await
        .expect("the drain ends with nothing open")
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::Cleanly);
}

/// A replica whose background work fails while it is leaving the rotation has nothing left to
/// wait for: its NOT_SERVING period ends there, with the failure.
#[tokio::test]
async fn a_failure_during_the_not_serving_period_ends_it() {
    use stagedoor_runtime::server::ServerError;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (end, ending) = tokio::sync::oneshot::channel::<()>();
    let failing = tokio::spawn(async move {
        let _ = ending.await;
    });
    let (server, url) = spawn_server(
        listener,
        ShutdownTrigger::default(),
        vec![("admission", failing)],
    );
    let (stop, stops) = tokio::sync::mpsc::unbounded_channel();
    let running =
        tokio::spawn(server.run_until_stopped(stops, std::time::Duration::from_secs(3_600)));
    stop.send(()).unwrap();
    until_probe(&url, Some(ServingStatus::NotServing)).await;

    end.send(()).unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), running)
        .await
        .expect("the failure ends the NOT_SERVING period")
        .unwrap();
    assert!(
        matches!(&ended, Err(ServerError::Background(failure)) if failure.task == "admission"),
        "{ended:?}"
    );
}

/// A background task that ends while its service serves (a panic in the queue's admission
/// loop, a batch worker that returned) leaves a replica that still answers, but no longer
/// admits anyone or finishes its batches. The server takes the whole service out instead:
/// NOT_SERVING, its other tasks and streams told to stop at once (they watch the service's
/// signal; the drain limit here is an hour, so only that signal can end them in time), then
/// drained and ended with the task's failure (the binary then exits non-zero for its
/// supervisor to restart it).
#[tokio::test]
async fn a_background_task_that_ends_while_serving_stops_its_server() {
    use stagedoor_runtime::server::ServerError;
    // Not speed checks: bounds so that a server that serves on fails instead of hanging.
    let bound = std::time::Duration::from_secs(30);

    for panics in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trigger = ShutdownTrigger::default();
        let (left, steady_left) = tokio::sync::oneshot::channel();
        let steady = tokio::spawn({
            let shutdown = trigger.subscribe();
            async move {
                shutdown.wait().await;
                let _ = left.send(());
            }
        });
        let (end, ending) = tokio::sync::oneshot::channel::<()>();
        let failing = tokio::spawn(async move {
            let _ = ending.await;
            assert!(!panics, "the admission loop broke");
        });
        let mut server = GrpcServer::new()
            .drain_limit(std::time::Duration::from_secs(3_600))
            .spawn(
                listener,
                trigger,
                vec![("steady", steady), ("admission", failing)],
            )
            .unwrap();
        let url = server.url();
        let mut watch = watch_serving(&url).await;

        end.send(()).unwrap();
        let leaving = tokio::time::timeout(bound, watch.message())
            .await
            .expect("the watcher hears of the failure")
            .unwrap()
            .unwrap();
        assert_eq!(leaving.status, 2, "NOT_SERVING once the task ended");
        // The watch is still open, so the server is still draining: the other task was told
        // to stop by the failure itself, not by the end of the server.
        tokio::time::timeout(bound, steady_left)
            .await
            .expect("the service's other tasks are told to stop during the drain")
            .unwrap();
        drop(watch);
        tokio::time::timeout(bound, server.ended())
            .await
            .expect("the server stops once its last stream is gone");
        match server.wait().await {
            Err(ServerError::Background(failure)) => {
                assert_eq!(failure.task, "admission");
                let expected = if panics {
                    "panicked: the admission loop broke"
                } else {
                    "returned"
                };
                assert_eq!(failure.how, expected);
            }
            other => panic!("expected the background failure, got {other:?}"),
        }
        assert_eq!(probe(&url).await, None, "the listener is closed");
    }
}

/// Tasks that end because the service stops (on its signal, or later, as a batch worker does
/// once the server that fed it is gone) are no failure: a stop is clean every time.
#[tokio::test]
async fn tasks_that_end_with_their_service_are_no_failure() {
    for _ in 0..20 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trigger = ShutdownTrigger::default();
        let on_signal = tokio::spawn(trigger.subscribe().wait());
        let (feeding, fed) = tokio::sync::oneshot::channel::<()>();
        let fed_until_stop = tokio::spawn({
            let shutdown = trigger.subscribe();
            async move {
                shutdown.wait().await;
                tokio::task::yield_now().await;
                drop(feeding);
            }
        });
        let worker = tokio::spawn(async move {
            let _ = fed.await;
        });
        let server = GrpcServer::new()
            .spawn(
                listener,
                trigger,
                vec![
                    ("on signal", on_signal),
                    ("feeder", fed_until_stop),
                    ("worker", worker),
                ],
            )
            .unwrap();
        server.shutdown().await.expect("a clean stop");
    }
}

/// A peer that vanishes without closing its connection (a phone out of coverage) is found by
/// the server's HTTP/2 pings: the connection is closed, and the streams on it (a fan's
/// watch) end, instead of staying open until TCP's keepalive gives up minutes later. Here a
/// proxy between client and server stops passing bytes while keeping both sockets open: the
/// server's pings go unanswered.
#[tokio::test]
async fn a_peer_that_stops_answering_is_cut_off_by_keepalive_pings() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    let keepalive = Keepalive {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(200),
    };
    let server = tokio::spawn(
        GrpcServer::new()
            .keepalive(keepalive)
            .serve(listener, shutdown),
    );

    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let (server_closed, closed) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn({
        let frozen = frozen.clone();
        async move {
            let (client, _) = proxy.accept().await.unwrap();
            let upstream = tokio::net::TcpStream::connect(server_addr).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = upstream.into_split();
            let upward = tokio::spawn({
                let frozen = frozen.clone();
                async move {
                    let mut buffer = vec![0; 16 * 1024];
                    while let Ok(read) = client_read.read(&mut buffer).await {
                        if read == 0 || frozen.load(Ordering::SeqCst) {
                            break; // the client's bytes (its ping answers) go nowhere
                        }
                        if server_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                    // Both sockets stay open: nothing tells the server the client is gone.
                    std::future::pending::<()>().await;
                    drop((client_read, server_write));
                }
            });
            let mut buffer = vec![0; 16 * 1024];
            loop {
                match server_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    // Frozen: the server's bytes (its pings) are read and dropped.
                    Ok(_) if frozen.load(Ordering::SeqCst) => {}
                    Ok(read) => {
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = server_closed.send(());
            upward.abort();
        }
    });

    // A watch through the proxy, as a fan's phone would hold one.
    let _watch = watch_serving(&format!("http://{proxy_addr}")).await;
    frozen.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the server closed the silent peer's connection within 5 s")
        .unwrap();

    trigger.fire();
    server.await.unwrap().unwrap();
}

/// Binding without listening must still find a port another server listens on at once,
/// before the service connects or migrates anything, with the address in the error.
#[tokio::test]
async fn binding_a_port_another_server_listens_on_fails_at_once() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let error = stagedoor_runtime::server::bind(addr)
        .await
        .expect_err("a port another server listens on was bound");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    assert!(
        error
            .to_string()
            .contains(&format!("cannot listen on {addr}")),
        "{error}"
    );
}
