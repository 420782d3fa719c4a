//! Object storage for the generated images: an S3-compatible store (AWS S3, MinIO, Garage, s3s-fs)
//! or a local folder with the same semantics, so the worker, its tests and the local demo share one
//! code path.
//!
//! - [`Storage`] is an enum rather than a trait object because its operations are `async fn`s.
//! - Every operation validates its bucket, key and metadata first, the same way for both backends,
//!   so a key that works locally also works against S3 and the other way round.
//! - Data operations retry transient failures in-process with bounded exponential backoff and
//!   jitter ([`RetryPolicy`]); every retry is logged and counted ([`Storage::retries`]).
//! - Errors are split into [`StorageError::Transient`] (worth retrying the job later) and
//!   [`StorageError::Permanent`] (retrying cannot help: bad credentials, missing bucket, bad key).
pub mod local;
pub mod s3;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::keys::segment_problem;

pub use local::LocalStore;
pub use s3::S3Store;

/// The S3 limit on user metadata per object: the UTF-8 bytes of all keys and values together
/// (without the `x-amz-meta-` prefix). Enforced for both backends so the local one does not accept
/// what S3 would refuse.
pub const MAX_METADATA_BYTES: usize = 2048;

/// The S3 limit on key length (UTF-8 bytes).
pub const MAX_KEY_BYTES: usize = 1024;

/// Bounded exponential backoff with jitter for transient storage errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included (1 = no retry; 0 is treated as 1).
    pub max_attempts: usize,
    /// Delay before the first retry; doubles with every retry.
    pub min_delay: Duration,
    /// Upper bound of any single delay, jitter included.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts, 200 ms .. 5 s: rides out a store restart of ~10 s without holding a job for
    /// minutes.
    fn default() -> Self {
        Self {
            max_attempts: 6,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Where and how to store objects.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `s3://` (the bucket is chosen per object) or `file:///abs/path` (one folder per bucket
    /// under the path).
    pub url: String,
    /// S3 endpoint URL for MinIO/Garage/s3s-fs; `None` = AWS.
    pub endpoint: Option<String>,
    /// S3 region; `None` = `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); `None` = true when `endpoint` is set, since
    /// self-hosted stores rarely have wildcard DNS for virtual-hosted buckets.
    pub force_path_style: Option<bool>,
    pub retry: RetryPolicy,
    /// TCP/TLS connect timeout of one attempt.
    pub connect_timeout: Duration,
    /// Time limit of one attempt of one operation, body transfer included.
    pub operation_timeout: Duration,
}

impl StorageConfig {
    /// A config for `url` with the defaults: no endpoint (AWS), `us-east-1`, the default
    /// [`RetryPolicy`], 5 s connect and 60 s operation timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            endpoint: None,
            region: None,
            force_path_style: None,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(60),
        }
    }
}

/// Explicit S3 credentials, for callers that do not want the standard AWS chain (tests, several
/// stores with different keys in one process). `Debug` never prints the secret.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A storage failure. `key` is `bucket/key` (or just the bucket, or the URL for config errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// Network errors, timeouts, HTTP 5xx, throttling: the store may work again later. Returned
    /// once the in-process retries are used up.
    #[error("storage {op} {key}: transient error: {message}")]
    Transient {
        op: &'static str,
        key: String,
        message: String,
    },
    /// HTTP 4xx (access denied, no such bucket, bad request), invalid keys, invalid config:
    /// retrying cannot help.
    #[error("storage {op} {key}: {message}")]
    Permanent {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl StorageError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Transient { .. })
    }

    pub fn op(&self) -> &'static str {
        match self {
            StorageError::Transient { op, .. } | StorageError::Permanent { op, .. } => op,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            StorageError::Transient { message, .. } | StorageError::Permanent { message, .. } => {
                message
            }
        }
    }

    pub(crate) fn permanent(
        op: &'static str,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        StorageError::Permanent {
            op,
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn transient(
        op: &'static str,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        StorageError::Transient {
            op,
            key: key.into(),
            message: message.into(),
        }
    }
}

/// What [`Storage::get_limited`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    Bytes(Vec<u8>),
    /// The object's size, over the limit (its body was not read).
    TooLarge(u64),
}

/// An object store: S3-compatible or a local folder.
#[derive(Debug)]
pub enum Storage {
    S3(s3::S3Store),
    Local(local::LocalStore),
}

impl Storage {
    /// Opens the store named by `cfg.url`. S3 credentials come from the standard AWS chain
    /// (environment, profile, web identity, IMDS…), resolved lazily on the first request.
    pub async fn connect(cfg: &StorageConfig) -> Result<Storage, StorageError> {
        Self::connect_inner(cfg, None).await
    }

