//! Audit events: what happened to a user or was done by a key.
//!
//! Architecture invariant: an event is written by [`store::record`] (an operator command's by
//! [`store::record_operator`]) in the same transaction as the change it records, so an
//! acknowledged change always has its event and a failed one never does. Event data names
//! fields and non-secret values only, never secrets or hashes.
pub mod grpc;
pub mod matcher;
pub mod retention;
pub mod store;
pub mod stream;

use uuid::Uuid;

use crate::auth::Caller;

/// Declares [`EventType`] once: its variants, their stored names and the list of all.
macro_rules! event_types {
    ($($variant:ident => $name:literal,)+) => {
        /// The kinds of events; the names are those of `roster.v1.EventType` without the
        /// prefix.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum EventType {
            $($variant,)+
        }

        impl EventType {
            /// Every type, in `roster.v1.EventType` number order.
            pub const ALL: &[EventType] = &[$(EventType::$variant,)+];

            /// The stored name, e.g. `USER_CREATED`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)+
                }
            }
        }
    };
}

event_types! {
    UserCreated => "USER_CREATED",
    UserUpdated => "USER_UPDATED",
    UserDeleted => "USER_DELETED",
    UserBlocked => "USER_BLOCKED",
    UserUnblocked => "USER_UNBLOCKED",
    UserDeactivated => "USER_DEACTIVATED",
    UserReactivated => "USER_REACTIVATED",
    UserImported => "USER_IMPORTED",
    ContactVerificationStarted => "CONTACT_VERIFICATION_STARTED",
    ContactVerified => "CONTACT_VERIFIED",
    ContactVerificationFailed => "CONTACT_VERIFICATION_FAILED",
    PasswordSet => "PASSWORD_SET",
    PasswordChanged => "PASSWORD_CHANGED",
    PasswordExpired => "PASSWORD_EXPIRED",
    PasswordResetRequested => "PASSWORD_RESET_REQUESTED",
    PasswordReset => "PASSWORD_RESET",
    PasswordRehashed => "PASSWORD_REHASHED",
    LoginSucceeded => "LOGIN_SUCCEEDED",
    LoginFailed => "LOGIN_FAILED",
    UserLockedOut => "USER_LOCKED_OUT",
    AuthenticatorEnrolled => "AUTHENTICATOR_ENROLLED",
    AuthenticatorConfirmed => "AUTHENTICATOR_CONFIRMED",
    AuthenticatorUpdated => "AUTHENTICATOR_UPDATED",
    AuthenticatorDeleted => "AUTHENTICATOR_DELETED",
    FactorVerified => "FACTOR_VERIFIED",
    FactorVerificationFailed => "FACTOR_VERIFICATION_FAILED",
    RecoveryCodesGenerated => "RECOVERY_CODES_GENERATED",
    IdentityLinked => "IDENTITY_LINKED",
    IdentityUnlinked => "IDENTITY_UNLINKED",
    UsersMerged => "USERS_MERGED",
    UsersExported => "USERS_EXPORTED",
    OtpChallengeStarted => "OTP_CHALLENGE_STARTED",
    ProjectCreated => "PROJECT_CREATED",
    ProjectUpdated => "PROJECT_UPDATED",
    ProjectPolicyUpdated => "PROJECT_POLICY_UPDATED",
    ApiKeyCreated => "API_KEY_CREATED",
    ApiKeyUpdated => "API_KEY_UPDATED",
    ApiKeyRevoked => "API_KEY_REVOKED",
    ProviderTokensRead => "PROVIDER_TOKENS_READ",
    IpThrottleReleased => "IP_THROTTLE_RELEASED",
}

impl EventType {
    /// The stored name for a filter value: `LOGIN_FAILED` or `EVENT_TYPE_LOGIN_FAILED`.
    pub fn stored_name(name: &str) -> Option<&'static str> {
        let name = name.strip_prefix("EVENT_TYPE_").unwrap_or(name);
        Self::ALL.iter().map(|t| t.as_str()).find(|s| *s == name)
    }
}

/// A stored event, as read back.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Uuid,
    pub position: i64,
    /// The stored type name, e.g. `USER_CREATED`.
    pub kind: String,
    pub user_id: Option<Uuid>,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub api_key_id: Option<Uuid>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub data: serde_json::Value,
}

/// Who caused an event: the key, the request, and the end user's address when known.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub api_key_id: Uuid,
    pub request_id: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl EventContext {
    /// The context of a call: the calling peer's address stands in for an end-user address.
    pub fn from_caller(caller: &Caller) -> Self {
        EventContext {
            api_key_id: caller.key_id,
            request_id: caller.request_id.clone(),
            ip: caller.peer_ip.clone(),
            user_agent: None,
        }
    }
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventType,
    pub user_id: Option<Uuid>,
    pub data: serde_json::Value,
}

impl NewEvent {
    /// An event about the project itself (its keys and settings), not about a user.
    pub fn for_project(kind: EventType, data: serde_json::Value) -> Self {
        NewEvent {
            kind,
            user_id: None,
            data,
        }
    }

    pub fn for_user(kind: EventType, user_id: Uuid, data: serde_json::Value) -> Self {
        NewEvent {
            kind,
            user_id: Some(user_id),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_a_proto_event_type_in_number_order() {
        for (i, t) in EventType::ALL.iter().enumerate() {
            let proto =
                crate::pb::v1::EventType::from_str_name(&format!("EVENT_TYPE_{}", t.as_str()));
            assert_eq!(proto.map(|p| p as usize), Some(i + 1), "{t:?}");
            assert_eq!(EventType::stored_name(t.as_str()), Some(t.as_str()));
        }
        assert_eq!(
            EventType::stored_name("EVENT_TYPE_LOGIN_FAILED"),
            Some("LOGIN_FAILED")
        );
        assert_eq!(EventType::stored_name("NOPE"), None);
    }
}
