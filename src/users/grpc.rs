//! UserService over gRPC: converts requests into validated domain values (every field
//! violation at once), calls `ops`, and converts results back. No SQL here.
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::bulk_grpc;
use super::ops::{self, ContactChannel, Lifecycle, VerificationResult};
use super::store::{self, ListSpec, ORDER_FIELDS};
use super::{
    LookupKey, NewUser, PasswordInput, Profile, User, UserStatus, has_identifier, validate_profile,
};
use crate::auth::{Scope, caller_of};
use crate::crypto;
use crate::error::{Error, Violation, Violations};
use crate::pb::v1 as pb;
use crate::pb::v1::user_service_server::UserService;
use crate::query::{page, sql};
use crate::server::AppState;
use crate::wire;

/// The UserService implementation.
pub struct UserApi {
    state: AppState,
}

impl UserApi {
    pub fn new(state: AppState) -> Self {
        UserApi { state }
    }
}

/// Most limits that apply to all ids in a batch.
pub const MAX_BATCH: usize = 1000;

/// The ids of a batch call: 1 to [`MAX_BATCH`] UUIDs, each bad one a violation of its own
/// (`ids[3]`), repeats dropped, first-seen order kept.
fn batch_ids(given: &[String]) -> Result<Vec<Uuid>, Status> {
    if given.len() > MAX_BATCH {
        return Err(Error::invalid("ids", format!("at most {MAX_BATCH} ids per call")).into());
    }
    let mut v = Violations::new();
    if given.is_empty() {
        v.add("ids", "must name at least one user");
    }
    let mut seen = std::collections::HashSet::with_capacity(given.len());
    let mut ids = Vec::with_capacity(given.len());
    for (i, s) in given.iter().enumerate() {
        let id = id_field(&mut v, &format!("ids[{i}]"), s);
        if seen.insert(id) {
            ids.push(id);
        }
    }
    v.into_result()?;
    Ok(ids)
}

pub(super) fn text(s: &str) -> Option<String> {
    let t = s.trim();
    if t.is_empty() {
        None
    } else {
        Some(t.to_string())
    }
}

/// The settable fields of a proto `User`, collecting violations for what cannot even be
/// converted (metadata that is not JSON-compatible).
pub(crate) fn profile_from_proto(u: &pb::User, prefix: &str, v: &mut Violations) -> Profile {
    let mut meta = |name: &str, s: &Option<prost_types::Struct>| match s {
        None => serde_json::Map::new(),
        Some(s) => wire::struct_to_json(s).unwrap_or_else(|e| {
            v.add(format!("{prefix}.{name}"), e);
            serde_json::Map::new()
        }),
    };
    Profile {
        external_id: text(&u.external_id),
        email: text(&u.email),
        email_verified: u.email_verified,
        phone_number: text(&u.phone_number),
        phone_verified: u.phone_verified,
        username: text(&u.username),
        display_name: text(&u.display_name),
        given_name: text(&u.given_name),
        family_name: text(&u.family_name),
        picture_url: text(&u.picture_url),
        locale: text(&u.locale),
        timezone: text(&u.timezone),
        user_metadata: meta("user_metadata", &u.user_metadata),
        app_metadata: meta("app_metadata", &u.app_metadata),
    }
}

