//! Random hostile requests to every RPC, generated from the descriptors the server serves (a
//! new RPC or field is covered without touching this file): each field present or not, with
//! values drawn from the project's real ids and contacts (to reach past the lookups) and from
//! hostile ones (oversize, control characters, SQL, broken UUIDs, extreme numbers, deep
//! metadata, unknown enum values, invalid timestamps). Whatever comes, the server answers OK
//! or a status with an ErrorInfo of domain `roster.dev` (INVALID_ARGUMENT with its field
//! violations), never INTERNAL, UNKNOWN or a broken connection, never SQL in a message, and
//! serves a plain GetUser afterwards.
//!
//! Each round sends every RPC once, 8 calls in flight (ImportUsers gets 1 to 5 messages).
//! The seed is printed; `ROSTER_RANDOM_SEED` replays a run's requests (their interleaving
//! varies), `ROSTER_RANDOM_REQUESTS` sets the rounds (default 25).
use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type as FieldType};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

use roster::config::ServerConfig;

use crate::harness::{TestApp, details};
use crate::matrix::call_with;
use crate::pb;

/// Every message of the set (nested ones too) by full name without the leading dot.
fn messages(fds: &FileDescriptorSet) -> HashMap<String, DescriptorProto> {
    fn add(out: &mut HashMap<String, DescriptorProto>, prefix: &str, m: &DescriptorProto) {
        let name = format!("{prefix}.{}", m.name());
        for n in &m.nested_type {
            add(out, &name, n);
        }
        out.insert(name, m.clone());
    }
    let mut out = HashMap::new();
    for f in &fds.file {
        for m in &f.message_type {
            add(&mut out, f.package(), m);
        }
    }
    out
}

/// What the generator draws from besides hostile values: the project's own objects.
struct Known {
    user_ids: Vec<String>,
    event_ids: Vec<String>,
    /// Authenticators' and events' ids.
    other_ids: Vec<String>,
    emails: Vec<String>,
    phones: Vec<String>,
    usernames: Vec<String>,
    external_ids: Vec<String>,
}

const HOSTILE: &[&str] = &[
    "",
    " ",
    "\u{0}",
    "a\u{0}b",
    "\u{202e}evil\u{200b}",
    "💥🧨",
    "' OR 1=1 --",
    "\"; DROP TABLE users; --",
    "$1",
    "%",
    "_",
    "\\",
    "*",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "0190b6b4-7c1e-7cc4-a5b7-",
    "not-a-uuid",
    "user@",
    "@example.com",
    "a@b",
    "+",
    "+0",
    "+999999999999999999",
    "../../etc/passwd",
    "9223372036854775808",
    "-1",
    "1e309",
    "NaN",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "rst_x_y",
    "AAAA",
    "%%%%",
    "null",
    "{}",
    "[]",
];

const FILTERS: &[&str] = &[
    "email = \"a@example.com\"",
    "status = BLOCKED AND created_at > \"2020-01-01T00:00:00Z\"",
    "app_metadata.plan:\"*\" OR NOT user_metadata.`a b` = 1",
    "id > \"00000000-0000-0000-0000-000000000000\"",
    "type = USER_CREATED OR user_id = \"x\"",
    "(((((((((((((((((((a = 1)))))))))))))))))))",
    "email = \"unterminated",
    "email = 'single'",
    "login_count > 99999999999999999999",
    "password_format = \"bcrypt\" AND enrolled_methods:TOTP",
    "created_at < \"not a time\"",
    ") OR (",
    "NOT NOT NOT",
];

