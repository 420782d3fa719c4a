//! A private RabbitMQ node per test, for the tests that need broker-wide changes (restarting the
//! node, lowering `consumer_timeout`) without disturbing any other test, whatever the runner:
//! cargo-nextest runs every test at once, so the shared node on 127.0.0.1:5672 must never be
//! restarted or reconfigured.
//!
//! Each node has its own name (`sdbatch-test-<pid>-<n>@localhost`), AMQP port, distribution port,
//! Erlang cookie and data/log/config folders in a temp folder, so several run side by side with
//! the shared node. It runs the installed server scripts directly (`/usr/lib/rabbitmq/bin` on
//! Debian, or `$SDBATCH_RABBITMQ_BIN`), not the `/usr/sbin` wrappers, which switch to the
//! `rabbitmq` user as root and drop the environment that makes the node private.
//!
//! No node outlives its test: `Drop` kills the node's process group (also while a panicking test
//! unwinds), and a watchdog in that group kills it when the test process dies without unwinding
//! (killed by a runner's timeout, `panic = "abort"`), as its stdin, a pipe from the test process,
//! then reaches end of file.
//!
//! Start-up takes a few seconds (one Erlang VM boot); see `startup_time`.
#![allow(dead_code)]
use lapin::{Connection, ConnectionProperties};
use std::fs::File;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a node may take to start before the test fails (a loaded 2-core machine running
/// several nodes at once is far slower than the ~3-5 s of one node).
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(90);
/// The consumer-timeout check runs on each channel's tick (`rabbit.channel_tick_interval`,
/// default 60 s in 3.10), so a lowered timeout only takes effect that coarsely unless the tick is
/// lowered too. This is the tick used when a consumer timeout is set and no tick is given.
const DEFAULT_TICK_WITH_CONSUMER_TIMEOUT_MS: u64 = 1000;
/// Start attempts: a port picked free can be taken by another process before the node binds it.
const START_ATTEMPTS: u32 = 3;

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// Runs the server in the background with its stdin closed, kills the whole process group once
/// stdin (a pipe the test process holds) reaches end of file, and exits with the server's status
/// when the server exits on its own (a failed start). `$0` is the server script.
const WATCHDOG: &str = r#"exec 3<&0
"$0" </dev/null 3<&- &
server=$!
(read -r _ <&3; kill -KILL 0) &
exec 3<&-
wait "$server"
"#;

/// Options for a private node; `PrivateBroker::builder()`.
#[derive(Clone, Debug)]
pub struct PrivateBrokerBuilder {
    consumer_timeout_ms: Option<u64>,
    channel_tick_interval_ms: Option<u64>,
    start_timeout: Duration,
}

impl PrivateBrokerBuilder {
    /// `rabbit.consumer_timeout` for the node (the broker default is 30 min). Also lowers the
    /// channel tick that checks it to 1 s unless `channel_tick_interval` says otherwise.
    pub fn consumer_timeout(mut self, ms: u64) -> Self {
        self.consumer_timeout_ms = Some(ms);
        self
    }

    /// `rabbit.channel_tick_interval` (default 60 000 ms): how often each channel checks its
    /// oldest unacknowledged delivery against the consumer timeout.
    pub fn channel_tick_interval(mut self, ms: u64) -> Self {
        self.channel_tick_interval_ms = Some(ms);
        self
    }

    /// How long `start` waits for the node to accept AMQP connections.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    fn advanced_config(&self) -> String {
        let mut rabbit = Vec::new();
        if let Some(ms) = self.consumer_timeout_ms {
            rabbit.push(format!("{{consumer_timeout, {ms}}}"));
        }
        let tick = self.channel_tick_interval_ms.or(self
            .consumer_timeout_ms
            .map(|_| DEFAULT_TICK_WITH_CONSUMER_TIMEOUT_MS));
        if let Some(ms) = tick {
            rabbit.push(format!("{{channel_tick_interval, {ms}}}"));
        }
        format!("[{{rabbit, [{}]}}].\n", rabbit.join(", "))
    }

    /// Starts the node and waits until it accepts AMQP connections as guest (panics, with the
    /// node's log, when it does not within the start timeout).
    pub async fn start(self) -> PrivateBroker {
        let begun = Instant::now();
        let mut attempt = 1;
        loop {
            let mut broker = PrivateBroker::spawn(&self);
            let deadline = begun + self.start_timeout;
            match broker.wait_ready(deadline).await {
                Ok(()) => {
                    broker.startup_time = begun.elapsed();
                    return broker;
                }
                Err(why) => {
                    let log = broker.log_text();
                    let port_taken = log.contains("eaddrinuse");
                    drop(broker);
                    if port_taken && attempt < START_ATTEMPTS && Instant::now() < deadline {
                        attempt += 1;
                        continue;
                    }
                    panic!("private RabbitMQ node did not start (attempt {attempt}): {why}\n{log}");
                }
            }
        }
    }
}