pub fn user_to_proto(u: &User) -> pb::User {
    let p = &u.profile;
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let status = match u.status {
        UserStatus::Active => pb::UserStatus::Active,
        UserStatus::PendingVerification => pb::UserStatus::PendingVerification,
        UserStatus::Blocked => pb::UserStatus::Blocked,
        UserStatus::Deactivated => pb::UserStatus::Deactivated,
    };
    let mut enrolled = Vec::with_capacity(u.factor_types.len() + 1);
    if u.has_password {
        enrolled.push(pb::AuthenticatorType::Password as i32);
    }
    enrolled.extend(u.factor_types.iter().map(|&t| i32::from(t)));
    pb::User {
        id: u.id.to_string(),
        external_id: s(&p.external_id),
        email: s(&p.email),
        email_verified: p.email_verified,
        phone_number: s(&p.phone_number),
        phone_verified: p.phone_verified,
        username: s(&p.username),
        display_name: s(&p.display_name),
        given_name: s(&p.given_name),
        family_name: s(&p.family_name),
        picture_url: s(&p.picture_url),
        locale: s(&p.locale),
        timezone: s(&p.timezone),
        status: status as i32,
        user_metadata: Some(wire::json_to_struct(&p.user_metadata)),
        app_metadata: Some(wire::json_to_struct(&p.app_metadata)),
        has_password: u.has_password,
        password_changed_at: wire::opt_timestamp(u.password_changed_at),
        require_password_change: u.require_password_change,
        enrolled_methods: enrolled,
        default_method: u
            .default_factor
            .map_or(pb::AuthenticatorType::Unspecified as i32, i32::from),
        login_count: u.login_count,
        last_login_at: wire::opt_timestamp(u.last_login_at),
        last_login_ip: s(&u.last_login_ip),
        locked_until: wire::opt_timestamp(u.locked_until.filter(|t| *t > chrono::Utc::now())),
        blocked_reason: s(&u.blocked_reason),
        created_at: Some(wire::timestamp(u.created_at)),
        updated_at: Some(wire::timestamp(u.updated_at)),
        etag: u.etag(),
    }
}

pub fn id_field(v: &mut Violations, field: &str, value: &str) -> Uuid {
    wire::parse_id(value).unwrap_or_else(|e| {
        v.add(field, e);
        Uuid::nil()
    })
}

/// A required id, as its own error.
pub fn required_id(field: &str, value: &str) -> Result<Uuid, Error> {
    wire::parse_id(value).map_err(|e| Error::invalid(field, e))
}

fn etag_of(s: &str) -> Option<&str> {
    let t = s.trim();
    if t.is_empty() { None } else { Some(t) }
}

fn contact_channel(n: i32) -> Result<ContactChannel, Error> {
    match pb::ContactChannel::try_from(n) {
        Ok(pb::ContactChannel::Email) => Ok(ContactChannel::Email),
        Ok(pb::ContactChannel::Phone) => Ok(ContactChannel::Phone),
        _ => Err(Error::invalid("channel", "must be EMAIL or PHONE")),
    }
}

/// `min_password_chars`: the caller's project's minimum for a new password.
fn new_user_from_request(
    req: pb::CreateUserRequest,
    min_password_chars: usize,
) -> Result<NewUser, Error> {
    let mut v = Violations::new();
    let Some(u) = req.user else {
        return Err(Error::invalid("user", "is required"));
    };
    let profile = profile_from_proto(&u, "user", &mut v);
    validate_profile(&profile, "user", &mut v);
    if !has_identifier(&profile) {
        v.add(
            "user",
            "needs at least one of email, phone_number, username, external_id",
        );
    }
    let id = if req.user_id.is_empty() {
        Uuid::now_v7()
    } else {
        id_field(&mut v, "user_id", &req.user_id)
    };
    use pb::create_user_request::InitialPassword;
    let password = match req.initial_password {
        None => None,
        Some(InitialPassword::Password(p)) => {
            if let Err(e) =
                crypto::policy::check_new_password(&p, &profile.personal(), min_password_chars)
            {
                v.add("password", e);
            }
            Some(PasswordInput::Plain(p))
        }
        Some(InitialPassword::PasswordHash(h)) => {
            if let Err(e) = crypto::formats::parse(&h) {
                v.add("password_hash", e);
            }
            Some(PasswordInput::Hash(h))
        }
    };
    v.into_result()?;
    Ok(NewUser {
        id,
        profile,
        pending: req.pending,
        password,
        created_at: None,
    })
}

fn lookup_key(req: pb::LookupUserRequest) -> Result<LookupKey, Error> {
    use pb::lookup_user_request::Key;
    let key = req.key.ok_or_else(|| {
        Error::invalid(
            "key",
            "set exactly one of email, phone_number, username, external_id",
        )
    })?;
    Ok(match key {
        Key::Email(e) => well_formed_lookup("email", &e, LookupKey::Email),
        Key::PhoneNumber(p) => well_formed_lookup("phone_number", &p, LookupKey::PhoneNumber),
        Key::Username(u) => checked_lookup("username", &u, LookupKey::Username),
        Key::ExternalId(x) => checked_lookup("external_id", &x, LookupKey::ExternalId),
    }?)
}

