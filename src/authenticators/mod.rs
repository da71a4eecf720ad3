//! AuthenticatorService: how users prove who they are.
//!
//! `grpc.rs` validates requests and converts to and from proto; `password.rs` holds the
//! password operations (sign-in bookkeeping, lockout, rehash, reset tokens); `factors.rs` the
//! management of second factors and the bookkeeping every factor check shares (lockout,
//! default, events); `totp.rs`, `otp.rs`, `recovery.rs` and `passkey.rs` one factor each;
//! `store.rs` the SQL.
//!
//! Secrets: password hashes are read only by `store.rs` and checked only on the hashing pool
//! in `crate::crypto`; TOTP seeds are sealed before they reach `store.rs` and opened only to
//! check a code; OTP and recovery codes are kept as hashes. None of them appears in a
//! response (but once, at enrolment), an event or a log line.
pub mod factors;
pub mod grpc;
pub mod otp;
pub mod passkey;
pub mod password;
pub mod recovery;
pub mod sends;
pub mod store;
pub mod throttle;
pub mod totp;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A kind of authenticator; the numbers are `roster.v1.AuthenticatorType`'s, stored as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Password = 1,
    Totp = 2,
    Passkey = 3,
    EmailOtp = 4,
    SmsOtp = 5,
    RecoveryCodes = 6,
}

impl Kind {
    pub fn from_i16(n: i16) -> Option<Kind> {
        Some(match n {
            1 => Kind::Password,
            2 => Kind::Totp,
            3 => Kind::Passkey,
            4 => Kind::EmailOtp,
            5 => Kind::SmsOtp,
            6 => Kind::RecoveryCodes,
            _ => return None,
        })
    }

    /// Filter values: `TOTP` or `AUTHENTICATOR_TYPE_TOTP`.
    pub fn number_by_name(name: &str) -> Option<i16> {
        let name = name.strip_prefix("AUTHENTICATOR_TYPE_").unwrap_or(name);
        (1..=6)
            .filter_map(Kind::from_i16)
            .find(|k| k.as_str() == name)
            .map(|k| k as i16)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Password => "PASSWORD",
            Kind::Totp => "TOTP",
            Kind::Passkey => "PASSKEY",
            Kind::EmailOtp => "EMAIL_OTP",
            Kind::SmsOtp => "SMS_OTP",
            Kind::RecoveryCodes => "RECOVERY_CODES",
        }
    }

    /// Whether this kind can be the user's default factor (recovery codes are a fallback).
    pub fn can_be_default(self) -> bool {
        !matches!(self, Kind::RecoveryCodes | Kind::Password)
    }
}

/// An enrolled authenticator, without its secret.
#[derive(Debug, Clone)]
pub struct Authenticator {
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: Kind,
    pub name: Option<String>,
    pub confirmed: bool,
    pub is_default: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub credential_id: Option<Vec<u8>>,
    pub aaguid: Option<Uuid>,
    pub transports: Vec<String>,
    pub backed_up: bool,
    pub email: Option<String>,
    pub phone_number: Option<String>,
}

/// The outcome of a factor check, as `roster.v1.VerifyFactorResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorResult {
    Ok,
    InvalidCode,
    CodeReused,
    Expired,
    TooManyAttempts,
    Locked,
}

impl FactorResult {
    pub fn as_str(self) -> &'static str {
        match self {
            FactorResult::Ok => "OK",
            FactorResult::InvalidCode => "INVALID_CODE",
            FactorResult::CodeReused => "CODE_REUSED",
            FactorResult::Expired => "EXPIRED",
            FactorResult::TooManyAttempts => "TOO_MANY_ATTEMPTS",
            FactorResult::Locked => "LOCKED",
        }
    }
}

/// Most characters of an authenticator's name.
pub const MAX_NAME_CHARS: usize = 256;
