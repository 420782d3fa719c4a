//! A local HTTP receiver for webhook tests: answers from a script, reports every request it got
//! on a channel (tests wait on it, never on sleeps).
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sdbatch::webhook::WebhookUrl;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// What a receiver answers to one request.
#[derive(Clone)]
pub enum Answer {
    Status(u16),
    /// 302 to this `Location`.
    Redirect(String),
    /// Never answers.
    Hang,
}

/// One request a receiver got.
#[derive(Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct Script {
    /// Answers in order; the last one repeats.
    answers: Mutex<VecDeque<Answer>>,
    seen: mpsc::UnboundedSender<Received>,
}

/// A local HTTP receiver on `ip` (port chosen by the system).
pub struct Receiver {
    pub addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    pub async fn start(ip: &str, answers: &[Answer]) -> Receiver {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let script = Arc::new(Script {
            answers: Mutex::new(answers.iter().cloned().collect()),
            seen: tx,
        });
        let app = axum::Router::new().fallback(answer).with_state(script);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, requests: rx }
    }

    pub fn url(&self, path: &str) -> WebhookUrl {
        WebhookUrl::parse(&format!("http://{}{path}", self.addr)).unwrap()
    }

    /// The next request (it has arrived when the delivery that sent it is over).
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(30), self.requests.recv())
            .await
            .expect("a request within 30 s")
            .expect("receiver running")
    }

    /// Every request received so far.
    pub fn received(&mut self) -> Vec<Received> {
        std::iter::from_fn(|| self.requests.try_recv().ok()).collect()
    }
}

async fn answer(State(script): State<Arc<Script>>, request: Request) -> Response {
    let path = request.uri().to_string();
    let headers = request.headers().clone();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let next = {
        let mut answers = script.answers.lock().unwrap();
        if answers.len() > 1 {
            answers.pop_front()
        } else {
            answers.front().cloned()
        }
    };
    let _ = script.seen.send(Received {
        path,
        headers,
        body,
    });
    match next.unwrap_or(Answer::Status(200)) {
        Answer::Status(s) => (StatusCode::from_u16(s).unwrap(), "receiver says hi").into_response(),
        Answer::Redirect(to) => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
        Answer::Hang => std::future::pending().await,
    }
}

impl Received {
    /// A header's value (panics when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}
