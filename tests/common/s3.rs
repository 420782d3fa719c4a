//! A real S3-compatible server for the tests: s3s-fs (built by `scripts/services.sh install`), one
//! per test, on a free port of 127.0.0.1 with its own data folder and SigV4 credentials.
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct S3Server {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    child: Option<Child>,
    /// Holds `data/` (the server's root) and `s3s-fs.log`; removed on drop.
    root: TempDir,
    port: u16,
}

impl S3Server {
    /// `$SDBATCH_S3S_FS`, else `${SDBATCH_CACHE:-$HOME/.cache/sdbatch}/s3s-fs-0.14.1/bin/s3s-fs`.
    pub fn binary() -> PathBuf {
        if let Some(path) = std::env::var_os("SDBATCH_S3S_FS") {
            return PathBuf::from(path);
        }
        let cache = std::env::var_os("SDBATCH_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").expect("HOME is not set");
                Path::new(&home).join(".cache/sdbatch")
            });
        cache.join("s3s-fs-0.14.1/bin/s3s-fs")
    }

    /// Starts a server on a free port with an empty data folder and waits until it accepts
    /// connections.
    pub fn start() -> S3Server {
        let binary = Self::binary();
        assert!(
            binary.is_file(),
            "S3 test server binary {} is missing: run scripts/services.sh install",
            binary.display()
        );
        let root = tempfile::Builder::new()
            .prefix("sdbatch-s3-")
            .tempdir()
            .expect("cannot create a temp folder for s3s-fs");
        std::fs::create_dir(root.path().join("data"))
            .expect("cannot create the s3s-fs data folder");
        // Port 0 makes the kernel pick a free port; the listener is closed right before s3s-fs
        // binds it (a tiny race with other processes, fine for tests).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("cannot find a free port")
            .port();
        let mut server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: "sdbatch-test".to_owned(),
            secret_key: format!("sdbatch-test-secret-{port}"),
            child: None,
            root,
            port,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's root folder: one subfolder per bucket.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("s3s-fs.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open the s3s-fs log");
        let log_err = log.try_clone().expect("cannot clone the log handle");
        let child = Command::new(Self::binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ])
            .arg(self.data_dir())
            .env("RUST_LOG", "s3s_fs=info,s3s=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", Self::binary().display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "s3s-fs exited ({status}) before listening on {addr}; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                self.stop();
                panic!(
                    "s3s-fs did not listen on {addr} within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL: like a crash, no graceful drain) and reaps it; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
