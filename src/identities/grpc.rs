//! IdentityService over gRPC: validates requests (every field violation at once), calls
//! `ops`, converts results. No SQL here.
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    Identity, MAX_CONNECTION, MAX_PROVIDER, MAX_SUBJECT, MAX_TOKEN_BYTES, NewIdentity, Tokens, ops,
};
use crate::auth::caller_of;
use crate::error::Violations;
use crate::pb::v1 as pb;
use crate::pb::v1::identity_service_server::IdentityService;
use crate::server::AppState;
use crate::users::grpc::{id_field, user_to_proto};
use crate::users::{self};
use crate::wire;

/// The IdentityService implementation.
pub struct IdentityApi {
    state: AppState,
}

impl IdentityApi {
    pub fn new(state: AppState) -> Self {
        IdentityApi { state }
    }
}

pub fn identity_to_proto(i: &Identity) -> pb::Identity {
    pb::Identity {
        id: i.id.to_string(),
        user_id: i.user_id.to_string(),
        provider: i.provider.clone(),
        subject: i.subject.clone(),
        connection: i.connection.clone().unwrap_or_default(),
        email: i.email.clone().unwrap_or_default(),
        profile: Some(wire::json_to_struct(&i.profile)),
        created_at: Some(wire::timestamp(i.created_at)),
        updated_at: Some(wire::timestamp(i.updated_at)),
    }
}

/// A required short printable string (provider, subject, connection).
pub(crate) fn short_text(
    v: &mut Violations,
    field: &str,
    raw: &str,
    max: usize,
    required: bool,
) -> Option<String> {
    let s = raw.trim();
    if s.is_empty() {
        if required {
            v.add(field, "is required");
        }
        return None;
    }
    if s.chars().count() > max || s.chars().any(char::is_control) {
        v.add(field, format!("must be at most {max} printable characters"));
    }
    Some(s.to_string())
}

fn token(v: &mut Violations, field: &str, raw: String) -> Option<String> {
    if raw.is_empty() {
        return None;
    }
    if raw.len() > MAX_TOKEN_BYTES {
        v.add(field, format!("must be at most {MAX_TOKEN_BYTES} bytes"));
    }
    Some(raw)
}

/// (provider, subject) of a request.
fn provider_subject(v: &mut Violations, provider: &str, subject: &str) -> (String, String) {
    (
        short_text(v, "provider", provider, MAX_PROVIDER, true).unwrap_or_default(),
        short_text(v, "subject", subject, MAX_SUBJECT, true).unwrap_or_default(),
    )
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    #[tracing::instrument(skip_all)]
    async fn link_identity(
        &self,
        request: Request<pb::LinkIdentityRequest>,
    ) -> Result<Response<pb::LinkIdentityResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let user_id = id_field(&mut v, "user_id", &req.user_id);
        let (provider, subject) = provider_subject(&mut v, &req.provider, &req.subject);
        let connection = short_text(&mut v, "connection", &req.connection, MAX_CONNECTION, false);
        let email = req.email.trim().to_string();
        let email = if email.is_empty() {
            None
        } else {
            if let Err(e) = users::check_email(&email) {
                v.add("email", e);
            }
            Some(email)
        };
        let profile = match &req.profile {
            None => serde_json::Map::new(),
            Some(s) => wire::struct_to_json(s).unwrap_or_else(|e| {
                v.add("profile", e);
                serde_json::Map::new()
            }),
        };
        if let Err(e) = wire::check_metadata(&profile) {
            v.add("profile", e);
        }
        let access = token(&mut v, "access_token", req.access_token);
        let refresh = token(&mut v, "refresh_token", req.refresh_token);
        let expires_at = req.token_expires_at.as_ref().and_then(|t| {
            let parsed = wire::from_timestamp(t);
            if parsed.is_none() {
                v.add("token_expires_at", "is not a valid timestamp");
            }
            parsed
        });
        v.into_result()?;
        let tokens =
            (access.is_some() || refresh.is_some() || expires_at.is_some()).then_some(Tokens {
                access,
                refresh,
                expires_at,
            });
        let new = NewIdentity {
            provider,
            subject,
            connection,
            email,
            profile,
            tokens,
        };
        let identity = ops::link(
            &self.state.pool,
            self.state.sealer.as_deref(),
            &caller,
            user_id,
            new,
        )
        .await?;
        Ok(Response::new(pb::LinkIdentityResponse {
            identity: Some(identity_to_proto(&identity)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn unlink_identity(
        &self,
        request: Request<pb::UnlinkIdentityRequest>,
    ) -> Result<Response<pb::UnlinkIdentityResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let user_id = id_field(&mut v, "user_id", &req.user_id);
        let (provider, subject) = provider_subject(&mut v, &req.provider, &req.subject);
        v.into_result()?;
        let user = ops::unlink(
            &self.state.pool,
            &caller,
            user_id,
            &provider,
            &subject,
            req.create_standalone_user,
        )
        .await?;
        Ok(Response::new(pb::UnlinkIdentityResponse {
            user: user.as_ref().map(user_to_proto),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let caller = caller_of(&request)?;
        let mut v = Violations::new();
        let user_id = id_field(&mut v, "user_id", &request.get_ref().user_id);
        v.into_result()?;
        let list = ops::list(&self.state.pool, &caller, user_id).await?;
        Ok(Response::new(pb::ListIdentitiesResponse {
            identities: list.iter().map(identity_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn lookup_user_by_identity(
        &self,
        request: Request<pb::LookupUserByIdentityRequest>,
    ) -> Result<Response<pb::LookupUserByIdentityResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let (provider, subject) = provider_subject(&mut v, &req.provider, &req.subject);
        v.into_result()?;
        let (user, identity) =
            ops::lookup(&self.state.user_reads, &caller, &provider, &subject).await?;
        Ok(Response::new(pb::LookupUserByIdentityResponse {
            user: Some(user_to_proto(&user)),
            identity: Some(identity_to_proto(&identity)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn merge_users(
        &self,
        request: Request<pb::MergeUsersRequest>,
    ) -> Result<Response<pb::MergeUsersResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let primary = id_field(&mut v, "primary_user_id", &req.primary_user_id);
        let secondary = id_field(&mut v, "secondary_user_id", &req.secondary_user_id);
        if primary == secondary && primary != Uuid::nil() {
            v.add("secondary_user_id", "must differ from primary_user_id");
        }
        v.into_result()?;
        let user = ops::merge(&self.state.pool, &caller, primary, secondary).await?;
        Ok(Response::new(pb::MergeUsersResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_provider_tokens(
        &self,
        request: Request<pb::GetProviderTokensRequest>,
    ) -> Result<Response<pb::GetProviderTokensResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let user_id = id_field(&mut v, "user_id", &req.user_id);
        let (provider, subject) = provider_subject(&mut v, &req.provider, &req.subject);
        v.into_result()?;
        let t = ops::provider_tokens(
            &self.state.pool,
            self.state.sealer.as_deref(),
            &caller,
            user_id,
            &provider,
            &subject,
        )
        .await?;
        Ok(Response::new(pb::GetProviderTokensResponse {
            access_token: t.access.unwrap_or_default(),
            refresh_token: t.refresh.unwrap_or_default(),
            expires_at: wire::opt_timestamp(t.expires_at),
        }))
    }
}
