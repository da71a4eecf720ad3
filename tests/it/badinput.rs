//! The bad-input corpus: hostile bytes and values on the wire get INVALID_ARGUMENT with a
//! field violation (never INTERNAL, never a panic), and nothing is written.
use prost::Message;
use tonic::Code;

use crate::harness::{TestApp, violated_fields};
use crate::matrix::call;
use crate::pb;

/// A field `number` holding `bytes` as a length-delimited value (string, bytes or message).
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

async fn users_count(app: &TestApp) -> i64 {
    app.sql_one("SELECT count(*) FROM users", &[]).await
}

#[tokio::test]
async fn invalid_utf8_and_truncated_messages_are_invalid_arguments() {
    let app = TestApp::spawn().await;
    let create = "/roster.v1.UserService/CreateUser";
    // CreateUserRequest.user (1) = User { email (3) = invalid UTF-8 }.
    let bad_utf8 = field(1, &field(3, b"a\xff\xfe@example.com"));
    // A length prefix running past the end of the message.
    let mut truncated = field(1, &field(3, b"a@example.com"));
    truncated.truncate(truncated.len() - 4);
    // Field 1 (user) with a wire type it cannot have (group start), then garbage.
    let garbage = vec![0x0b, 0xff, 0xff, 0xff, 0xff, 0x0f];
    for (what, body, field) in [
        ("invalid UTF-8", bad_utf8, "user.email"),
        ("truncated", truncated, "user"),
        ("garbage", garbage, "user"),
    ] {
        let err = call(&app, create, Some(&app.token), body)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert_eq!(violated_fields(&err), vec![field], "{what}: {err:?}");
    }
    assert_eq!(users_count(&app).await, 0);

    // A well-formed message passes the same path (the corpus is not refused for its path).
    let ok = pb::CreateUserRequest {
        user: Some(crate::user_with_email("fine@example.com")),
        ..Default::default()
    }
    .encode_to_vec();
    call(&app, create, Some(&app.token), ok).await.unwrap();
    assert_eq!(users_count(&app).await, 1);
}

#[tokio::test]
async fn an_undecodable_import_message_ends_the_stream_after_what_came_before() {
    let app = TestApp::spawn().await;
    let frames = |r: pb::ImportUsersRequest| r.encode_to_vec();
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let messages = vec![
        frames(crate::bulk::options(
            pb::ImportMode::CreateOnly,
            pb::ImportMatchOn::Email,
            false,
        )),
        frames(pb::ImportUsersRequest {
            item: Some(pb::import_users_request::Item::Record(pb::ImportRecord {
                user: Some(crate::user_with_email("before@example.com")),
                ..Default::default()
            })),
        }),
        // ImportUsersRequest.record (2) = ImportRecord { user (1) = User { email = bad UTF-8 } }
        field(2, &field(1, &field(3, b"\xc3\x28@example.com"))),
        frames(pb::ImportUsersRequest {
            item: Some(pb::import_users_request::Item::Record(pb::ImportRecord {
                user: Some(crate::user_with_email("after@example.com")),
                ..Default::default()
            })),
        }),
    ];
    let mut req = tonic::Request::new(tokio_stream::iter(messages));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", app.token).parse().unwrap(),
    );
    let path = http::uri::PathAndQuery::from_static("/roster.v1.UserService/ImportUsers");
    let mut stream = grpc
        .streaming(req, path, crate::matrix::Raw)
        .await
        .unwrap()
        .into_inner();
    let mut results = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(bytes)) => {
                let m = pb::ImportUsersResponse::decode(bytes.as_slice()).unwrap();
                assert!(matches!(
                    m.item,
                    Some(pb::import_users_response::Item::Result(_))
                ));
                results += 1;
            }
            Ok(None) => panic!("the stream must end with an error, not a summary"),
            Err(e) => break e,
        }
    };
    assert_eq!(results, 1);
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(violated_fields(&err), vec!["record"]);
    assert_eq!(users_count(&app).await, 1);
}