    /// Like [`Storage::connect`], with explicit S3 credentials instead of the AWS chain (ignored
    /// by the local backend).
    pub async fn connect_with_credentials(
        cfg: &StorageConfig,
        credentials: StaticCredentials,
    ) -> Result<Storage, StorageError> {
        Self::connect_inner(cfg, Some(credentials)).await
    }

    async fn connect_inner(
        cfg: &StorageConfig,
        credentials: Option<StaticCredentials>,
    ) -> Result<Storage, StorageError> {
        const OP: &str = "connect";
        let invalid = |message: String| StorageError::permanent(OP, redact_url(&cfg.url), message);
        let url = url::Url::parse(&cfg.url).map_err(|e| {
            invalid(format!(
                "invalid storage URL ({e}): expected s3:// or file:///absolute/path"
            ))
        })?;
        match url.scheme() {
            "s3" => {
                // The bucket is chosen per object (the job says where its images go); a bucket or
                // path here would be silently ignored, so refuse it instead.
                let has_location = url.host_str().is_some_and(|h| !h.is_empty())
                    || !(url.path().is_empty() || url.path() == "/");
                if has_location {
                    return Err(invalid(
                        "the s3:// storage URL must not name a bucket or path: the bucket is \
                         chosen per object; use plain s3://"
                            .into(),
                    ));
                }
                Ok(Storage::S3(s3::S3Store::connect(cfg, credentials).await?))
            }
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(invalid(
                        "file:// URLs must not name a host: use file:///abs/path".into(),
                    ));
                }
                let root = url
                    .to_file_path()
                    .map_err(|()| invalid("file:// URL is not an absolute local path".into()))?;
                Ok(Storage::Local(local::LocalStore::connect(root, cfg).await?))
            }
            other => Err(invalid(format!(
                "unsupported storage URL scheme `{other}`: expected s3:// or file:///absolute/path"
            ))),
        }
    }

    /// Sets how many keys [`Storage::list`] asks S3 for per page (S3's maximum and default is
    /// 1000). For tests of the pagination and for stores with smaller limits; the local backend
    /// reads its folders in one pass and ignores it.
    pub fn with_list_page_size(self, page_size: usize) -> Self {
        match self {
            Storage::S3(s) => Storage::S3(s.with_list_page_size(page_size)),
            Storage::Local(l) => Storage::Local(l),
        }
    }

    /// Stores `body` under `bucket/key`, replacing any existing object. Transient errors are
    /// retried per the [`RetryPolicy`]; the put is idempotent, so a retry after a lost response
    /// is harmless. Metadata keys are lowercased (S3 lowercases them anyway).
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(String, String)],
    ) -> Result<(), StorageError> {
        const OP: &str = "put";
        let name = object_name(bucket, key);
        validate_object(OP, bucket, key)?;
        let metadata = normalize_metadata(OP, &name, metadata)?;
        if !content_type.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(StorageError::permanent(
                OP,
                name,
                format!("content type {content_type:?} is not printable ASCII"),
            ));
        }
        match self {
            Storage::S3(s) => s.put(bucket, key, body, content_type, &metadata).await,
            Storage::Local(l) => l.put(bucket, key, body, content_type, &metadata).await,
        }
    }

    /// Deletes `bucket/key`; deleting an object that does not exist is not an error (as in S3).
    /// Used to take back what a batch stored before it was dead-lettered.
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        validate_object("delete", bucket, key)?;
        match self {
            Storage::S3(s) => s.delete(bucket, key).await,
            Storage::Local(l) => l.delete(bucket, key).await,
        }
    }

    /// The object's bytes, or `None` when it does not exist.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        validate_object("get", bucket, key)?;
        match self {
            Storage::S3(s) => s.get(bucket, key).await,
            Storage::Local(l) => l.get(bucket, key).await,
        }
    }

    /// The object's bytes if it has at most `max_bytes`, [`Limited::TooLarge`] (its size) if it
    /// has more, or `None` when it does not exist. The size is checked before the body is read,
    /// so an oversized object is never downloaded (nor held in memory).
    pub async fn get_limited(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
    ) -> Result<Option<Limited>, StorageError> {
        validate_object("get", bucket, key)?;
        match self {
            Storage::S3(s) => s.get_limited(bucket, key, max_bytes).await,
            Storage::Local(l) => l.get_limited(bucket, key, max_bytes).await,
        }
    }

    pub async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StorageError> {
        validate_object("exists", bucket, key)?;
        match self {
            Storage::S3(s) => s.exists(bucket, key).await,
            Storage::Local(l) => l.exists(bucket, key).await,
        }
    }

    /// All keys starting with `prefix` (plain prefix match, no delimiter), sorted bytewise, all
    /// pages read.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StorageError> {
        const OP: &str = "list";
        validate_bucket(OP, bucket)?;
        validate_prefix(OP, bucket, prefix)?;
        let mut keys = match self {
            Storage::S3(s) => s.list(bucket, prefix).await?,
            Storage::Local(l) => l.list(bucket, prefix).await?,
        };
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// The object's user metadata (keys lowercase, values as given to [`Storage::put`]), or
    /// `None` when the object does not exist.
    ///
    /// Against S3 a missing bucket also reads as `None`: HEAD responses have no body to tell
    /// "no such bucket" from "no such key".
    pub async fn head_metadata(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<HashMap<String, String>>, StorageError> {
        validate_object("head", bucket, key)?;
        match self {
            Storage::S3(s) => s.head_metadata(bucket, key).await,
            Storage::Local(l) => l.head_metadata(bucket, key).await,
        }
    }

    /// Readiness: the bucket exists and is reachable with our credentials. One attempt, no
    /// retries: a probe must answer quickly, and its caller asks again anyway.
    pub async fn check(&self, bucket: &str) -> Result<(), StorageError> {
        validate_bucket("check", bucket)?;
        match self {
            Storage::S3(s) => s.check(bucket).await,
            Storage::Local(l) => l.check(bucket).await,
        }
    }

    /// Creates the bucket; succeeds when it already exists and is ours. For tests and the local
    /// demo: production buckets are provisioned outside the worker.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        validate_bucket("create_bucket", bucket)?;
        match self {
            Storage::S3(s) => s.create_bucket(bucket).await,
            Storage::Local(l) => l.create_bucket(bucket).await,
        }
    }

    /// How many retries (attempts after a transient failure) all operations made so far.
    pub fn retries(&self) -> u64 {
        match self {
            Storage::S3(s) => s.retrier().retries(),
            Storage::Local(l) => l.retrier().retries(),
        }
    }

    /// A one-line description for logs; never contains credentials.
    pub fn describe(&self) -> String {
        match self {
            Storage::S3(s) => s.describe(),
            Storage::Local(l) => l.describe(),
        }
    }
}

