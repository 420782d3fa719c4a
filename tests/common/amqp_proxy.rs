//! A TCP proxy in front of RabbitMQ that can make the broker go silent for one connection without
//! closing it, the failure a heartbeat only notices after minutes: the worker must notice it by
//! its own operation timeouts instead of hanging.
//!
//! The first connection through the proxy is frozen right after it has carried its first complete
//! delivery (`basic.deliver` or `basic.get-ok`, + content header + body frames) to the client: from then on nothing
//! is forwarded in either direction and the sockets stay open, until [`AmqpProxy::kill_frozen`]
//! closes them (and RabbitMQ requeues what that connection held). Later connections are plain
//! pass-through. The freeze is triggered by the protocol itself, not by timing.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub struct AmqpProxy {
    pub port: u16,
    state: Arc<State>,
}

struct State {
    frozen: AtomicBool,
    frozen_notify: Notify,
    killed: AtomicBool,
    kill_notify: Notify,
    connections: AtomicUsize,
}

impl AmqpProxy {
    pub async fn start(upstream: SocketAddr) -> AmqpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            frozen: AtomicBool::new(false),
            frozen_notify: Notify::new(),
            killed: AtomicBool::new(false),
            kill_notify: Notify::new(),
            connections: AtomicUsize::new(0),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let first = st.connections.fetch_add(1, Ordering::SeqCst) == 0;
                let st = st.clone();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                if first {
                    tokio::spawn(frozen_after_delivery(sr, cw, st.clone()));
                    tokio::spawn(client_to_server(cr, sw, Some(st)));
                } else {
                    tokio::spawn(plain(sr, cw));
                    tokio::spawn(client_to_server(cr, sw, None));
                }
            }
        });
        AmqpProxy { port, state }
    }

    /// The AMQP URL through the proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Waits until the first connection has carried its first delivery and is frozen.
    pub async fn wait_frozen(&self) {
        wait_frozen_state(&self.state).await
    }

    /// Closes the frozen connection: the broker then requeues the messages it held.
    pub fn kill_frozen(&self) {
        self.state.killed.store(true, Ordering::SeqCst);
        self.state.kill_notify.notify_waiters();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

/// Waits until `flag` is set (its setter notifies `notify` after setting it).
async fn wait_set(flag: &AtomicBool, notify: &Notify) {
    loop {
        // Registered before the check, so a notification between the two is not missed.
        let notified = notify.notified();
        if flag.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

async fn wait_killed(st: &State) {
    wait_set(&st.killed, &st.kill_notify).await
}

async fn plain(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

/// Client → server; on the first connection, stops forwarding once frozen and holds the socket
/// until killed.
async fn client_to_server(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    freezable: Option<Arc<State>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => n,
            _ = async {
                match &freezable {
                    Some(st) => { wait_frozen_state(st).await; }
                    None => std::future::pending::<()>().await,
                }
            } => break,
        };
        let Ok(n) = n else { return };
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if freezable
            .as_ref()
            .is_some_and(|st| st.frozen.load(Ordering::SeqCst))
        {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    if let Some(st) = freezable {
        wait_killed(&st).await;
    }
    drop((from, to));
}

async fn wait_frozen_state(st: &State) {
    wait_set(&st.frozen, &st.frozen_notify).await
}

/// Server → client, frame by frame, until the first delivery is complete; then frozen.
async fn frozen_after_delivery(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, st: Arc<State>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // (channel, body bytes still expected) once a basic.deliver was seen.
    let mut delivery: Option<(u16, Option<u64>)> = None;
    'read: loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        // Forward every complete frame; stop right after the one that completes the delivery.
        while pending.len() >= 7 {
            let size = u32::from_be_bytes(pending[3..7].try_into().unwrap()) as usize;
            let total = 7 + size + 1;
            if pending.len() < total {
                break;
            }
            let frame: Vec<u8> = pending.drain(..total).collect();
            let kind = frame[0];
            let channel = u16::from_be_bytes([frame[1], frame[2]]);
            let payload = &frame[7..7 + size];
            if to.write_all(&frame).await.is_err() {
                return;
            }
            let complete = match (&mut delivery, kind) {
                // basic.deliver (class 60, method 60), or basic.get-ok (method 71): a worker
                // that pulls its next message (priority lanes) gets it that way.
                (None, 1)
                    if payload.len() >= 4
                        && (payload[..4] == [0, 60, 0, 60] || payload[..4] == [0, 60, 0, 71]) =>
                {
                    delivery = Some((channel, None));
                    false
                }
                (Some((ch, expected)), 2) if *ch == channel => {
                    let body = u64::from_be_bytes(payload[4..12].try_into().unwrap());
                    *expected = Some(body);
                    body == 0
                }
                (Some((ch, Some(left))), 3) if *ch == channel => {
                    *left = left.saturating_sub(size as u64);
                    *left == 0
                }
                _ => false,
            };
            if complete {
                break 'read;
            }
        }
    }
    st.frozen.store(true, Ordering::SeqCst);
    st.frozen_notify.notify_waiters();
    wait_killed(&st).await;
    drop((from, to));
}