#[tokio::test]
async fn hostile_values_get_field_violations_and_write_nothing() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let long = "x".repeat(100_000);
    let mut deep = serde_json::json!("leaf");
    for _ in 0..50 {
        deep = serde_json::json!({ "k": deep });
    }
    let creates: Vec<(pb::User, &str)> = vec![
        (
            pb::User {
                email: format!("{long}@example.com"),
                ..Default::default()
            },
            "user.email",
        ),
        (
            pb::User {
                email: "a@x.io".into(),
                display_name: long.clone(),
                ..Default::default()
            },
            "user.display_name",
        ),
        (
            pb::User {
                phone_number: "+1 (415) 555-0100".into(),
                ..Default::default()
            },
            "user.phone_number",
        ),
        (
            pb::User {
                phone_number: "+0123456".into(),
                ..Default::default()
            },
            "user.phone_number",
        ),
        (
            pb::User {
                email: "a@x.io".into(),
                username: "robert'); DROP TABLE users;--".into(),
                ..Default::default()
            },
            "user.username",
        ),
        (
            pb::User {
                email: "a@x.io".into(),
                app_metadata: Some(crate::pb_struct(serde_json::json!({ "d": deep }))),
                ..Default::default()
            },
            "user.app_metadata",
        ),
        (
            pb::User {
                email: "a@x.io".into(),
                picture_url: "javascript:alert(1)".into(),
                ..Default::default()
            },
            "user.picture_url",
        ),
        (
            pb::User {
                email: "a@x.io".into(),
                locale: "en_GB\u{0}".into(),
                ..Default::default()
            },
            "user.locale",
        ),
    ];
    for (user, field) in creates {
        let err = users
            .create_user(pb::CreateUserRequest {
                user: Some(user),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            violated_fields(&err).contains(&field.to_string()),
            "{field}: {err:?}"
        );
    }
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(crate::user_with_email("a@x.io")),
            user_id: "not-a-uuid".into(),
            initial_password: Some(pb::create_user_request::InitialPassword::PasswordHash(
                "$2b$99$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyzABCDE".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["password_hash", "user_id"]);

    let parens = format!("{}email = \"a\"{}", "(".repeat(10_000), ")".repeat(10_000));
    for filter in [
        "email = 'x' OR 1=1; --",
        "email = \"unbalanced",
        "((email = \"a\")",
        parens.as_str(),
        "password_hash = \"x\"",
        "app_metadata.a.b.c.d.e.f.g.h.i.j.k = 1",
    ] {
        let err = users
            .list_users(pb::ListUsersRequest {
                filter: filter.into(),
                ..Default::default()
            })
            .await
            .expect_err(&filter[..filter.len().min(60)]);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{}",
            &filter[..filter.len().min(40)]
        );
        assert_eq!(violated_fields(&err), vec!["filter"]);
    }
    for (page_size, token) in [
        (-1, ""),
        (1_000_000, ""),
        (10, "garbage-token"),
        (10, "%%%"),
    ] {
        let err = users
            .list_users(pb::ListUsersRequest {
                page_size,
                page_token: token.into(),
                ..Default::default()
            })
            .await;
        match err {
            // An oversized page is capped (AIP-158), not refused.
            Ok(_) => assert!(page_size == 1_000_000 && token.is_empty()),
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{page_size} {token}"),
        }
    }
    let err = users
        .get_user(pb::GetUserRequest {
            id: "' OR 1=1 --".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["id"]);
    assert_eq!(users_count(&app).await, 0, "nothing was written");
}

/// A batch of hundreds of bad ids gets an INVALID_ARGUMENT its caller can read (the first
/// violations, the rest counted), not a stream reset for trailers too big to accept.
#[tokio::test]
async fn a_batch_of_bad_ids_gets_a_readable_invalid_argument() {
    let app = TestApp::spawn().await;
    let ids: Vec<String> = (0..1000).map(|i| format!("not-a-uuid-{i:04}")).collect();
    let err = app
        .users()
        .batch_delete_users(pb::BatchDeleteUsersRequest { ids })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let fields = violated_fields(&err);
    assert!(
        (50..1000).contains(&fields.len()),
        "{} violations",
        fields.len()
    );
    let details = crate::harness::details(&err);
    let kept = &details.bad_request().unwrap().field_violations;
    assert_eq!(
        (kept[0].field.as_str(), kept[1].field.as_str()),
        ("ids[0]", "ids[1]")
    );
    let omitted: usize = details.error_info().unwrap().metadata["violations_omitted"]
        .parse()
        .unwrap();
    assert_eq!(omitted + fields.len(), 1000);
    assert!(err.message().len() <= 1024, "{}", err.message());
    assert!(err.message().ends_with(" more"), "{}", err.message());
}
