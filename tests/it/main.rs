//! The one integration-test binary: every test drives the real server over a socket, against
//! a real PostgreSQL (see `harness`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod badinput;
mod bulk;
mod cli;
mod creates;
mod events;
mod factors;
mod faults;
mod harness;
mod identities;
mod list;
mod matrix;
mod passkeys;
mod passwords;
mod random;
mod server;
mod telemetry;
mod tls;
mod upgrade;
mod users;

use roster::pb::v1 as pb;

/// A user with just an email.
pub fn user_with_email(email: &str) -> pb::User {
    pb::User {
        email: email.to_string(),
        ..Default::default()
    }
}

/// Creates a user with `email` and returns it.
pub async fn create_user(users: &mut harness::Users, email: &str) -> pb::User {
    create(users, user_with_email(email)).await
}

/// Creates `user` and returns it as stored.
pub async fn create(users: &mut harness::Users, user: pb::User) -> pb::User {
    create_from(
        users,
        pb::CreateUserRequest {
            user: Some(user),
            ..Default::default()
        },
    )
    .await
}

/// Creates a user PENDING_VERIFICATION with `email`.
pub async fn create_pending(users: &mut harness::Users, email: &str) -> pb::User {
    create_from(
        users,
        pb::CreateUserRequest {
            user: Some(user_with_email(email)),
            pending: true,
            ..Default::default()
        },
    )
    .await
}

/// Runs a CreateUser that must succeed and returns the user as stored.
pub async fn create_from(users: &mut harness::Users, req: pb::CreateUserRequest) -> pb::User {
    users
        .create_user(req)
        .await
        .expect("create user")
        .into_inner()
        .user
        .expect("user")
}

/// GetUser `id`, which must succeed.
pub async fn get(users: &mut harness::Users, id: &str) -> pb::User {
    users
        .get_user(pb::GetUserRequest { id: id.into() })
        .await
        .expect("get user")
        .into_inner()
        .user
        .expect("user")
}

/// LookupUser by `key`, which must find the user.
pub async fn user_by(users: &mut harness::Users, key: pb::lookup_user_request::Key) -> pb::User {
    users
        .lookup_user(pb::LookupUserRequest { key: Some(key) })
        .await
        .expect("lookup user")
        .into_inner()
        .user
        .expect("user")
}

/// LookupUser by email, which must find the user.
pub async fn user_by_email(users: &mut harness::Users, email: &str) -> pb::User {
    user_by(users, pb::lookup_user_request::Key::Email(email.into())).await
}

/// A `Struct` from a JSON object literal.
pub fn pb_struct(v: serde_json::Value) -> prost_types::Struct {
    roster::wire::json_to_struct(v.as_object().expect("object"))
}

pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}