const HASHES: &[&str] = &[
    // bcrypt, cost 4 (cheap to check): "password"
    "$2b$04$8yv3OAvKZsTqkQP.Ne9cBuAbkwzAR0ZoNLqGtp5aLuY3fSjV4XTpu",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$8ENFEfbDRv2Nt9LNdMRMhKuWJvxNBXlo8hLH0ZS9Y1s",
    "$argon2id$v=19$m=4294967295,t=4294967295,p=255$c2FsdA$aGFzaA",
    "$2b$99$abcdefghijklmnopqrstuv",
    "$pbkdf2-sha256$i=4294967295,l=32$c2FsdA$aGFzaA",
    "$scrypt$ln=63,r=8,p=1$c2FsdA$aGFzaA",
    "$5$rounds=999999999$salt$hash",
    "plaintext",
];

const MASK_PATHS: &[&str] = &[
    "display_name",
    "email",
    "app_metadata",
    "app_metadata.plan",
    "user_metadata.`a.b`",
    "id",
    "etag",
    "nope",
    "",
    "app_metadata..x",
    "name",
    "is_default",
];

fn long(rng: &mut StdRng) -> String {
    "x".repeat(one_of(rng, &[257, 321, 1025, 2049, 70_000]))
}

/// One of `items`, each as likely.
fn one_of<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

/// One of the last few of `from` (the newest objects are the likeliest to still exist).
fn pick<'a>(rng: &mut StdRng, from: &'a [String]) -> Option<&'a str> {
    let recent = &from[from.len().saturating_sub(6)..];
    (!recent.is_empty()).then(|| recent[rng.gen_range(0..recent.len())].as_str())
}

/// A string for a field named `name`: mostly a plausible value for that name, often a
/// hostile one.
fn string_for(rng: &mut StdRng, known: &Known, name: &str, hostility: f64) -> String {
    if rng.gen_bool(hostility) {
        return match rng.gen_range(0..10) {
            0 => long(rng),
            1 => (0..rng.gen_range(1..40))
                .map(|_| char::from_u32(rng.gen_range(1..0x3000)).unwrap_or('?'))
                .collect(),
            _ => one_of(rng, HOSTILE).to_string(),
        };
    }
    // A value another user holds, or a fresh one (so creates and updates can pass).
    let taken_or_fresh = |rng: &mut StdRng, taken: &[String], fresh: String| match pick(rng, taken)
    {
        Some(t) if rng.gen_bool(0.5) => t.to_string(),
        _ => fresh,
    };
    let n: u32 = rng.gen_range(0..10_000);
    let plausible = if name == "authenticator_id" || name.ends_with("ids") && rng.gen_bool(0.2) {
        pick(rng, &known.other_ids).map(str::to_string)
    } else if name == "id" || name.ends_with("_id") || name.ends_with("ids") {
        let pool = match rng.gen_range(0..10) {
            0 => &known.event_ids,
            1 => &known.other_ids,
            _ => &known.user_ids,
        };
        pick(rng, pool).map(str::to_string)
    } else if name.contains("email") {
        Some(taken_or_fresh(
            rng,
            &known.emails,
            format!("u{n}@example.com"),
        ))
    } else if name.contains("phone") {
        Some(taken_or_fresh(
            rng,
            &known.phones,
            format!("+1415666{n:04}"),
        ))
    } else if name == "username" {
        Some(taken_or_fresh(rng, &known.usernames, format!("u{n}")))
    } else if name == "external_id" || name == "subject" {
        Some(taken_or_fresh(rng, &known.external_ids, format!("x-{n}")))
    } else if name == "filter" {
        Some(one_of(rng, FILTERS).to_string())
    } else if name.contains("password_hash") {
        Some(one_of(rng, HASHES).to_string())
    } else if name == "new_password" {
        Some(format!("a fresh passphrase {n}"))
    } else if name.contains("password") {
        Some("correct horse battery staple".to_string())
    } else if name == "paths" {
        Some(one_of(rng, MASK_PATHS).to_string())
    } else if name == "order_by" {
        Some(
            one_of(
                rng,
                &[
                    "created_at desc",
                    "email, username desc",
                    "nope",
                    "email asc asc",
                ],
            )
            .to_string(),
        )
    } else if name == "code" {
        Some(one_of(rng, &["123456", "000000", "ABCD-EFGH-JKLM", "1234567"]).to_string())
    } else if name == "provider" {
        Some(one_of(rng, &["google", "github", "oidc"]).to_string())
    } else if name == "etag" || name == "page_token" {
        // Usually none: a made-up one is refused, which the hostile values cover.
        Some(String::new())
    } else if name.ends_with("_url") {
        Some(format!("https://example.com/{n}.png"))
    } else if name == "locale" {
        Some("en-US".to_string())
    } else if name == "timezone" {
        Some("Europe/Paris".to_string())
    } else {
        None
    };
    plausible.unwrap_or_else(|| format!("word{n}"))
}

