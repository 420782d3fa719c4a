//! The S3 backend (aws-sdk-s3), for AWS S3 and S3-compatible stores (MinIO, Garage, s3s-fs).
//!
//! The SDK's own retries are disabled: [`Retrier`] retries with our policy, logs and counts every
//! retry, and classifies errors into transient and permanent ones ([`classify`]).
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};

use super::{
    Limited, Retrier, StaticCredentials, StorageConfig, StorageError, decode_metadata_value,
    encode_metadata_value, object_name, redact_url,
};

const DEFAULT_REGION: &str = "us-east-1";
/// S3's maximum (and default) page size of ListObjectsV2.
const MAX_LIST_PAGE_SIZE: usize = 1000;

pub struct S3Store {
    client: Client,
    retrier: Retrier,
    region: String,
    list_page_size: i32,
    description: String,
}

impl fmt::Debug for S3Store {
    // The client's config holds the credentials provider: print only the redacted description.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("description", &self.description)
            .field("retrier", &self.retrier)
            .finish_non_exhaustive()
    }
}

/// Why `endpoint` cannot be an S3 endpoint URL. The SDK would accept user info, a query or a
/// fragment, and the endpoint then appears in request errors and `batch.failed` events, secrets
/// and all. Credentials belong in the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ...).
/// The reasons never quote the URL.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    const NOT_HTTP: &str = "expected an http:// or https:// URL";
    let url = url::Url::parse(endpoint).map_err(|_| NOT_HTTP)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(NOT_HTTP);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL names no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the URL must not contain credentials (user:password@); give the keys in \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or another source of the AWS chain",
        );
    }
    if url.query().is_some() {
        return Err("the URL must not have a query (?...)");
    }
    if url.fragment().is_some() {
        return Err("the URL must not have a fragment (#...)");
    }
    Ok(())
}

/// Scheme, host and port of a rejected endpoint, to name it in the error: its path, like its
/// user info and query, may carry a token.
fn endpoint_origin(endpoint: &str) -> String {
    match url::Url::parse(endpoint).map(|u| u.origin()) {
        Ok(origin) if origin.is_tuple() => origin.ascii_serialization(),
        _ => "<S3 endpoint>".to_owned(),
    }
}

impl S3Store {
    pub(crate) async fn connect(
        cfg: &StorageConfig,
        credentials: Option<StaticCredentials>,
    ) -> Result<Self, StorageError> {
        const OP: &str = "connect";
        if let Some(endpoint) = &cfg.endpoint {
            // Checked here rather than failing every request later with a construction error.
            check_endpoint(endpoint).map_err(|why| {
                StorageError::permanent(
                    OP,
                    endpoint_origin(endpoint),
                    format!("invalid S3 endpoint: {why}"),
                )
            })?;
        }
        let region = cfg
            .region
            .clone()
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let path_style = cfg.force_path_style.unwrap_or(cfg.endpoint.is_some());
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(cfg.connect_timeout)
            .operation_timeout(cfg.operation_timeout)
            .operation_attempt_timeout(cfg.operation_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            // We retry with backon (our policy, our logs, our retry counter); SDK retries would
            // multiply the attempts and hide them.
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        let credential_source = match credentials {
            Some(c) => {
                loader = loader.credentials_provider(Credentials::new(
                    c.access_key_id,
                    c.secret_access_key,
                    c.session_token,
                    None,
                    "sdbatch-static",
                ));
                "static keys"
            }
            // Left to the standard chain: env AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/
            // AWS_SESSION_TOKEN, profile, web identity, ECS, IMDS.
            None => "the AWS default chain",
        };
        let shared = loader.load().await;
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(path_style)
            // Since aws-sdk-s3 1.69 the SDK adds CRC32 checksums to every upload by default, sent
            // as a trailer of an aws-chunked streaming body, and validates response checksums.
            // Garage (and other S3 clones) reject those streaming uploads; computing checksums only
            // where an operation requires them keeps plain signed PUTs that every store accepts.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &cfg.endpoint {
            s3 = s3.endpoint_url(endpoint);
        }
        let description = format!(
            "s3 (endpoint {}, region {region}, {} addressing, credentials from {credential_source})",
            cfg.endpoint
                .as_deref()
                .map_or_else(|| "AWS".to_owned(), redact_url),
            if path_style {
                "path-style"
            } else {
                "virtual-hosted"
            },
        );
        Ok(Self {
            client: Client::from_conf(s3.build()),
            retrier: Retrier::new(cfg.retry.clone()),
            region,
            list_page_size: MAX_LIST_PAGE_SIZE as i32,
            description,
        })
    }