/// A lookup value, trimmed and bounded (a lookup never needs more than the longest field).
pub fn checked_lookup(
    field: &str,
    raw: &str,
    make: fn(String) -> LookupKey,
) -> Result<LookupKey, Violation> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(Violation::new(field, "must not be empty"));
    }
    if value.chars().count() > super::MAX_EMAIL || value.chars().any(char::is_control) {
        return Err(Violation::new(
            field,
            "is too long or has control characters",
        ));
    }
    Ok(make(value.to_string()))
}

/// [`checked_lookup`], and an email that is not one or a phone not in E.164 form is refused:
/// no user could have it, so it is the caller's mistake (a phone typed as "+1 415 555 0123",
/// a phone in the email field), not an unknown user. Sign-in keeps the lenient form: there
/// a malformed login is just a wrong one.
pub fn well_formed_lookup(
    field: &str,
    raw: &str,
    make: fn(String) -> LookupKey,
) -> Result<LookupKey, Violation> {
    let key = checked_lookup(field, raw, make)?;
    match &key {
        LookupKey::Email(e) => super::check_email(e),
        LookupKey::PhoneNumber(p) => super::check_phone(p),
        LookupKey::Username(_) | LookupKey::ExternalId(_) => Ok(()),
    }
    .map_err(|m| Violation::new(field, m))?;
    Ok(key)
}

/// The most characters of a free-text query.
pub const MAX_QUERY: usize = 256;

fn list_spec(req: &pb::ListUsersRequest) -> Result<(ListSpec, String), Error> {
    let mut v = Violations::new();
    let filter = sql::parse_filter(&req.filter, store::filter_field).unwrap_or_else(|e| {
        v.add("filter", e.to_string());
        None
    });
    let query = text(&req.query).map(|q| q.to_lowercase());
    if let Some(q) = &query
        && (q.chars().count() > MAX_QUERY || q.chars().any(char::is_control))
    {
        v.add(
            "query",
            format!("must be at most {MAX_QUERY} printable characters"),
        );
    }
    let order = page::parse_order(&req.order_by, ORDER_FIELDS, "created_at").unwrap_or_else(|e| {
        v.add("order_by", e);
        page::parse_order("", ORDER_FIELDS, "created_at").unwrap_or(page::Order { fields: vec![] })
    });
    let limit = page::page_size(req.page_size).unwrap_or_else(|e| {
        v.add("page_size", e);
        page::DEFAULT_PAGE_SIZE
    });
    let fp = page::fingerprint(&[
        req.filter.trim(),
        query.as_deref().unwrap_or(""),
        &order.canonical(),
    ]);
    let after = if req.page_token.is_empty() {
        None
    } else {
        page::decode_token(&req.page_token, &fp, &order)
            .map_err(|e| v.add("page_token", e))
            .ok()
    };
    v.into_result()?;
    Ok((
        ListSpec {
            filter,
            query,
            order,
            limit,
            after,
        },
        fp,
    ))
}

