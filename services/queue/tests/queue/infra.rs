use stagedoor_proto::queue::v1::{
    queue_internal_service_server::QueueInternalServiceServer,
    queue_service_server::QueueServiceServer,
};
use stagedoor_queue::grpc::QueueApi;
use stagedoor_runtime::db;
use stagedoor_testkit::TestDatabase;
use tokio_stream::StreamExt;
use tonic::server::NamedService;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::{config, start, Queue};

async fn channel(queue: &Queue) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(queue.handle.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn health_reports_serving() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let mut health = HealthClient::new(channel(&queue).await);
    for service in [
        "",
        <QueueServiceServer<QueueApi> as NamedService>::NAME,
        <QueueInternalServiceServer<QueueApi> as NamedService>::NAME,
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_queue_services_in_both_versions() {
    let database = TestDatabase::create().await;
    let queue = start(config(&database)).await;
    let expected = [
        "stagedoor.queue.v1.QueueService",
        "stagedoor.queue.v1.QueueInternalService",
    ];

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(&queue).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&queue).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "stagedoor.queue.v1.QueueService".into(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "v1alpha reflection resolves the queue service: {response:?}"
    );
}

#[tokio::test]
async fn the_queue_role_cannot_touch_other_schemas() {
    let database = TestDatabase::create().await;
    // Another service's table, as that service's migrations would make it.
    let admin = database.admin().await;
    sqlx::query("CREATE TABLE concert.seats (seat_number int)")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE concert.seats OWNER TO stagedoor_concert")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;

    let queue_role = sqlx::PgPool::connect(&database.url(db::QUEUE))
        .await
        .unwrap();
    for statement in [
        "SELECT * FROM concert.seats",
        "INSERT INTO concert.seats VALUES (1)",
        "CREATE TABLE concert.stolen (id int)",
        "CREATE TABLE point.stolen (id int)",
        "CREATE TABLE public.stolen (id int)",
    ] {
        let error = sqlx::query(statement)
            .execute(&queue_role)
            .await
            .unwrap_err();
        assert_eq!(
            stagedoor_runtime::error::sqlstate(&error).as_deref(),
            Some("42501"),
            "`{statement}` must be refused with insufficient_privilege, got {error}"
        );
    }
    // Its own schema is its to use.
    sqlx::query("CREATE TABLE queue.scratch (id int)")
        .execute(&queue_role)
        .await
        .unwrap();
    queue_role.close().await;
}
