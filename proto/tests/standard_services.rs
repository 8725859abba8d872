//! Every server we run serves gRPC health and reflection; this checks the shared
//! helper over a real TCP connection, and that reflection describes our services.

use fsb_proto::{SERVICE_NAMES, ServingStatus, standard_services};
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn health_and_reflection_are_served() {
    let (reporter, health, reflection) = standard_services().unwrap();
    reporter
        .set_service_status("fastpath.v1.FastPath", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    let serving = health
        .check(HealthCheckRequest {
            service: "fastpath.v1.FastPath".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        health_check_response::ServingStatus::Serving as i32
    );
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in SERVICE_NAMES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    server.abort();
}

#[test]
fn create_request_carries_the_contract_fields() {
    use fsb_proto::fastpath::v1::{
        ConsistencyMode, CreateRequest, CreateResponse, Stage, Timeline,
    };
    // Unset mode is the server default and must be distinguishable from FAST/STRONG.
    let req = CreateRequest {
        request_id: "r1".into(),
        ..Default::default()
    };
    assert_eq!(req.mode(), ConsistencyMode::Unspecified);
    let resp = CreateResponse {
        timeline: Some(Timeline {
            stages: vec![Stage {
                name: "allocate".into(),
                start_us: 10,
                duration_us: 3,
            }],
            total_us: 13,
            path: "cold".into(),
            note: String::new(),
            started_unix_us: 0,
        }),
        ..Default::default()
    };
    assert_eq!(resp.timeline.unwrap().stages[0].name, "allocate");
}
