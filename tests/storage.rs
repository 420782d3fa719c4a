//! The storage module against a real S3 server (s3s-fs, one per test, verifying SigV4) and a temp
//! folder. Every test makes its own server, folder and bucket, so order and leftovers don't matter.
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::s3::S3Server;
use sdbatch::storage::{RetryPolicy, StaticCredentials, Storage, StorageConfig, StorageError};
use tempfile::TempDir;

const PROMPT: &str = "café 🎨 日本";

fn init_logs() {
    // Retry warnings show up in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_test_writer()
        .try_init();
}

/// The worker shares one `Storage` between tasks and spawns its futures: they must be `Send`.
#[allow(dead_code)]
fn storage_and_its_futures_are_send_and_sync(s: &Storage) {
    fn send<T: Send>(_: T) {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Storage>();
    send_sync::<StorageError>();
    send(s.put("b", "k", Vec::new(), "", &[]));
    send(s.get("b", "k"));
    send(s.exists("b", "k"));
    send(s.list("b", ""));
    send(s.head_metadata("b", "k"));
    send(s.check("b"));
    send(s.create_bucket("b"));
}

fn unique_bucket() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "sdbatch-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    }
}

fn s3_config(server: &S3Server, retry: RetryPolicy) -> StorageConfig {
    let mut cfg = StorageConfig::new("s3://");
    cfg.endpoint = Some(server.endpoint.clone());
    cfg.retry = retry;
    cfg.connect_timeout = Duration::from_millis(500);
    cfg.operation_timeout = Duration::from_secs(10);
    cfg
}

fn credentials(server: &S3Server) -> StaticCredentials {
    StaticCredentials {
        access_key_id: server.access_key.clone(),
        secret_access_key: server.secret_key.clone(),
        session_token: None,
    }
}

async fn connect_s3(server: &S3Server, retry: RetryPolicy) -> Storage {
    Storage::connect_with_credentials(&s3_config(server, retry), credentials(server))
        .await
        .expect("connect to s3s-fs")
}

/// A store with a fresh bucket, and what keeps its backing alive.
struct Fixture {
    storage: Storage,
    bucket: String,
    server: Option<S3Server>,
    _dir: Option<TempDir>,
}

async fn s3_fixture() -> Fixture {
    init_logs();
    let server = S3Server::start();
    let storage = connect_s3(&server, quick_retry()).await;
    let bucket = unique_bucket();
    storage.create_bucket(&bucket).await.expect("create bucket");
    Fixture {
        storage,
        bucket,
        server: Some(server),
        _dir: None,
    }
}

async fn local_fixture() -> Fixture {
    init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let url = url::Url::from_directory_path(dir.path().join("store"))
        .expect("absolute path")
        .to_string();
    let mut cfg = StorageConfig::new(url);
    cfg.retry = quick_retry();
    let storage = Storage::connect(&cfg).await.expect("open local store");
    let bucket = unique_bucket();
    storage.create_bucket(&bucket).await.expect("create bucket");
    Fixture {
        storage,
        bucket,
        server: None,
        _dir: Some(dir),
    }
}

/// Runs a shared test against both backends: `<name>::s3` and `<name>::local`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn s3() {
                super::$name(super::s3_fixture().await).await;
            }
            #[tokio::test]
            async fn local() {
                super::$name(super::local_fixture().await).await;
            }
        }
    )*};
}

both_backends!(
    put_get_exists,
    list_prefix_and_pages,
    metadata_round_trip,
    invalid_input_is_rejected,
    bucket_check_and_create,
    get_limited_stops_at_the_limit,
);

fn png_like(len: usize, seed: u8) -> Vec<u8> {
    let mut body = b"\x89PNG\r\n\x1a\n".to_vec();
    body.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    body
}

fn assert_permanent<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, StorageError>,
) -> StorageError {
    match result {
        Err(e) if !e.is_transient() => e,
        other => panic!("{what}: expected a permanent error, got {other:?}"),
    }
}

