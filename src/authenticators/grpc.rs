//! AuthenticatorService over gRPC: validates each request into domain values (every field
//! violation at once), calls the operations, and converts results back. No SQL here.
use std::net::IpAddr;

use tonic::{Request, Response, Status};

use super::factors::{self, AuthenticatorPatch, FactorTarget};
use super::password::{self, NewPassword, Origin, SignInResult, sign_in_context};
use super::sends::Delivery;
use super::store::Login;
use super::{Authenticator, FactorResult, Kind, MAX_NAME_CHARS, otp, passkey, recovery, totp};
use crate::auth::{Caller, caller_of};
use crate::crypto::{formats, policy};
use crate::error::{Error, Violations};
use crate::pb::v1 as pb;
use crate::pb::v1::authenticator_service_server::AuthenticatorService;
use crate::server::AppState;
use crate::users::LookupKey;
use crate::users::grpc::{checked_lookup, required_id, user_to_proto, well_formed_lookup};
use crate::wire;

/// The AuthenticatorService implementation.
pub struct AuthenticatorApi {
    state: AppState,
}

impl AuthenticatorApi {
    pub fn new(state: AppState) -> Self {
        AuthenticatorApi { state }
    }
}

/// Most characters of a user agent recorded with a sign-in.
pub const MAX_USER_AGENT: usize = 1024;

/// A password typed at sign-in: present and not absurdly long. (Length rules for new
/// passwords do not apply: a password set before a policy change must still work.)
fn typed_password(v: &mut Violations, field: &str, p: &str) {
    if p.is_empty() {
        v.add(field, "is required");
    } else if p.chars().count() > policy::MAX_PASSWORD_CHARS {
        v.add(
            field,
            format!("must be at most {} characters", policy::MAX_PASSWORD_CHARS),
        );
    }
}

/// A new password, checked against the caller's project's minimum length.
fn new_plain_password(v: &mut Violations, caller: &Caller, state: &AppState, field: &str, p: &str) {
    let min = state.passwords_for(caller).min_length as usize;
    if let Err(e) = policy::check_new_password(p, &[], min) {
        v.add(field, e);
    }
}

fn user_id(v: &mut Violations, field: &str, raw: &str) -> uuid::Uuid {
    wire::parse_id(raw).unwrap_or_else(|e| {
        v.add(field, e);
        uuid::Uuid::nil()
    })
}

fn origin(v: &mut Violations, ip: &str, user_agent: &str) -> Origin {
    let ip = ip.trim();
    let ip = if ip.is_empty() {
        None
    } else {
        match ip.parse::<IpAddr>() {
            Ok(a) => Some(a.to_string()),
            Err(_) => {
                v.add("ip", "must be an IPv4 or IPv6 address");
                None
            }
        }
    };
    let ua = user_agent.trim();
    if ua.chars().count() > MAX_USER_AGENT || ua.chars().any(char::is_control) {
        v.add(
            "user_agent",
            format!("must be at most {MAX_USER_AGENT} printable characters"),
        );
    }
    Origin {
        ip,
        user_agent: (!ua.is_empty()).then(|| ua.to_string()),
    }
}

/// An optional authenticator name: trimmed, at most 256 printable characters.
pub(crate) fn optional_name(v: &mut Violations, field: &str, raw: &str) -> Option<String> {
    let t = raw.trim();
    if t.chars().count() > MAX_NAME_CHARS || t.chars().any(char::is_control) {
        v.add(
            field,
            format!("must be at most {MAX_NAME_CHARS} printable characters"),
        );
    }
    (!t.is_empty()).then(|| t.to_string())
}

fn kind_of(n: i32) -> Option<Kind> {
    i16::try_from(n).ok().and_then(Kind::from_i16)
}

