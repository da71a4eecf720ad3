//! Roster: a self-hostable user-management service over gRPC on PostgreSQL.
//!
//! The library behind the `roster` binary and the integration tests. See
//! `docs/ARCHITECTURE.md` for the map: `grpc.rs` files convert between proto and domain
//! types, domain functions validate, `store.rs` files hold the SQL.
pub mod admin;
pub mod auth;
pub mod authenticators;
pub mod cli;
pub mod coalesce;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod db;
pub mod error;
pub mod events;
pub mod identities;
pub mod logwriter;
pub mod metrics;
pub mod pb;
pub mod query;
pub mod ratelimit;
pub mod server;
pub mod servers;
pub mod telemetry;
pub mod tls;
pub mod users;
pub mod wire;