async fn put_get_exists(fx: Fixture) {
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    let key = "jobs/1/img-0.png";
    let body = png_like(1 << 20, 1);
    s.put(b, key, body.clone(), "image/png", &[]).await.unwrap();
    assert_eq!(s.get(b, key).await.unwrap().as_deref(), Some(&body[..]));
    assert!(s.exists(b, key).await.unwrap());

    // Absent keys. (A key that is only a "folder" of others, like `jobs/1`, is tested for the
    // local backend only: s3s-fs answers HTTP 500 for it, where AWS says 404.)
    assert_eq!(s.get(b, "jobs/1/img-1.png").await.unwrap(), None);
    assert!(!s.exists(b, "jobs/1/img-1.png").await.unwrap());
    assert_eq!(s.get(b, "jobs/2/img-0.png").await.unwrap(), None);
    assert_eq!(s.head_metadata(b, "nope.png").await.unwrap(), None);

    // Overwrite; an empty body is an object too.
    let body2 = png_like(10, 2);
    s.put(b, key, body2.clone(), "image/png", &[])
        .await
        .unwrap();
    assert_eq!(s.get(b, key).await.unwrap(), Some(body2));
    s.put(b, "empty", Vec::new(), "", &[]).await.unwrap();
    assert_eq!(s.get(b, "empty").await.unwrap(), Some(Vec::new()));

    assert_eq!(s.retries(), 0, "nothing should have been retried");
}

/// `get_limited` returns objects up to the limit and only the size of larger ones.
async fn get_limited_stops_at_the_limit(fx: Fixture) {
    use sdbatch::storage::Limited;
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    let body = png_like(1000, 3);
    s.put(b, "in/a.png", body.clone(), "image/png", &[])
        .await
        .unwrap();
    let n = body.len() as u64;
    assert_eq!(
        s.get_limited(b, "in/a.png", n).await.unwrap(),
        Some(Limited::Bytes(body))
    );
    assert_eq!(
        s.get_limited(b, "in/a.png", n - 1).await.unwrap(),
        Some(Limited::TooLarge(n))
    );
    assert_eq!(s.get_limited(b, "in/none.png", n).await.unwrap(), None);
    assert_permanent("bad key", s.get_limited(b, "../x", n).await);
}

async fn list_prefix_and_pages(mut fx: Fixture) {
    // Two keys per page, so five keys take three pages against S3.
    fx.storage = fx.storage.with_list_page_size(2);
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    let mut keys: Vec<String> = (0..5)
        .rev()
        .map(|i| format!("jobs/a/img-{i}.png"))
        .collect();
    keys.extend(
        [
            "jobs/a/sub/x.png",
            "jobs/ab/y.png",
            "jobs/b/z.png",
            "other.png",
        ]
        .map(String::from),
    );
    let metadata = [("prompt".to_owned(), PROMPT.to_owned())];
    for key in &keys {
        s.put(b, key, b"x".to_vec(), "image/png", &metadata)
            .await
            .unwrap();
    }
    let listed = |prefix: &'static str| async move { s.list(b, prefix).await.unwrap() };

    let mut all = keys.clone();
    all.sort();
    // The local backend's metadata files must not show up.
    assert_eq!(listed("").await, all);
    let a: Vec<String> = (0..5)
        .map(|i| format!("jobs/a/img-{i}.png"))
        .chain(["jobs/a/sub/x.png".to_owned()])
        .collect();
    assert_eq!(listed("jobs/a/").await, a);
    // A plain prefix, not a folder: "jobs/a" also matches "jobs/ab/…".
    let mut a_ab = a.clone();
    a_ab.push("jobs/ab/y.png".to_owned());
    assert_eq!(listed("jobs/a").await, a_ab);
    assert_eq!(listed("jobs/a/img-").await, a[..5].to_vec());
    assert_eq!(listed("jobs/a/sub/").await, ["jobs/a/sub/x.png"]);
    assert_eq!(listed("jobs/b/z.png").await, ["jobs/b/z.png"]);
    assert!(listed("nothing/").await.is_empty());
    assert!(listed("jobs/a/img-9").await.is_empty());

    let empty_bucket = unique_bucket();
    s.create_bucket(&empty_bucket).await.unwrap();
    assert!(s.list(&empty_bucket, "").await.unwrap().is_empty());
}

