//! The one domain error type and its mapping to `tonic::Status` with google.rpc details.
//!
//! Architecture invariant: this is the only module that chooses gRPC status codes. Every
//! non-OK status carries an `ErrorInfo` (UPPER_SNAKE reason, domain `roster.dev`), plus
//! `BadRequest` or `ResourceInfo` where they fit. INTERNAL never carries the cause: it is
//! logged here and a generic message is sent.
use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The `ErrorInfo.domain` of every error Roster sends.
pub const ERROR_DOMAIN: &str = "roster.dev";

/// Declares [`Reason`]: each variant with its `ErrorInfo.reason` text, its gRPC code and what
/// it means (docs/errors.md lists the same, checked by a test).
macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $name:ident = $text:literal, $code:ident;)+) => {
        /// Every `ErrorInfo.reason` Roster sends: a closed set, so clients can branch on it
        /// and the reference in docs/errors.md cannot miss one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Reason {
            $($(#[doc = $doc])+ $name,)+
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),+];

            /// The UPPER_SNAKE text sent as `ErrorInfo.reason`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => $text,)+
                }
            }

            /// The status code this reason is always sent with.
            pub fn code(self) -> Code {
                match self {
                    $(Reason::$name => Code::$code,)+
                }
            }
        }
    };
}

reasons! {
    /// One or more request fields are bad: `BadRequest` lists every violation.
    InvalidArgument = "INVALID_ARGUMENT", InvalidArgument;
    /// No such resource in the caller's project: `ResourceInfo` names it.
    NotFound = "NOT_FOUND", NotFound;
    /// A unique value is taken: `ResourceInfo` names the holder, metadata `field` the value.
    AlreadyExists = "ALREADY_EXISTS", AlreadyExists;
    /// The etag sent is not the resource's current one: read it again.
    EtagMismatch = "ETAG_MISMATCH", Aborted;
    /// The database broke a deadlock with a concurrent call (or a serialization failure):
    /// nothing was changed, and the call sent again will most likely pass.
    ConcurrentConflict = "CONCURRENT_CONFLICT", Aborted;
    /// An export's client read nothing for `--export-stall-secs`.
    ExportStalled = "EXPORT_STALLED", Aborted;
    /// The call ran past `--call-timeout-secs`.
    CallTimeout = "CALL_TIMEOUT", DeadlineExceeded;
    /// No `authorization` metadata.
    MissingApiKey = "MISSING_API_KEY", Unauthenticated;
    /// The metadata is not `Bearer rst_<key-id>_<secret>`.
    MalformedApiKey = "MALFORMED_API_KEY", Unauthenticated;
    /// No such key, or the secret does not match.
    InvalidApiKey = "INVALID_API_KEY", Unauthenticated;
    /// The key was revoked.
    RevokedApiKey = "REVOKED_API_KEY", Unauthenticated;
    /// The key is past its expiry.
    ExpiredApiKey = "EXPIRED_API_KEY", Unauthenticated;
    /// The key lacks the call's scope: metadata `scope` names it.
    MissingScope = "MISSING_SCOPE", PermissionDenied;
    /// The key is restricted to networks the caller is not in: metadata `ip`.
    AddressNotAllowed = "ADDRESS_NOT_ALLOWED", PermissionDenied;
    /// The key's or the project's rate was exceeded: `RetryInfo` says when to retry.
    RateLimited = "RATE_LIMITED", ResourceExhausted;
    /// The server runs `--max-exports` exports already.
    TooManyExports = "TOO_MANY_EXPORTS", ResourceExhausted;
    /// The project's hourly SMS ceiling is reached.
    SmsLimitReached = "SMS_LIMIT_REACHED", ResourceExhausted;
    /// A code for this user was issued too recently, or too many this hour.
    TooManyCodes = "TOO_MANY_CODES", ResourceExhausted;
    /// The caller's IP failed too many sign-ins in the window.
    IpThrottled = "IP_THROTTLED", ResourceExhausted;
    /// The user is blocked.
    UserBlocked = "USER_BLOCKED", FailedPrecondition;
    /// The user is deactivated.
    UserDeactivated = "USER_DEACTIVATED", FailedPrecondition;
    /// The user is locked after too many failed attempts.
    UserLocked = "USER_LOCKED", FailedPrecondition;
    /// The user has no email or phone number for the channel asked.
    NoContact = "NO_CONTACT", FailedPrecondition;
    /// The user's email or phone number is not verified.
    ContactNotVerified = "CONTACT_NOT_VERIFIED", FailedPrecondition;
    /// The user's address changed since the OTP channel was enrolled.
    ContactChanged = "CONTACT_CHANGED", FailedPrecondition;
    /// The user has no password.
    NoPassword = "NO_PASSWORD", FailedPrecondition;
    /// The user has no passkey.
    NoPasskeys = "NO_PASSKEYS", FailedPrecondition;
    /// The user has no confirmed authenticator of the type asked.
    FactorNotEnrolled = "FACTOR_NOT_ENROLLED", FailedPrecondition;
    /// The authenticator is not confirmed yet.
    AuthenticatorNotConfirmed = "AUTHENTICATOR_NOT_CONFIRMED", FailedPrecondition;
    /// The TOTP authenticator is confirmed already.
    AlreadyConfirmed = "ALREADY_CONFIRMED", FailedPrecondition;
    /// The user has the most authenticators allowed.
    TooManyAuthenticators = "TOO_MANY_AUTHENTICATORS", FailedPrecondition;
    /// The project has no WebAuthn relying party.
    WebauthnNotConfigured = "WEBAUTHN_NOT_CONFIGURED", FailedPrecondition;
    /// The call needs sealed secrets and the server has no encryption keys.
    EncryptionNotConfigured = "ENCRYPTION_NOT_CONFIGURED", FailedPrecondition;
    /// A stored secret cannot be opened with the configured keys.
    SecretUnreadable = "SECRET_UNREADABLE", FailedPrecondition;
    /// Stored provider tokens cannot be opened with the configured keys.
    TokensUnreadable = "TOKENS_UNREADABLE", FailedPrecondition;
    /// The phone number is outside `--sms-allowed-prefixes`.
    SmsDestinationNotAllowed = "SMS_DESTINATION_NOT_ALLOWED", FailedPrecondition;
    /// (Operator commands) the key is revoked or expired.
    KeyNotActive = "KEY_NOT_ACTIVE", FailedPrecondition;
    /// The server is stopping: retry, on another replica or after the restart.
    ShuttingDown = "SHUTTING_DOWN", Unavailable;
    /// The database cannot be reached: safe to retry.
    DatabaseUnavailable = "DATABASE_UNAVAILABLE", Unavailable;
    /// A fault inside the server, logged there; the message carries no cause.
    Internal = "INTERNAL", Internal;
}

