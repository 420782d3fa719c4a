//! One webhook delivery: resolve the host, check every address, connect to a checked one, POST
//! the signed event, and retry with backoff until it is accepted or the time bound runs out.
//!
//! The HTTP exchange is hyper's HTTP/1.1 client connection over a socket this module opened
//! itself, so nothing resolves the host a second time (DNS rebinding) and nothing follows a
//! redirect: a 3xx is a refused delivery and its `Location` is never fetched. Every attempt is
//! bounded: the time it takes, the response head (16 KiB) and the part of the body read for the
//! log (1 KiB, only for a failure).
use super::policy::{Policy, Refusal, WebhookUrl};
use super::sign::{self, Secret};
use crate::bounded;
use crate::metrics::Metrics;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use url::Host;

/// Addresses of one host considered at most (all of them are checked).
const MAX_ADDRESSES: usize = 16;
/// Bytes of a failed response's body kept for the log.
const MAX_RESPONSE_BODY_BYTES: usize = 1024;
/// Time spent reading that excerpt at most: the status alone decides the outcome.
const RESPONSE_BODY_TIME: Duration = Duration::from_secs(1);
/// hyper's read buffer, which bounds a response head (its smallest value is 8 KiB).
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;
/// Length of an error text in logs.
const MAX_ERROR_BYTES: usize = 256;

/// The time bounds of deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// One attempt: lookup, connect, TLS, request and response head.
    pub timeout: Duration,
    /// From the event's hand-over to the last attempt's start: no attempt starts later.
    pub give_up: Duration,
    /// The first pause between attempts; each next one doubles, up to `max_backoff`, each
    /// lengthened by a random part of up to itself (jitter).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// The pauses between attempts: exponential with jitter, never summing past `give_up`.
pub fn schedule(s: &Settings) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(s.min_backoff)
        .with_max_delay(s.max_backoff)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(s.give_up))
        .build()
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered { attempts: u32 },
    /// No 2xx within the time bound, or an answer that retrying cannot change (a 4xx other than
    /// 408, 425 and 429).
    GaveUp { attempts: u32, last_error: String },
    /// Not sent or not followed: the policy refused the URL or an address it resolves to, or
    /// the receiver answered with a redirect.
    Refused(String),
}

impl Outcome {
    /// The `outcome` label of `sdbatch_webhook_deliveries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::GaveUp { .. } => "gave_up",
            Outcome::Refused(_) => "refused",
        }
    }
}

/// One attempt's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    Delivered,
    /// Worth another attempt: network errors, timeouts, 408, 425, 429, 5xx.
    Retry(String),
    /// The receiver's final answer.
    Final(String),
    Refused(String),
}

/// What an HTTP status means for the delivery.
fn judge(status: StatusCode, excerpt: &str) -> Attempt {
    let answered = || {
        if excerpt.is_empty() {
            format!("answered {status}")
        } else {
            format!("answered {status}: {excerpt}")
        }
    };
    match status.as_u16() {
        200..=299 => Attempt::Delivered,
        300..=399 => Attempt::Refused(format!(
            "answered {status}: redirects are not followed (the Location is never fetched)"
        )),
        408 | 425 | 429 | 500..=599 => Attempt::Retry(answered()),
        _ => Attempt::Final(answered()),
    }
}

/// A boxed future of a lookup.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Name resolution, replaceable in tests (a resolver that answers with private addresses).
pub trait Resolve: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// The system's resolver (`getaddrinfo` on tokio's blocking pool).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, port))
                .await?
                .take(MAX_ADDRESSES)
                .collect())
        })
    }
}

/// Sends one event to one URL, with its retries. Shared by every delivery of a worker.
pub struct Client {
    pub(super) policy: Policy,
    secret: Secret,
    settings: Settings,
    /// `None` when no trust anchors could be loaded: https deliveries then fail (and say so).
    tls: Option<TlsConnector>,
    resolver: Arc<dyn Resolve>,
    /// Connections open at once, all deliveries together.
    connections: Semaphore,
    metrics: Arc<Metrics>,
}