async fn metadata_round_trip(fx: Fixture) {
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    let metadata: Vec<(String, String)> = [
        ("Prompt", PROMPT),
        ("seed", "42"),
        ("model", "CompVis/stable-diffusion-v1-4"),
        ("odd", " 100% sure,  two spaces\tand a tab "),
        ("percent-escape-lookalike", "%41%zz"),
        ("empty", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    s.put(b, "m/img.png", b"png".to_vec(), "image/png", &metadata)
        .await
        .unwrap();
    let got = s
        .head_metadata(b, "m/img.png")
        .await
        .unwrap()
        .expect("object exists");
    let want: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    // An empty value may or may not survive as a header; everything else must be exact.
    let got_non_empty: HashMap<String, String> = got
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(got_non_empty, want);
    assert_eq!(got["prompt"], PROMPT);

    // Overwriting replaces the metadata; no metadata reads as an empty map.
    s.put(b, "m/img.png", b"png2".to_vec(), "image/png", &[])
        .await
        .unwrap();
    assert_eq!(
        s.head_metadata(b, "m/img.png").await.unwrap(),
        Some(HashMap::new())
    );
    assert_eq!(s.head_metadata(b, "m/missing.png").await.unwrap(), None);
}

async fn invalid_input_is_rejected(fx: Fixture) {
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    for key in [
        "",
        "/abs",
        "a/../b",
        "..",
        "a/./b",
        "a//b",
        "trailing/",
        "back\\slash",
        "nul\0",
        ".sdbatch-meta/x",
    ] {
        assert_permanent(
            &format!("put {key:?}"),
            s.put(b, key, vec![1], "image/png", &[]).await,
        );
        assert_permanent(&format!("get {key:?}"), s.get(b, key).await);
        assert_permanent(&format!("exists {key:?}"), s.exists(b, key).await);
        assert_permanent(&format!("head {key:?}"), s.head_metadata(b, key).await);
    }
    for prefix in ["/", "../", "a//", "a\\"] {
        assert_permanent(&format!("list {prefix:?}"), s.list(b, prefix).await);
    }
    for bucket in ["", "ab", "Upper", "a/b", "../x", "under_score"] {
        assert_permanent(&format!("bucket {bucket:?}"), s.get(bucket, "k").await);
        assert_permanent(&format!("check {bucket:?}"), s.check(bucket).await);
    }
    let too_big = [("prompt".to_owned(), "日本".repeat(200))];
    let err = assert_permanent(
        "big metadata",
        s.put(b, "k", vec![1], "image/png", &too_big).await,
    );
    assert!(err.to_string().contains("2048"), "{err}");
    let bad_key = [("has space".to_owned(), "v".to_owned())];
    assert_permanent(
        "metadata key",
        s.put(b, "k", vec![1], "image/png", &bad_key).await,
    );
    assert_permanent(
        "content type",
        s.put(b, "k", vec![1], "image/pñg", &[]).await,
    );
    assert!(
        !s.exists(b, "k").await.unwrap(),
        "rejected puts must not write"
    );
    assert_eq!(s.retries(), 0, "invalid input must not be retried");
}

async fn bucket_check_and_create(fx: Fixture) {
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    s.check(b).await.unwrap();
    let missing = unique_bucket();
    let err = assert_permanent("check missing bucket", s.check(&missing).await);
    assert_eq!(err.op(), "check");
    // Idempotent.
    s.create_bucket(b).await.unwrap();
    s.create_bucket(&missing).await.unwrap();
    s.check(&missing).await.unwrap();
    assert_eq!(s.list(&missing, "").await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn s3_put_survives_a_server_restart() {
    init_logs();
    let mut server = S3Server::start();
    let policy = RetryPolicy {
        max_attempts: 8,
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    };
    let storage = connect_s3(&server, policy).await;
    let bucket = unique_bucket();
    storage.create_bucket(&bucket).await.unwrap();
    // A first put opens a pooled connection that the kill then breaks.
    storage
        .put(&bucket, "warm.png", vec![0], "image/png", &[])
        .await
        .unwrap();
    server.stop();

    let restarter = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1500));
        server.restart();
        server
    });
    let started = Instant::now();
    let body = png_like(100_000, 3);
    let put = storage
        .put(&bucket, "after-restart.png", body.clone(), "image/png", &[])
        .await;
    let elapsed = started.elapsed();
    let server = restarter.await.expect("restart task");
    put.unwrap_or_else(|e| panic!("put after restart: {e}\nserver log:\n{}", server.log()));
    println!(
        "put succeeded after {elapsed:?} with {} retries",
        storage.retries()
    );
    assert!(storage.retries() > 0);
    assert!(elapsed >= Duration::from_millis(1400), "{elapsed:?}");
    assert_eq!(
        storage.get(&bucket, "after-restart.png").await.unwrap(),
        Some(body)
    );
    // The data folder survived the restart.
    assert!(storage.exists(&bucket, "warm.png").await.unwrap());
}

