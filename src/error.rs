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
    #[error("{resource} {id} not found")]
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
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    Unauthenticated {
        reason: &'static str,
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
        reason: &'static str,
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
    Aborted {
        reason: &'static str,
        message: String,
    },
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

    fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Error::Invalid(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Error::NotFound { .. } => (Code::NotFound, "NOT_FOUND"),
            Error::AlreadyExists { .. } => (Code::AlreadyExists, "ALREADY_EXISTS"),
            Error::EtagMismatch { .. } => (Code::Aborted, "ETAG_MISMATCH"),
            Error::FailedPrecondition { reason, .. } => (Code::FailedPrecondition, reason),
            Error::Unauthenticated { reason, .. } => (Code::Unauthenticated, reason),
            Error::PermissionDenied { .. } => (Code::PermissionDenied, "MISSING_SCOPE"),
            Error::AddressNotAllowed { .. } => (Code::PermissionDenied, "ADDRESS_NOT_ALLOWED"),
            Error::RateLimited { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
            Error::Exhausted { reason, .. } => (Code::ResourceExhausted, reason),
            Error::Aborted { reason, .. } => (Code::Aborted, reason),
            Error::TimedOut { .. } => (Code::DeadlineExceeded, "CALL_TIMEOUT"),
            Error::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN"),
            Error::Unavailable(_) => (Code::Unavailable, "DATABASE_UNAVAILABLE"),
            Error::Internal(_) => (Code::Internal, "INTERNAL"),
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

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let (code, reason) = err.code_and_reason();
        let mut meta = HashMap::new();
        let mut details = ErrorDetails::new();
        let message = match &err {
            Error::Invalid(violations) => {
                let fv: Vec<FieldViolation> = violations
                    .iter()
                    .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                    .collect();
                details.set_bad_request(fv);
                let summary: Vec<String> = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect();
                format!("invalid request: {}", summary.join("; "))
            }
            Error::NotFound { resource, id } => {
                details.set_resource_info(*resource, id.clone(), "", "not found");
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
        details.set_error_info(reason, ERROR_DOMAIN, meta);
        Status::with_error_details(code, message, details)
    }
}