/// A RabbitMQ node of one test's own; stopped on drop.
pub struct PrivateBroker {
    node: String,
    port: u16,
    dist_port: u16,
    /// The watchdog shell, leader of the node's process group.
    child: Child,
    /// Closing it makes the watchdog kill the group.
    watchdog_stdin: Option<ChildStdin>,
    startup_time: Duration,
    /// Config, cookie, data and logs; removed after the node is killed (fields drop after
    /// `Drop::drop`).
    dir: TempDir,
}

impl PrivateBroker {
    pub fn builder() -> PrivateBrokerBuilder {
        PrivateBrokerBuilder {
            consumer_timeout_ms: None,
            channel_tick_interval_ms: None,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }

    /// A node with RabbitMQ's defaults.
    pub async fn start() -> PrivateBroker {
        Self::builder().start().await
    }

    /// The folder of the server scripts (`rabbitmq-server`, `rabbitmqctl`).
    pub fn bin_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("SDBATCH_RABBITMQ_BIN") {
            return PathBuf::from(dir);
        }
        let debian = Path::new("/usr/lib/rabbitmq/bin");
        assert!(
            debian.join("rabbitmq-server").exists(),
            "RabbitMQ server scripts not found in {} (install rabbitmq-server, \
             scripts/services.sh install, or set SDBATCH_RABBITMQ_BIN)",
            debian.display()
        );
        debian.to_path_buf()
    }

    fn spawn(options: &PrivateBrokerBuilder) -> PrivateBroker {
        let dir = tempfile::Builder::new()
            .prefix("sdbatch-rmq-")
            .tempdir()
            .expect("cannot create a temp folder for a RabbitMQ node");
        let node = format!(
            "sdbatch-test-{}-{}@localhost",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        );
        let port = free_port();
        let dist_port = free_port();
        let p = dir.path();
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir(p.join(sub)).unwrap();
        }
        write_private(&p.join("home/.erlang.cookie"), &cookie());
        std::fs::write(p.join("rabbitmq.conf"), "").unwrap();
        std::fs::write(p.join("advanced.config"), options.advanced_config()).unwrap();
        std::fs::write(p.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(p.join("rabbitmq-env.conf"), "").unwrap();

        let out = File::create(p.join("server.out")).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg(Self::bin_dir().join("rabbitmq-server"))
            .envs(Self::env(p))
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", p.join("log"))
            .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", p.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("enabled_plugins"))
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = command.spawn().expect("cannot run sh for rabbitmq-server");
        let watchdog_stdin = child.stdin.take();
        PrivateBroker {
            node,
            port,
            dist_port,
            child,
            watchdog_stdin,
            startup_time: Duration::ZERO,
            dir,
        }
    }