    pub(crate) fn with_list_page_size(mut self, page_size: usize) -> Self {
        // Clamped to 1..=1000, so the conversion cannot truncate.
        self.list_page_size = page_size.clamp(1, MAX_LIST_PAGE_SIZE) as i32;
        self
    }

    pub(crate) fn retrier(&self) -> &Retrier {
        &self.retrier
    }

    pub(crate) fn describe(&self) -> String {
        self.description.clone()
    }

    pub(crate) async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(String, String)],
    ) -> Result<(), StorageError> {
        const OP: &str = "put";
        let name = &object_name(bucket, key);
        // An in-memory body: each attempt clones it cheaply (shared bytes), no copy of the image.
        let body = &SdkBody::from(body);
        let metadata: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), encode_metadata_value(v)))
            .collect();
        let metadata = &metadata;
        self.retrier
            .run(OP, name, || async move {
                let body = body.try_clone().ok_or_else(|| {
                    StorageError::permanent(OP, name, "request body cannot be replayed")
                })?;
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(ByteStream::new(body))
                    .set_content_type((!content_type.is_empty()).then(|| content_type.to_owned()))
                    .set_metadata((!metadata.is_empty()).then(|| metadata.clone()))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(OP, name, e))
            })
            .await
    }

    pub(crate) async fn delete(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        const OP: &str = "delete";
        let name = &object_name(bucket, key);
        self.retrier
            .run(OP, name, || async move {
                self.client
                    .delete_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(OP, name, e))
            })
            .await
    }

    pub(crate) async fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        const OP: &str = "get";
        let name = &object_name(bucket, key);
        self.retrier
            .run(OP, name, || async move {
                let out = match self
                    .client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(out) => out,
                    // AWS answers NoSuchBucket with 404 too; that one is an error, not "absent".
                    Err(e) if status(&e) == Some(404) && e.code() != Some("NoSuchBucket") => {
                        return Ok(None);
                    }
                    Err(e) => return Err(classify(OP, name, e)),
                };
                // The body streams after the headers: a connection lost here is transient.
                let bytes = out.body.collect().await.map_err(|e| {
                    StorageError::transient(
                        OP,
                        name,
                        format!("reading the body failed: {}", error_chain(&e)),
                    )
                })?;
                Ok(Some(bytes.to_vec()))
            })
            .await
    }

    pub(crate) async fn get_limited(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
    ) -> Result<Option<Limited>, StorageError> {
        const OP: &str = "get";
        let name = &object_name(bucket, key);
        self.retrier
            .run(OP, name, || async move {
                let out = match self
                    .client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(out) => out,
                    Err(e) if status(&e) == Some(404) && e.code() != Some("NoSuchBucket") => {
                        return Ok(None);
                    }
                    Err(e) => return Err(classify(OP, name, e)),
                };
                // The declared length first: an oversized object is dropped unread.
                let declared = out.content_length().map_or(0, |n| n.max(0) as u64);
                if declared > max_bytes {
                    return Ok(Some(Limited::TooLarge(declared)));
                }
                // And the bytes as they stream, in case the length was absent or wrong.
                let mut body = out.body;
                let mut bytes = Vec::with_capacity(declared as usize);
                while let Some(chunk) = body.try_next().await.map_err(|e| {
                    StorageError::transient(
                        OP,
                        name,
                        format!("reading the body failed: {}", error_chain(&e)),
                    )
                })? {
                    if (bytes.len() + chunk.len()) as u64 > max_bytes {
                        return Ok(Some(Limited::TooLarge((bytes.len() + chunk.len()) as u64)));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(Some(Limited::Bytes(bytes)))
            })
            .await
    }

    pub(crate) async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StorageError> {
        Ok(self.head("exists", bucket, key).await?.is_some())
    }

    pub(crate) async fn head_metadata(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<HashMap<String, String>>, StorageError> {
        self.head("head", bucket, key).await
    }

    /// HeadObject: the decoded user metadata, or `None` on 404.
    async fn head(
        &self,
        op: &'static str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<HashMap<String, String>>, StorageError> {
        let name = &object_name(bucket, key);
        self.retrier
            .run(op, name, || async move {
                match self
                    .client
                    .head_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(out) => Ok(Some(
                        out.metadata()
                            .into_iter()
                            .flatten()
                            .map(|(k, v)| (k.to_ascii_lowercase(), decode_metadata_value(v)))
                            .collect(),
                    )),
                    // HEAD responses have no body, so "no such bucket" also reads as absent.
                    Err(e) if status(&e) == Some(404) => Ok(None),
                    Err(e) => Err(classify(op, name, e)),
                }
            })
            .await
    }

    pub(crate) async fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<String>, StorageError> {
        const OP: &str = "list";
        let name = &object_name(bucket, prefix);
        // Each page is retried on its own, so a blip on page 7 does not restart the listing.
        collect_pages(OP, name, |token| async move {
            self.retrier
                .run(OP, name, move || {
                    self.list_page(OP, name, bucket, prefix, token.clone())
                })
                .await
        })
        .await
    }

    async fn list_page(
        &self,
        op: &'static str,
        name: &str,
        bucket: &str,
        prefix: &str,
        token: Option<String>,
    ) -> Result<Page, StorageError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .set_prefix((!prefix.is_empty()).then(|| prefix.to_owned()))
            .max_keys(self.list_page_size)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| classify(op, name, e))?;
        let keys: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect();
        let next = if out.is_truncated() == Some(true) {
            match out.next_continuation_token() {
                Some(t) if !t.is_empty() => Some(t.to_owned()),
                _ => {
                    return Err(StorageError::permanent(
                        op,
                        name,
                        "the store returned a truncated listing without a continuation token",
                    ));
                }
            }
        } else {
            None
        };
        tracing::debug!(
            op,
            key = name,
            keys = keys.len(),
            more = next.is_some(),
            "storage: listed a page"
        );
        Ok(Page { keys, next })
    }

    pub(crate) async fn check(&self, bucket: &str) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("check", bucket, e))
    }

    pub(crate) async fn create_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        const OP: &str = "create_bucket";
        self.retrier
            .run(OP, bucket, || async move {
                let mut req = self.client.create_bucket().bucket(bucket);
                // AWS wants the region spelt out everywhere but in us-east-1.
                if self.region != DEFAULT_REGION {
                    req = req.create_bucket_configuration(
                        CreateBucketConfiguration::builder()
                            .location_constraint(BucketLocationConstraint::from(
                                self.region.as_str(),
                            ))
                            .build(),
                    );
                }
                let err = match req.send().await {
                    Ok(_) => return Ok(()),
                    Err(e) => e,
                };
                match err.code() {
                    // Ours already, e.g. a retry after a lost response.
                    Some("BucketAlreadyOwnedByYou") => Ok(()),
                    // AWS means "someone else's", but s3s-fs (and some clones) say this for our
                    // own bucket too: it is ours if we can HEAD it.
                    Some("BucketAlreadyExists")
                        if self
                            .client
                            .head_bucket()
                            .bucket(bucket)
                            .send()
                            .await
                            .is_ok() =>
                    {
                        Ok(())
                    }
                    _ => Err(classify(OP, bucket, err)),
                }
            })
            .await
    }
}