/// One bad field of a request: `field` is a path such as `user.email` or `ids[3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Error::Invalid(vec![v])
    }
}

/// Collects every violation of a request so they are reported together, not one per call.
#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation::new(field, description));
    }

    pub fn push(&mut self, violation: Violation) {
        self.0.push(violation);
    }

    pub fn extend(&mut self, other: Violations) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was collected, else the `Invalid` error holding them all.
    pub fn into_result(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(self.0))
        }
    }
}

/// Everything that can go wrong in a request, in domain terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<Violation>),
    /// `id` empty when the resource went away during the call (deleted concurrently).
    #[error("{resource}{}{id} not found", if id.is_empty() { "" } else { " " })]
    NotFound { resource: &'static str, id: String },
    #[error("a {resource} with this {field} already exists")]
    AlreadyExists {
        resource: &'static str,
        field: &'static str,
        owner: Option<String>,
    },
    #[error("the etag does not match the current version of the {resource}")]
    EtagMismatch { resource: &'static str },
    #[error("{message}")]
    FailedPrecondition { reason: Reason, message: String },
    #[error("{message}")]
    Unauthenticated {
        reason: Reason,
        message: &'static str,
    },
    #[error("the API key lacks the scope {scope}")]
    PermissionDenied { scope: &'static str },
    /// The key is restricted to networks the calling peer is not in (`ip`: the peer's
    /// address, as the server saw it, so an operator can tell a proxy from the caller).
    #[error("the API key is not accepted from {ip}: it is restricted to other networks")]
    AddressNotAllowed { ip: String },
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    /// A server-wide limit (not the caller's rate): RESOURCE_EXHAUSTED with RetryInfo.
    #[error("{message}")]
    Exhausted {
        reason: Reason,
        message: String,
        retry_after: Duration,
    },
    /// The call took longer than the server lets any call take (`--call-timeout-secs`).
    #[error(
        "the call took longer than this server allows ({} s, --call-timeout-secs)",
        .limit.as_secs()
    )]
    TimedOut { limit: Duration },
    /// The call was ended part-way for the reason given: ABORTED, safe to retry.
    #[error("{message}")]
    Aborted { reason: Reason, message: String },
    /// The server is stopping: UNAVAILABLE, safe to retry (on another replica or after the
    /// restart).
    #[error(
        "the server is shutting down; retry (a stream resumes after the last position it received)"
    )]
    ShuttingDown,
    #[error("the database is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl Error {
    /// One violation as a whole error.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::Invalid(vec![Violation::new(field, description)])
    }

    pub fn not_found(resource: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            resource,
            id: id.into(),
        }
    }

    /// One failure answered to several callers (a coalesced read): the same code for each,
    /// with the shared cause kept for the log.
    pub fn shared(e: std::sync::Arc<Error>) -> Self {
        match *e {
            Error::Unavailable(_) => Error::Unavailable(anyhow::Error::new(e)),
            _ => Error::Internal(anyhow::Error::new(e)),
        }
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        Error::Internal(e.into())
    }

    /// The reason sent with this error; its code is the reason's.
    fn reason(&self) -> Reason {
        match self {
            Error::Invalid(_) => Reason::InvalidArgument,
            Error::NotFound { .. } => Reason::NotFound,
            Error::AlreadyExists { .. } => Reason::AlreadyExists,
            Error::EtagMismatch { .. } => Reason::EtagMismatch,
            Error::FailedPrecondition { reason, .. }
            | Error::Unauthenticated { reason, .. }
            | Error::Exhausted { reason, .. }
            | Error::Aborted { reason, .. } => *reason,
            Error::PermissionDenied { .. } => Reason::MissingScope,
            Error::AddressNotAllowed { .. } => Reason::AddressNotAllowed,
            Error::RateLimited { .. } => Reason::RateLimited,
            Error::TimedOut { .. } => Reason::CallTimeout,
            Error::ShuttingDown => Reason::ShuttingDown,
            Error::Unavailable(_) => Reason::DatabaseUnavailable,
            Error::Internal(_) => Reason::Internal,
        }
    }
}