#[tokio::test]
async fn s3_down_gives_a_transient_error_quickly() {
    init_logs();
    let mut server = S3Server::start();
    let storage = connect_s3(&server, quick_retry()).await;
    let bucket = unique_bucket();
    storage.create_bucket(&bucket).await.unwrap();
    server.stop();

    let started = Instant::now();
    let err = storage
        .put(&bucket, "img.png", vec![1, 2, 3], "image/png", &[])
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    println!("gave up after {elapsed:?}: {err}");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(storage.retries(), 2, "3 attempts = 2 retries");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    // Reads fail the same way; the readiness check makes one attempt.
    assert!(
        storage
            .get(&bucket, "img.png")
            .await
            .unwrap_err()
            .is_transient()
    );
    assert!(storage.list(&bucket, "").await.unwrap_err().is_transient());
    assert_eq!(storage.retries(), 6);
    assert!(storage.check(&bucket).await.unwrap_err().is_transient());
    assert_eq!(storage.retries(), 6);
}

#[tokio::test]
async fn s3_wrong_credentials_are_permanent() {
    let fx = s3_fixture().await;
    let server = fx.server.as_ref().expect("s3 fixture");
    fx.storage
        .put(&fx.bucket, "ok.png", vec![1], "image/png", &[])
        .await
        .unwrap();
    for (what, creds) in [
        (
            "wrong secret",
            StaticCredentials {
                secret_access_key: "not-the-secret".into(),
                ..credentials(server)
            },
        ),
        (
            "unknown access key",
            StaticCredentials {
                access_key_id: "nobody".into(),
                ..credentials(server)
            },
        ),
    ] {
        let storage = Storage::connect_with_credentials(&s3_config(server, quick_retry()), creds)
            .await
            .unwrap();
        let err = assert_permanent(
            what,
            storage
                .put(&fx.bucket, "x.png", vec![1], "image/png", &[])
                .await,
        );
        assert!(err.message().contains("403"), "{what}: {err}");
        // A denied read is an error, not "absent".
        assert_permanent(what, storage.get(&fx.bucket, "ok.png").await);
        assert_permanent(what, storage.exists(&fx.bucket, "ok.png").await);
        assert_permanent(what, storage.check(&fx.bucket).await);
        assert_eq!(
            storage.retries(),
            0,
            "{what}: permanent errors are not retried"
        );
    }
}

#[tokio::test]
async fn s3_describe_hides_secrets() {
    let fx = s3_fixture().await;
    let server = fx.server.as_ref().expect("s3 fixture");
    let description = fx.storage.describe();
    assert!(description.contains(&server.endpoint), "{description}");
    assert!(description.contains("path-style"), "{description}");
    assert!(!description.contains(&server.secret_key), "{description}");
    let debug = format!("{:?}", fx.storage);
    assert!(!debug.contains(&server.secret_key), "{debug}");
    let creds = format!("{:?}", credentials(server));
    assert!(!creds.contains(&server.secret_key), "{creds}");

    // An endpoint carrying credentials is refused outright, without echoing them.
    let mut cfg = s3_config(server, quick_retry());
    cfg.endpoint = Some(format!("http://user:hunter2@127.0.0.1:{}", server.port()));
    let err = assert_permanent("endpoint with credentials", Storage::connect(&cfg).await);
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test]
async fn bad_configs_are_permanent_errors() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "s3://bucket",
        "s3://bucket/prefix",
        "ftp://host/x",
        "not a url",
        "file://host/x",
    ] {
        let err = assert_permanent(url, Storage::connect(&StorageConfig::new(url)).await);
        assert_eq!(err.op(), "connect");
    }
    let mut cfg = StorageConfig::new("s3://");
    cfg.endpoint = Some("localhost:9000".into());
    assert_permanent("endpoint without scheme", Storage::connect(&cfg).await);

    // A file where the root folder should be.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let url = url::Url::from_file_path(&file).unwrap().to_string();
    assert_permanent(
        "root is a file",
        Storage::connect(&StorageConfig::new(url)).await,
    );
}

