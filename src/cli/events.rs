//! `roster events`: follows the audit log (StreamEvents) and writes one JSON object per event
//! to standard output, for a SIEM or log shipper, or with `--post URL` POSTs each to a
//! webhook (webhook.rs). With `--state FILE` the last position written is kept there, so a
//! restarted follower resumes after it. Delivery is at least once: the state is saved after
//! the lines it covers are flushed (or the webhook took them), so a crash between the two
//! repeats a few events (each has its `id` to tell them apart), and never skips one. With
//! `--until-caught-up` it writes the events there are and exits, for a one-off query or a
//! shipper run by a scheduler (the state file carries it from one run to the next). The
//! stream's checkpoints say exactly where the log's end was when reached, and let the state
//! move past stretches without events for this follower (another project's, or ones its
//! filter leaves out), so a filtered follower does not read them again after a restart.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value};

use super::follow_metrics::FollowMetrics;
use super::remote::ServerArgs;
use super::webhook::{PostArgs, Poster, Refused};
use crate::pb::v1 as pb;
use crate::wire;

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// AIP-160 filter, as on ListEvents (e.g. 'type = LOGIN_FAILED').
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Start after this position (0: from the oldest event kept). A position in --state
    /// wins over it.
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// Without a position to start after: begin with the events from this time (RFC 3339),
    /// or `now` for new events only (a first start that should not replay the whole log).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Keep the last position written in this file and resume after it on the next start.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Write the events there are, then exit 0 instead of following: once the server says
    /// the stream has reached the end of the log.
    #[arg(long)]
    pub until_caught_up: bool,
    /// Serve the follower's Prometheus metrics (`GET /metrics`) on this address, e.g.
    /// 0.0.0.0:9091: where it is, what it delivered, how old the oldest event waiting for
    /// the webhook is, whether it is connected.
    #[arg(long, value_name = "ADDR", env = "ROSTER_EVENTS_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub post: PostArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How long output may wait for more events before it is flushed and the state saved.
const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Events written between saves of the state while they keep coming.
const SAVE_EVERY: u64 = 1_000;
/// With --until-caught-up and a server from before checkpoints (which never says where the
/// log ends): how long the stream must bring nothing before the log counts as read.
const CAUGHT_UP_AFTER: Duration = Duration::from_secs(10);
/// With --until-caught-up and --post: how long a webhook may go without taking an event
/// before the run stops (a follower tries for as long as it takes).
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// With --post: how often a progress line is written while events go out.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Waits between reconnections: doubling from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_LAST: Duration = Duration::from_secs(30);

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    // A server that is down is waited for; an address that cannot be one is said at once.
    tonic::transport::Endpoint::from_shared(args.server.server.clone())
        .with_context(|| format!("bad server address {}", args.server.server))?;
    let mut after = args.after;
    if let Some(path) = &args.state
        && let Some(saved) = read_state(path)?
    {
        after = saved;
    }
    let metrics = FollowMetrics::default();
    metrics.position.set(after);
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
        let m = metrics.clone();
        tokio::spawn(crate::metrics::serve_with(
            listener,
            move || m.render(),
            std::future::pending(),
        ));
    }
    let mut poster = Poster::new(&args.post)?;
    if let Some(poster) = &mut poster {
        poster.count_retries(metrics.retries.clone());
        if args.until_caught_up {
            // A scheduled run must end, not retry until the next one starts beside it.
            poster.give_up_after(GIVE_UP_AFTER);
        }
    }
    let mut out = Output {
        stdout: std::io::BufWriter::new(std::io::stdout().lock()),
        poster,
        state: args.state.clone(),
        after,
        saved: after,
        unsaved: 0,
        sent: 0,
        reported: std::time::Instant::now(),
        metrics,
    };
    // Stopped by a signal, it saves what it wrote before exiting 0.
    let stopped = super::stop_on_signal()?;
    let result = follow(&args, &mut out, stopped).await;
    out.report();
    out.save()?;
    result
}

/// What has been written and where it has been saved.
struct Output<W: Write> {
    stdout: W,
    /// With --post: where each event goes instead of standard output.
    poster: Option<Poster>,
    state: Option<PathBuf>,
    /// The position of the last event written, or of a later checkpoint.
    after: i64,
    /// The position the state file holds.
    saved: i64,
    /// Events written since the state was last saved.
    unsaved: u64,
    /// With --post: events delivered since the last progress line, and when that was.
    sent: u64,
    reported: std::time::Instant,
    metrics: FollowMetrics,
}

