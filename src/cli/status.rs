//! `sdbatch status BATCH_ID…`: each batch's state from its objects (manifest, cancel tombstone,
//! progress object) and the dead-letter queue, without listening to events. The decision is
//! [`sdbatch::status::classify`]; this reads what it needs.
use super::{BrokerArgs, MAX_FIELD_CHARS, printable};
use anyhow::{Context, Result, bail};
use clap::Args;
use sdbatch::cancel::{TOMBSTONE_NAME, Tombstone};
use sdbatch::events::{BatchCompleted, BatchProgress};
use sdbatch::message::batch_key;
use sdbatch::queue;
use sdbatch::status::{BatchStatus, DeadLetter, classify};
use sdbatch::storage::{Limited, Storage, StorageConfig};
use std::collections::HashMap;

/// Largest manifest or progress object read (1024 images' records are well under 2 MiB).
const MAX_OBJECT_BYTES: u64 = 16 << 20;
/// Dead letters read at most to find the batches' (the rest stay unread, in the queue).
const MAX_DEAD_LETTERS: usize = 100_000;
/// Batch ids per call.
const MAX_BATCH_IDS: usize = 1000;

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The batches to look up.
    #[arg(required = true, value_name = "BATCH_ID")]
    pub batch_ids: Vec<String>,
    /// One JSON object per batch, one per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: BatchStoreArgs,
}

/// Where the batches' objects are: shared by `status` and `cancel`.
#[derive(Args, Debug, Clone)]
pub struct BatchStoreArgs {
    /// The bucket the batches were stored in.
    #[arg(long, env = "S3_BUCKET", hide_env_values = true)]
    pub bucket: String,
    /// The key prefix the batches were stored under (the message's `output.prefix`, or the
    /// workers' default).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// `s3://` or `file:///absolute/folder`, as the workers'.
    #[arg(
        long,
        env = "SDBATCH_STORAGE_URL",
        hide_env_values = true,
        default_value = "s3://"
    )]
    pub storage_url: String,
    #[arg(long, env = "S3_ENDPOINT", hide_env_values = true)]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION", hide_env_values = true)]
    pub s3_region: Option<String>,
}

impl BatchStoreArgs {
    pub async fn connect(&self) -> Result<Storage> {
        let mut cfg = StorageConfig::new(self.storage_url.clone());
        cfg.endpoint = self.s3_endpoint.clone();
        cfg.region = self.s3_region.clone();
        Ok(Storage::connect(&cfg).await?)
    }

    /// The key of `name` in batch `id`'s folder.
    pub fn key(&self, id: &str, name: &str) -> String {
        batch_key(&self.prefix, id, name)
    }
}

/// An object's JSON, `None` when it does not exist.
async fn read_json<T: serde::de::DeserializeOwned>(
    storage: &Storage,
    bucket: &str,
    key: &str,
) -> Result<Option<T>> {
    match storage
        .get_limited(bucket, key, MAX_OBJECT_BYTES)
        .await
        .with_context(|| format!("reading s3://{bucket}/{key}"))?
    {
        None => Ok(None),
        Some(Limited::TooLarge(size)) => bail!("s3://{bucket}/{key} is {size} bytes: not ours"),
        Some(Limited::Bytes(b)) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("s3://{bucket}/{key}"))?,
        )),
    }
}

/// The state of each of `batch_ids`, from the objects in `store` and the dead-letter queue.
/// `conn` is the caller's: `cancel` goes on to publish on it.
pub async fn lookup(
    conn: &lapin::Connection,
    topology: &queue::Topology,
    store: &BatchStoreArgs,
    storage: &Storage,
    batch_ids: &[String],
) -> Result<Vec<BatchStatus>> {
    if batch_ids.len() > MAX_BATCH_IDS {
        bail!("at most {MAX_BATCH_IDS} batch ids per call");
    }
    // The dead letters, read once for every batch asked about (and returned to the queue when
    // this channel closes: nothing is acked).
    let channel = conn.create_channel().await?;
    queue::declare(&channel, topology).await?;
    let wanted: std::collections::HashSet<&str> = batch_ids.iter().map(String::as_str).collect();
    let mut dead: HashMap<String, DeadLetter> = HashMap::new();
    for l in super::dlq::read_all(&channel, &topology.dead_queue, MAX_DEAD_LETTERS).await? {
        if wanted.contains(l.batch_id.as_str()) {
            dead.insert(
                l.batch_id.clone(),
                DeadLetter {
                    reason: l.reason.clone(),
                    detail: l.detail.clone(),
                },
            );
        }
    }
    let _ = channel.close(200, "done".into()).await;

    let bucket = &store.bucket;
    let mut found = Vec::with_capacity(batch_ids.len());
    for id in batch_ids {
        // Read in the order of precedence, each only when the earlier ones are absent.
        let manifest: Option<BatchCompleted> =
            read_json(storage, bucket, &store.key(id, "manifest.json")).await?;
        let tombstone: Option<Tombstone> = if manifest.is_none() {
            read_json(storage, bucket, &store.key(id, TOMBSTONE_NAME)).await?
        } else {
            None
        };
        let progress: Option<BatchProgress> = if manifest.is_none() && tombstone.is_none() {
            read_json(storage, bucket, &store.key(id, "progress.json")).await?
        } else {
            None
        };
        found.push(classify(
            id,
            manifest.as_ref(),
            tombstone.as_ref(),
            dead.get(id),
            progress.as_ref(),
        ));
    }
    Ok(found)
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let storage = args.store.connect().await?;
    let conn = queue::connect(&args.broker.amqp_url, "sdbatch status").await?;
    let found = lookup(
        &conn,
        &args.broker.topology(),
        &args.store,
        &storage,
        &args.batch_ids,
    )
    .await;
    let _ = conn.close(200, "done".into()).await;
    for status in found? {
        if args.json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            // Worker- and producer-supplied text: escaped.
            println!("{}", printable(&status.line(), 4 * MAX_FIELD_CHARS));
            if let BatchStatus::Completed { keys, .. } = &status {
                for k in keys {
                    println!("  {}", printable(k, 1024));
                }
            }
        }
    }
    Ok(())
}