fn put_len(out: &mut Vec<u8>, number: u32, body: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

struct Generator<'a> {
    messages: &'a HashMap<String, DescriptorProto>,
    known: Known,
    rng: StdRng,
    /// How likely a string is hostile rather than plausible, drawn per request: some
    /// requests are mostly well-formed, to reach the code behind validation.
    hostility: f64,
    /// Bytes written for the current request: past [`BUDGET`] no more fields are added, so
    /// nested repeated fields cannot multiply into a huge message.
    spent: usize,
}

const BUDGET: usize = 256 * 1024;

impl Generator<'_> {
    /// An encoded message of type `name`, `depth` levels down.
    fn message(&mut self, name: &str, depth: usize) -> Vec<u8> {
        let mut out = Vec::new();
        // The map outlives the generator's borrow: its descriptors need no copy.
        let messages = self.messages;
        let Some(desc) = messages.get(name) else {
            return out;
        };
        if name == "google.protobuf.Timestamp" || name == "google.protobuf.Duration" {
            let seconds: i64 = one_of(
                &mut self.rng,
                &[
                    0,
                    1_700_000_000,
                    -62_135_596_801,
                    253_402_300_800,
                    i64::MAX,
                    i64::MIN,
                ],
            );
            let nanos: i32 = one_of(
                &mut self.rng,
                &[0, 999_999_999, 1_000_000_000, -1, i32::MAX],
            );
            encode_key(1, WireType::Varint, &mut out);
            encode_varint(seconds as u64, &mut out);
            encode_key(2, WireType::Varint, &mut out);
            encode_varint(nanos as i64 as u64, &mut out);
            return out;
        }
        // Deeper down, fewer fields: the message stays small while its depth goes past the
        // server's bounds (metadata: depth 8).
        let presence = if depth < 3 { 0.6 } else { 0.35 };
        for f in &desc.field {
            if depth > 14 || !self.rng.gen_bool(presence) {
                continue;
            }
            let times = match f.label() {
                // Past the batch limits (1,000), for lists of scalars only.
                Label::Repeated if f.r#type() != FieldType::Message && self.rng.gen_bool(0.05) => {
                    1_001
                }
                Label::Repeated => self.rng.gen_range(0..4),
                _ => 1,
            };
            for _ in 0..times {
                if self.spent > BUDGET {
                    break;
                }
                let before = out.len();
                self.field(&mut out, f, depth);
                self.spent += out.len() - before;
            }
        }
        out
    }

    fn field(&mut self, out: &mut Vec<u8>, f: &FieldDescriptorProto, depth: usize) {
        let n = f.number() as u32;
        let rng = &mut self.rng;
        match f.r#type() {
            FieldType::String => {
                let s = string_for(rng, &self.known, f.name(), self.hostility);
                put_len(out, n, s.as_bytes());
            }
            FieldType::Bytes => {
                let len = one_of(rng, &[0, 1, 16, 32, 64, 100, 5_000]);
                let b: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                put_len(out, n, &b);
            }
            FieldType::Bool => {
                encode_key(n, WireType::Varint, out);
                encode_varint(rng.gen_range(0..2), out);
            }
            FieldType::Enum => {
                // Known values, unknown ones, negative, huge.
                let candidates = [
                    rng.gen_range(0..8),
                    rng.gen_range(0..60),
                    -1,
                    i32::MAX as i64,
                ];
                let v: i64 = one_of(rng, &candidates);
                encode_key(n, WireType::Varint, out);
                encode_varint(v as u64, out);
            }
            FieldType::Int32 | FieldType::Int64 | FieldType::Uint32 | FieldType::Uint64 => {
                let v: i64 = one_of(
                    rng,
                    &[
                        0,
                        1,
                        50,
                        1_000,
                        1_001,
                        -1,
                        i32::MAX as i64,
                        i64::MAX,
                        i64::MIN,
                    ],
                );
                encode_key(n, WireType::Varint, out);
                encode_varint(v as u64, out);
            }
            FieldType::Sint32 | FieldType::Sint64 => {
                let v: i64 = one_of(rng, &[0, -1, i64::MAX, i64::MIN]);
                encode_key(n, WireType::Varint, out);
                encode_varint(((v << 1) ^ (v >> 63)) as u64, out);
            }
            FieldType::Double => {
                let v = one_of(rng, &[0.0, -1.5, 1e308, f64::NAN, f64::INFINITY]);
                encode_key(n, WireType::SixtyFourBit, out);
                out.extend_from_slice(&f64::to_le_bytes(v));
            }
            FieldType::Float => {
                encode_key(n, WireType::ThirtyTwoBit, out);
                out.extend_from_slice(&f32::to_le_bytes(f32::NAN));
            }
            FieldType::Fixed64 | FieldType::Sfixed64 => {
                encode_key(n, WireType::SixtyFourBit, out);
                out.extend_from_slice(&u64::MAX.to_le_bytes());
            }
            FieldType::Fixed32 | FieldType::Sfixed32 => {
                encode_key(n, WireType::ThirtyTwoBit, out);
                out.extend_from_slice(&u32::MAX.to_le_bytes());
            }
            FieldType::Message => {
                let name = f.type_name().trim_start_matches('.').to_string();
                let body = self.message(&name, depth + 1);
                put_len(out, n, &body);
            }
            FieldType::Group => {}
        }
    }
}