impl<W: Write> Output<W> {
    async fn write(&mut self, event: &pb::Event) -> anyhow::Result<()> {
        let json = serde_json::to_vec(&event_json(event))?;
        match &self.poster {
            // Delivered (a 2xx) before the position moves on past it.
            Some(poster) => {
                if poster.would_overflow(json.len()) {
                    self.send().await?;
                }
                let id = match event.id.as_str() {
                    "" => event.position.to_string(),
                    id => id.to_string(),
                };
                let at = event
                    .occurred_at
                    .as_ref()
                    .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9);
                if let Some(poster) = &mut self.poster {
                    if poster.is_empty() {
                        self.metrics.waiting_since(at);
                    }
                    if poster.add(&id, event.position, at, &json) {
                        self.send().await?;
                    }
                }
            }
            None => {
                self.stdout
                    .write_all(&json)
                    .and_then(|()| self.stdout.write_all(b"\n"))
                    .context("writing to standard output")?;
                self.after = event.position;
                self.unsaved += 1;
                self.metrics.delivered.inc();
                self.metrics.position.set(self.after);
                if self.unsaved >= SAVE_EVERY {
                    self.save()?;
                }
            }
        }
        Ok(())
    }

    /// With --post: the events taken and not yet sent, sent (until the webhook takes them);
    /// only then does the position move on past them.
    async fn send(&mut self) -> anyhow::Result<()> {
        let Some(poster) = &mut self.poster else {
            return Ok(());
        };
        let Some((last, count)) = poster.send().await? else {
            return Ok(());
        };
        self.after = last;
        self.sent += count as u64;
        self.unsaved += count as u64;
        self.metrics.none_waiting();
        self.metrics.delivered.inc_by(count as u64);
        self.metrics.position.set(last);
        if self.reported.elapsed() >= REPORT_EVERY {
            self.report();
        }
        if self.unsaved >= SAVE_EVERY {
            self.save()?;
        }
        Ok(())
    }

    /// When events are waiting for more to go with them: when they must go at the latest.
    fn due(&self) -> Option<tokio::time::Instant> {
        let due = self.poster.as_ref()?.due()?;
        Some(due.into())
    }

    /// Sends what waits for the webhook, then flushes and saves.
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.send().await?;
        self.save()
    }

    /// With --post, a progress line on standard error (a follower run as a service is
    /// otherwise silent while it works): how many events went out since the last, and where
    /// it is.
    fn report(&mut self) {
        if self.poster.is_some() && self.sent > 0 {
            eprintln!(
                "roster events: {} event(s) sent to the webhook in {:.0} s; at position {}",
                self.sent,
                self.reported.elapsed().as_secs_f64(),
                self.after
            );
        }
        self.sent = 0;
        self.reported = std::time::Instant::now();
    }

    /// Everything up to `position` has been written (the events for it up to there were):
    /// once the events waiting for the webhook are delivered.
    async fn checkpoint(&mut self, position: i64) -> anyhow::Result<()> {
        self.send().await?;
        self.after = self.after.max(position);
        self.metrics.position.set(self.after);
        self.save()
    }

    /// Flushes what was written, then records its last position: never the other way round.
    fn save(&mut self) -> anyhow::Result<()> {
        self.stdout.flush().context("writing to standard output")?;
        if self.after != self.saved
            && let Some(path) = &self.state
        {
            write_state(path, self.after)?;
            self.saved = self.after;
        }
        self.unsaved = 0;
        Ok(())
    }
}

/// How a stream stopped bringing events.
enum Paused {
    /// The server ended it: reconnect.
    Ended,
    /// The log was read to its end, with --until-caught-up: done.
    CaughtUp,
}

/// Streams from `out.after` on, reconnecting (from the last position written) when the
/// server goes away, until `stopped` turns true or the log is read to its end with
/// --until-caught-up (Ok), or an error retrying cannot mend.
async fn follow<W: Write>(
    args: &EventsArgs,
    out: &mut Output<W>,
    mut stopped: tokio::sync::watch::Receiver<Option<&'static str>>,
) -> anyhow::Result<()> {
    let mut wait = RECONNECT_FIRST;
    loop {
        let stream = async {
            let mut logs = args.server.logs().await?;
            let stream = logs
                .stream_events(pb::StreamEventsRequest {
                    after_position: out.after,
                    // Once an event has been written, its position says where to go on.
                    since: args.since.filter(|_| out.after == 0).map(wire::timestamp),
                    filter: args.filter.clone(),
                    checkpoints: true,
                })
                .await?;
            anyhow::Ok(stream.into_inner())
        }
        .await;
        let ended = match stream {
            Ok(mut stream) => {
                wait = RECONNECT_FIRST;
                out.metrics.connected.set(1);
                let until = args.until_caught_up.then_some(CAUGHT_UP_AFTER);
                tokio::select! {
                    ended = pump(&mut stream, out, until) => ended,
                    _ = stopped.wait_for(Option::is_some) => return Ok(()),
                }
            }
            Err(e) => Err(e),
        };
        let e = match ended {
            Ok(Paused::CaughtUp) => return Ok(()),
            Ok(Paused::Ended) => anyhow::anyhow!("the server ended the stream"),
            Err(e) => e,
        };
        // A webhook's refusal is for good: the follower stops before that event.
        if e.is::<Refused>() || !super::remote::retryable(&e) {
            return Err(e);
        }
        out.metrics.connected.set(0);
        out.metrics.reconnects.inc();
        // Events taken and not delivered come again on the new stream, which starts after
        // the last one delivered.
        if let Some(poster) = &mut out.poster {
            poster.discard();
            out.metrics.none_waiting();
        }
        out.save()?;
        eprintln!(
            "roster events: {}; reconnecting in {:.1} s from position {}",
            super::error_line(&e),
            wait.as_secs_f64(),
            out.after
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.wait_for(Option::is_some) => return Ok(()),
        }
        wait = (wait * 2).min(RECONNECT_LAST);
    }
}

