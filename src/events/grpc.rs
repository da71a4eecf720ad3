//! LogService over gRPC: ListEvents, GetEvent and StreamEvents. Validates requests, reads
//! through `store`, follows the shared horizon of `stream` for live streams.
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Event;
use super::store::{self, ListSpec, ORDER_FIELDS, StreamSpec};
use super::stream::{EventFeed, Item, Start};
use crate::auth::caller_of;
use crate::db;
use crate::error::{Error, Violations};
use crate::pb::v1 as pb;
use crate::pb::v1::log_service_server::LogService;
use crate::query::{filter, page, sql};
use crate::server::AppState;
use crate::users::grpc::required_id;
use crate::wire;

/// The LogService implementation.
pub struct LogApi {
    state: AppState,
    feed: Arc<EventFeed>,
}

impl LogApi {
    pub fn new(state: AppState, feed: Arc<EventFeed>) -> Self {
        LogApi { state, feed }
    }
}

pub fn event_to_proto(e: &Event) -> pb::Event {
    let kind = pb::EventType::from_str_name(&format!("EVENT_TYPE_{}", e.kind))
        .unwrap_or(pb::EventType::Unspecified);
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let data = match &e.data {
        serde_json::Value::Object(m) => wire::json_to_struct(m),
        _ => prost_types::Struct::default(),
    };
    pb::Event {
        id: e.id.to_string(),
        position: e.position,
        r#type: kind as i32,
        user_id: e.user_id.map(|u| u.to_string()).unwrap_or_default(),
        occurred_at: Some(wire::timestamp(e.occurred_at)),
        api_key_id: e.api_key_id.map(|u| u.to_string()).unwrap_or_default(),
        ip: s(&e.ip),
        user_agent: s(&e.user_agent),
        request_id: s(&e.request_id),
        data: Some(data),
    }
}

/// Parses and checks an events filter, adding a violation when it is bad.
fn events_filter(v: &mut Violations, text: &str) -> Option<filter::Expr> {
    sql::parse_filter(text, store::filter_field).unwrap_or_else(|e| {
        v.add("filter", e.to_string());
        None
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::StreamEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LogService for LogApi {
    #[tracing::instrument(skip_all)]
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let filter = events_filter(&mut v, &req.filter);
        let default_order = || page::Order {
            fields: vec![(ORDER_FIELDS[0], true)],
        };
        let order = page::parse_order(&req.order_by, ORDER_FIELDS, "occurred_at desc")
            .unwrap_or_else(|e| {
                v.add("order_by", e);
                default_order()
            });
        let limit = page::page_size(req.page_size).unwrap_or_else(|e| {
            v.add("page_size", e);
            page::DEFAULT_PAGE_SIZE
        });
        let fp = page::fingerprint(&[req.filter.trim(), &order.canonical()]);
        let after = if req.page_token.is_empty() {
            None
        } else {
            page::decode_token(&req.page_token, &fp, &order)
                .map_err(|e| v.add("page_token", e))
                .ok()
        };
        v.into_result()?;
        let spec = ListSpec {
            filter,
            order,
            limit,
            after,
        };
        let client = db::client(&self.state.pool).await?;
        let rows = store::list(&*client, caller.project_id, &spec).await?;
        let (events, next_page_token) = page::split_page(rows, limit, &fp);
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::GetEventResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = required_id("id", &request.get_ref().id)?;
        let client = db::client(&self.state.pool).await?;
        let event = store::get(&*client, caller.project_id, id)
            .await?
            .ok_or_else(|| Error::not_found("event", id.to_string()))?;
        Ok(Response::new(pb::GetEventResponse {
            event: Some(event_to_proto(&event)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let filter = events_filter(&mut v, &req.filter);
        if req.after_position < 0 {
            v.add("after_position", "must not be negative");
        }
        let since = req.since.as_ref().and_then(|t| {
            let parsed = wire::from_timestamp(t);
            if parsed.is_none() {
                v.add("since", "is not a valid timestamp");
            }
            parsed
        });
        v.into_result()?;
        let start = match since {
            Some(t) if req.after_position == 0 => Start::Since(t),
            _ => Start::After(req.after_position),
        };
        let spec = StreamSpec {
            project_id: caller.project_id,
            filter,
            since,
        };
        let rx = self
            .feed
            .follow(self.state.pool.clone(), spec, start, req.checkpoints);
        let stream = ReceiverStream::new(rx).map(|item| match item {
            Ok(Item::Event(e)) => Ok(pb::StreamEventsResponse {
                event: Some(event_to_proto(&e)),
                checkpoint: None,
            }),
            Ok(Item::Checkpoint(position)) => Ok(pb::StreamEventsResponse {
                event: None,
                checkpoint: Some(pb::StreamCheckpoint { position }),
            }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