/// The authenticator a factor call names: by `authenticator_id`, else by `type`, which must be
/// one of `kinds` (a violation on `type` otherwise).
fn factor_target(v: &mut Violations, id: &str, kind: i32, kinds: &[Kind]) -> FactorTarget {
    if !id.trim().is_empty() {
        return FactorTarget::Id(user_id(v, "authenticator_id", id));
    }
    match kind_of(kind).filter(|k| kinds.contains(k)) {
        Some(k) => FactorTarget::Kind(k),
        None => {
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            let (last, rest) = names.split_last().unwrap_or((&"", &[]));
            v.add(
                "type",
                format!(
                    "set authenticator_id, or type to {} or {last}",
                    rest.join(", ")
                ),
            );
            // Unused: the violation fails the call.
            FactorTarget::Kind(kinds.first().copied().unwrap_or(Kind::Totp))
        }
    }
}

pub fn authenticator_to_proto(a: &Authenticator) -> pb::Authenticator {
    use base64::Engine as _;
    pb::Authenticator {
        id: a.id.to_string(),
        user_id: a.user_id.to_string(),
        r#type: a.kind as i32,
        name: a.name.clone().unwrap_or_default(),
        confirmed: a.confirmed,
        is_default: a.is_default,
        created_at: Some(wire::timestamp(a.created_at)),
        last_used_at: wire::opt_timestamp(a.last_used_at),
        credential_id: a
            .credential_id
            .as_ref()
            .map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c))
            .unwrap_or_default(),
        aaguid: a.aaguid.map(|u| u.to_string()).unwrap_or_default(),
        transports: a.transports.clone(),
        backed_up: a.backed_up,
        email: a.email.clone().unwrap_or_default(),
        phone_number: a.phone_number.clone().unwrap_or_default(),
    }
}

fn factor_result(r: FactorResult) -> i32 {
    use pb::VerifyFactorResult as P;
    (match r {
        FactorResult::Ok => P::Ok,
        FactorResult::InvalidCode => P::InvalidCode,
        FactorResult::CodeReused => P::CodeReused,
        FactorResult::Expired => P::Expired,
        FactorResult::TooManyAttempts => P::TooManyAttempts,
        FactorResult::Locked => P::Locked,
    }) as i32
}

/// Largest WebAuthn credential JSON accepted (real ones are a few KiB).
pub const MAX_CREDENTIAL_JSON: usize = 64 * 1024;

