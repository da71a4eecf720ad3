//! OTLP trace export: `roster serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` sends one server span
//! per call to a collector (here a fake one, over the real OTLP/gRPC protocol), continuing
//! the caller's W3C trace.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use roster::pb::v1::user_service_client::UserServiceClient;
use tonic::Code;

use crate::harness::{TestApp, key};
use crate::{pb, user_with_email};

#[derive(Default, Clone)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// (service.name of the resource, span) for every span received so far.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut out = Vec::new();
        for req in self.received.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| a.value.as_ref()?.value.clone())
                    .map(|v| match v {
                        Value::StringValue(s) => s,
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        out.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        out
    }
}

fn attribute(span: &Span, name: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == name)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

#[tokio::test]
async fn rpc_spans_are_exported_over_otlp_and_continue_the_callers_trace() {
    let app = TestApp::spawn().await;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (mut server, channel) = crate::harness::serve_process(
        &app,
        "",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{collector_addr}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ],
    );
    crate::faults::wait_for(
        &channel,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        Duration::from_secs(20),
    )
    .await;
    let mut users = UserServiceClient::with_interceptor(channel, key(Some(&app.token)));

    // The caller's trace: this call's span must be its child.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut create = tonic::Request::new(pb::CreateUserRequest {
        user: Some(user_with_email("traced@example.com")),
        ..Default::default()
    });
    create.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    users.create_user(create).await.unwrap();
    let missing = users
        .get_user(pb::GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.spans();
        let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
        if names.contains(&"roster.v1.UserService/CreateUser")
            && names.contains(&"roster.v1.UserService/GetUser")
        {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans never arrived: {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.kill().unwrap();
    server.wait().unwrap();

    let find = |name: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}"))
    };
    let (service, create) = find("roster.v1.UserService/CreateUser");
    assert_eq!(service, "roster");
    assert_eq!(hex::encode(&create.trace_id), trace_id);
    assert_eq!(hex::encode(&create.parent_span_id), parent_id);
    assert_eq!(create.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(create, "rpc.system"),
        Some(Value::StringValue("grpc".into()))
    );
    assert_eq!(
        attribute(create, "rpc.service"),
        Some(Value::StringValue("roster.v1.UserService".into()))
    );
    assert_eq!(
        attribute(create, "rpc.method"),
        Some(Value::StringValue("CreateUser".into()))
    );
    assert_eq!(
        attribute(create, "rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );
    assert_eq!(
        attribute(create, "project"),
        Some(Value::StringValue(app.project_id.to_string()))
    );
    assert!(create.end_time_unix_nano > create.start_time_unix_nano);

    // Without a traceparent the call starts a trace of its own. NOT_FOUND is the caller's
    // outcome, not a server error: the span status stays unset.
    let (_, get) = find("roster.v1.UserService/GetUser");
    assert_ne!(hex::encode(&get.trace_id), trace_id);
    assert!(get.parent_span_id.is_empty());
    assert_eq!(
        attribute(get, "rpc.grpc.status_code"),
        Some(Value::IntValue(5))
    );
    assert_ne!(
        get.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    // The API key's secret is nowhere in what was exported.
    let secret = crate::harness::key_secret(&app.token);
    let exported = format!("{:?}", collector.received.lock().unwrap());
    assert!(!exported.contains(secret));
}
