//! The protobuf codec of Roster's services: prost's, except that a request which does not
//! decode (bad UTF-8 in a string, a truncated field, nesting past prost's recursion limit) is
//! the caller's bad input — INVALID_ARGUMENT with a field violation naming the field — where
//! tonic's codec would answer INTERNAL. Used by the generated code (see build.rs), so unary
//! calls and every message of a stream get the same answer.
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::error::Error;

/// The prefix of the status prost's decoder reports a failure with.
pub const DECODE_FAILURE: &str = "failed to decode Protobuf message";

#[derive(Debug, Clone)]
pub struct RosterCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for RosterCodec<T, U> {
    fn default() -> Self {
        RosterCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for RosterCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = RosterDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RosterDecoder(self.0.decoder())
    }
}

#[derive(Debug, Clone)]
pub struct RosterDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for RosterDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(
            |status| match status.message().strip_prefix(DECODE_FAILURE) {
                Some(rest) => {
                    let (field, why) = decode_failure_field(rest);
                    Error::invalid(field, why).into()
                }
                None => status,
            },
        )
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The field path and reason of a prost decode error: its text is the innermost-first stack
/// of `Message.field` entries, then the reason ("User.email: CreateUserRequest.user: invalid
/// string value: ..." is `user.email`). The path stops at a well-known type (metadata).
pub fn decode_failure_field(text: &str) -> (String, String) {
    let text = text.trim_start_matches(':').trim();
    let parts: Vec<&str> = text.split(": ").collect();
    let is_entry = |p: &str| {
        p.split_once('.').is_some_and(|(m, f)| {
            !m.is_empty()
                && !f.is_empty()
                && m.chars().all(|c| c.is_ascii_alphanumeric())
                && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let stack = parts.iter().take_while(|p| is_entry(p)).count();
    let reason = parts[stack..].join(": ");
    let mut path = Vec::new();
    for entry in parts[..stack].iter().rev() {
        let (message, field) = entry.split_once('.').unwrap_or(("", entry));
        if matches!(message, "Struct" | "Value" | "ListValue") || path.len() >= 6 {
            break;
        }
        path.push(field);
    }
    let field = if path.is_empty() {
        "request".to_string()
    } else {
        path.join(".")
    };
    let reason = if reason.is_empty() {
        "is not valid protobuf".into()
    } else {
        reason
    };
    (field, format!("is not a valid message: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_failures_name_their_field() {
        assert_eq!(
            decode_failure_field(
                ": User.email: CreateUserRequest.user: invalid string value: data is not UTF-8 encoded"
            ),
            (
                "user.email".into(),
                "is not a valid message: invalid string value: data is not UTF-8 encoded".into()
            )
        );
        let deep = format!(
            "{}User.app_metadata: CreateUserRequest.user: recursion limit reached",
            "Value.kind: Struct.fields: ".repeat(30)
        );
        assert_eq!(decode_failure_field(&deep).0, "user.app_metadata");
        assert_eq!(
            decode_failure_field("buffer underflow"),
            (
                "request".into(),
                "is not a valid message: buffer underflow".into()
            )
        );
    }
}