#[tokio::test]
async fn local_layout_is_clean_and_writes_are_atomic() {
    let fx = local_fixture().await;
    let (s, b) = (&fx.storage, fx.bucket.as_str());
    let dir = fx
        ._dir
        .as_ref()
        .expect("local fixture")
        .path()
        .join("store");
    assert!(
        s.describe().contains(&dir.display().to_string()),
        "{}",
        s.describe()
    );

    let metadata = [("prompt".to_owned(), PROMPT.to_owned())];
    s.put(b, "jobs/1/img.png", b"png".to_vec(), "image/png", &metadata)
        .await
        .unwrap();
    let object = dir.join(b).join("jobs/1/img.png");
    let meta = dir.join(b).join(".sdbatch-meta/jobs/1/img.png.json");
    assert_eq!(std::fs::read(&object).unwrap(), b"png");
    let meta_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta_json["metadata"]["prompt"], PROMPT);
    assert_eq!(meta_json["content_type"], "image/png");
    let leftovers: Vec<_> = std::fs::read_dir(object.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["img.png"], "no temp files left behind");

    // Files dropped in by hand are objects (without metadata); stray temp files are not.
    std::fs::write(dir.join(b).join("jobs/1/by-hand.png"), b"h").unwrap();
    std::fs::write(dir.join(b).join("jobs/1/.sdbatch-tmp.1.2"), b"partial").unwrap();
    assert_eq!(
        s.list(b, "").await.unwrap(),
        ["jobs/1/by-hand.png", "jobs/1/img.png"]
    );
    assert_eq!(
        s.head_metadata(b, "jobs/1/by-hand.png").await.unwrap(),
        Some(HashMap::new())
    );
    // A "folder" is not an object.
    assert!(!s.exists(b, "jobs/1").await.unwrap());
    assert_eq!(s.get(b, "jobs/1").await.unwrap(), None);
    assert_eq!(s.head_metadata(b, "jobs").await.unwrap(), None);

    // A missing bucket is an error for every operation, as on AWS.
    let missing = unique_bucket();
    assert_permanent("put", s.put(&missing, "k", vec![1], "image/png", &[]).await);
    assert_permanent("get", s.get(&missing, "k").await);
    assert_permanent("exists", s.exists(&missing, "k").await);
    assert_permanent("list", s.list(&missing, "").await);
    assert!(!dir.join(&missing).exists(), "no implicit bucket creation");

    // A key cannot be both an object and a folder on disk: a clean error, not a panic.
    assert_permanent(
        "object under an object",
        s.put(b, "jobs/1/img.png/x", vec![1], "image/png", &[])
            .await,
    );
    assert_permanent(
        "object over a folder",
        s.put(b, "jobs/1", vec![1], "image/png", &[]).await,
    );

    // Concurrent overwrites: a reader sees one whole version or the other, never a mix.
    let (v1, v2) = (png_like(1 << 20, 1), png_like(1 << 20, 2));
    s.put(b, "race.png", v1.clone(), "image/png", &[])
        .await
        .unwrap();
    let writer = async {
        for i in 0..20 {
            let body = if i % 2 == 0 { v2.clone() } else { v1.clone() };
            s.put(b, "race.png", body, "image/png", &[]).await.unwrap();
        }
    };
    let reader = async {
        for _ in 0..50 {
            let got = s.get(b, "race.png").await.unwrap().expect("always present");
            assert!(got == v1 || got == v2, "torn read of {} bytes", got.len());
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(writer, reader);
    assert_eq!(s.retries(), 0);
}

#[tokio::test]
async fn s3_hung_server_times_out_as_transient() {
    init_logs();
    // Accepts connections (the kernel backlog does) but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = StorageConfig::new("s3://");
    cfg.endpoint = Some(format!("http://{}", listener.local_addr().unwrap()));
    cfg.retry = RetryPolicy {
        max_attempts: 2,
        ..quick_retry()
    };
    cfg.operation_timeout = Duration::from_millis(300);
    let creds = StaticCredentials {
        access_key_id: "k".into(),
        secret_access_key: "s".into(),
        session_token: None,
    };
    let storage = Storage::connect_with_credentials(&cfg, creds)
        .await
        .unwrap();
    let started = Instant::now();
    let err = storage
        .put("bucket", "k.png", vec![1], "image/png", &[])
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    println!("gave up after {elapsed:?}: {err}");
    assert!(err.is_transient(), "{err}");
    assert!(err.message().contains("timeout"), "{err}");
    assert_eq!(storage.retries(), 1);
    assert!(
        elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}