impl Client {
    pub fn new(
        policy: Policy,
        secret: Secret,
        settings: Settings,
        max_connections: usize,
        resolver: Arc<dyn Resolve>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            policy,
            secret,
            settings,
            tls: tls_connector(),
            resolver,
            connections: Semaphore::new(max_connections.max(1)),
            metrics,
        }
    }

    /// Delivers `body` (the event `event`, exactly as published on the exchange) to `url`,
    /// retrying until a 2xx, a final answer, a refusal or the time bound. Counts every failed
    /// attempt that is retried and the final outcome.
    pub async fn deliver(&self, url: &WebhookUrl, event: &str, body: Bytes) -> Outcome {
        let outcome = self.deliver_uncounted(url, event, body).await;
        self.metrics
            .webhook_deliveries
            .with_label_values(&[outcome.label()])
            .inc();
        outcome
    }

    async fn deliver_uncounted(&self, url: &WebhookUrl, event: &str, body: Bytes) -> Outcome {
        if let Err(refusal) = self.policy.check_url(url) {
            return Outcome::Refused(refusal.to_string());
        }
        let deadline = tokio::time::Instant::now() + self.settings.give_up;
        // The same id on every attempt: receivers deduplicate retries by it.
        let delivery_id = uuid::Uuid::now_v7().to_string();
        let mut pauses = schedule(&self.settings);
        let mut attempts = 0;
        loop {
            attempts += 1;
            // Waiting for a free connection is not an attempt; it ends at the deadline too.
            let Ok(Ok(permit)) =
                tokio::time::timeout_at(deadline, self.connections.acquire()).await
            else {
                return Outcome::GaveUp {
                    attempts: attempts - 1,
                    last_error: "no free connection before the time bound".into(),
                };
            };
            // The last attempt may not outlast the bound either.
            let limit = self
                .settings
                .timeout
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let started = Instant::now();
            let attempt =
                match tokio::time::timeout(limit, self.attempt(url, event, &delivery_id, &body))
                    .await
                {
                    Ok(a) => a,
                    Err(_) => Attempt::Retry(format!("no answer within {limit:?}")),
                };
            drop(permit);
            self.metrics
                .webhook_request_seconds
                .observe(started.elapsed().as_secs_f64());
            let error = match attempt {
                Attempt::Delivered => return Outcome::Delivered { attempts },
                Attempt::Refused(why) => return Outcome::Refused(why),
                Attempt::Final(why) => {
                    return Outcome::GaveUp {
                        attempts,
                        last_error: why,
                    };
                }
                Attempt::Retry(why) => why,
            };
            let pause = pauses
                .next()
                .filter(|p| tokio::time::Instant::now() + *p < deadline);
            let Some(pause) = pause else {
                return Outcome::GaveUp {
                    attempts,
                    last_error: error,
                };
            };
            self.metrics
                .webhook_deliveries
                .with_label_values(&["failed_retrying"])
                .inc();
            tracing::warn!(attempt = attempts, error, retry_in = ?pause, "webhook attempt failed; retrying");
            tokio::time::sleep(pause).await;
        }
    }

    /// One attempt (the caller bounds its time).
    async fn attempt(
        &self,
        url: &WebhookUrl,
        event: &str,
        delivery_id: &str,
        body: &Bytes,
    ) -> Attempt {
        let addrs = match self.addresses(url).await {
            Ok(a) => a,
            Err(AddressError::Refused(r)) => return Attempt::Refused(r.to_string()),
            Err(AddressError::Lookup(e)) => return Attempt::Retry(e),
        };
        let tcp = match connect(&addrs).await {
            Ok(s) => s,
            Err(e) => return Attempt::Retry(e),
        };
        let request = match self.request(url, event, delivery_id, body.clone()) {
            Ok(r) => r,
            Err(e) => return Attempt::Final(e),
        };
        let answer = if url.is_https() {
            let Some(tls) = &self.tls else {
                return Attempt::Final("no TLS trust anchors on this worker".into());
            };
            let name = match server_name(url) {
                Ok(n) => n,
                Err(e) => return Attempt::Final(e),
            };
            match tls.connect(name, tcp).await {
                Ok(stream) => exchange(stream, request).await,
                Err(e) => Err(format!("TLS: {e}")),
            }
        } else {
            exchange(tcp, request).await
        };
        match answer {
            Ok((status, excerpt)) => judge(status, &excerpt),
            Err(e) => Attempt::Retry(e),
        }
    }

    /// The host's addresses, each allowed by the policy (one refused address refuses them all:
    /// a name that resolves inside the network is not a public receiver).
    async fn addresses(&self, url: &WebhookUrl) -> Result<Vec<SocketAddr>, AddressError> {
        let port = url.port();
        let ips: Vec<SocketAddr> = match url.host() {
            Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            Host::Domain(name) => self
                .resolver
                .resolve(name, port)
                .await
                .map_err(|e| AddressError::Lookup(cut(&format!("looking up the host: {e}"))))?
                .into_iter()
                .take(MAX_ADDRESSES)
                .collect(),
        };
        if ips.is_empty() {
            return Err(AddressError::Lookup("the host has no address".into()));
        }
        for a in &ips {
            self.policy
                .check_addr(a.ip())
                .map_err(AddressError::Refused)?;
        }
        Ok(ips)
    }

    fn request(
        &self,
        url: &WebhookUrl,
        event: &str,
        delivery_id: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, String> {
        let u = url.url();
        let mut target = u.path().to_string();
        if let Some(q) = u.query() {
            target.push('?');
            target.push_str(q);
        }
        // The port only when it is not the scheme's (`port()` is `None` then), as browsers do.
        let host = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
            None => u.host_str().unwrap_or("").to_string(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Request::post(target)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("sdbatch/", env!("CARGO_PKG_VERSION")),
            )
            .header("sdbatch-event", event)
            .header("sdbatch-delivery", delivery_id)
            .header(
                sign::SIGNATURE_HEADER,
                sign::header_value(&self.secret, now, &body),
            )
            .body(Full::new(body))
            .map_err(|e| cut(&format!("building the request: {e}")))
    }
}

