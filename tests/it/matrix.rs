//! The isolation and scope matrix, generated from the service descriptors (a new RPC is
//! covered without touching this file): every method of every Roster service, called raw,
//! with no key, a malformed key, a revoked key, an expired key, a key lacking only the
//! method's scope, and a key of another project sending this project's ids. The first five
//! must be refused with exactly UNAUTHENTICATED or PERMISSION_DENIED; the last must neither
//! reveal nor change anything of this project.
use std::time::Duration;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost_types::field_descriptor_proto::Type as FieldType;
use prost_types::{DescriptorProto, FileDescriptorSet};
use roster::auth::{Scope, ScopeSet, required_scope};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::harness::TestApp;
use crate::pb;

/// Passes message bytes through as they are.
#[derive(Default, Clone)]
pub(crate) struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n).to_vec()))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

struct Method {
    path: String,
    input: String,
}

/// Every method of the roster.v1 services, from the descriptor set the server serves.
fn methods(fds: &FileDescriptorSet) -> Vec<Method> {
    let mut out = Vec::new();
    for file in &fds.file {
        if file.package() != "roster.v1" {
            continue;
        }
        for service in &file.service {
            for m in &service.method {
                out.push(Method {
                    path: format!("/roster.v1.{}/{}", service.name(), m.name()),
                    input: m.input_type().trim_start_matches('.').to_string(),
                });
            }
        }
    }
    out
}

fn message<'a>(fds: &'a FileDescriptorSet, full_name: &str) -> Option<&'a DescriptorProto> {
    fds.file.iter().find_map(|f| {
        let prefix = format!("{}.", f.package());
        let name = full_name.strip_prefix(&prefix)?;
        f.message_type.iter().find(|m| m.name() == name)
    })
}

fn put_string(out: &mut Vec<u8>, number: i32, value: &str) {
    prost::encoding::string::encode(number as u32, &value.to_string(), out);
}

/// A request of type `input` with every id-like string field (and `id` inside message
/// fields, e.g. `user.id`) set to `id`: what a caller holding another project's ids sends.
fn request_with_ids(fds: &FileDescriptorSet, input: &str, id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(msg) = message(fds, input) else {
        return out;
    };
    for f in &msg.field {
        let name = f.name();
        match f.r#type() {
            FieldType::String if name == "id" || name.ends_with("_id") => {
                put_string(&mut out, f.number(), id);
            }
            // Repeated ids (BatchDeleteUsers.ids).
            FieldType::String if name == "ids" => put_string(&mut out, f.number(), id),
            FieldType::Message => {
                let nested = f.type_name().trim_start_matches('.');
                if let Some(inner) = message(fds, nested)
                    && let Some(idf) = inner.field.iter().find(|x| x.name() == "id")
                {
                    let mut body = Vec::new();
                    put_string(&mut body, idf.number(), id);
                    prost::encoding::encode_key(
                        f.number() as u32,
                        prost::encoding::WireType::LengthDelimited,
                        &mut out,
                    );
                    prost::encoding::encode_varint(body.len() as u64, &mut out);
                    out.extend_from_slice(&body);
                }
            }
            _ => {}
        }
    }
    out
}

/// Calls `path` with `body` as a one-message stream (valid for every method kind) and reads
/// the whole answer: Ok(response bytes) or the status.
pub(crate) async fn call(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    call_with(app, path, token, vec![body]).await
}

/// [`call`] with `bodies` as the request stream (several messages for ImportUsers).
pub(crate) async fn call_with(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    bodies: Vec<Vec<u8>>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let mut req = tonic::Request::new(tokio_stream::iter(bodies));
    req.set_timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    let mut stream = grpc.streaming(req, path, Raw).await?.into_inner();
    let mut all = Vec::new();
    // Streams that follow live (StreamEvents) never end: a first message is enough.
    loop {
        match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
            Ok(Ok(Some(m))) => all.extend(m),
            Ok(Ok(None)) | Err(_) => return Ok(all),
            Ok(Err(status)) => return Err(status),
        }
    }
}

fn all_scopes_but(scope: Scope) -> Vec<&'static str> {
    Scope::ALL
        .iter()
        .filter(|s| **s != scope)
        .map(|s| s.as_str())
        .collect()
}

#[tokio::test]
async fn every_rpc_refuses_bad_keys_and_never_crosses_projects() {
    let app = TestApp::spawn().await;
    let fds = FileDescriptorSet::decode(roster::pb::FILE_DESCRIPTOR_SET).unwrap();
    let methods = methods(&fds);
    assert!(methods.len() >= 40, "found {} methods", methods.len());

    // A user of this project with a marker that must never reach another project's caller.
    let marker = format!("victim-{}", uuid::Uuid::now_v7().simple());
    let victim = app
        .users()
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: format!("{marker}@example.com"),
                display_name: marker.clone(),
                ..Default::default()
            }),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "a long enough passphrase 1".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    // Events written by calls (operator events, like the keys made below, have no key).
    let by_calls = "SELECT count(*) FROM events WHERE project_id = $1 AND api_key_id IS NOT NULL";
    let events_before: i64 = app.sql_one(by_calls, &[&app.project_id]).await;

    let revoked = {
        let mut client = app.pool.get().await.unwrap();
        let (key, token) =
            roster::admin::create_key(&mut **client, app.project_id, "gone", &["*".into()], None)
                .await
                .unwrap();
        roster::admin::revoke_key(&mut **client, key.id)
            .await
            .unwrap();
        token
    };
    let expired = {
        let mut client = app.pool.get().await.unwrap();
        let soon = chrono::Utc::now() + chrono::TimeDelta::hours(1);
        let (key, token) = roster::admin::create_key(
            &mut **client,
            app.project_id,
            "old",
            &["*".into()],
            Some(soon),
        )
        .await
        .unwrap();
        client
            .execute(
                "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
                &[&key.id],
            )
            .await
            .unwrap();
        token
    };
    let (_, stranger) = app.other_project().await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    for m in &methods {
        let scope = required_scope(&m.path).unwrap_or_else(|| panic!("{} has no scope", m.path));
        for (case, token) in [
            ("no key", None),
            ("malformed key", Some("rst_not-a-key")),
            ("revoked key", Some(revoked.as_str())),
            ("expired key", Some(expired.as_str())),
        ] {
            let err = call(&app, &m.path, token, vec![]).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{} with {case}", m.path);
        }
        let scopes = all_scopes_but(scope);
        assert!(!ScopeSet::parse(&scopes).unwrap().contains(scope));
        let lacking = app.key(&scopes).await;
        let err = call(&app, &m.path, Some(&lacking), vec![])
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{} without {}",
            m.path,
            scope.as_str()
        );

        let body = request_with_ids(&fds, &m.input, &victim.id);
        let answer = call(&app, &m.path, Some(&stranger), body).await;
        let text = match &answer {
            Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            Err(s) => format!("{} {:?}", s.message(), s.details()),
        };
        assert!(
            !text.contains(&marker),
            "{} revealed this project's user to another project: {answer:?}",
            m.path
        );
    }

    // Nothing of this project changed.
    let after = app
        .users()
        .get_user(pb::GetUserRequest {
            id: victim.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(after.etag, victim.etag);
    let events_of_project: i64 = app.sql_one(by_calls, &[&app.project_id]).await;
    assert_eq!(
        events_of_project, events_before,
        "no event was written in this project by the other project's calls"
    );
}
