//! A TCP proxy in front of the S3 server that makes the store slow: every chunk the server sends
//! back is held for a fixed delay before it reaches the client, so each request takes at least that
//! long while the bytes themselves are untouched. Requests go through at full speed.
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct SlowProxy {
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    pub async fn start(upstream: SocketAddr, delay: Duration) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_r, mut client_w) = client.into_split();
                    let (mut server_r, mut server_w) = server.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
                        let _ = server_w.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match server_r.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            tokio::time::sleep(delay).await;
                            if client_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = client_w.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        SlowProxy { endpoint, task }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