/// A fresh user with every contact, a linked identity and a TOTP factor, added to the
/// pools (requests delete users, so each round adds one).
async fn add_user(app: &TestApp, known: &mut Known, n: usize) {
    let user = pb::User {
        email: format!("r{n}@example.com"),
        phone_number: format!("+1415555{n:04}"),
        username: format!("r{n}"),
        external_id: format!("ext-{n}"),
        // Verified, so OTP channels can be enrolled to them.
        email_verified: true,
        phone_verified: true,
        ..Default::default()
    };
    let Ok(created) = app
        .users()
        .create_user(pb::CreateUserRequest {
            user: Some(user.clone()),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "correct horse battery staple".into(),
            )),
            ..Default::default()
        })
        .await
    else {
        return;
    };
    let id = created.into_inner().user.unwrap().id;
    known.user_ids.push(id.clone());
    known.emails.push(user.email);
    known.phones.push(user.phone_number);
    known.usernames.push(user.username);
    known.external_ids.push(user.external_id);
    let _ = app
        .identities()
        .link_identity(pb::LinkIdentityRequest {
            user_id: id.clone(),
            provider: "google".into(),
            subject: format!("ext-{n}"),
            ..Default::default()
        })
        .await;
    if let Ok(totp) = app
        .authenticators()
        .enroll_totp(pb::EnrollTotpRequest {
            user_id: id,
            ..Default::default()
        })
        .await
    {
        known
            .other_ids
            .push(totp.into_inner().authenticator.unwrap().id);
    }
    if let Ok(events) = app
        .logs()
        .list_events(pb::ListEventsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
    {
        (known.event_ids).extend(events.into_inner().events.into_iter().map(|e| e.id));
    }
}

