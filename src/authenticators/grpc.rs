//! AuthenticatorService over gRPC: validates each request into domain values (every field
//! violation at once), calls the operations, and converts results back. No SQL here. RPCs of
//! later issues (TOTP, OTP, passkeys, recovery codes) still answer UNIMPLEMENTED.
use std::net::IpAddr;

use tonic::{Request, Response, Status};

use super::password::{self, NewPassword, Origin, SignInResult};
use super::store::Login;
use crate::auth::caller_of;
use crate::crypto::{formats, policy};
use crate::error::{Error, Violations};
use crate::pb::v1 as pb;
use crate::pb::v1::authenticator_service_server::AuthenticatorService;
use crate::server::AppState;
use crate::users::LookupKey;
use crate::users::grpc::{checked_lookup, required_id, user_to_proto};
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

fn new_plain_password(v: &mut Violations, field: &str, p: &str) {
    if let Err(e) = policy::check_new_password(p, &[]) {
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

fn sign_in_result(r: SignInResult) -> pb::VerifyPasswordResult {
    use pb::VerifyPasswordResult as P;
    match r {
        SignInResult::Ok => P::Ok,
        SignInResult::InvalidCredentials => P::InvalidCredentials,
        SignInResult::Locked(_) => P::Locked,
        SignInResult::Blocked => P::Blocked,
        SignInResult::Deactivated => P::Deactivated,
        SignInResult::PasswordChangeRequired => P::PasswordChangeRequired,
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
                new_plain_password(&mut v, "password", &p);
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
        let user = password::set_password(
            &s.pool,
            &s.hasher,
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
        new_plain_password(&mut v, "new_password", &req.new_password);
        if !req.new_password.is_empty() && req.new_password == req.current_password {
            v.add("new_password", "must differ from the current password");
        }
        v.into_result()?;
        let s = &self.state;
        let user = password::change_password(
            &s.pool,
            &s.hasher,
            &s.passwords,
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
        let (result, user) = password::verify_password(
            &s.pool,
            &s.hasher,
            &s.passwords,
            &caller,
            &login,
            req.password,
            &origin,
        )
        .await?;
        tracing::info!(result = ?result, "password verified");
        Ok(Response::new(pb::VerifyPasswordResponse {
            result: sign_in_result(result) as i32,
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
                Login::Key(checked_lookup("email", e, LookupKey::Email).map_err(Error::from)?)
            }
        };
        let (token, expires_at) =
            password::create_reset_token(&self.state.pool, &caller, &login).await?;
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
        new_plain_password(&mut v, "new_password", &req.new_password);
        v.into_result()?;
        let s = &self.state;
        let user =
            password::reset_password(&s.pool, &s.hasher, &caller, token, req.new_password).await?;
        Ok(Response::new(pb::ResetPasswordResponse {
            user: Some(user_to_proto(&user)),
        }))
    }
}
