//! `roster users`: one user at a time through a running server, for an operator or a support
//! desk (what `buf curl` does, without the JSON requests): show a user, list users by filter
//! or search, create one, change its fields, set its password, block, unblock, deactivate,
//! reactivate or delete one, list and remove their factors, link, unlink and list their
//! identities, merge a duplicate into another, make a password reset token or expire a
//! password, and show what happened to one (its events). A user is named by id, email, phone
//! number or username, told apart by their form, or with `--by` by external id or linked
//! identity.
use anyhow::{Context, bail};
use serde_json::{Map, Value};

use super::records::{USER_FIELDS, field_value};
use super::remote::ServerArgs;
use crate::pb::v1 as pb;
use crate::pb::v1::lookup_user_request::Key;
use crate::users::ProfileField;

#[derive(clap::Args, Debug)]
pub struct UsersArgs {
    #[command(subcommand)]
    pub command: UsersCommand,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How a user is named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// By its form: a UUID is an id, `@` an email, a leading `+` a phone number, anything
    /// else a username.
    Auto,
    Id,
    Email,
    Phone,
    Username,
    ExternalId,
    /// A linked identity as `provider:subject` (`google:1076...`): whose is it?
    Identity,
}

#[derive(clap::Args, Debug)]
pub struct Who {
    /// The user: id, email, phone number (E.164) or username (see --by for an external id or
    /// a linked identity).
    pub user: String,
    /// What USER is (default: told by its form).
    #[arg(long, value_enum, default_value_t = By::Auto)]
    pub by: By,
}

