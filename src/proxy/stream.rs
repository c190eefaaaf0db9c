//! One proxied Envoy stream (behavior.md §11): its own upstream stream of the same kind, every
//! message forwarded at once but ECDS responses, which wait for their conversion.
//!
//! - Requests (ACKs and NACKs included) go upstream as they come. Envoy's ACK of a response the
//!   proxy pushed itself (a re-push, below) names a nonce the upstream never sent: it goes up
//!   with the nonce of the last upstream ECDS response Envoy had been sent when the proxy pushed
//!   (carried in the proxy's nonce), never with that of a response still being converted, which
//!   the upstream would take as accepted before Envoy has even seen it.
//! - ECDS responses are converted; meanwhile other types keep flowing both ways. A newer SotW
//!   response replaces one still converting (it is the whole state); delta responses are
//!   forwarded in order. A response that cannot be converted is NACKed upstream with the last
//!   version Envoy accepted on this stream, and Envoy never sees it.
//! - When an identity's result changes later (a background retry succeeded), the resources using
//!   it are pushed again with a nonce of the proxy's own.
//! - A lost upstream stream is opened again with backoff, replaying what Envoy asked for; Envoy's
//!   stream stays open and Envoy keeps its config meanwhile.
//! - Every response sent to Envoy takes its share of the send budget until Envoy answers it, and
//!   one left unanswered past `--xds-ack-timeout` resets the stream ([`Unread`]); a stream that
//!   ends or breaks a bound while Envoy has not read everything is reset too, as on `serve`'s
//!   port, so that HTTP/2 drops the unread bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::convert::{self, Converting};
use super::hub::Hub;
use super::unread::Unread;
use super::wire::Wire;
use crate::backoff::{Backoff, WATCH};
use crate::metrics::{ConversionResult, Metrics};
use crate::xds::limits::{self, AbortHandle, LogGate, SendBudget};
use crate::xds::store::XdsSeries;
use crate::xds::{Api, StreamLimits, ECDS_TYPE_URL};

/// Prefix of the nonces of the proxy's own pushes.
const OWN_NONCE: &str = "wasm-ecds-proxy/";

/// One of the [`StreamLimits::max_streams`](crate::xds::StreamLimits) slots of the proxy's port,
/// held by an Envoy stream while it lives, which is counted meanwhile in
/// `wasm_ecds_proxy_streams`.
pub struct OpenStream(Arc<Context>);

