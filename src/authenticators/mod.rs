//! AuthenticatorService: how users prove who they are.
//!
//! `grpc.rs` validates requests and converts to and from proto; `password.rs` holds the
//! password operations (sign-in bookkeeping, lockout, rehash, reset tokens); `store.rs` the
//! SQL. Password hashes are read only by `store.rs` and checked only on the hashing pool in
//! `crate::crypto`; they never appear in a response, an event or a log line.
pub mod grpc;
pub mod password;
pub mod store;
