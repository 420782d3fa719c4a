//! The local-folder backend (`file:///abs/path`): object `bucket/key` is the file
//! `<path>/<bucket>/<key>`, so outputs can be browsed directly; its metadata lives apart, in
//! `<path>/<bucket>/.sdbatch-meta/<key>.json`, to keep the object namespace clean.
//!
//! Differences from S3 that callers may notice: a key cannot be both an object and a "folder" of
//! other keys (`a` and `a/b`), and symbolic links inside a bucket are not listed.
use std::collections::{BTreeMap, HashMap};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::fs;
use tokio::io::AsyncWriteExt;

use super::{Limited, Retrier, StorageConfig, StorageError, object_name, validate_key};
use crate::keys::RESERVED_SEGMENT_PREFIX;

/// Per-bucket folder holding the metadata files (a reserved name: no key may start with it).
const META_DIR: &str = ".sdbatch-meta";
/// Temporary files are written next to their target and renamed over it (reserved as well).
const TMP_PREFIX: &str = ".sdbatch-tmp.";

/// What `<key>.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct MetaFile {
    content_type: String,
    metadata: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    retrier: Retrier,
    tmp_counter: AtomicU64,
}

impl LocalStore {
    /// Opens (creating if needed) the root folder. Buckets are not created implicitly, as with
    /// S3: writing to a missing bucket is a permanent error.
    pub(crate) async fn connect(root: PathBuf, cfg: &StorageConfig) -> Result<Self, StorageError> {
        const OP: &str = "connect";
        let name = root.display().to_string();
        fs::create_dir_all(&root)
            .await
            .map_err(|e| io_error(OP, &name, "cannot create storage folder", &root, e))?;
        Ok(Self {
            root,
            retrier: Retrier::new(cfg.retry.clone()),
            tmp_counter: AtomicU64::new(0),
        })
    }

    pub(crate) fn retrier(&self) -> &Retrier {
        &self.retrier
    }

    pub(crate) fn describe(&self) -> String {
        format!("local folder {}", self.root.display())
    }

    fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    fn meta_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.bucket_dir(bucket)
            .join(META_DIR)
            .join(format!("{key}.json"))
    }

    /// The bucket's folder, or a permanent error when it is missing (like S3's NoSuchBucket).
    async fn require_bucket(
        &self,
        op: &'static str,
        bucket: &str,
    ) -> Result<PathBuf, StorageError> {
        let dir = self.bucket_dir(bucket);
        match fs::metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(StorageError::permanent(
                op,
                bucket,
                format!("bucket path {} is not a folder", dir.display()),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StorageError::permanent(
                op,
                bucket,
                format!("no such bucket: folder {} does not exist", dir.display()),
            )),
            Err(e) => Err(io_error(op, bucket, "cannot read bucket folder", &dir, e)),
        }
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
        let name = object_name(bucket, key);
        let meta = MetaFile {
            content_type: content_type.to_owned(),
            metadata: metadata.iter().cloned().collect(),
        };
        let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| {
            StorageError::permanent(OP, &name, format!("cannot encode metadata: {e}"))
        })?;
        // The attempts borrow these; `async move` copies the references into each attempt.
        let (name, meta_json, body) = (&name, &meta_json, &body);
        self.retrier
            .run(OP, name, || async move {
                let dir = self.require_bucket(OP, bucket).await?;
                // Metadata first: a reader that sees the new object also sees its metadata.
                self.write_atomic(OP, name, &self.meta_path(bucket, key), meta_json)
                    .await?;
                self.write_atomic(OP, name, &dir.join(key), body).await
            })
            .await
    }

    /// Writes `data` to a temporary file in the target's folder, syncs it, and renames it over the
    /// target: readers see the old or the new file, never a partial one, even across a crash.
    async fn write_atomic(
        &self,
        op: &'static str,
        name: &str,
        path: &Path,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let parent = path.parent().ok_or_else(|| {
            StorageError::permanent(op, name, format!("{} has no parent folder", path.display()))
        })?;
        fs::create_dir_all(parent)
            .await
            .map_err(|e| io_error(op, name, "cannot create folder", parent, e))?;
        let tmp = parent.join(format!(
            "{TMP_PREFIX}{}.{}",
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let written = async {
            let mut file = fs::File::create(&tmp).await?;
            file.write_all(data).await?;
            file.flush().await?;
            file.sync_all().await?;
            drop(file);
            fs::rename(&tmp, path).await
        }
        .await;
        if let Err(e) = written {
            // Best effort: the write already failed; a leftover temp file is ignored by `list`.
            let _ = fs::remove_file(&tmp).await;
            return Err(io_error(op, name, "cannot write", path, e));
        }
        Ok(())
    }

    pub(crate) async fn delete(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        const OP: &str = "delete";
        let name = &object_name(bucket, key);
        self.retrier
            .run(OP, name, || async move {
                let path = self.require_bucket(OP, bucket).await?.join(key);
                for file in [path, self.meta_path(bucket, key)] {
                    match fs::remove_file(&file).await {
                        Ok(()) => {}
                        Err(e) if is_absent(&e) => {}
                        Err(e) => return Err(io_error(OP, name, "cannot delete", &file, e)),
                    }
                }
                Ok(())
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
                let path = self.require_bucket(OP, bucket).await?.join(key);
                match fs::read(&path).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if is_absent(&e) => Ok(None),
                    Err(e) => Err(io_error(OP, name, "cannot read", &path, e)),
                }
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
                let path = self.require_bucket(OP, bucket).await?.join(key);
                match fs::metadata(&path).await {
                    Ok(meta) if meta.len() > max_bytes => {
                        return Ok(Some(Limited::TooLarge(meta.len())));
                    }
                    Ok(_) => {}
                    Err(e) if is_absent(&e) => return Ok(None),
                    Err(e) => return Err(io_error(OP, name, "cannot read", &path, e)),
                }
                // Read at most one byte past the limit: a file grown since the stat is caught.
                let file = match fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if is_absent(&e) => return Ok(None),
                    Err(e) => return Err(io_error(OP, name, "cannot read", &path, e)),
                };
                let mut bytes = Vec::new();
                use tokio::io::AsyncReadExt as _;
                file.take(max_bytes + 1)
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| io_error(OP, name, "cannot read", &path, e))?;
                if bytes.len() as u64 > max_bytes {
                    return Ok(Some(Limited::TooLarge(bytes.len() as u64)));
                }
                Ok(Some(Limited::Bytes(bytes)))
            })
            .await
    }

    pub(crate) async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StorageError> {
        const OP: &str = "exists";
        let name = object_name(bucket, key);
        self.retrier
            .run(OP, &name, || self.exists_once(OP, &name, bucket, key))
            .await
    }

    async fn exists_once(
        &self,
        op: &'static str,
        name: &str,
        bucket: &str,
        key: &str,
    ) -> Result<bool, StorageError> {
        let path = self.require_bucket(op, bucket).await?.join(key);
        match fs::metadata(&path).await {
            // A folder is the parent of other keys, not an object.
            Ok(m) => Ok(m.is_file()),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(io_error(op, name, "cannot stat", &path, e)),
        }
    }

    pub(crate) async fn head_metadata(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<HashMap<String, String>>, StorageError> {
        const OP: &str = "head";
        let name = &object_name(bucket, key);
        self.retrier
            .run(OP, name, || async move {
                if !self.exists_once(OP, name, bucket, key).await? {
                    return Ok(None);
                }
                let path = self.meta_path(bucket, key);
                let json = match fs::read(&path).await {
                    Ok(json) => json,
                    // An object copied in by hand has no metadata file: no metadata.
                    Err(e) if is_absent(&e) => return Ok(Some(HashMap::new())),
                    Err(e) => return Err(io_error(OP, name, "cannot read", &path, e)),
                };
                let meta: MetaFile = serde_json::from_slice(&json).map_err(|e| {
                    StorageError::permanent(
                        OP,
                        name,
                        format!("corrupt metadata file {}: {e}", path.display()),
                    )
                })?;
                Ok(Some(meta.metadata.into_iter().collect()))
            })
            .await
    }

    pub(crate) async fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<String>, StorageError> {
        const OP: &str = "list";
        let name = object_name(bucket, prefix);
        self.retrier
            .run(OP, &name, || self.list_once(OP, &name, bucket, prefix))
            .await
    }

    async fn list_once(
        &self,
        op: &'static str,
        name: &str,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<String>, StorageError> {
        let bucket_dir = self.require_bucket(op, bucket).await?;
        // Start in the deepest folder the prefix names completely ("jobs/1/img" → "jobs/1").
        let start_key = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let mut pending = vec![(bucket_dir.join(start_key), start_key.to_owned())];
        let mut keys = Vec::new();
        while let Some((dir, dir_key)) = pending.pop() {
            let mut entries = match fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(io_error(op, name, "cannot list", &dir, e)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| io_error(op, name, "cannot list", &dir, e))?
            {
                // Non-UTF-8 names cannot be keys; reserved names are our metadata and temp files.
                let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if file_name.starts_with(RESERVED_SEGMENT_PREFIX) {
                    continue;
                }
                let key = if dir_key.is_empty() {
                    file_name
                } else {
                    format!("{dir_key}/{file_name}")
                };
                let file_type = entry
                    .file_type()
                    .await
                    .map_err(|e| io_error(op, name, "cannot stat", &entry.path(), e))?;
                if file_type.is_dir() {
                    let as_dir = format!("{key}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        pending.push((entry.path(), key));
                    }
                } else if file_type.is_file()
                    && key.starts_with(prefix)
                    && validate_key(op, bucket, &key).is_ok()
                {
                    keys.push(key);
                }
            }
        }
        keys.sort_unstable();
        Ok(keys)
    }

    pub(crate) async fn check(&self, bucket: &str) -> Result<(), StorageError> {
        self.require_bucket("check", bucket).await.map(|_| ())
    }

    pub(crate) async fn create_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        const OP: &str = "create_bucket";
        let dir = &self.bucket_dir(bucket);
        self.retrier
            .run(OP, bucket, || async move {
                // create_dir_all succeeds when the folder exists: idempotent like
                // BucketAlreadyOwnedByYou.
                fs::create_dir_all(dir)
                    .await
                    .map_err(|e| io_error(OP, bucket, "cannot create bucket folder", dir, e))
            })
            .await
    }
}

/// "No such object": the path or one of its parents is missing, or it is a folder / goes through
/// a file (keys `a` vs `a/b`).
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::IsADirectory
    )
}

/// File-system errors that retrying cannot fix are permanent; the rest (I/O errors, full disk,
/// too many open files, interrupted calls) are transient and retried.
fn io_error(op: &'static str, name: &str, what: &str, path: &Path, e: io::Error) -> StorageError {
    let message = format!("{what} {}: {e}", path.display());
    match e.kind() {
        ErrorKind::NotFound
        | ErrorKind::PermissionDenied
        | ErrorKind::ReadOnlyFilesystem
        | ErrorKind::NotADirectory
        | ErrorKind::IsADirectory
        | ErrorKind::AlreadyExists
        | ErrorKind::DirectoryNotEmpty
        | ErrorKind::InvalidInput
        | ErrorKind::InvalidFilename
        | ErrorKind::InvalidData
        | ErrorKind::Unsupported => StorageError::permanent(op, name, message),
        _ => StorageError::transient(op, name, message),
    }
}
