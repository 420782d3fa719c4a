//! `sdbatch cancel BATCH_ID…`: stops batches that are queued or running. For each batch, its
//! state is looked up as `status` does; an unfinished one gets its tombstone and a broadcast on
//! the control exchange (see [`sdbatch::cancel`]); a finished one is left alone and said so.
//! The workers answer with `batch.cancelled` (what was stored, what was not).
use super::status::{BatchStoreArgs, lookup};
use super::{BrokerArgs, MAX_FIELD_CHARS, printable};
use anyhow::{Context, Result, bail};
use clap::Args;
use sdbatch::cancel::{CancelDecision, CancelRequest, TOMBSTONE_NAME, Tombstone, decide};
use sdbatch::message::{check_prefix, is_valid_batch_id};
use sdbatch::queue::{self, Publisher};
use sdbatch::status::BatchStatus;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The batches to cancel.
    #[arg(required = true, value_name = "BATCH_ID")]
    pub batch_ids: Vec<String>,
    /// One JSON object per batch, one per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: BatchStoreArgs,
}

/// What was done for one batch.
#[derive(Debug, Serialize)]
struct Outcome<'a> {
    batch_id: &'a str,
    /// `cancel_requested`, `already_cancelled` (asked again), `already_completed`,
    /// `already_failed`.
    outcome: &'static str,
    /// Its state before this call.
    before: &'a BatchStatus,
}

pub async fn run(args: CancelArgs) -> Result<()> {
    if let Some(bad) = args.batch_ids.iter().find(|id| !is_valid_batch_id(id)) {
        bail!(
            "invalid batch id {}: expected [A-Za-z0-9_-], 1 to 128 characters",
            printable(bad, MAX_FIELD_CHARS)
        );
    }
    check_prefix(&args.store.prefix).map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
    let storage = args.store.connect().await?;
    let topology = args.broker.topology();
    // One connection: the lookup reads the dead letters on it (and declares the topology), the
    // broadcasts go out on it.
    let conn = queue::connect(&args.broker.amqp_url, "sdbatch cancel").await?;
    let result = cancel_all(&args, &conn, &topology, &storage).await;
    let _ = conn.close(200, "done".into()).await;
    result
}

async fn cancel_all(
    args: &CancelArgs,
    conn: &lapin::Connection,
    topology: &queue::Topology,
    storage: &sdbatch::storage::Storage,
) -> Result<()> {
    let before = lookup(conn, topology, &args.store, storage, &args.batch_ids).await?;
    let publisher = Publisher::new(conn).await?;
    let bucket = &args.store.bucket;
    for (id, status) in args.batch_ids.iter().zip(&before) {
        let decision = decide(status);
        let request = CancelRequest::new(id, bucket, &args.store.prefix);
        if decision == CancelDecision::Cancel {
            // The tombstone first: a worker that takes the message after this finds it; one that
            // holds it already hears the broadcast below.
            let key = args.store.key(id, TOMBSTONE_NAME);
            storage
                .put(
                    bucket,
                    &key,
                    Tombstone::for_request(&request).to_json_vec(),
                    "application/json",
                    &[],
                )
                .await
                .with_context(|| format!("writing s3://{bucket}/{key}"))?;
        }
        if decision != CancelDecision::TooLate {
            publisher
                .publish_json(
                    &topology.control_exchange,
                    "",
                    &request.to_json_vec(),
                    None,
                    false,
                )
                .await
                .with_context(|| format!("broadcasting the cancel of {id}"))?;
        }
        let outcome = match (decision, status) {
            (CancelDecision::Cancel, _) => "cancel_requested",
            (CancelDecision::Repeat, _) => "already_cancelled",
            (CancelDecision::TooLate, BatchStatus::Completed { .. }) => "already_completed",
            (CancelDecision::TooLate, _) => "already_failed",
        };
        if args.json {
            let line = Outcome {
                batch_id: id,
                outcome,
                before: status,
            };
            println!("{}", serde_json::to_string(&line)?);
        } else {
            let said = match decision {
                CancelDecision::Cancel => format!(
                    "{id}: cancel requested (it was {}); workers answer with batch.cancelled",
                    state_word(status)
                ),
                CancelDecision::Repeat => {
                    format!("{id}: already cancelled; the workers were asked again")
                }
                // Worker-supplied text: escaped.
                CancelDecision::TooLate => format!(
                    "nothing cancelled: {}",
                    printable(&status.line(), 4 * MAX_FIELD_CHARS)
                ),
            };
            println!("{said}");
        }
    }
    Ok(())
}

fn state_word(status: &BatchStatus) -> &'static str {
    match status {
        BatchStatus::Queued { .. } => "queued",
        BatchStatus::Running { .. } => "running",
        BatchStatus::Completed { .. } => "completed",
        BatchStatus::Failed { .. } => "failed",
        BatchStatus::Cancelled { .. } => "cancelled",
    }
}