#[tonic::async_trait]
impl UserService for UserApi {
    #[tracing::instrument(skip_all)]
    async fn import_users(
        &self,
        request: Request<tonic::Streaming<pb::ImportUsersRequest>>,
    ) -> Result<Response<bulk_grpc::ImportStream>, Status> {
        let caller = caller_of(&request)?;
        let history = self.state.passwords_for(&caller).history;
        Ok(Response::new(bulk_grpc::run_import(
            request.into_inner(),
            self.state.pool.clone(),
            caller,
            history,
            self.state.sealer.clone(),
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn export_users(
        &self,
        request: Request<pb::ExportUsersRequest>,
    ) -> Result<Response<bulk_grpc::ExportStream>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let filter = sql::parse_filter(&req.filter, store::filter_field).unwrap_or_else(|e| {
            v.add("filter", e.to_string());
            None
        });
        let fields = bulk_grpc::read_mask(req.read_mask.as_ref(), &mut v);
        v.into_result()?;
        if req.include_password_hashes {
            caller.require(Scope::UsersExportSecrets)?;
        }
        if req.include_identities {
            caller.require(Scope::IdentitiesRead)?;
        }
        if req.include_authenticators {
            // TOTP seeds are secrets as much as password hashes are.
            caller.require(Scope::AuthenticatorsRead)?;
            caller.require(Scope::UsersExportSecrets)?;
        }
        let spec = super::bulk_store::ExportSpec {
            filter,
            with_identities: req.include_identities,
            with_factors: req.include_authenticators,
            with_password_hash: req.include_password_hashes,
        };
        let data = serde_json::json!({
            "filter": req.filter.trim(),
            "fields": fields.clone().unwrap_or_else(|| vec!["*"]),
            "include_password_hashes": req.include_password_hashes,
            "include_identities": req.include_identities,
            "include_authenticators": req.include_authenticators,
        });
        let slot = self.state.exports.slot()?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let (end_tx, mut end) = tokio::sync::oneshot::channel();
        tokio::spawn(ops::export_users(
            self.state.pool.clone(),
            caller,
            spec,
            self.state.sealer.clone(),
            data,
            ops::ExportOut {
                chunks: tx,
                end: end_tx,
                stall: self.state.exports.stall,
                slot,
            },
        ));
        // The first (empty) chunk says the snapshot opened; without it the outcome is the
        // error that kept it from opening, and the RPC's answer.
        match rx.recv().await {
            Some(_) => Ok(Response::new(bulk_grpc::export_stream(rx, end, fields))),
            None => Err(match end.try_recv() {
                Ok(Err(e)) => e,
                _ => Error::internal(anyhow::anyhow!("export ended before it began")),
            }
            .into()),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let min = self.state.passwords_for(&caller).min_length;
        let new = new_user_from_request(request.into_inner(), min as usize)?;
        if let Some(crate::users::PasswordInput::Plain(p)) = &new.password {
            self.state.refuse_breached("password", p).await?;
        }
        let user =
            ops::create_user(&self.state.user_creates, &self.state.hasher, &caller, new).await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = required_id("id", &request.get_ref().id)?;
        let user = ops::get_user(&self.state.user_reads, &caller, id).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn batch_get_users(
        &self,
        request: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        let caller = caller_of(&request)?;
        let ids = batch_ids(&request.get_ref().ids)?;
        let (found, missing) = ops::batch_get_users(&self.state.pool, &caller, &ids).await?;
        Ok(Response::new(pb::BatchGetUsersResponse {
            users: found.iter().map(user_to_proto).collect(),
            not_found_ids: missing.iter().map(Uuid::to_string).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn lookup_user(
        &self,
        request: Request<pb::LookupUserRequest>,
    ) -> Result<Response<pb::LookupUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let key = lookup_key(request.into_inner())?;
        let user = ops::lookup_user(&self.state.user_reads, &caller, &key).await?;
        Ok(Response::new(pb::LookupUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let Some(u) = req.user else {
            return Err(Error::invalid("user", "is required").into());
        };
        let id = id_field(&mut v, "user.id", &u.id);
        let given = profile_from_proto(&u, "user", &mut v);
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let mask = super::parse_mask(&paths).unwrap_or_else(|e| {
            v.extend(e);
            Vec::new()
        });
        v.into_result()?;
        let etag = etag_of(&req.etag).or(etag_of(&u.etag));
        let user = ops::update_user(&self.state.pool, &caller, id, &given, &mask, etag).await?;
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = required_id("id", &req.id)?;
        ops::delete_user(&self.state.pool, &caller, id, etag_of(&req.etag)).await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn batch_delete_users(
        &self,
        request: Request<pb::BatchDeleteUsersRequest>,
    ) -> Result<Response<pb::BatchDeleteUsersResponse>, Status> {
        let caller = caller_of(&request)?;
        let ids = batch_ids(&request.get_ref().ids)?;
        let (deleted, missing) = ops::batch_delete_users(&self.state.pool, &caller, &ids).await?;
        Ok(Response::new(pb::BatchDeleteUsersResponse {
            deleted_ids: deleted.iter().map(Uuid::to_string).collect(),
            not_found_ids: missing.iter().map(Uuid::to_string).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let (spec, fp) = list_spec(&req)?;
        let page =
            ops::list_users(&self.state.pool, &caller, &spec, &fp, req.show_total_size).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: page.users.iter().map(user_to_proto).collect(),
            next_page_token: page.next_page_token,
            total_size: page
                .total_size
                .map(|n| n.min(i32::MAX as i64) as i32)
                .unwrap_or(0),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn block_user(
        &self,
        request: Request<pb::BlockUserRequest>,
    ) -> Result<Response<pb::BlockUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = id_field(&mut v, "id", &req.id);
        let reason = text(&req.reason);
        if let Some(r) = &reason
            && let Err(m) = super::check_reason(r)
        {
            v.add("reason", m);
        }
        v.into_result()?;
        let user = ops::change_lifecycle(
            &self.state.pool,
            &caller,
            id,
            Lifecycle::Block,
            reason.as_deref(),
        )
        .await?;
        Ok(Response::new(pb::BlockUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn unblock_user(
        &self,
        request: Request<pb::UnblockUserRequest>,
    ) -> Result<Response<pb::UnblockUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = required_id("id", &request.get_ref().id)?;
        let user =
            ops::change_lifecycle(&self.state.pool, &caller, id, Lifecycle::Unblock, None).await?;
        Ok(Response::new(pb::UnblockUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = required_id("id", &request.get_ref().id)?;
        let user =
            ops::change_lifecycle(&self.state.pool, &caller, id, Lifecycle::Deactivate, None)
                .await?;
        Ok(Response::new(pb::DeactivateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = required_id("id", &request.get_ref().id)?;
        let user =
            ops::change_lifecycle(&self.state.pool, &caller, id, Lifecycle::Reactivate, None)
                .await?;
        Ok(Response::new(pb::ReactivateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn start_contact_verification(
        &self,
        request: Request<pb::StartContactVerificationRequest>,
    ) -> Result<Response<pb::StartContactVerificationResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = required_id("id", &req.id)?;
        let channel = contact_channel(req.channel)?;
        let limit = self.state.passwords_for(&caller).codes;
        let (code, expires_at) = ops::start_contact_verification(
            &self.state.pool,
            &caller,
            id,
            channel,
            limit,
            &self.state.sms_for(&caller),
        )
        .await?;
        self.state.codes_issued.inc(channel.delivery());
        Ok(Response::new(pb::StartContactVerificationResponse {
            code,
            expires_at: Some(wire::timestamp(expires_at)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn confirm_contact_verification(
        &self,
        request: Request<pb::ConfirmContactVerificationRequest>,
    ) -> Result<Response<pb::ConfirmContactVerificationResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = id_field(&mut v, "id", &req.id);
        let channel = contact_channel(req.channel)
            .map_err(|_| v.add("channel", "must be EMAIL or PHONE"))
            .ok();
        // A mistyped code is an answer (INVALID_CODE), not a malformed request; only
        // absurd input is rejected outright.
        if req.code.len() > 64 {
            v.add("code", "must be at most 64 characters");
        }
        v.into_result()?;
        let channel = channel.ok_or_else(|| Error::invalid("channel", "must be EMAIL or PHONE"))?;
        let (result, user) = ops::confirm_contact_verification(
            &self.state.pool,
            &caller,
            id,
            channel,
            req.code.trim(),
        )
        .await?;
        let result = match result {
            VerificationResult::Ok => pb::ContactVerificationResult::Ok,
            VerificationResult::InvalidCode => pb::ContactVerificationResult::InvalidCode,
            VerificationResult::Expired => pb::ContactVerificationResult::Expired,
            VerificationResult::TooManyAttempts => pb::ContactVerificationResult::TooManyAttempts,
        };
        Ok(Response::new(pb::ConfirmContactVerificationResponse {
            result: result as i32,
            user: Some(user_to_proto(&user)),
        }))
    }
}