    /// What both the server and `rabbitmqctl` need: the private cookie (in `$HOME`) and no
    /// system-wide rabbitmq-env.conf.
    fn env(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("HOME", dir.join("home")),
            ("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf")),
        ]
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in over loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    /// From spawning the node to its first accepted AMQP connection.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// The server's stdout/stderr and the node's log file.
    pub fn log_text(&self) -> String {
        let p = self.dir.path();
        let out = std::fs::read_to_string(p.join("server.out")).unwrap_or_default();
        let log = std::fs::read_to_string(p.join("log").join(format!("{}.log", self.node)))
            .unwrap_or_default();
        format!(
            "--- {} server output ---\n{}\n--- {} node log (last 150 lines) ---\n{}",
            self.node,
            tail(&out, 150),
            self.node,
            tail(&log, 150)
        )
    }

    /// Runs `rabbitmqctl -n NODE ARGS`, returns its stdout; panics (with the node's log) when it
    /// fails.
    pub async fn ctl(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(Self::bin_dir().join("rabbitmqctl"))
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .envs(Self::env(self.dir.path()))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("cannot run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}{}\n{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Evaluates an Erlang expression on the node (`rabbitmqctl eval`).
    pub async fn eval(&self, expr: &str) -> String {
        self.ctl(&["eval", expr]).await.trim().to_string()
    }

    /// Stops the RabbitMQ application (the Erlang node stays up): every connection is closed and
    /// new ones are refused until `start_app`.
    pub async fn stop_app(&self) {
        self.ctl(&["stop_app"]).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "node {} still accepts connections after stop_app",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the RabbitMQ application again and waits until it accepts AMQP connections.
    pub async fn start_app(&mut self) {
        self.ctl(&["start_app"]).await;
        let deadline = Instant::now() + DEFAULT_START_TIMEOUT;
        if let Err(why) = self.wait_ready(deadline).await {
            panic!(
                "node {} did not accept connections after start_app: {why}\n{}",
                self.node,
                self.log_text()
            );
        }
    }

    /// `stop_app` then `start_app`: a broker restart as clients see it.
    pub async fn restart(&mut self) {
        self.stop_app().await;
        self.start_app().await;
    }

    /// Sets `rabbit.consumer_timeout` at run time, and lowers the channel tick that checks it to
    /// at most 1 s. A channel reads the timeout when it opens, so this applies to channels
    /// opened afterwards only; prefer `builder().consumer_timeout(ms)`.
    pub async fn set_consumer_timeout(&self, ms: u64) {
        self.eval(&format!(
            "ok = application:set_env(rabbit, consumer_timeout, {ms}), \
             {{ok, T}} = application:get_env(rabbit, channel_tick_interval), \
             application:set_env(rabbit, channel_tick_interval, \
             min(T, {DEFAULT_TICK_WITH_CONSUMER_TIMEOUT_MS}))."
        ))
        .await;
    }

    /// Waits until a guest AMQP connection succeeds, the node exits, or `deadline` passes.
    async fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        let url = self.url();
        let mut last = String::from("not tried");
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "the node exited ({status}); last connect error: {last}"
                ));
            }
            // Only try AMQP once the port is open: refused TCP connects are cheap and quiet.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let connect = Connection::connect(&url, ConnectionProperties::default());
                match tokio::time::timeout(Duration::from_secs(5), connect).await {
                    Ok(Ok(conn)) => {
                        let _ = conn.close(200, "ready".into()).await;
                        return Ok(());
                    }
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "AMQP connect timed out".into(),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no AMQP connection on port {} within the start timeout; last error: {last}",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // Kill the whole group (watchdog, server script, Erlang VM and its helpers) at once: the
        // node's data is thrown away, so there is nothing to shut down gracefully.
        drop(self.watchdog_stdin.take());
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        // The VM is a grandchild: wait (bounded) until its listener is gone, so a test that
        // follows sees the node stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A free port below the kernel's ephemeral range when there is room there (the usual 32768+):
/// ports from `bind(0)` (other tests' S3 servers and metrics endpoints) and the local ports of
/// outgoing connections come from that range, and the node's ports must stay free while it boots
/// and between `stop_app` and `start_app`. Falls back to `bind(0)`.
fn free_port() -> u16 {
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if ephemeral_low > LOWEST + 1000 {
        for _ in 0..50 {
            let port = (LOWEST + random_u32() % (ephemeral_low - LOWEST)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot find a free port")
        .port()
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("cannot read /dev/urandom");
    u32::from_ne_bytes(bytes)
}

/// A random Erlang cookie (letters only), from the kernel's random source.
fn cookie() -> String {
    (0..24)
        .map(|_| (b'A' + (random_u32() % 26) as u8) as char)
        .collect()
}

/// Erlang refuses a cookie file that others can read.
fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