#[derive(clap::Subcommand, Debug)]
pub enum UsersCommand {
    /// Show a user, every field, as one JSON object (key users.read).
    Get(Who),
    /// List users, a line each (id, email or other login, status, created, last sign-in),
    /// newest first unless --order-by says otherwise (key users.read).
    List {
        /// A ListUsers filter, e.g. 'status = BLOCKED AND last_login_at < "2026-01-01T00:00:00Z"'.
        #[arg(long, default_value = "")]
        filter: String,
        /// Free-text search over email, username, names and external id.
        #[arg(long, default_value = "")]
        query: String,
        /// ListUsers order, e.g. `last_login_at desc`.
        #[arg(long, default_value = "created_at desc")]
        order_by: String,
        /// At most this many users (0: all of them).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per user instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Create a user from `--set FIELD=VALUE`s, printed as `get` shows it (key users.write).
    /// With --password, an initial password typed at the prompt or piped in.
    Create {
        /// A field of the new user, `FIELD=VALUE`, repeatable: email, phone_number, username,
        /// external_id, display_name, given_name, family_name, picture_url, locale, timezone,
        /// email_verified, phone_verified (true/false), user_metadata, app_metadata (a JSON
        /// object, or one key as app_metadata.KEY=VALUE), id (a UUID of your own).
        #[arg(long = "set", value_name = "FIELD=VALUE", required = true)]
        set: Vec<String>,
        /// Give the user a password: typed at the prompt (twice, not shown) or, piped in, the
        /// first line of standard input.
        #[arg(long)]
        password: bool,
        /// With --password: a temporary one, to be changed at the first sign-in (key
        /// authenticators.write too).
        #[arg(long, requires = "password")]
        temporary: bool,
        /// Create it PENDING_VERIFICATION (it cannot sign in until verified) instead of
        /// ACTIVE.
        #[arg(long)]
        pending: bool,
    },
    /// Change some of a user's fields: only those named, and only if nobody changed the user
    /// since it was read (key users.write).
    Update {
        #[command(flatten)]
        who: Who,
        /// A new value, `FIELD=VALUE` (the fields of create, but id); one metadata key as
        /// app_metadata.KEY=VALUE (the value JSON when it reads as JSON, else text; nested keys
        /// dotted, a key with a dot or dash in backticks). Repeatable.
        #[arg(
            long = "set",
            value_name = "FIELD=VALUE",
            required_unless_present = "unset"
        )]
        set: Vec<String>,
        /// Clear a field, or remove one metadata key (app_metadata.KEY). Repeatable.
        #[arg(long, value_name = "FIELD")]
        unset: Vec<String>,
    },
    /// Set a user's password: typed at the prompt (twice, not shown) or, piped in, the first
    /// line of standard input; never a command-line argument (key authenticators.write).
    SetPassword {
        #[command(flatten)]
        who: Who,
        /// A temporary password, to be changed at the next sign-in.
        #[arg(long)]
        temporary: bool,
        /// What is given is a password hash made elsewhere (any format CreateUser takes), not
        /// a password.
        #[arg(long)]
        hash: bool,
    },
    /// Block a user: every sign-in refused until unblocked (key users.write).
    Block {
        #[command(flatten)]
        who: Who,
        /// Why, kept on the user and in the event.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Unblock a user (also ends a lock after failed sign-ins) (key users.write).
    Unblock(Who),
    /// Deactivate a user: dormant, cannot sign in, can be reactivated (key users.write).
    Deactivate(Who),
    /// Reactivate a deactivated user (key users.write).
    Reactivate(Who),
    /// Delete a user with its authenticators, identities and events: irreversible (key
    /// users.write).
    Delete {
        #[command(flatten)]
        who: Who,
        /// The user's id, to confirm (`roster users get` shows it).
        #[arg(long)]
        confirm: String,
    },
    /// A user's second factors and passkeys, a line each (key authenticators.read).
    Factors {
        #[command(flatten)]
        who: Who,
        /// One JSON object per factor instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Remove one factor (a lost phone's app, a lost key), by the id `factors` shows (key
    /// authenticators.write).
    RemoveFactor {
        #[command(flatten)]
        who: Who,
        /// The factor's id.
        #[arg(long)]
        factor: String,
    },
    /// Remove all of a user's factors (or those of one --type), so they enroll again (key
    /// authenticators.write).
    ResetFactors {
        #[command(flatten)]
        who: Who,
        /// Only factors of this type (TOTP, PASSKEY, EMAIL_OTP, SMS_OTP, RECOVERY_CODES).
        #[arg(long, value_name = "TYPE")]
        r#type: Option<String>,
        /// The user's id, to confirm.
        #[arg(long)]
        confirm: String,
    },
    /// Make a one-time password reset token (30 minutes) to send the user; printed alone on
    /// standard output (key authenticators.write).
    PasswordReset(Who),
    /// Make the user change their password at the next sign-in (key authenticators.write).
    ExpirePassword(Who),
    /// A user's linked identities (social and SSO accounts), a line each (key
    /// identities.read).
    Identities {
        #[command(flatten)]
        who: Who,
        /// One JSON object per identity instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Link an identity (a social or SSO account) to a user, so signing in with it finds
    /// them (key identities.write).
    Link {
        #[command(flatten)]
        who: Who,
        /// The provider's name, as your sign-in code passes it (google, github, okta...).
        #[arg(long)]
        provider: String,
        /// The user's id at the provider (OIDC `sub`).
        #[arg(long)]
        subject: String,
        /// The connection (tenant, SAML or OIDC app) it came through, if you tell them apart.
        #[arg(long, default_value = "")]
        connection: String,
        /// The email the provider knows.
        #[arg(long, default_value = "")]
        email: String,
    },
    /// Merge a duplicate account into another: its identities and factors move to the user
    /// --into names, and the duplicate is deleted, in one transaction; irreversible (key
    /// identities.write).
    Merge {
        #[command(flatten)]
        who: Who,
        /// The user that remains, keeping its own profile (id, email, phone or username).
        #[arg(long, value_name = "USER")]
        into: String,
        /// The id of the user merged in and deleted, to confirm.
        #[arg(long)]
        confirm: String,
    },
    /// Unlink an identity from a user (key identities.write).
    Unlink {
        #[command(flatten)]
        who: Who,
        /// The identity's provider, as `identities` shows it.
        #[arg(long)]
        provider: String,
        /// The identity's subject at the provider.
        #[arg(long)]
        subject: String,
        /// Move the identity to a new user of its own instead of dropping it (an account
        /// linked to the wrong person).
        #[arg(long)]
        to_new_user: bool,
    },
    /// What happened to a user: its events, newest first, one JSON object each (key
    /// logs.read).
    Events {
        #[command(flatten)]
        who: Who,
        /// At most this many events.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

pub async fn run(args: UsersArgs) -> anyhow::Result<()> {
    let mut users = args.server.users().await?;
    let refused = |s: tonic::Status| super::remote::call_failed(&args.server, "the call", s);
    match args.command {
        UsersCommand::Get(who) => {
            let user = find(&args.server, &mut users, &who).await?;
            println!("{}", serde_json::to_string_pretty(&user_json(&user))?);
        }
        UsersCommand::List {
            filter,
            query,
            order_by,
            limit,
            json,
        } => {
            let mut page_token = String::new();
            let mut shown = 0;
            if !json {
                println!(
                    "{:<36}  {:<32}  {:<20}  {:<20}  LAST SIGN-IN",
                    "ID", "LOGIN", "STATUS", "CREATED"
                );
            }
            loop {
                let want = if limit == 0 {
                    1000
                } else {
                    (limit - shown).min(1000)
                };
                let page = users
                    .list_users(pb::ListUsersRequest {
                        page_size: want as i32,
                        page_token,
                        filter: filter.clone(),
                        query: query.clone(),
                        order_by: order_by.clone(),
                        show_total_size: false,
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                for u in &page.users {
                    if json {
                        println!("{}", serde_json::to_string(&user_json(u))?);
                    } else {
                        println!("{}", table_line(u));
                    }
                }
                shown += page.users.len();
                if page.next_page_token.is_empty() || (limit != 0 && shown >= limit) {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        UsersCommand::Create {
            set,
            password,
            temporary,
            pending,
        } => {
            let (user, _) = user_changes(&set, &[], true)?;
            let user_id = user.id.clone();
            let initial = if password {
                let label = match login(&user) {
                    "-" => "the new user".to_string(),
                    l => l.to_string(),
                };
                Some(pb::create_user_request::InitialPassword::Password(
                    read_password(format!("Password for {label}")).await?,
                ))
            } else {
                None
            };
            let created = users
                .create_user(pb::CreateUserRequest {
                    user: Some(pb::User {
                        id: String::new(),
                        ..user
                    }),
                    user_id,
                    initial_password: initial,
                    pending,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .user
                .context("the server answered without a user")?;
            println!("{}", serde_json::to_string_pretty(&user_json(&created))?);
            if temporary {
                let mut authn = args.server.authenticators().await?;
                authn
                    .expire_password(pb::ExpirePasswordRequest {
                        user_id: created.id.clone(),
                    })
                    .await
                    .map_err(|s| {
                        super::remote::call_failed(&args.server, "the call", s).context(format!(
                            "created {}, but its password could not be made temporary                              (roster users expire-password {} does it)",
                            created.id, created.id
                        ))
                    })?;
                eprintln!("the password is temporary: it must be changed at the first sign-in");
            }
        }
        UsersCommand::Update { who, set, unset } => {
            let found = find(&args.server, &mut users, &who).await?;
            let (changes, paths) = user_changes(&set, &unset, false)?;
            // The etag read above: a user changed since is not overwritten unseen.
            let updated = users
                .update_user(pb::UpdateUserRequest {
                    user: Some(pb::User {
                        id: found.id.clone(),
                        ..changes
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: paths.clone(),
                    }),
                    etag: found.etag.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .user;
            done(&format!("updated {} of", paths.join(", ")), updated);
        }
        UsersCommand::SetPassword {
            who,
            temporary,
            hash,
        } => {
            let user = find(&args.server, &mut users, &who).await?;
            let what = if hash {
                "Password hash"
            } else {
                "New password"
            };
            let secret = read_password(format!("{what} for {}", login(&user))).await?;
            let new_password = if hash {
                pb::set_password_request::NewPassword::PasswordHash(secret)
            } else {
                pb::set_password_request::NewPassword::Password(secret)
            };
            let mut authn = args.server.authenticators().await?;
            authn
                .set_password(pb::SetPasswordRequest {
                    user_id: user.id.clone(),
                    new_password: Some(new_password),
                    require_change: temporary,
                })
                .await
                .map_err(refused)?;
            let how = if temporary {
                " (temporary: to be changed at the next sign-in)"
            } else {
                ""
            };
            println!("password set for {} ({}){how}", user.id, login(&user));
        }
        UsersCommand::Block { who, reason } => {
            change(&args.server, &mut users, &who, Change::Block(reason)).await?
        }
        UsersCommand::Unblock(who) => {
            change(&args.server, &mut users, &who, Change::Unblock).await?
        }
        UsersCommand::Deactivate(who) => {
            change(&args.server, &mut users, &who, Change::Deactivate).await?
        }
        UsersCommand::Reactivate(who) => {
            change(&args.server, &mut users, &who, Change::Reactivate).await?
        }
        UsersCommand::Delete { who, confirm } => {
            let user = find(&args.server, &mut users, &who).await?;
            if confirm != user.id {
                bail!(
                    "--confirm must be the user's id ({}) to delete {}",
                    user.id,
                    login(&user)
                );
            }
            // The etag read above: a user changed since is not deleted unseen.
            users
                .delete_user(pb::DeleteUserRequest {
                    id: user.id.clone(),
                    etag: user.etag.clone(),
                })
                .await
                .map_err(refused)?;
            println!("deleted {} ({})", user.id, login(&user));
        }
        UsersCommand::Factors { who, json } => {
            let user = find(&args.server, &mut users, &who).await?;
            let mut authn = args.server.authenticators().await?;
            let list = authn
                .list_authenticators(pb::ListAuthenticatorsRequest {
                    user_id: user.id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .authenticators;
            if !json {
                println!(
                    "{:<36}  {:<14}  {:<24}  {:<22}  {:<20}  LAST USED",
                    "ID", "TYPE", "NAME", "STATE", "CREATED"
                );
            }
            for a in &list {
                if json {
                    println!("{}", serde_json::to_string(&factor_json(a))?);
                } else {
                    println!("{}", factor_line(a));
                }
            }
        }
        UsersCommand::RemoveFactor { who, factor } => {
            let user = find(&args.server, &mut users, &who).await?;
            let mut authn = args.server.authenticators().await?;
            authn
                .delete_authenticator(pb::DeleteAuthenticatorRequest {
                    user_id: user.id.clone(),
                    authenticator_id: factor.clone(),
                })
                .await
                .map_err(refused)?;
            println!("removed factor {factor} of {} ({})", user.id, login(&user));
        }
        UsersCommand::ResetFactors {
            who,
            r#type,
            confirm,
        } => {
            let user = find(&args.server, &mut users, &who).await?;
            if confirm != user.id {
                bail!(
                    "--confirm must be the user's id ({}) to remove the factors of {}",
                    user.id,
                    login(&user)
                );
            }
            let kind = match &r#type {
                Some(t) => factor_type(t)?,
                None => pb::AuthenticatorType::Unspecified,
            };
            let mut authn = args.server.authenticators().await?;
            let deleted = authn
                .delete_all_authenticators(pb::DeleteAllAuthenticatorsRequest {
                    user_id: user.id.clone(),
                    r#type: kind as i32,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .deleted_count;
            println!(
                "removed {deleted} factor(s) of {} ({})",
                user.id,
                login(&user)
            );
        }
        UsersCommand::PasswordReset(who) => {
            let user = find(&args.server, &mut users, &who).await?;
            let mut authn = args.server.authenticators().await?;
            let reset = authn
                .create_password_reset_token(pb::CreatePasswordResetTokenRequest {
                    login: Some(pb::create_password_reset_token_request::Login::UserId(
                        user.id.clone(),
                    )),
                })
                .await
                .map_err(refused)?
                .into_inner();
            // The token alone on stdout (for a script to put in a link), the rest aside.
            println!("{}", reset.token);
            let until = short_time(&reset.expires_at).unwrap_or_default();
            eprintln!(
                "a password reset token for {} ({}), valid until {until} UTC: give it to \
                 the user only (ResetPassword uses it once)",
                user.id,
                login(&user)
            );
        }
        UsersCommand::ExpirePassword(who) => {
            let id = find(&args.server, &mut users, &who).await?.id;
            let mut authn = args.server.authenticators().await?;
            let user = authn
                .expire_password(pb::ExpirePasswordRequest { user_id: id })
                .await
                .map_err(refused)?
                .into_inner()
                .user;
            done("password expired for", user);
        }
        UsersCommand::Identities { who, json } => {
            let user = find(&args.server, &mut users, &who).await?;
            let list = args
                .server
                .identities()
                .await?
                .list_identities(pb::ListIdentitiesRequest {
                    user_id: user.id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .identities;
            if !json {
                println!(
                    "{:<20}  {:<32}  {:<20}  {:<32}  LINKED",
                    "PROVIDER", "SUBJECT", "CONNECTION", "EMAIL"
                );
            }
            for i in &list {
                if json {
                    println!("{}", serde_json::to_string(&identity_json(i))?);
                } else {
                    let or_dash = |s: &str| {
                        if s.is_empty() {
                            "-".to_string()
                        } else {
                            s.to_string()
                        }
                    };
                    println!(
                        "{:<20}  {:<32}  {:<20}  {:<32}  {}",
                        i.provider,
                        i.subject,
                        or_dash(&i.connection),
                        or_dash(&i.email),
                        short_time(&i.created_at).unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        UsersCommand::Link {
            who,
            provider,
            subject,
            connection,
            email,
        } => {
            let user = find(&args.server, &mut users, &who).await?;
            args.server
                .identities()
                .await?
                .link_identity(pb::LinkIdentityRequest {
                    user_id: user.id.clone(),
                    provider: provider.clone(),
                    subject: subject.clone(),
                    connection,
                    email,
                    ..Default::default()
                })
                .await
                .map_err(refused)?;
            println!(
                "linked {provider}:{subject} to {} ({})",
                user.id,
                login(&user)
            );
        }
        UsersCommand::Merge { who, into, confirm } => {
            let merged = find(&args.server, &mut users, &who).await?;
            let into = Who {
                user: into,
                by: By::Auto,
            };
            let kept = find(&args.server, &mut users, &into).await?;
            if confirm != merged.id {
                bail!(
                    "--confirm must be the id of the user merged in and deleted ({}) to merge \
                     {} into {}",
                    merged.id,
                    login(&merged),
                    login(&kept)
                );
            }
            if merged.id == kept.id {
                bail!("{} and --into are the same user", login(&merged));
            }
            let user = args
                .server
                .identities()
                .await?
                .merge_users(pb::MergeUsersRequest {
                    primary_user_id: kept.id.clone(),
                    secondary_user_id: merged.id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .user;
            done(
                &format!("merged {} ({}) into", merged.id, login(&merged)),
                user,
            );
        }
        UsersCommand::Unlink {
            who,
            provider,
            subject,
            to_new_user,
        } => {
            let user = find(&args.server, &mut users, &who).await?;
            let standalone = args
                .server
                .identities()
                .await?
                .unlink_identity(pb::UnlinkIdentityRequest {
                    user_id: user.id.clone(),
                    provider: provider.clone(),
                    subject: subject.clone(),
                    create_standalone_user: to_new_user,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .user;
            println!(
                "unlinked {provider}:{subject} from {} ({})",
                user.id,
                login(&user)
            );
            if let Some(new) = standalone {
                println!("moved to the new user {}", new.id);
            }
        }
        UsersCommand::Events { who, limit } => {
            let id = find(&args.server, &mut users, &who).await?.id;
            let mut logs = args.server.logs().await?;
            let events = logs
                .list_events(pb::ListEventsRequest {
                    filter: format!("user_id = \"{id}\""),
                    page_size: limit.clamp(1, 1000) as i32,
                    page_token: String::new(),
                    order_by: "occurred_at desc".into(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .events;
            for e in &events {
                println!("{}", serde_json::to_string(&super::events::event_json(e))?);
            }
        }
    }
    Ok(())
}

/// A change of a user's status.
enum Change {
    Block(String),
    Unblock,
    Deactivate,
    Reactivate,
}

/// Makes `change` to the user WHO names and says so.
async fn change(
    server: &ServerArgs,
    users: &mut super::remote::Users,
    who: &Who,
    change: Change,
) -> anyhow::Result<()> {
    let id = find(server, users, who).await?.id;
    let (what, answer) = match change {
        Change::Block(reason) => (
            "blocked",
            users
                .block_user(pb::BlockUserRequest { id, reason })
                .await
                .map(|r| r.into_inner().user),
        ),
        Change::Unblock => (
            "unblocked",
            users
                .unblock_user(pb::UnblockUserRequest { id })
                .await
                .map(|r| r.into_inner().user),
        ),
        Change::Deactivate => (
            "deactivated",
            users
                .deactivate_user(pb::DeactivateUserRequest { id })
                .await
                .map(|r| r.into_inner().user),
        ),
        Change::Reactivate => (
            "reactivated",
            users
                .reactivate_user(pb::ReactivateUserRequest { id })
                .await
                .map(|r| r.into_inner().user),
        ),
    };
    let user = answer.map_err(|s| super::remote::call_failed(server, "the call", s))?;
    done(what, user);
    Ok(())
}

/// The user WHO names (NOT_FOUND says which key was looked for).
async fn find(
    server: &ServerArgs,
    users: &mut super::remote::Users,
    who: &Who,
) -> anyhow::Result<pb::User> {
    let text = who.user.trim().to_string();
    let by = match who.by {
        By::Auto if uuid::Uuid::try_parse(&text).is_ok() => By::Id,
        By::Auto if text.contains('@') => By::Email,
        By::Auto if text.starts_with('+') => By::Phone,
        By::Auto => By::Username,
        by => by,
    };
    let answer = match by {
        By::Id => users
            .get_user(pb::GetUserRequest { id: text.clone() })
            .await
            .map(|r| r.into_inner().user),
        By::Identity => {
            let Some((provider, subject)) = text.split_once(':') else {
                bail!("--by identity: give provider:subject, e.g. google:1076...");
            };
            server
                .identities()
                .await?
                .lookup_user_by_identity(pb::LookupUserByIdentityRequest {
                    provider: provider.into(),
                    subject: subject.into(),
                })
                .await
                .map(|r| r.into_inner().user)
        }
        key => {
            let key = match key {
                By::Email => Key::Email(text.clone()),
                By::Phone => Key::PhoneNumber(text.clone()),
                By::ExternalId => Key::ExternalId(text.clone()),
                _ => Key::Username(text.clone()),
            };
            users
                .lookup_user(pb::LookupUserRequest { key: Some(key) })
                .await
                .map(|r| r.into_inner().user)
        }
    };
    let what = match by {
        By::Id => "id",
        By::Email => "email",
        By::Phone => "phone number",
        By::ExternalId => "external id",
        By::Identity => "linked identity",
        _ => "username",
    };
    match answer {
        Ok(Some(user)) => Ok(user),
        Ok(None) => bail!("the server answered without a user"),
        Err(s) if s.code() == tonic::Code::NotFound => {
            bail!("no user with the {what} {text}")
        }
        Err(s) => Err(anyhow::Error::from(s)).with_context(|| format!("looking up {text}")),
    }
}

/// A user holding the `--set` values, and the update mask naming them and the `--unset`
/// fields (which the user leaves empty, so UpdateUser clears them).
fn user_changes(
    sets: &[String],
    unsets: &[String],
    creating: bool,
) -> anyhow::Result<(pb::User, Vec<String>)> {
    let mut fields = Map::new();
    // Metadata keys set one by one, as the objects they make.
    let mut keys: [(&str, Map<String, Value>); 2] =
        [("user_metadata", Map::new()), ("app_metadata", Map::new())];
    let mut paths: Vec<String> = Vec::new();
    for text in sets {
        let Some((name, value)) = split_assignment(text) else {
            bail!("--set {text}: give FIELD=VALUE");
        };
        if let Some((field, object)) = keys
            .iter_mut()
            .find(|(f, _)| name.strip_prefix(f).is_some_and(|r| r.starts_with('.')))
        {
            let path = crate::wire::metadata_key_path(&name[field.len() + 1..])
                .map_err(|e| anyhow::anyhow!("--set {name}: the key path {e}"))?;
            // JSON when it reads as JSON (5, true, {"a":1}, "quoted"), else the text itself.
            let value = serde_json::from_str(value).unwrap_or(Value::String(value.to_string()));
            insert_at(object, &path, value).map_err(|e| anyhow::anyhow!("--set {name}: {e}"))?;
        } else if settable(name) || (creating && name == "id") {
            if fields
                .insert(name.to_string(), Value::String(value.to_string()))
                .is_some()
            {
                bail!("--set {name}: given twice");
            }
        } else {
            bail!(
                "--set {name}: not a field to set; one of {}{}",
                settable_names(),
                if creating { ", id" } else { "" }
            );
        }
        if paths.iter().any(|p| p == name) {
            bail!("--set {name}: given twice");
        }
        paths.push(name.to_string());
    }
    for (field, object) in &keys {
        if object.is_empty() {
            continue;
        }
        if fields.contains_key(*field) {
            bail!("--set {field} and --set {field}.KEY: give one or the other");
        }
        fields.insert(field.to_string(), Value::Object(object.clone()));
    }
    for name in unsets {
        let name = name.trim();
        let known = settable(name)
            || ["user_metadata.", "app_metadata."]
                .iter()
                .any(|p| name.starts_with(p));
        if !known {
            bail!(
                "--unset {name}: not a field to clear; one of {}",
                settable_names()
            );
        }
        if paths.iter().any(|p| p == name) {
            bail!("--unset {name}: also given to --set");
        }
        paths.push(name.to_string());
    }
    let record = super::records::import_record(fields).map_err(|e| anyhow::anyhow!("--set {e}"))?;
    let mut user = record.user.unwrap_or_default();
    user.id = record.user_id;
    Ok((user, paths))
}

/// Whether `--set` may give the field: UpdateUser's profile fields.
fn settable(name: &str) -> bool {
    ProfileField::ALL.iter().any(|f| f.name() == name)
}

fn settable_names() -> String {
    let names: Vec<&str> = ProfileField::ALL.iter().map(|f| f.name()).collect();
    names.join(", ")
}

/// `NAME=VALUE` split at the first `=` outside a backtick-quoted metadata key.
fn split_assignment(text: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '`' => quoted = !quoted,
            '=' if !quoted => return Some((text[..i].trim(), &text[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Puts `value` at `path` in `object`, making the objects on the way.
fn insert_at(object: &mut Map<String, Value>, path: &[String], value: Value) -> Result<(), String> {
    let (last, on_the_way) = path.split_last().ok_or("an empty key path")?;
    let mut at = object;
    for key in on_the_way {
        let next = at
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        at = next
            .as_object_mut()
            .ok_or_else(|| format!("{key} is given a value and keys of its own"))?;
    }
    if at.insert(last.clone(), value).is_some() {
        return Err("given twice".into());
    }
    Ok(())
}

/// A password (or hash): typed at a terminal, not shown, and typed again to be sure; else
/// the first line of standard input (a pipe from a password manager or a file).
async fn read_password(prompt: String) -> anyhow::Result<String> {
    // A person typing, or a pipe: blocking reads, kept off the runtime's threads.
    tokio::task::spawn_blocking(move || read_password_blocking(&prompt))
        .await
        .context("reading the password")?
}

fn read_password_blocking(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let secret = if std::io::stdin().is_terminal() {
        let term = console::Term::stderr();
        term.write_str(&format!("{prompt}: "))?;
        let first = term.read_secure_line().context("reading the password")?;
        term.write_str("Again: ")?;
        let again = term.read_secure_line().context("reading the password")?;
        if first != again {
            bail!("the two did not match; nothing was changed");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if secret.is_empty() {
        bail!("no password given (type it at the prompt or pipe it in); nothing was changed");
    }
    Ok(secret)
}

/// A linked identity as JSON (its profile included; provider tokens are never listed).
fn identity_json(i: &pb::Identity) -> Value {
    let mut m = Map::new();
    for (k, v) in [
        ("provider", &i.provider),
        ("subject", &i.subject),
        ("connection", &i.connection),
        ("email", &i.email),
    ] {
        if !v.is_empty() {
            m.insert(k.into(), Value::String(v.clone()));
        }
    }
    if let Some(p) = i
        .profile
        .as_ref()
        .and_then(|p| crate::wire::struct_to_json(p).ok())
    {
        m.insert("profile".into(), Value::Object(p));
    }
    if let Some(t) = i.created_at.as_ref().and_then(crate::wire::from_timestamp) {
        m.insert("created_at".into(), Value::String(t.to_rfc3339()));
    }
    Value::Object(m)
}

/// A factor type as `--type` names it, with or without `AUTHENTICATOR_TYPE_`.
fn factor_type(text: &str) -> anyhow::Result<pb::AuthenticatorType> {
    let name = text.trim().to_ascii_uppercase();
    let name = name.strip_prefix("AUTHENTICATOR_TYPE_").unwrap_or(&name);
    match pb::AuthenticatorType::from_str_name(&format!("AUTHENTICATOR_TYPE_{name}")) {
        Some(t) if t != pb::AuthenticatorType::Unspecified => Ok(t),
        _ => bail!("--type: TOTP, PASSKEY, EMAIL_OTP, SMS_OTP or RECOVERY_CODES, not {text}"),
    }
}

fn factor_type_name(t: i32) -> String {
    pb::AuthenticatorType::try_from(t)
        .map(|t| {
            t.as_str_name()
                .trim_start_matches("AUTHENTICATOR_TYPE_")
                .to_string()
        })
        .unwrap_or_else(|_| t.to_string())
}

/// A factor as JSON: what ListAuthenticators says of it (no secret is ever there).
fn factor_json(a: &pb::Authenticator) -> Value {
    let time = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(crate::wire::from_timestamp)
            .map(|t| Value::String(t.to_rfc3339()))
            .unwrap_or(Value::Null)
    };
    let text = |s: &str| (!s.is_empty()).then(|| Value::String(s.to_string()));
    let mut m = Map::new();
    m.insert("id".into(), Value::String(a.id.clone()));
    m.insert("type".into(), Value::String(factor_type_name(a.r#type)));
    m.insert("confirmed".into(), Value::Bool(a.confirmed));
    m.insert("is_default".into(), Value::Bool(a.is_default));
    m.insert("created_at".into(), time(&a.created_at));
    m.insert("last_used_at".into(), time(&a.last_used_at));
    for (k, v) in [
        ("name", &a.name),
        ("email", &a.email),
        ("phone_number", &a.phone_number),
        ("aaguid", &a.aaguid),
    ] {
        if let Some(v) = text(v) {
            m.insert(k.into(), v);
        }
    }
    Value::Object(m)
}

/// A factor as a line of `factors`' table.
fn factor_line(a: &pb::Authenticator) -> String {
    let time = |t: &Option<prost_types::Timestamp>| short_time(t).unwrap_or_else(|| "-".into());
    let name = [&a.name, &a.email, &a.phone_number]
        .into_iter()
        .find(|s| !s.is_empty())
        .map(String::as_str)
        .unwrap_or("-");
    let state = match (a.confirmed, a.is_default) {
        (false, _) => "not confirmed",
        (true, true) => "confirmed, default",
        (true, false) => "confirmed",
    };
    format!(
        "{:<36}  {:<14}  {:<24}  {:<22}  {:<20}  {}",
        a.id,
        factor_type_name(a.r#type),
        name,
        state,
        time(&a.created_at),
        time(&a.last_used_at)
    )
}

/// Every field of a user, as `roster export` writes them (empty ones left out).
fn user_json(u: &pb::User) -> Value {
    let m: Map<String, Value> = USER_FIELDS
        .iter()
        .map(|f| (f.to_string(), field_value(u, f)))
        .filter(|(_, v)| !v.is_null())
        .collect();
    Value::Object(m)
}

/// How a user is best known: email, else phone, username or external id.
fn login(u: &pb::User) -> &str {
    [&u.email, &u.phone_number, &u.username, &u.external_id]
        .into_iter()
        .find(|s| !s.is_empty())
        .map(String::as_str)
        .unwrap_or("-")
}

/// A user as a line of `list`'s table.
fn table_line(u: &pb::User) -> String {
    let time = |t: &Option<prost_types::Timestamp>| short_time(t).unwrap_or_else(|| "-".into());
    let status = field_value(u, "status");
    format!(
        "{:<36}  {:<32}  {:<20}  {:<20}  {}",
        u.id,
        login(u),
        status.as_str().unwrap_or("-"),
        time(&u.created_at),
        time(&u.last_login_at)
    )
}

/// A time to the second, for the table.
fn short_time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref()
        .and_then(crate::wire::from_timestamp)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn done(what: &str, user: Option<pb::User>) {
    match user {
        Some(u) => println!("{what} {} ({})", u.id, login(&u)),
        None => println!("{what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn set_and_unset_make_the_user_and_its_mask() {
        let (user, paths) = user_changes(
            &sets(&[
                "email=a@x.io",
                "app_metadata.plan=pro",
                "app_metadata.`a=b`.n=[1,2]",
                "user_metadata.note=\"5\"",
            ]),
            &sets(&["locale", "app_metadata.old"]),
            false,
        )
        .unwrap();
        assert_eq!(user.email, "a@x.io");
        assert_eq!(
            paths,
            [
                "email",
                "app_metadata.plan",
                "app_metadata.`a=b`.n",
                "user_metadata.note",
                "locale",
                "app_metadata.old"
            ]
        );
        let meta = crate::wire::struct_to_json(user.app_metadata.as_ref().unwrap()).unwrap();
        assert_eq!(
            Value::Object(meta),
            serde_json::json!({"plan": "pro", "a=b": {"n": [1, 2]}})
        );
        let note = crate::wire::struct_to_json(user.user_metadata.as_ref().unwrap()).unwrap();
        assert_eq!(note["note"], "5", "a quoted JSON string stays text");
        for (set, unset, says) in [
            (vec!["email"], vec![], "give FIELD=VALUE"),
            (vec!["email=a@x.io", "email=b@x.io"], vec![], "given twice"),
            (
                vec!["app_metadata.a=1", "app_metadata.a.b=2"],
                vec![],
                "keys of its own",
            ),
            (
                vec!["app_metadata={}", "app_metadata.a=1"],
                vec![],
                "one or the other",
            ),
            (vec!["email=a@x.io"], vec!["email"], "also given to --set"),
            (
                vec!["created_at=2020-01-01T00:00:00Z"],
                vec![],
                "not a field to set",
            ),
            (
                vec!["id=0190d6a0-0000-7000-8000-000000000001"],
                vec![],
                "not a field",
            ),
            (vec![], vec!["status"], "not a field to clear"),
            (vec!["email_verified=maybe"], vec![], "email_verified"),
            (vec!["app_metadata.`open=1"], vec![], "give FIELD=VALUE"),
        ] {
            let e = user_changes(&sets(&set), &sets(&unset), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{set:?} {unset:?}: {e}");
        }
        let (user, _) = user_changes(
            &sets(&["id=0190d6a0-0000-7000-8000-000000000001"]),
            &[],
            true,
        )
        .unwrap();
        assert_eq!(user.id, "0190d6a0-0000-7000-8000-000000000001");
    }
}