fn describe(violations: &[Violation]) -> String {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    parts.join("; ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// A status travels in HTTP/2 trailers, and gRPC clients refuse trailers past 8 KiB (gRPC
// core's default `grpc.max_metadata_size`; tonic's client resets the stream at 16 KiB): a
// request with hundreds of bad fields must still get its INVALID_ARGUMENT read. The
// message and the details (base64, a third larger) together stay well under 8 KiB.
/// The longest status message sent, in characters.
const MAX_MESSAGE_CHARS: usize = 1024;
/// Field violations kept in `BadRequest`, by the bytes of their fields and descriptions:
/// past it the rest are counted in `ErrorInfo.metadata.violations_omitted`.
const MAX_VIOLATION_BYTES: usize = 3072;
const MAX_FIELD_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 400;

/// `s` cut to `max` characters, an ellipsis marking a cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let reason = err.reason();
        let code = reason.code();
        let mut meta = HashMap::new();
        let mut details = ErrorDetails::new();
        let message = match &err {
            Error::Invalid(violations) => {
                let mut fv = Vec::new();
                let mut used = 0;
                for v in violations {
                    let field = clip(&v.field, MAX_FIELD_CHARS);
                    let description = clip(&v.description, MAX_DESCRIPTION_CHARS);
                    used += field.len() + description.len();
                    if used > MAX_VIOLATION_BYTES && !fv.is_empty() {
                        break;
                    }
                    fv.push(FieldViolation::new(field, description));
                }
                let omitted = violations.len() - fv.len();
                if omitted > 0 {
                    meta.insert("violations_omitted".to_string(), omitted.to_string());
                }
                // The message names as many as fit and counts the rest.
                let mut message = String::from("invalid request: ");
                let mut shown = 0;
                for v in &fv {
                    let part = format!("{}: {}", v.field, v.description);
                    if shown > 0 && message.len() + part.len() > MAX_MESSAGE_CHARS - 64 {
                        break;
                    }
                    if shown > 0 {
                        message.push_str("; ");
                    }
                    message.push_str(&part);
                    shown += 1;
                }
                if shown < violations.len() {
                    message.push_str(&format!("; and {} more", violations.len() - shown));
                }
                details.set_bad_request(fv);
                message
            }
            Error::NotFound { resource, id } => {
                details.set_resource_info(*resource, clip(id, MAX_FIELD_CHARS), "", "not found");
                err.to_string()
            }
            Error::AlreadyExists {
                resource,
                field,
                owner,
            } => {
                meta.insert("field".to_string(), field.to_string());
                details.set_resource_info(
                    *resource,
                    owner.clone().unwrap_or_default(),
                    "",
                    format!("{field} is already taken"),
                );
                err.to_string()
            }
            Error::PermissionDenied { scope } => {
                meta.insert("scope".to_string(), scope.to_string());
                err.to_string()
            }
            Error::AddressNotAllowed { ip } => {
                meta.insert("ip".to_string(), ip.clone());
                err.to_string()
            }
            Error::RateLimited { retry_after } | Error::Exhausted { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
                err.to_string()
            }
            Error::Unavailable(cause) => {
                tracing::warn!(error = %format!("{cause:#}"), "database unavailable");
                "the database is unavailable; retry later".to_string()
            }
            Error::Internal(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "internal error");
                "internal error".to_string()
            }
            _ => err.to_string(),
        };
        details.set_error_info(reason.as_str(), ERROR_DOMAIN, meta);
        Status::with_error_details(code, clip(&message, MAX_MESSAGE_CHARS), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/errors.md lists exactly the reasons the server can send, each with its code, so a
    /// client written from it can branch on every one (and a new reason cannot go unlisted).
    #[test]
    fn reasons_are_documented() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/errors.md"))
            .unwrap();
        let rows: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .map(|l| {
                let (reason, rest) = l.split_once("` | ").unwrap();
                let code = rest.split(" |").next().unwrap().trim();
                (reason.to_string(), code.to_string())
            })
            .collect();
        let snake = |code: Code| {
            let mut out = String::new();
            for (i, c) in format!("{code:?}").chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        };
        let expected: Vec<(String, String)> = Reason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), snake(r.code())))
            .collect();
        assert_eq!(rows, expected, "docs/errors.md's table, in Reason's order");
    }

    /// Hundreds of violations (a batch of bad ids) still fit in the trailers every gRPC
    /// client accepts (8 KiB), saying how many were left out; a few are all kept.
    #[test]
    fn a_status_stays_small_whatever_its_violations() {
        let many: Vec<Violation> = (0..600)
            .map(|i| Violation::new(format!("ids[{i}]"), "must be a UUID"))
            .chain([Violation::new("x".repeat(70_000), "y".repeat(70_000))])
            .collect();
        let status = Status::from(Error::Invalid(many));
        // grpc-status-details-bin is base64; grpc-message percent-encodes all but printable
        // ASCII.
        let message: usize = (status.message().bytes())
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    1
                } else {
                    3
                }
            })
            .sum();
        let encoded = status.details().len().div_ceil(3) * 4 + message;
        assert!(encoded < 8 * 1024, "{encoded} bytes of trailers");
        let details = status.get_error_details();
        let kept = details.bad_request().unwrap().field_violations.len();
        assert!((100..600).contains(&kept), "{kept} kept");
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "ids[0]"
        );
        let omitted = &details.error_info().unwrap().metadata["violations_omitted"];
        assert_eq!(omitted, &(601 - kept).to_string());
        assert!(
            status
                .message()
                .starts_with("invalid request: ids[0]: must be a UUID; ids[1]")
        );
        assert!(status.message().ends_with(" more"), "{}", status.message());

        let one_huge = Status::from(Error::invalid("x".repeat(70_000), "z".repeat(70_000)));
        let details = one_huge.get_error_details();
        let v = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(
            (v.field.chars().count(), v.description.chars().count()),
            (201, 401)
        );
        assert!(one_huge.message().chars().count() <= 1025);

        let few = Status::from(Error::Invalid(vec![
            Violation::new("user.email", "must be an email address"),
            Violation::new("user.phone_number", "must be E.164"),
        ]));
        let details = few.get_error_details();
        assert_eq!(details.bad_request().unwrap().field_violations.len(), 2);
        assert!(details.error_info().unwrap().metadata.is_empty());
        assert_eq!(
            few.message(),
            "invalid request: user.email: must be an email address; user.phone_number: must be E.164"
        );
    }

    #[test]
    fn every_error_sends_its_reason_with_the_reasons_code() {
        let status = Status::from(Error::FailedPrecondition {
            reason: Reason::UserBlocked,
            message: "the user is blocked".into(),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("USER_BLOCKED", ERROR_DOMAIN)
        );
        let status = Status::from(Error::TimedOut {
            limit: Duration::from_secs(30),
        });
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "CALL_TIMEOUT"
        );
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{} twice", r.as_str());
            assert!(
                r.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_')
            );
        }
    }
}