/// One page of a listing; `next` is the continuation token when there are more.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub(crate) keys: Vec<String>,
    pub(crate) next: Option<String>,
}

/// Reads pages until one has no continuation token. A token seen before means the store is
/// looping: fail instead of listing forever.
pub(crate) async fn collect_pages<F, Fut>(
    op: &'static str,
    name: &str,
    mut fetch: F,
) -> Result<Vec<String>, StorageError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<Page, StorageError>>,
{
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    let mut token = None;
    loop {
        let page = fetch(token.take()).await?;
        keys.extend(page.keys);
        match page.next {
            None => return Ok(keys),
            Some(next) if !seen.insert(next.clone()) => {
                return Err(StorageError::permanent(
                    op,
                    name,
                    format!("the store repeated the continuation token {next:?}"),
                ));
            }
            Some(next) => token = Some(next),
        }
    }
}

fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Transient: no response (connect errors, resets, timeouts), unparseable responses, HTTP 5xx,
/// 408, 429 and throttling codes. Permanent: requests that cannot be built and the other 4xx
/// (bad credentials or signature → 403, no such bucket → 404, wrong region → 301/400).
pub(crate) fn classify<E>(
    op: &'static str,
    name: &str,
    err: SdkError<E, HttpResponse>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ConstructionFailure(_) => StorageError::permanent(
            op,
            name,
            format!("cannot build the request: {}", error_chain(&err)),
        ),
        // A connector "user" error is a bad request/config (e.g. an invalid URL), not the network.
        SdkError::DispatchFailure(f) if f.is_user() => {
            StorageError::permanent(op, name, error_chain(&err))
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = err.code().unwrap_or_default();
            let message = match (code, err.message()) {
                ("", _) => format!("HTTP {status}{}", status_hint(status)),
                (code, Some(msg)) if !msg.is_empty() => format!("HTTP {status} {code}: {msg}"),
                (code, _) => format!("HTTP {status} {code}"),
            };
            let throttled = matches!(
                code,
                "SlowDown"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestLimitExceeded"
                    | "RequestTimeout"
                    | "InternalError"
                    | "ServiceUnavailable"
            );
            if status >= 500 || status == 408 || status == 429 || throttled {
                StorageError::transient(op, name, message)
            } else {
                StorageError::permanent(op, name, message)
            }
        }
        // TimeoutError, DispatchFailure (connect refused, reset, DNS, connect timeout),
        // ResponseError, and any variant added later: worth another try.
        _ => StorageError::transient(op, name, error_chain(&err)),
    }
}

