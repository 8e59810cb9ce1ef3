//! The shared gRPC server under a burst: many calls at once over ONE connection, as a
//! service replica's calls to another (a thousand fans' token checks) or a BFF's arrive.

use stagedoor_runtime::{server::GrpcServer, ShutdownTrigger};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

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