/// Runs operations with the [`RetryPolicy`] and counts the retries.
#[derive(Debug)]
pub(crate) struct Retrier {
    policy: RetryPolicy,
    retries: AtomicU64,
}

impl Retrier {
    pub(crate) fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            retries: AtomicU64::new(0),
        }
    }

    pub(crate) fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Runs `attempt` until it succeeds, fails permanently, or `max_attempts` are used up.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        attempt: F,
    ) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let max_attempts = self.policy.max_attempts.max(1);
        let max_delay = self.policy.max_delay.max(self.policy.min_delay);
        // backon counts retries, not attempts. Its jitter adds up to +100 % to each delay; the
        // `adjust` below clamps the result so `max_delay` stays a real bound.
        let backoff = ExponentialBuilder::default()
            .with_factor(2.0)
            .with_min_delay(self.policy.min_delay)
            .with_max_delay(max_delay)
            .with_max_times(max_attempts - 1)
            .with_jitter();
        let mut attempts = 1usize;
        let result = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(StorageError::is_transient)
            .adjust(|_, delay| delay.map(|d| d.min(max_delay)))
            .notify(|err, delay| {
                self.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    op,
                    key,
                    attempt = attempts,
                    max_attempts,
                    delay_ms = delay.as_millis() as u64,
                    error = %err.message(),
                    "storage: transient error, retrying"
                );
                attempts += 1;
            })
            .await;
        result.map_err(|err| match err {
            StorageError::Transient { op, key, message } if attempts > 1 => {
                StorageError::Transient {
                    op,
                    key,
                    message: format!("{message} (gave up after {attempts} attempts)"),
                }
            }
            other => other,
        })
    }
}

pub(crate) fn object_name(bucket: &str, key: &str) -> String {
    format!("{bucket}/{key}")
}

/// Bucket names as S3 allows them (3–63 of `a-z 0-9 . -`, starting and ending with a letter or
/// digit, no `..`); also what makes them safe as a folder name for the local backend.
pub(crate) fn validate_bucket(op: &'static str, bucket: &str) -> Result<(), StorageError> {
    let bytes = bucket.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let valid = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'-')
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && !bucket.contains("..");
    if valid {
        Ok(())
    } else {
        Err(StorageError::permanent(
            op,
            bucket,
            "invalid bucket name: expected 3-63 characters of a-z, 0-9, '.', '-', starting and \
             ending with a letter or digit",
        ))
    }
}