/// What is wrong with an answer, if anything.
fn fault(answer: &Result<Vec<u8>, tonic::Status>) -> Option<String> {
    let status = answer.as_ref().err()?;
    if matches!(
        status.code(),
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented
    ) {
        return Some(format!("{status:?}"));
    }
    let message = status.message().to_lowercase();
    for sql in [
        "select ",
        "sqlstate",
        "syntax error",
        "relation \"",
        "violates",
        "panicked",
    ] {
        if message.contains(sql) {
            return Some(format!("database or panic text in the message: {status:?}"));
        }
    }
    let d = details(status);
    let Some(info) = d.error_info() else {
        return Some(format!("no ErrorInfo: {status:?}"));
    };
    if info.domain != roster::error::ERROR_DOMAIN {
        return Some(format!("ErrorInfo domain {}: {status:?}", info.domain));
    }
    if status.code() == Code::InvalidArgument {
        let violations = d
            .bad_request()
            .map(|b| b.field_violations.clone())
            .unwrap_or_default();
        if violations.is_empty() || violations.iter().any(|v| v.field.is_empty()) {
            return Some(format!(
                "INVALID_ARGUMENT without named field violations: {status:?}"
            ));
        }
    }
    None
}

#[tokio::test]
async fn random_hostile_requests_to_every_rpc_get_clean_answers() {
    random_requests(TestApp::spawn().await).await;
}

/// The same against a server with every policy on (code rations, the SMS ceiling, password
/// history and age, a low lockout, the IP throttle, passkeys configured), whose checks take
/// row locks and write counters that the default server skips.
#[tokio::test]
async fn random_requests_with_every_policy_on_get_clean_answers() {
    let app = TestApp::spawn_with(ServerConfig {
        key_cache_ms: 50,
        code_resend_secs: 30,
        codes_per_hour: 5,
        sms_per_hour: 20,
        password_history: 3,
        password_max_age_days: 1,
        lockout_threshold: 3,
        ip_failure_limit: 5,
        ..ServerConfig::default()
    })
    .await;
    crate::passkeys::configure(&app).await;
    random_requests(app).await;
}