/// Writes the stream's events as they come, flushing when it pauses; with `until`, returns at
/// the first checkpoint (the end of the log when the stream began), or once nothing has come
/// for that long from a server that sends none.
async fn pump<W: Write>(
    stream: &mut tonic::Streaming<pb::StreamEventsResponse>,
    out: &mut Output<W>,
    until: Option<Duration>,
) -> anyhow::Result<Paused> {
    loop {
        // `message` is cancel-safe: a timed-out wait loses nothing. Output waiting (lines not
        // flushed, events not yet sent to the webhook) goes when the stream pauses, or at
        // the latest when a batch is due.
        let next = if out.unsaved > 0 || out.due().is_some() {
            let mut by = tokio::time::Instant::now() + FLUSH_AFTER;
            if let Some(due) = out.due() {
                by = by.min(due);
            }
            match tokio::time::timeout_at(by, stream.message()).await {
                Ok(next) => next,
                Err(_) => {
                    out.flush().await?;
                    continue;
                }
            }
        } else if let Some(quiet) = until {
            match tokio::time::timeout(quiet, stream.message()).await {
                Ok(next) => next,
                Err(_) => return Ok(Paused::CaughtUp),
            }
        } else {
            stream.message().await
        };
        match next? {
            Some(m) => {
                if let Some(event) = m.event {
                    out.write(&event).await?;
                }
                if let Some(checkpoint) = m.checkpoint {
                    out.checkpoint(checkpoint.position).await?;
                    if until.is_some() {
                        return Ok(Paused::CaughtUp);
                    }
                }
            }
            None => return Ok(Paused::Ended),
        }
    }
}

fn parse_since(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    match text.trim() {
        "now" => Ok(chrono::Utc::now()),
        t => chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| "give an RFC 3339 time (2026-12-01T00:00:00Z) or now".to_string()),
    }
}

fn read_state(path: &Path) -> anyhow::Result<Option<i64>> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<i64>()
            .map(Some)
            .with_context(|| format!("{} does not hold a position", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces the state file whole (written aside, then renamed), so it is never half-written.
fn write_state(path: &Path, position: i64) -> anyhow::Result<()> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    let aside = PathBuf::from(aside);
    std::fs::write(&aside, format!("{position}\n"))
        .with_context(|| format!("writing {}", aside.display()))?;
    std::fs::rename(&aside, path).with_context(|| format!("writing {}", path.display()))
}

/// An event as one JSON object: the proto's field names, the type without its prefix, the
/// time in RFC 3339, `data` as an object, absent values as null.
pub(super) fn event_json(e: &pb::Event) -> Value {
    let text = |s: &str| match s {
        "" => Value::Null,
        s => Value::String(s.to_string()),
    };
    let mut m = Map::new();
    m.insert("position".into(), e.position.into());
    m.insert("id".into(), text(&e.id));
    let kind = pb::EventType::try_from(e.r#type)
        .map(|t| {
            t.as_str_name()
                .trim_start_matches("EVENT_TYPE_")
                .to_string()
        })
        .unwrap_or_else(|_| e.r#type.to_string());
    m.insert("type".into(), Value::String(kind));
    m.insert("user_id".into(), text(&e.user_id));
    let at = e
        .occurred_at
        .as_ref()
        .and_then(wire::from_timestamp)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)));
    m.insert("occurred_at".into(), at.unwrap_or(Value::Null));
    m.insert("api_key_id".into(), text(&e.api_key_id));
    m.insert("ip".into(), text(&e.ip));
    m.insert("user_agent".into(), text(&e.user_agent));
    m.insert("request_id".into(), text(&e.request_id));
    let data = e
        .data
        .as_ref()
        .and_then(|d| wire::struct_to_json(d).ok())
        .map(Value::Object)
        .unwrap_or(Value::Null);
    m.insert("data".into(), data);
    Value::Object(m)
}
