//! A per-test stack for worker tests: its own S3 server with a bucket, its own queue names, an
//! event watcher, worker processes, and message builders.
use super::broker::{Broker, WorkerProcess, unique};
use super::s3::S3Server;
use sdbatch::events::Event;
use sdbatch::storage::{StaticCredentials, Storage, StorageConfig};
use serde_json::json;

pub async fn store(s3: &S3Server) -> Storage {
    let mut cfg = StorageConfig::new("s3://");
    cfg.endpoint = Some(s3.endpoint.clone());
    Storage::connect_with_credentials(
        &cfg,
        StaticCredentials {
            access_key_id: s3.access_key.clone(),
            secret_access_key: s3.secret_key.clone(),
            session_token: None,
        },
    )
    .await
    .unwrap()
}

pub fn batch(batch_id: &str, steps: u32, items: &[(&str, &str, u64, u32)]) -> Vec<u8> {
    let items: Vec<_> = items
        .iter()
        .map(|(id, prompt, seed, n)| json!({"id": id, "prompt": prompt, "seed": seed, "num_images": n}))
        .collect();
    serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": items,
        "params": {"steps": steps, "guidance_scale": 7.5, "scheduler": "pndm"}
    }))
    .unwrap()
}

pub fn completed(events: &[Event], batch_id: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Completed(c) if c.batch_id == batch_id))
        .count()
}

/// Setup shared by the tests: S3 server with a bucket, broker topology, event watcher.
pub struct Stack {
    pub s3: S3Server,
    pub storage: Storage,
    pub broker: Broker,
    pub bucket: String,
    pub prefix: String,
    pub logs: tempfile::TempDir,
}

impl Stack {
    pub async fn new(name: &str, delivery_limit: u32) -> Stack {
        let s3 = S3Server::start();
        let storage = store(&s3).await;
        let bucket = "images".to_string();
        storage.create_bucket(&bucket).await.unwrap();
        let prefix = unique(name);
        let broker = Broker::new(&prefix, delivery_limit).await;
        Stack {
            s3,
            storage,
            broker,
            bucket,
            prefix,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    pub fn worker(&self, name: &str, extra: &[&str]) -> WorkerProcess {
        WorkerProcess::spawn(
            &self.prefix,
            &self.s3,
            &self.bucket,
            self.logs.path(),
            name,
            extra,
        )
    }

    pub async fn keys(&self) -> Vec<String> {
        self.storage.list(&self.bucket, "").await.unwrap()
    }

    /// `sdbatch <command> IDS… --json` (`status`, `cancel`) against this stack: one JSON
    /// object per line of its output. The command must succeed.
    pub fn cli_json(&self, command: &str, ids: &[&str]) -> Vec<serde_json::Value> {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .arg(command)
            .args(ids)
            .args(["--json", "--bucket", &self.bucket])
            .args(["--queue-prefix", &self.prefix])
            .args(["--s3-endpoint", &self.s3.endpoint])
            .env("AMQP_URL", super::broker::amqp_url())
            .env("AWS_ACCESS_KEY_ID", &self.s3.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.s3.secret_key)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "sdbatch {command}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}