async fn random_requests(app: TestApp) {
    let mut known = Known {
        user_ids: Vec::new(),
        event_ids: Vec::new(),
        other_ids: Vec::new(),
        emails: Vec::new(),
        phones: Vec::new(),
        usernames: Vec::new(),
        external_ids: Vec::new(),
    };
    for n in 0..3 {
        add_user(&app, &mut known, n).await;
    }
    let fds = FileDescriptorSet::decode(roster::pb::FILE_DESCRIPTOR_SET).unwrap();
    let all = messages(&fds);
    let seed: u64 = std::env::var("ROSTER_RANDOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let per_rpc: usize = std::env::var("ROSTER_RANDOM_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    eprintln!("random requests: ROSTER_RANDOM_SEED={seed}, {per_rpc} per RPC");
    let mut generator = Generator {
        messages: &all,
        known,
        rng: StdRng::seed_from_u64(seed),
        hostility: 0.4,
        spent: 0,
    };
    // (path, input type, whether the client streams)
    let mut methods = Vec::new();
    for file in fds.file.iter().filter(|f| f.package() == "roster.v1") {
        for s in &file.service {
            for m in &s.method {
                methods.push((
                    format!("/roster.v1.{}/{}", s.name(), m.name()),
                    m.input_type().trim_start_matches('.').to_string(),
                    m.client_streaming(),
                ));
            }
        }
    }
    assert!(methods.len() > 40, "the descriptors list the RPCs");
    let mut faults = Vec::new();
    // Answers by ErrorInfo reason ("OK" for none).
    let mut codes: HashMap<String, usize> = HashMap::new();
    let mut answered_ok = std::collections::HashSet::new();
    for round in 0..per_rpc {
        add_user(&app, &mut generator.known, round + 3).await;
        // Every RPC once per round, 8 at a time, so writes to the same few users race as
        // they would from several callers (a deadlock would show as a timeout).
        let mut requests = Vec::new();
        for (path, input, streaming) in &methods {
            let count = if *streaming {
                generator.rng.gen_range(1..6)
            } else {
                1
            };
            let bodies: Vec<Vec<u8>> = (0..count)
                .map(|_| {
                    generator.spent = 0;
                    generator.hostility = one_of(&mut generator.rng, &[0.05, 0.2, 0.5]);
                    generator.message(input, 0)
                })
                .collect();
            requests.push((path.clone(), bodies));
        }
        let answers: Vec<_> = futures_util::stream::iter(requests)
            .map(|(path, bodies)| {
                let app = &app;
                async move {
                    let answer = tokio::time::timeout(
                        Duration::from_secs(20),
                        call_with(app, &path, Some(&app.token), bodies.clone()),
                    )
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::unknown("no answer within 20 s")));
                    (path, bodies, answer)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (path, bodies, answer) in answers {
            let reason = answer
                .as_ref()
                .err()
                .map_or("OK".to_string(), crate::harness::reason);
            *codes.entry(reason).or_default() += 1;
            if answer.is_ok() {
                answered_ok.insert(path.clone());
            }
            if let Some(what) = fault(&answer) {
                let shown: String = (bodies.iter().flatten().take(200))
                    .map(|b| format!("{b:02x}"))
                    .collect();
                faults.push(format!(
                    "{path} (round {round}): {what}\n  request: {shown}"
                ));
            }
        }
    }
    let never_ok: Vec<&str> = (methods.iter())
        .filter(|(path, ..)| !answered_ok.contains(path))
        .map(|(path, ..)| path.rsplit('/').next().unwrap_or(path))
        .collect();
    eprintln!(
        "answers by reason: {codes:?}; {} of {} RPCs answered OK at least once (not: {})",
        answered_ok.len(),
        methods.len(),
        never_ok.join(", ")
    );
    assert!(
        faults.is_empty(),
        "{} faulty answers (ROSTER_RANDOM_SEED={seed}):\n{}",
        faults.len(),
        faults
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The random requests reached past validation, not only into it.
    assert!(answered_ok.len() >= 10, "{answered_ok:?}");
    // And the server is still itself.
    let mut users = app.users();
    let got = users
        .get_user(pb::GetUserRequest {
            id: generator.known.user_ids.last().unwrap().clone(),
        })
        .await;
    assert!(
        got.is_ok() || got.as_ref().unwrap_err().code() == Code::NotFound,
        "{got:?}"
    );
    users
        .create_user(pb::CreateUserRequest {
            user: Some(crate::user_with_email("after@example.com")),
            ..Default::default()
        })
        .await
        .unwrap();
    // What the racing writes left is consistent: the factor summary on each user row (kept
    // by a trigger) matches its authenticators, every user has the event of its creation or
    // import (written in the same transaction), and a block reason only on blocked users.
    for (what, sql) in [
        (
            "users whose factor summary disagrees with their authenticators",
            "SELECT count(*) FROM users u WHERE u.factor_types IS DISTINCT FROM ARRAY(
                 SELECT DISTINCT a.type FROM authenticators a WHERE a.project_id = u.project_id
                 AND a.user_id = u.id AND a.confirmed ORDER BY a.type)
             OR u.default_factor IS DISTINCT FROM (SELECT a.type FROM authenticators a
                 WHERE a.project_id = u.project_id AND a.user_id = u.id AND a.is_default)",
        ),
        (
            "users without an event",
            "SELECT count(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM events e
                 WHERE e.project_id = u.project_id AND e.user_id = u.id)",
        ),
        (
            "users with a block reason but not blocked",
            "SELECT count(*) FROM users WHERE blocked_reason IS NOT NULL AND status <> 3",
        ),
    ] {
        assert_eq!(app.sql_one::<i64>(sql, &[]).await, 0, "{what}");
    }
}
