//! IdentityService: social/SSO identities linked to users, the social-login lookup, unlinking
//! (optionally into a standalone user) and merging users.
//!
//! `grpc.rs` validates and converts; `ops.rs` runs each operation in one transaction with its
//! events; `store.rs` holds the SQL. Provider tokens are sealed with `crate::crypto::seal`
//! before they are stored and are opened only for GetProviderTokens.
pub mod grpc;
pub mod ops;
pub mod store;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A linked identity (without its tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub id: Uuid,
    pub user_id: Uuid,
    pub provider: String,
    pub subject: String,
    pub connection: Option<String>,
    pub email: Option<String>,
    pub profile: Map<String, Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Provider tokens as given; `Debug` never shows them.
#[derive(Clone, Default)]
pub struct Tokens {
    pub access: Option<String>,
    pub refresh: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("access", &self.access.as_ref().map(|_| "<redacted>"))
            .field("refresh", &self.refresh.as_ref().map(|_| "<redacted>"))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What LinkIdentity attaches.
#[derive(Debug, Clone)]
pub struct NewIdentity {
    pub provider: String,
    pub subject: String,
    pub connection: Option<String>,
    pub email: Option<String>,
    pub profile: Map<String, Value>,
    /// `None` keeps the tokens an identity already has when it is linked again.
    pub tokens: Option<Tokens>,
}

/// Limits, in characters.
pub const MAX_PROVIDER: usize = 128;
pub const MAX_SUBJECT: usize = 256;
pub const MAX_CONNECTION: usize = 128;
/// Longest provider token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