/// Keys must map onto a relative file path without surprises: no leading `/`, no empty, `.` or
/// `..` segments, no backslashes or NUL, no reserved `.sdbatch-` segments, at most 1024 bytes.
pub(crate) fn validate_key(op: &'static str, bucket: &str, key: &str) -> Result<(), StorageError> {
    let reason = if key.is_empty() {
        Some("empty key")
    } else if key.len() > MAX_KEY_BYTES {
        Some("key longer than 1024 bytes")
    } else if key.starts_with('/') {
        Some("key starts with '/'")
    } else if key.contains('\\') {
        Some("key contains a backslash")
    } else if key.chars().any(char::is_control) {
        Some("key contains NUL or another control character")
    } else {
        key.split('/').find_map(segment_problem)
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(StorageError::permanent(
            op,
            object_name(bucket, key),
            format!("invalid key: {reason}"),
        )),
    }
}

fn validate_object(op: &'static str, bucket: &str, key: &str) -> Result<(), StorageError> {
    validate_bucket(op, bucket)?;
    validate_key(op, bucket, key)
}

/// A list prefix may stop anywhere (mid-segment, after a `/`), but its complete segments must be
/// valid key segments and it must not contain what no key can.
pub(crate) fn validate_prefix(
    op: &'static str,
    bucket: &str,
    prefix: &str,
) -> Result<(), StorageError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let mut segments: Vec<&str> = prefix.split('/').collect();
    // The last segment is partial ("img-0" of "jobs/img-0…"); only the complete ones are checked.
    segments.pop();
    let reason = if prefix.len() > MAX_KEY_BYTES {
        Some("prefix longer than 1024 bytes")
    } else if prefix.starts_with('/') {
        Some("prefix starts with '/'")
    } else if prefix.contains('\\') {
        Some("prefix contains a backslash")
    } else if prefix.chars().any(char::is_control) {
        Some("prefix contains NUL or another control character")
    } else {
        segments.into_iter().find_map(segment_problem)
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(StorageError::permanent(
            op,
            object_name(bucket, prefix),
            format!("invalid prefix: {reason}"),
        )),
    }
}

/// Lowercases metadata keys and checks them (`a-z 0-9 - _ .`, unique) and the S3 size limit
/// (measured on the values as sent, i.e. percent-encoded).
pub(crate) fn normalize_metadata(
    op: &'static str,
    name: &str,
    metadata: &[(String, String)],
) -> Result<Vec<(String, String)>, StorageError> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(metadata.len());
    let mut size = 0usize;
    for (key, value) in metadata {
        let key = key.to_ascii_lowercase();
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !key_ok {
            return Err(StorageError::permanent(
                op,
                name,
                format!(
                    "invalid metadata key {key:?}: expected ASCII letters, digits, '-', '_', '.'"
                ),
            ));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(StorageError::permanent(
                op,
                name,
                format!("duplicate metadata key {key:?} (keys are case-insensitive)"),
            ));
        }
        size += key.len() + encode_metadata_value(value).len();
        out.push((key, value.clone()));
    }
    if size > MAX_METADATA_BYTES {
        return Err(StorageError::permanent(
            op,
            name,
            format!(
                "user metadata is {size} bytes once encoded; S3 allows {MAX_METADATA_BYTES} \
                 (store long values such as prompts in the object or a sidecar instead)"
            ),
        ));
    }
    Ok(out)
}