enum AddressError {
    Refused(Refusal),
    Lookup(String),
}

fn cut(text: &str) -> String {
    bounded::cut(text, MAX_ERROR_BYTES)
}

/// The first of `addrs` that accepts a connection.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = cut(&format!("connecting to {addr}: {e}")),
        }
    }
    Err(last)
}

/// The name the certificate must carry: the URL's host (an IP literal is checked as an IP).
fn server_name(url: &WebhookUrl) -> Result<rustls::pki_types::ServerName<'static>, String> {
    match url.host() {
        Host::Ipv4(ip) => Ok(IpAddr::V4(ip).into()),
        Host::Ipv6(ip) => Ok(IpAddr::V6(ip).into()),
        Host::Domain(d) => rustls::pki_types::ServerName::try_from(d.to_string())
            .map_err(|e| cut(&format!("TLS server name: {e}"))),
    }
}

/// One HTTP/1.1 request on `io`: the status, and for a failure the start of the body.
async fn exchange<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<(StatusCode, String), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
        .handshake::<_, Full<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| cut(&format!("HTTP handshake: {e}")))?;
    let answer = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| cut(&format!("HTTP: {e}")))?;
        let status = response.status();
        let excerpt = if status.is_success() {
            String::new()
        } else {
            tokio::time::timeout(RESPONSE_BODY_TIME, read_prefix(response.into_body()))
                .await
                .unwrap_or_default()
        };
        Ok((status, excerpt))
    };
    // The connection is driven here, not on a task of its own, so that it ends (and its socket
    // closes) with this attempt, whatever the receiver does.
    tokio::pin!(answer);
    tokio::pin!(conn);
    tokio::select! {
        a = &mut answer => a,
        // The connection ended (the receiver closed it, or the exchange is over): what was
        // received is still readable, and an incomplete answer is an error.
        _ = &mut conn => answer.await,
    }
}

/// At most [`MAX_RESPONSE_BODY_BYTES`] of a body, as inert text.
async fn read_prefix(mut body: hyper::body::Incoming) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_RESPONSE_BODY_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_RESPONSE_BODY_BYTES - buf.len();
                    buf.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    cut(&String::from_utf8_lossy(&buf))
}

/// TLS with the system's trust anchors (as the S3 client uses) and aws-lc-rs, HTTP/1.1 only.
fn tls_connector() -> Option<TlsConnector> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        tracing::warn!(
            errors = loaded.errors.len(),
            "no TLS trust anchors found: https webhooks will fail"
        );
        return None;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "TLS set-up failed: https webhooks will fail");
            return None;
        }
    };
    let mut config = versions.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Some(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(give_up: Duration) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            give_up,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_schedule_grows_with_jitter_and_stops_at_the_bound() {
        for _ in 0..50 {
            let s = settings(Duration::from_secs(3600));
            let pauses: Vec<Duration> = schedule(&s).collect();
            let total: Duration = pauses.iter().sum();
            assert!(total <= s.give_up, "{total:?}");
            // Enough attempts to ride out an outage, not a storm of them.
            assert!((8..=40).contains(&pauses.len()), "{}", pauses.len());
            // Pause n is between its base (1, 2, 4 … 300 s) and twice it.
            for (n, p) in pauses.iter().enumerate() {
                let base = Duration::from_secs(1u64 << n.min(9)).min(s.max_backoff);
                assert!(
                    *p >= base && *p <= base * 2,
                    "pause {n}: {p:?}, base {base:?}"
                );
            }
        }
    }

    #[test]
    fn a_short_bound_allows_few_pauses() {
        let s = Settings {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            ..settings(Duration::from_millis(500))
        };
        let pauses: Vec<Duration> = schedule(&s).collect();
        assert!(!pauses.is_empty() && pauses.len() <= 4, "{pauses:?}");
        assert!(pauses.iter().sum::<Duration>() <= s.give_up);
        assert_eq!(schedule(&settings(Duration::ZERO)).next(), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(judge(StatusCode::OK, ""), Attempt::Delivered);
        assert_eq!(judge(StatusCode::NO_CONTENT, ""), Attempt::Delivered);
        for s in [301, 302, 303, 307, 308] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(matches!(judge(s, ""), Attempt::Refused(_)), "{s}");
        }
        for s in [408, 425, 429, 500, 502, 503, 504] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(matches!(judge(s, ""), Attempt::Retry(_)), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 413] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(
                matches!(judge(s, "nope"), Attempt::Final(e) if e.contains("nope")),
                "{s}"
            );
        }
    }
}