impl OpenStream {
    /// A slot, unless `max_streams` are taken (checked and taken at once).
    pub fn try_new(ctx: &Arc<Context>) -> Option<Self> {
        let max = ctx.limits.max_streams;
        (ctx.open)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        ctx.series.streams.inc();
        Some(OpenStream(ctx.clone()))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.series.streams.dec();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The nonce of the proxy's own push `n` on stream `id`, made when the last upstream response
/// Envoy had been sent was `origin`.
fn own_nonce(id: u64, n: u64, origin: &str) -> String {
    format!("{OWN_NONCE}{id}/{n}/{origin}")
}

/// The upstream nonce that answers for an own push's nonce; `None` for other nonces.
fn origin_of(nonce: &str) -> Option<&str> {
    let own = nonce.strip_prefix(OWN_NONCE)?;
    Some(own.splitn(3, '/').nth(2).unwrap_or_default())
}

/// What every proxied stream shares.
pub struct Context {
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    pub series: super::ProxySeries,
    pub upstream: Channel,
    pub upstream_name: String,
    pub max_message_size: usize,
    pub next_stream: AtomicU64,
    /// The `--xds-*` bounds of the port, enforced with the functions of `xds/limits.rs`.
    pub limits: StreamLimits,
    /// `wasm_ecds_xds_limit_count`: bounds hit (the xDS port's series).
    pub xds: XdsSeries,
    /// Refusal lines, one per bound and interval.
    pub log: LogGate,
    /// `--xds-send-budget`, shared by the port's streams ([`Unread`]).
    pub budget: SendBudget,
    /// Envoy streams open now (the slots of [`OpenStream`]).
    pub open: AtomicUsize,
}

/// An upstream stream being opened, or open.
enum Upstream<W: Wire> {
    Opening(BoxFuture<'static, Result<Streaming<W::Resp>, Status>>),
    Waiting(std::pin::Pin<Box<tokio::time::Sleep>>),
    Open(Box<Streaming<W::Resp>>),
}

/// Runs one Envoy stream until Envoy goes away (or `out` is closed). `abort` resets Envoy's
/// stream (`AbortLayer`); `None` outside it.
pub async fn run<W: Wire>(
    ctx: Arc<Context>,
    _slot: OpenStream,
    api: Api,
    mut downstream: Streaming<W::Req>,
    out: mpsc::Sender<Result<W::Resp, Status>>,
    abort: Option<AbortHandle>,
) {
    let id = ctx.next_stream.fetch_add(1, Ordering::Relaxed);
    // Envoy's node id as logged (cut), from its first request.
    let mut node_id: Option<String> = None;
    let mut memory = W::Memory::default();
    let mut sent = W::Sent::default();
    // The nonce of the last upstream ECDS response forwarded to Envoy (the origin of own pushes).
    let mut forwarded = String::new();
    // The last ECDS version Envoy accepted on this stream (for NACKs sent on its behalf).
    let mut accepted = String::new();
    let mut converting: VecDeque<(W::Resp, Converting)> = VecDeque::new();
    let mut own_pushes = 0u64;
    let mut epoch = ctx.hub.epoch();
    let mut backoff = Backoff::new(WATCH, Some(id));
    let (mut to_upstream, mut upstream) = open::<W>(&ctx, api, &memory);
    let mut unread = Unread::new(ctx.budget.clone(), ctx.limits.ack_timeout);
    let mut released = unread.watch_released();
    // A response for Envoy waiting for the send budget: nothing else is sent meanwhile.
    let mut blocked: Option<W::Resp> = None;
    // One timer for the oldest unanswered response's deadline, armed again when it fires early
    // (as `serve`'s stream task does).
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    let mut timer_armed = false;
    tokio::pin!(timer);
    let mut to_envoy = ToEnvoy {
        ctx: &ctx,
        out: &out,
        abort: abort.as_ref(),
        id,
    };
    loop {
        let free = blocked.is_none();
        let sent = tokio::select! {
            req = downstream.message() => {
                let mut req = match req {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        match limits::request_too_large(&e) {
                            Some(breach) => to_envoy.end(&unread, node_id.as_deref(), &breach),
                            None => tracing::debug!(stream = id, error = %e, "envoy stream ended"),
                        }
                        break;
                    }
                };
                // Checked before anything is forwarded or remembered for a replay.
                let names = W::names_after(&memory, &req);
                if let Some(breach) = ctx.limits.breach(W::req_node(&req), names) {
                    to_envoy.end(&unread, node_id.as_deref(), &breach);
                    break;
                }
                if node_id.is_none() {
                    node_id = W::req_node(&req).map(limits::node_id_for_logs);
                }
                let type_url = W::req_type(&req).to_string();
                if type_url == ECDS_TYPE_URL {
                    if let Some(v) = W::req_accepted(&req) {
                        accepted = v.to_string();
                    }
                }
                // Envoy has read the response it answers, and the ones before it.
                unread.answered(&type_url, W::req_nonce(&mut req));
                if let Some(origin) = origin_of(W::req_nonce(&mut req)) {
                    *W::req_nonce(&mut req) = origin.to_string();
                }
                W::remember_request(&mut memory, &req);
                let _ = to_upstream.send(req);
                None
            }
            event = next_upstream::<W>(&mut upstream, &ctx.series), if free => match event {
                UpstreamEvent::Reopen => {
                    (to_upstream, upstream) = open::<W>(&ctx, api, &memory);
                    None
                }
                UpstreamEvent::Response(resp) => {
                    backoff.reset();
                    if W::resp_type(&resp) != ECDS_TYPE_URL {
                        W::remember_response(&mut memory, &resp);
                        Some(resp)
                    } else {
                        match convert::start(&ctx.hub, &ctx.metrics, &W::resources(&resp)) {
                            Ok(c) => {
                                if W::SUPERSEDES {
                                    converting.clear();
                                }
                                converting.push_back((resp, c));
                            }
                            Err(e) => {
                                ctx.series.nacks.inc();
                                tracing::warn!(stream = id, error = %e, "ECDS response refused: NACKed upstream");
                                let _ = to_upstream.send(W::nack(&memory, &resp, &accepted, e));
                            }
                        }
                        None
                    }
                }
                UpstreamEvent::Lost(e) => {
                    ctx.series.upstream.with_label_values(&["lost"]).inc();
                    tracing::warn!(stream = id, upstream = %ctx.upstream_name, error = %e, "upstream stream lost; reconnecting");
                    upstream = Upstream::Waiting(Box::pin(tokio::time::sleep(backoff.next_delay())));
                    None
                }
            },
            () = head_ready(&mut converting), if free => {
                let (resp, mut c) = converting.pop_front().expect("a head is ready");
                match c.render(ctx.max_message_size) {
                    Ok(resources) => {
                        for e in c.errors() {
                            tracing::warn!(stream = id, "serving a fallback for {e}");
                        }
                        forwarded = W::resp_nonce(&resp).to_string();
                        let converted = W::rebuild(&resp, resources, forwarded.clone());
                        W::remember_response(&mut memory, &converted);
                        W::sent(&mut sent, resp, c);
                        Some(converted)
                    }
                    Err(e) => {
                        ctx.metrics.record_conversion(ConversionResult::MarshalFailure, 0.0);
                        ctx.series.nacks.inc();
                        tracing::warn!(stream = id, error = %e, "ECDS response cannot be sent: NACKed upstream");
                        let _ = to_upstream.send(W::nack(&memory, &resp, &accepted, e));
                        None
                    }
                }
            }
            changed = epoch.changed(), if free => {
                if changed.is_err() {
                    continue;
                }
                own_pushes += 1;
                let nonce = own_nonce(id, own_pushes, &forwarded);
                match W::repush(&mut sent, nonce, ctx.max_message_size) {
                    None => None,
                    Some(Ok(resp)) => {
                        ctx.series.repushes.inc();
                        tracing::info!(stream = id, "pushing converted resources again: their module or fallback changed");
                        W::remember_response(&mut memory, &resp);
                        Some(resp)
                    }
                    Some(Err(e)) => {
                        tracing::warn!(stream = id, error = %e, "cannot push converted resources again");
                        None
                    }
                }
            }
            _ = released.changed(), if !free => blocked.take(),
            () = &mut timer, if timer_armed && !unread.is_empty() => {
                match unread.deadline() {
                    // Armed for a response answered since.
                    Some(deadline) if tokio::time::Instant::now() < deadline => {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    _ => {
                        let breach = limits::ack_timeout(ctx.limits.ack_timeout);
                        to_envoy.end(&unread, node_id.as_deref(), &breach);
                        break;
                    }
                }
            }
        };
        let Some(resp) = sent else { continue };
        released.borrow_and_update();
        match to_envoy.send::<W>(&mut unread, resp).await {
            Delivery::Sent(deadline) => {
                if !timer_armed {
                    timer.as_mut().reset(deadline);
                    timer_armed = true;
                }
            }
            Delivery::Waiting(resp) => blocked = Some(resp),
            Delivery::Gone => break,
        }
    }
    if !unread.is_empty() {
        // Envoy may not have read everything: a reset makes HTTP/2 drop what it still holds.
        to_envoy.reset();
    }
}

/// What became of a response for Envoy.
enum Delivery<R> {
    /// Sent; answer it by this deadline.
    Sent(tokio::time::Instant),
    /// It waits for the send budget.
    Waiting(R),
    /// Envoy's side is gone.
    Gone,
}

/// Envoy's side of a stream.
struct ToEnvoy<'a, R> {
    ctx: &'a Context,
    out: &'a mpsc::Sender<Result<R, Status>>,
    abort: Option<&'a AbortHandle>,
    id: u64,
}

impl<R: prost::Message> ToEnvoy<'_, R> {
    /// Sends `resp` under the send budget.
    async fn send<W: Wire<Resp = R>>(&mut self, unread: &mut Unread, resp: R) -> Delivery<R> {
        let bytes = prost::Message::encoded_len(&resp);
        match unread.admit(bytes) {
            Ok(grant) => {
                let (type_url, nonce) = (
                    W::resp_type(&resp).to_string(),
                    W::resp_nonce(&resp).to_string(),
                );
                if self.out.send(Ok(resp)).await.is_err() {
                    return Delivery::Gone;
                }
                Delivery::Sent(unread.sent(&type_url, &nonce, grant))
            }
            Err(started) => {
                if started {
                    self.ctx.xds.count_limit("send_budget");
                    tracing::debug!(
                        stream = self.id,
                        bytes,
                        "response waits for the send budget"
                    );
                }
                Delivery::Waiting(resp)
            }
        }
    }

    /// Ends a stream that broke a bound: counted in `wasm_ecds_xds_limit_count`, logged through
    /// the log gate and told with the status `serve`'s port uses, unless Envoy has not read
    /// everything: the stream is then reset (the status would wait behind the unread bytes).
    /// Envoy's stream ends when the task returns, and its upstream stream with it.
    fn end(&self, unread: &Unread, node: Option<&str>, breach: &limits::Breach) {
        let ctx = self.ctx;
        let count = |limit: &str| ctx.xds.count_limit(limit);
        let status = limits::refuse(&ctx.log, count, node.unwrap_or_default(), breach);
        match self.abort {
            Some(abort) if !unread.is_empty() => abort.abort(),
            _ => {
                let _ = self.out.try_send(Err(status));
            }
        }
    }

    /// Resets Envoy's stream (HTTP/2 drops its unread bytes).
    fn reset(&self) {
        if let Some(abort) = self.abort {
            abort.abort();
        }
    }
}

/// Opens an upstream stream, queueing the replay of what Envoy asked for so far.
fn open<W: Wire>(
    ctx: &Context,
    api: Api,
    memory: &W::Memory,
) -> (mpsc::UnboundedSender<W::Req>, Upstream<W>) {
    let (tx, rx) = mpsc::unbounded_channel();
    for req in W::replay(memory) {
        let _ = tx.send(req);
    }
    let call = W::open(
        ctx.upstream.clone(),
        api,
        ctx.max_message_size,
        UnboundedReceiverStream::new(rx),
    );
    (tx, Upstream::Opening(call))
}

/// What the upstream side has next.
enum UpstreamEvent<R> {
    Response(R),
    /// The stream is lost: wait, then open it again.
    Lost(Status),
    /// The wait after a loss is over.
    Reopen,
}

/// The next upstream event. Cancel-safe: an opening call or a wait is resumed where it was.
async fn next_upstream<W: Wire>(
    upstream: &mut Upstream<W>,
    series: &super::ProxySeries,
) -> UpstreamEvent<W::Resp> {
    match upstream {
        Upstream::Waiting(sleep) => {
            sleep.await;
            return UpstreamEvent::Reopen;
        }
        Upstream::Opening(call) => match call.await {
            Ok(opened) => {
                series.upstream.with_label_values(&["opened"]).inc();
                *upstream = Upstream::Open(Box::new(opened));
            }
            Err(e) => return UpstreamEvent::Lost(e),
        },
        Upstream::Open(_) => {}
    }
    let Upstream::Open(s) = upstream else {
        unreachable!("opened above")
    };
    match s.message().await {
        Ok(Some(r)) => UpstreamEvent::Response(r),
        Ok(None) => UpstreamEvent::Lost(Status::unavailable("upstream closed the stream")),
        Err(e) => UpstreamEvent::Lost(e),
    }
}

/// Completes when the oldest response being converted has all its results.
async fn head_ready<R>(converting: &mut VecDeque<(R, Converting)>) {
    match converting.front_mut() {
        Some((_, c)) => c.ready().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_nonces_carry_the_upstream_nonce_envoy_had() {
        assert_eq!(origin_of(&own_nonce(3, 7, "42")), Some("42"));
        assert_eq!(origin_of(&own_nonce(3, 8, "a/b/c")), Some("a/b/c"));
        assert_eq!(origin_of(&own_nonce(1, 1, "")), Some(""));
        assert_eq!(origin_of("42"), None);
        assert_eq!(origin_of(""), None);
    }
}