/// The error and its causes, `: `-joined ("dispatch failure: io error: client error (Connect):
/// tcp connect error: Connection refused (os error 111)"). Unlike `DisplayErrorContext` it leaves
/// out the trailing `Debug` dump, which makes log lines unreadable.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let part = e.to_string();
        // Some layers repeat their source's text; keep each message once.
        if !parts.last().is_some_and(|last| last.contains(&part)) {
            parts.push(part);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// HEAD errors carry no body, hence no code: say what the status usually means.
fn status_hint(status: u16) -> &'static str {
    match status {
        301 | 307 => " (redirect: wrong region or endpoint for this bucket)",
        400 => " (bad request)",
        403 => " (access denied: check the credentials and the bucket policy)",
        404 => " (no such bucket or key)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_with_secrets_or_without_a_host_are_refused_at_connect() {
        let cases = [
            ("http://user:s3cret@127.0.0.1:9000", "credentials"),
            ("http://s3cret@127.0.0.1:9000", "credentials"),
            ("https://127.0.0.1:9000/?X-Amz-Signature=s3cret", "query"),
            ("https://127.0.0.1:9000/#s3cret", "fragment"),
            ("ftp://127.0.0.1/s3cret", "http:// or https://"),
            ("unix:/run/s3cret", "http:// or https://"),
            ("http://u:s3cret@/", "http:// or https://"),
            ("127.0.0.1:9000", "http:// or https://"),
        ];
        for (endpoint, why) in cases {
            let mut cfg = StorageConfig::new("s3://");
            cfg.endpoint = Some(endpoint.to_owned());
            let err = S3Store::connect(&cfg, None).await.unwrap_err();
            let text = err.to_string();
            assert!(!err.is_transient(), "{text}");
            assert!(text.contains("invalid S3 endpoint"), "{text}");
            assert!(text.contains(why), "{endpoint}: {text}");
            assert!(!text.contains("s3cret"), "{endpoint} leaked: {text}");
        }
        for endpoint in ["http://127.0.0.1:9000", "https://s3.example.com/base/path"] {
            assert_eq!(check_endpoint(endpoint), Ok(()), "{endpoint}");
        }
    }

    #[tokio::test]
    async fn pages_are_concatenated_until_the_last() {
        let pages = [
            (None, vec!["a", "b"], Some("t1")),
            (Some("t1"), vec!["c", "d"], Some("t2")),
            (Some("t2"), vec!["e"], None),
        ];
        let mut calls = 0;
        let keys = collect_pages("list", "b/", |token| {
            let (expected, keys, next) = &pages[calls];
            calls += 1;
            assert_eq!(token.as_deref(), *expected);
            let page = Page {
                keys: keys.iter().map(|k| k.to_string()).collect(),
                next: next.map(str::to_owned),
            };
            async move { Ok(page) }
        })
        .await
        .unwrap();
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn a_repeated_token_stops_the_listing() {
        let err = collect_pages("list", "b/", |_| async {
            Ok(Page {
                keys: vec!["a".into()],
                next: Some("same".into()),
            })
        })
        .await
        .unwrap_err();
        assert!(!err.is_transient());
        assert!(err.message().contains("repeated"), "{err}");
    }

    #[tokio::test]
    async fn page_errors_propagate() {
        let err = collect_pages("list", "b/", |_| async {
            Err(StorageError::transient("list", "b/", "down"))
        })
        .await
        .unwrap_err();
        assert!(err.is_transient());
    }
}