/// Makes a metadata value safe for an HTTP header and SigV4 signing: bytes outside printable
/// ASCII, `%` itself, and spaces that HTTP or SigV4 canonicalisation would trim or collapse
/// (leading, trailing, repeated) become `%XX` (UTF-8 bytes). Plain ASCII prompts stay readable.
pub(crate) fn encode_metadata_value(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        let keep = match b {
            b'%' => false,
            b' ' => i > 0 && i + 1 < bytes.len() && bytes[i - 1] != b' ' && bytes[i + 1] != b' ',
            0x21..=0x7e => true,
            _ => false,
        };
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode_metadata_value`]. Values written by other tools may hold a stray `%`: a `%`
/// not followed by two hex digits is kept as is, and if the decoded bytes are not UTF-8 the raw
/// value is returned unchanged.
pub(crate) fn decode_metadata_value(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            // Both digits are < 16, so the byte cannot overflow.
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_owned())
}

/// The URL without user info, query or fragment, for error messages and logs.
pub(crate) fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            // Both setters only fail for URLs that cannot have credentials; nothing to hide then.
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        // Unparseable: it may still embed a secret, so do not echo it.
        Err(_) => "<invalid URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_values_round_trip() {
        for value in [
            "a cat",
            "café 🎨 日本",
            "100% sure",
            "%41",
            " lead",
            "trail ",
            "two  spaces",
            "tab\there",
            "",
            " ",
        ] {
            let encoded = encode_metadata_value(value);
            assert!(
                encoded
                    .bytes()
                    .all(|b| (0x21..0x7f).contains(&b) || b == b' '),
                "{encoded:?}"
            );
            assert!(
                !encoded.starts_with(' ') && !encoded.ends_with(' ') && !encoded.contains("  ")
            );
            assert_eq!(decode_metadata_value(&encoded), value, "{encoded:?}");
        }
        assert_eq!(encode_metadata_value("a cat"), "a cat");
        assert_eq!(encode_metadata_value("café"), "caf%C3%A9");
        // Foreign values with stray '%' survive decoding.
        assert_eq!(decode_metadata_value("100%"), "100%");
        assert_eq!(decode_metadata_value("%zz"), "%zz");
        assert_eq!(decode_metadata_value("%FF"), "%FF");
    }

    #[test]
    fn keys_are_validated() {
        for ok in ["a", "a/b.png", "jobs/1/img-0.png", "..a/b..", "a/.hidden"] {
            assert!(validate_key("t", "bucket", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/../b",
            "a/.",
            "./a",
            "a\\b",
            "a\0b",
            ".sdbatch-meta/x",
            "a/.sdbatch-tmp.1",
        ] {
            let err = validate_key("t", "bucket", bad).unwrap_err();
            assert!(!err.is_transient(), "{bad}");
        }
        assert!(validate_key("t", "bucket", &"a".repeat(1025)).is_err());
    }

    #[test]
    fn prefixes_and_buckets_are_validated() {
        for ok in ["", "a", "a/", "a/b", "a/.", "a/..x"] {
            assert!(validate_prefix("t", "bucket", ok).is_ok(), "{ok}");
        }
        for bad in ["/a", "a//", "../", "a/../b", "a\\", ".sdbatch-meta/"] {
            assert!(validate_prefix("t", "bucket", bad).is_err(), "{bad}");
        }
        for ok in ["abc", "my-bucket.1", "0ab"] {
            assert!(validate_bucket("t", ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "Abc",
            "a_b",
            "-ab",
            "ab-",
            "a..b",
            "a/b",
            &"a".repeat(64),
        ] {
            assert!(validate_bucket("t", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_is_normalized_and_bounded() {
        let md = vec![("Prompt".to_owned(), "x".to_owned())];
        assert_eq!(
            normalize_metadata("t", "b/k", &md).unwrap(),
            vec![("prompt".to_owned(), "x".to_owned())]
        );
        let dup = vec![
            ("a".to_owned(), "1".to_owned()),
            ("A".to_owned(), "2".to_owned()),
        ];
        assert!(normalize_metadata("t", "b/k", &dup).is_err());
        let bad = vec![("a b".to_owned(), "1".to_owned())];
        assert!(normalize_metadata("t", "b/k", &bad).is_err());
        // 700 × "é" is 1400 UTF-8 bytes but 4200 once percent-encoded.
        let big = vec![("prompt".to_owned(), "é".repeat(700))];
        assert!(normalize_metadata("t", "b/k", &big).is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("http://user:secret@host:9000/?X-Amz-Signature=s"),
            "http://host:9000/"
        );
        assert_eq!(redact_url("not a url"), "<invalid URL>");
    }

    #[tokio::test]
    async fn retrier_counts_and_stops() {
        let retrier = Retrier::new(RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(15),
        });
        let mut calls = 0;
        let err = retrier
            .run("put", "b/k", || {
                calls += 1;
                async { Err::<(), _>(StorageError::transient("put", "b/k", "down")) }
            })
            .await
            .unwrap_err();
        assert_eq!(calls, 3);
        assert_eq!(retrier.retries(), 2);
        assert!(err.is_transient());
        assert!(err.message().contains("after 3 attempts"), "{err}");

        // Permanent errors are not retried.
        let mut calls = 0;
        let err = retrier
            .run("put", "b/k", || {
                calls += 1;
                async { Err::<(), _>(StorageError::permanent("put", "b/k", "denied")) }
            })
            .await
            .unwrap_err();
        assert_eq!((calls, retrier.retries()), (1, 2));
        assert_eq!(err.message(), "denied");
    }
}
