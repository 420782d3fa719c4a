//! `sdbatch dlq list|show|requeue|purge`: the dead letters with their reasons, and sending them back.
use super::BrokerArgs;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lapin::Channel;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use sdbatch::queue::{self, Publisher, header_str};

#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters (batch id, reason). Messages stay in the queue.
    List {
        /// Read at most this many messages.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Print one dead letter's headers and body.
    Show { batch_id: String },
    /// Send dead letters back to the jobs queue (all, or the given batch ids).
    Requeue {
        batch_ids: Vec<String>,
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter.
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

/// One dead letter as read from the queue (unacked until we decide).
struct DeadLetter {
    msg: BasicGetMessage,
    batch_id: String,
    reason: String,
    detail: String,
}

fn describe(msg: BasicGetMessage) -> DeadLetter {
    let props = &msg.delivery.properties;
    let batch_id = serde_json::from_slice::<serde_json::Value>(&msg.delivery.data)
        .ok()
        .and_then(|v| {
            v.get("batch_id")
                .and_then(|b| b.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "<unreadable>".into());
    // Worker-rejected messages carry our headers; broker dead-lettering (delivery limit) its own.
    let reason = header_str(props, "x-sdbatch-error")
        .or_else(|| header_str(props, "x-first-death-reason"))
        .unwrap_or_else(|| "unknown".into());
    let detail = header_str(props, "x-sdbatch-reason").unwrap_or_else(|| match reason.as_str() {
        "delivery_limit" => {
            "failed on every delivery (see the worker logs / batch.failed event)".into()
        }
        _ => String::new(),
    });
    DeadLetter {
        msg,
        batch_id,
        reason,
        detail,
    }
}

/// Reads up to `limit` dead letters without acking them: closing the channel returns the rest.
async fn read_all(channel: &Channel, queue_name: &str, limit: usize) -> Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    while out.len() < limit {
        match channel
            .basic_get(queue_name.into(), BasicGetOptions::default())
            .await
            .with_context(|| format!("reading {queue_name}"))?
        {
            Some(msg) => out.push(describe(msg)),
            None => break,
        }
    }
    Ok(out)
}

pub async fn run(args: DlqArgs) -> Result<()> {
    let topology = args.broker.topology();
    let conn = queue::connect(&args.broker.amqp_url, "sdbatch dlq").await?;
    let channel = conn.create_channel().await?;
    queue::declare(&channel, &topology).await?;
    let dead = topology.dead_queue.as_str();
    match args.command {
        DlqCommand::List { limit } => {
            let letters = read_all(&channel, dead, limit).await?;
            println!("{:<40} {:<22} detail", "batch_id", "reason");
            for l in &letters {
                println!("{:<40} {:<22} {}", l.batch_id, l.reason, l.detail);
            }
            println!("{} dead letter(s) in {dead}", letters.len());
        }
        DlqCommand::Show { batch_id } => {
            let letters = read_all(&channel, dead, usize::MAX).await?;
            let Some(l) = letters.iter().find(|l| l.batch_id == batch_id) else {
                bail!("no dead letter with batch_id {batch_id} in {dead}");
            };
            println!(
                "batch_id: {}\nreason:   {}\ndetail:   {}",
                l.batch_id, l.reason, l.detail
            );
            if let Some(headers) = l.msg.delivery.properties.headers() {
                for (k, v) in headers.inner() {
                    println!("header {}: {v:?}", k.as_str());
                }
            }
            let body = &l.msg.delivery.data;
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                Err(_) => println!("{}", String::from_utf8_lossy(body)),
            }
        }
        DlqCommand::Requeue { batch_ids, all } => {
            if batch_ids.is_empty() && !all {
                bail!("name the batch ids to requeue, or pass --all");
            }
            let publisher = Publisher::new(&conn).await?;
            let letters = read_all(&channel, dead, usize::MAX).await?;
            let mut sent = 0;
            for l in letters {
                if !all && !batch_ids.contains(&l.batch_id) {
                    continue;
                }
                // A fresh message: the dead-lettering headers describe the old life, and
                // x-delivery-count must start over.
                let mut headers = FieldTable::default();
                if let Some(old) = l.msg.delivery.properties.headers() {
                    for (k, v) in old.inner() {
                        let name = k.as_str();
                        if !name.starts_with("x-death")
                            && !name.starts_with("x-first-death")
                            && !name.starts_with("x-last-death")
                            && !name.starts_with("x-sdbatch-")
                            && name != "x-delivery-count"
                        {
                            headers.insert(k.clone(), v.clone());
                        }
                    }
                }
                publisher
                    .publish_json(
                        &topology.jobs_exchange,
                        &topology.jobs_queue,
                        &l.msg.delivery.data,
                        Some(headers),
                        true,
                    )
                    .await?;
                l.msg.delivery.acker.ack(BasicAckOptions::default()).await?;
                println!("requeued {}", l.batch_id);
                sent += 1;
            }
            println!("{sent} dead letter(s) sent back to {}", topology.jobs_queue);
        }
        DlqCommand::Purge { yes } => {
            if !yes {
                bail!("purging deletes every dead letter for good: pass --yes");
            }
            let n = channel
                .queue_purge(dead.into(), QueuePurgeOptions::default())
                .await?;
            println!("purged {n} dead letter(s) from {dead}");
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