/// Parses browser WebAuthn JSON (RegistrationResponseJSON or AuthenticationResponseJSON).
fn webauthn_json<T: serde::de::DeserializeOwned>(
    v: &mut Violations,
    field: &str,
    raw: &str,
) -> Option<T> {
    if raw.trim().is_empty() {
        v.add(field, "is required");
        return None;
    }
    if raw.len() > MAX_CREDENTIAL_JSON {
        v.add(
            field,
            format!("must be at most {MAX_CREDENTIAL_JSON} bytes"),
        );
        return None;
    }
    serde_json::from_str(raw)
        .map_err(|e| {
            v.add(
                field,
                format!(
                    "is not WebAuthn credential JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })
        .ok()
}

fn sign_in_result(r: SignInResult) -> pb::VerifyPasswordResult {
    use pb::VerifyPasswordResult as P;
    match r {
        SignInResult::Ok => P::Ok,
        SignInResult::InvalidCredentials => P::InvalidCredentials,
        SignInResult::Locked(_) => P::Locked,
        SignInResult::Blocked => P::Blocked,
        SignInResult::Deactivated => P::Deactivated,
        SignInResult::PasswordChangeRequired(_) => P::PasswordChangeRequired,
    }
}

fn change_reason(r: SignInResult) -> pb::PasswordChangeReason {
    use pb::PasswordChangeReason as P;
    match r {
        SignInResult::PasswordChangeRequired(password::ChangeReason::Breached) => P::Breached,
        SignInResult::PasswordChangeRequired(password::ChangeReason::Expired) => P::Expired,
        SignInResult::PasswordChangeRequired(password::ChangeReason::MaxAge) => P::MaxAge,
        _ => P::Unspecified,
    }
}

#[tonic::async_trait]
impl AuthenticatorService for AuthenticatorApi {
    #[tracing::instrument(skip_all)]
    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = user_id(&mut v, "user_id", &req.user_id);
        use pb::set_password_request::NewPassword as P;
        let password = match req.new_password {
            None => {
                v.add("password", "set password or password_hash");
                None
            }
            Some(P::Password(p)) => {
                new_plain_password(&mut v, &caller, &self.state, "password", &p);
                Some(NewPassword::Plain(p))
            }
            Some(P::PasswordHash(h)) => {
                if let Err(e) = formats::parse(&h) {
                    v.add("password_hash", e);
                }
                Some(NewPassword::Hash(h))
            }
        };
        v.into_result()?;
        let Some(password) = password else {
            return Err(Error::invalid("password", "set password or password_hash").into());
        };
        let s = &self.state;
        if let NewPassword::Plain(p) = &password {
            s.refuse_breached("password", p).await?;
        }
        let user = password::set_password(
            &s.pool,
            &s.hasher,
            &s.passwords_for(&caller),
            &caller,
            id,
            password,
            req.require_change,
        )
        .await?;
        Ok(Response::new(pb::SetPasswordResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = user_id(&mut v, "user_id", &req.user_id);
        typed_password(&mut v, "current_password", &req.current_password);
        new_plain_password(
            &mut v,
            &caller,
            &self.state,
            "new_password",
            &req.new_password,
        );
        if !req.new_password.is_empty() && req.new_password == req.current_password {
            v.add("new_password", "must differ from the current password");
        }
        v.into_result()?;
        let s = &self.state;
        s.refuse_breached("new_password", &req.new_password).await?;
        let user = password::change_password(
            &s.pool,
            &s.hasher,
            &s.passwords_for(&caller),
            &caller,
            id,
            req.current_password,
            req.new_password,
        )
        .await?;
        Ok(Response::new(pb::ChangePasswordResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn expire_password(
        &self,
        request: Request<pb::ExpirePasswordRequest>,
    ) -> Result<Response<pb::ExpirePasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = required_id("user_id", &request.get_ref().user_id)?;
        let user = password::expire_password(&self.state.pool, &caller, id).await?;
        Ok(Response::new(pb::ExpirePasswordResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn verify_password(
        &self,
        request: Request<pb::VerifyPasswordRequest>,
    ) -> Result<Response<pb::VerifyPasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        use pb::verify_password_request::Login as L;
        let login = match &req.login {
            None => {
                v.add(
                    "login",
                    "set exactly one of user_id, email, username, phone_number",
                );
                None
            }
            Some(L::UserId(id)) => Some(Login::Id(user_id(&mut v, "user_id", id))),
            Some(L::Email(e)) => checked_lookup("email", e, LookupKey::Email)
                .map_err(|e| v.push(e))
                .ok()
                .map(Login::Key),
            Some(L::Username(u)) => checked_lookup("username", u, LookupKey::Username)
                .map_err(|e| v.push(e))
                .ok()
                .map(Login::Key),
            Some(L::PhoneNumber(p)) => checked_lookup("phone_number", p, LookupKey::PhoneNumber)
                .map_err(|e| v.push(e))
                .ok()
                .map(Login::Key),
        };
        typed_password(&mut v, "password", &req.password);
        let origin = origin(&mut v, &req.ip, &req.user_agent);
        v.into_result()?;
        let Some(login) = login else {
            return Err(Error::invalid("login", "is required").into());
        };
        let s = &self.state;
        // Only an address the caller reports is counted: the peer is the calling backend.
        let ip = origin
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let settings = s.passwords_for(&caller);
        let taken = match ip {
            Some(ip) => {
                s.ip_throttle
                    .attempt(&s.pool, caller.project_id, ip, settings.ip_failure_limit)
                    .await?
            }
            None => None,
        };
        // Looked up whatever the outcome (tens of µs, against the hash's milliseconds): only a
        // right password's answer depends on it, and whether a password is in a public list
        // is no secret.
        let breached = s.breached_at_sign_in(&req.password).await?;
        let (result, user) = password::verify_password(
            &s.pool,
            &s.hasher,
            &settings,
            &caller,
            &login,
            password::Presented {
                password: req.password,
                breached,
            },
            &origin,
        )
        .await?;
        if let Some(taken) = taken {
            taken
                .settle(result == SignInResult::InvalidCredentials)
                .await;
        }
        tracing::info!(result = ?result, "password verified");
        let answer = sign_in_result(result);
        s.verifications.inc(
            Kind::Password.as_str(),
            answer
                .as_str_name()
                .trim_start_matches("VERIFY_PASSWORD_RESULT_"),
        );
        Ok(Response::new(pb::VerifyPasswordResponse {
            result: answer as i32,
            change_reason: change_reason(result) as i32,
            user: user.as_ref().map(user_to_proto),
            locked_until: match result {
                SignInResult::Locked(t) => Some(wire::timestamp(t)),
                _ => None,
            },
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_password_reset_token(
        &self,
        request: Request<pb::CreatePasswordResetTokenRequest>,
    ) -> Result<Response<pb::CreatePasswordResetTokenResponse>, Status> {
        let caller = caller_of(&request)?;
        use pb::create_password_reset_token_request::Login as L;
        let login = match &request.get_ref().login {
            None => return Err(Error::invalid("login", "set user_id or email").into()),
            Some(L::UserId(id)) => Login::Id(required_id("user_id", id)?),
            Some(L::Email(e)) => {
                Login::Key(well_formed_lookup("email", e, LookupKey::Email).map_err(Error::from)?)
            }
        };
        let limit = self.state.passwords_for(&caller).codes;
        let (token, expires_at) =
            password::create_reset_token(&self.state.pool, &caller, &login, limit).await?;
        self.state.codes_issued.inc(Delivery::PasswordReset);
        Ok(Response::new(pb::CreatePasswordResetTokenResponse {
            token,
            expires_at: Some(wire::timestamp(expires_at)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn reset_password(
        &self,
        request: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let token = req.token.trim();
        if !password::is_reset_token(token) {
            v.add("token", "is not a password reset token");
        }
        new_plain_password(
            &mut v,
            &caller,
            &self.state,
            "new_password",
            &req.new_password,
        );
        v.into_result()?;
        let s = &self.state;
        s.refuse_breached("new_password", &req.new_password).await?;
        let user = password::reset_password(
            &s.pool,
            &s.hasher,
            &s.passwords_for(&caller),
            &caller,
            token,
            req.new_password,
        )
        .await?;
        Ok(Response::new(pb::ResetPasswordResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn check_password(
        &self,
        request: Request<pb::CheckPasswordRequest>,
    ) -> Result<Response<pb::CheckPasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let s = &self.state;
        let settings = s.passwords_for(&caller);
        let user = if req.user_id.trim().is_empty() {
            None
        } else {
            let id = required_id("user_id", &req.user_id)?;
            let client = crate::db::client(&s.pool).await?;
            let user = crate::users::store::get(&*client, caller.project_id, id)
                .await?
                .ok_or_else(|| password::not_found(id))?;
            Some(user)
        };
        let mut personal = user
            .as_ref()
            .map(|u| u.profile.personal())
            .unwrap_or_default();
        // Those of a sign-up form, for a user not created yet (compared, never stored).
        for given in [&req.email, &req.username, &req.phone_number] {
            if !given.trim().is_empty() && given.len() <= 1_024 {
                personal.push(given);
            }
        }
        let mut problems = policy::problems(&req.password, &personal, settings.min_length as usize);
        let checkable =
            !req.password.is_empty() && req.password.chars().count() <= policy::MAX_PASSWORD_CHARS;
        if checkable && s.is_breached(&req.password).await? {
            problems.push(crate::crypto::breached::PROBLEM.into());
        }
        if req.check_history {
            let Some(user) = &user else {
                return Err(Error::invalid("check_history", "needs user_id").into());
            };
            // Only for a password that could be set: the hashing is what costs.
            if checkable && problems.is_empty() {
                problems.extend(
                    password::reuse_problem(
                        &s.pool,
                        &s.hasher,
                        &settings,
                        &caller,
                        user.id,
                        &req.password,
                    )
                    .await?,
                );
            }
        }
        Ok(Response::new(pb::CheckPasswordResponse {
            acceptable: problems.is_empty(),
            problems,
            policy: Some(pb::PasswordPolicy {
                min_length: settings.min_length as i32,
                max_length: policy::MAX_PASSWORD_CHARS as i32,
                history: settings.history as i32,
                max_age_days: settings.max_age_days as i32,
                lockout_threshold: settings.lockout_threshold.min(i32::MAX as u32) as i32,
                lockout_duration: Some(prost_types::Duration {
                    seconds: settings.lockout.num_seconds(),
                    nanos: 0,
                }),
            }),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn enroll_totp(
        &self,
        request: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let name = optional_name(&mut v, "name", &req.name);
        v.into_result()?;
        let s = &self.state;
        let e = totp::enroll(&s.pool, s.sealer.as_deref(), &caller, uid, name.as_deref()).await?;
        Ok(Response::new(pb::EnrollTotpResponse {
            authenticator: Some(authenticator_to_proto(&e.authenticator)),
            secret: e.secret_base32,
            otpauth_uri: e.otpauth_uri,
            qr_png: e.qr_png,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn confirm_totp(
        &self,
        request: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let id = user_id(&mut v, "authenticator_id", &req.authenticator_id);
        let code: String = req.code.chars().filter(|c| !c.is_whitespace()).collect();
        if !crate::crypto::codes::is_six_digits(&code) {
            v.add("code", "must be 6 digits");
        }
        v.into_result()?;
        let s = &self.state;
        let (result, a) =
            totp::confirm(&s.pool, s.sealer.as_deref(), &caller, uid, id, &code).await?;
        Ok(Response::new(pb::ConfirmTotpResponse {
            result: factor_result(result),
            authenticator: Some(authenticator_to_proto(&a)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn generate_recovery_codes(
        &self,
        request: Request<pb::GenerateRecoveryCodesRequest>,
    ) -> Result<Response<pb::GenerateRecoveryCodesResponse>, Status> {
        let caller = caller_of(&request)?;
        let uid = required_id("user_id", &request.get_ref().user_id)?;
        let (a, codes) = recovery::generate(&self.state.pool, &caller, uid).await?;
        Ok(Response::new(pb::GenerateRecoveryCodesResponse {
            authenticator: Some(authenticator_to_proto(&a)),
            codes,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn enroll_otp_channel(
        &self,
        request: Request<pb::EnrollOtpChannelRequest>,
    ) -> Result<Response<pb::EnrollOtpChannelResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let kind = match kind_of(req.r#type) {
            Some(k @ (Kind::EmailOtp | Kind::SmsOtp)) => k,
            _ => {
                v.add("type", "must be EMAIL_OTP or SMS_OTP");
                Kind::EmailOtp
            }
        };
        let name = optional_name(&mut v, "name", &req.name);
        v.into_result()?;
        let s = &self.state;
        let a = otp::enroll(
            &s.pool,
            &caller,
            uid,
            kind,
            name.as_deref(),
            &s.sms_for(&caller),
        )
        .await?;
        Ok(Response::new(pb::EnrollOtpChannelResponse {
            authenticator: Some(authenticator_to_proto(&a)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn start_otp_challenge(
        &self,
        request: Request<pb::StartOtpChallengeRequest>,
    ) -> Result<Response<pb::StartOtpChallengeResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let target = factor_target(
            &mut v,
            &req.authenticator_id,
            req.r#type,
            &[Kind::EmailOtp, Kind::SmsOtp],
        );
        v.into_result()?;
        let limit = self.state.passwords_for(&caller).codes;
        let (code, expires_at, a) = otp::start_challenge(
            &self.state.pool,
            &caller,
            uid,
            target,
            limit,
            &self.state.sms_for(&caller),
        )
        .await?;
        self.state.codes_issued.inc(Delivery::of_otp(a.kind));
        Ok(Response::new(pb::StartOtpChallengeResponse {
            code,
            expires_at: Some(wire::timestamp(expires_at)),
            authenticator: Some(authenticator_to_proto(&a)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn verify_factor(
        &self,
        request: Request<pb::VerifyFactorRequest>,
    ) -> Result<Response<pb::VerifyFactorResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let target = factor_target(
            &mut v,
            &req.authenticator_id,
            req.r#type,
            &[
                Kind::Totp,
                Kind::EmailOtp,
                Kind::SmsOtp,
                Kind::RecoveryCodes,
            ],
        );
        if req.code.trim().is_empty() {
            v.add("code", "is required");
        } else if req.code.len() > 64 {
            v.add("code", "must be at most 64 characters");
        }
        let origin = origin(&mut v, &req.ip, &req.user_agent);
        v.into_result()?;
        let s = &self.state;
        let asked_for = match target {
            FactorTarget::Kind(kind) => Some(kind),
            FactorTarget::Id(_) => None,
        };
        let ctx = sign_in_context(&caller, &origin);
        let attempt = factors::Attempt {
            caller: &caller,
            ctx: &ctx,
            settings: &s.passwords_for(&caller),
            via: "VerifyFactor",
        };
        let out = factors::verify_factor(
            &s.pool,
            s.sealer.as_deref(),
            &attempt,
            uid,
            target,
            &req.code,
        )
        .await?;
        tracing::info!(result = out.result.as_str(), "factor verified");
        if let Some(kind) = out.authenticator.as_ref().map(|a| a.kind).or(asked_for) {
            s.verifications.inc(kind.as_str(), out.result.as_str());
        }
        Ok(Response::new(pb::VerifyFactorResponse {
            result: factor_result(out.result),
            authenticator: out.authenticator.as_ref().map(authenticator_to_proto),
            user: out.user.as_ref().map(user_to_proto),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn start_passkey_registration(
        &self,
        request: Request<pb::StartPasskeyRegistrationRequest>,
    ) -> Result<Response<pb::StartPasskeyRegistrationResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let name = optional_name(&mut v, "name", &req.name);
        v.into_result()?;
        let s = &self.state;
        let (id, options) =
            passkey::start_registration(&s.pool, &s.relying_party, &caller, uid, name).await?;
        Ok(Response::new(pb::StartPasskeyRegistrationResponse {
            ceremony_id: id.to_string(),
            options_json: options,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn finish_passkey_registration(
        &self,
        request: Request<pb::FinishPasskeyRegistrationRequest>,
    ) -> Result<Response<pb::FinishPasskeyRegistrationResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let ceremony = user_id(&mut v, "ceremony_id", &req.ceremony_id);
        let credential = webauthn_json(&mut v, "credential_json", &req.credential_json);
        v.into_result()?;
        let Some(credential) = credential else {
            return Err(Error::invalid("credential_json", "is required").into());
        };
        let s = &self.state;
        let a = passkey::finish_registration(
            &s.pool,
            &s.relying_party,
            &caller,
            uid,
            ceremony,
            &credential,
        )
        .await?;
        Ok(Response::new(pb::FinishPasskeyRegistrationResponse {
            authenticator: Some(authenticator_to_proto(&a)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn start_passkey_authentication(
        &self,
        request: Request<pb::StartPasskeyAuthenticationRequest>,
    ) -> Result<Response<pb::StartPasskeyAuthenticationResponse>, Status> {
        let caller = caller_of(&request)?;
        let raw = request.get_ref().user_id.trim();
        let uid = if raw.is_empty() {
            None
        } else {
            Some(required_id("user_id", raw)?)
        };
        let s = &self.state;
        let (id, options) =
            passkey::start_authentication(&s.pool, &s.relying_party, &caller, uid).await?;
        Ok(Response::new(pb::StartPasskeyAuthenticationResponse {
            ceremony_id: id.to_string(),
            options_json: options,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn finish_passkey_authentication(
        &self,
        request: Request<pb::FinishPasskeyAuthenticationRequest>,
    ) -> Result<Response<pb::FinishPasskeyAuthenticationResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let ceremony = user_id(&mut v, "ceremony_id", &req.ceremony_id);
        let credential = webauthn_json(&mut v, "credential_json", &req.credential_json);
        let origin = origin(&mut v, &req.ip, &req.user_agent);
        v.into_result()?;
        let Some(credential) = credential else {
            return Err(Error::invalid("credential_json", "is required").into());
        };
        let s = &self.state;
        let out = passkey::finish_authentication(
            &s.pool,
            &s.relying_party,
            &s.passwords_for(&caller),
            &caller,
            ceremony,
            &credential,
            &origin,
        )
        .await?;
        tracing::info!(result = out.result.as_str(), "passkey verified");
        s.verifications
            .inc(Kind::Passkey.as_str(), out.result.as_str());
        Ok(Response::new(pb::FinishPasskeyAuthenticationResponse {
            result: factor_result(out.result),
            authenticator: out.authenticator.as_ref().map(authenticator_to_proto),
            user: out.user.as_ref().map(user_to_proto),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_authenticators(
        &self,
        request: Request<pb::ListAuthenticatorsRequest>,
    ) -> Result<Response<pb::ListAuthenticatorsResponse>, Status> {
        let caller = caller_of(&request)?;
        let uid = required_id("user_id", &request.get_ref().user_id)?;
        let list = factors::list(&self.state.pool, &caller, uid).await?;
        Ok(Response::new(pb::ListAuthenticatorsResponse {
            authenticators: list.iter().map(authenticator_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_authenticator(
        &self,
        request: Request<pb::GetAuthenticatorRequest>,
    ) -> Result<Response<pb::GetAuthenticatorResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.get_ref();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let id = user_id(&mut v, "authenticator_id", &req.authenticator_id);
        v.into_result()?;
        let a = factors::get(&self.state.pool, &caller, uid, id).await?;
        Ok(Response::new(pb::GetAuthenticatorResponse {
            authenticator: Some(authenticator_to_proto(&a)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_authenticator(
        &self,
        request: Request<pb::UpdateAuthenticatorRequest>,
    ) -> Result<Response<pb::UpdateAuthenticatorResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let a = req.authenticator.unwrap_or_default();
        let uid = user_id(&mut v, "authenticator.user_id", &a.user_id);
        let id = user_id(&mut v, "authenticator.id", &a.id);
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            v.add("update_mask", "must name at least one of name, is_default");
        }
        let mut patch = AuthenticatorPatch {
            name: None,
            make_default: false,
        };
        for path in &paths {
            match path.as_str() {
                "name" => patch.name = Some(optional_name(&mut v, "authenticator.name", &a.name)),
                "is_default" if a.is_default => patch.make_default = true,
                "is_default" => v.add(
                    "authenticator.is_default",
                    "can only be set to true: make another authenticator the default instead",
                ),
                other => v.add(
                    "update_mask",
                    format!("unknown or read-only path {other:?}; settable: name, is_default"),
                ),
            }
        }
        v.into_result()?;
        let a = factors::update(&self.state.pool, &caller, uid, id, patch).await?;
        Ok(Response::new(pb::UpdateAuthenticatorResponse {
            authenticator: Some(authenticator_to_proto(&a)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_authenticator(
        &self,
        request: Request<pb::DeleteAuthenticatorRequest>,
    ) -> Result<Response<pb::DeleteAuthenticatorResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.get_ref();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let id = user_id(&mut v, "authenticator_id", &req.authenticator_id);
        v.into_result()?;
        factors::delete(&self.state.pool, &caller, uid, Some(id), None).await?;
        Ok(Response::new(pb::DeleteAuthenticatorResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_all_authenticators(
        &self,
        request: Request<pb::DeleteAllAuthenticatorsRequest>,
    ) -> Result<Response<pb::DeleteAllAuthenticatorsResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.get_ref();
        let mut v = Violations::new();
        let uid = user_id(&mut v, "user_id", &req.user_id);
        let kind = match req.r#type {
            0 => None,
            n => match kind_of(n) {
                Some(Kind::Password) | None => {
                    v.add(
                        "type",
                        "must be TOTP, PASSKEY, EMAIL_OTP, SMS_OTP, RECOVERY_CODES or unset \
                         (passwords are managed with SetPassword)",
                    );
                    None
                }
                k => k,
            },
        };
        v.into_result()?;
        let deleted = factors::delete(&self.state.pool, &caller, uid, None, kind).await?;
        Ok(Response::new(pb::DeleteAllAuthenticatorsResponse {
            deleted_count: i32::try_from(deleted.len()).unwrap_or(i32::MAX),
        }))
    }
}
