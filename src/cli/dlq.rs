//! `sdbatch dlq list|show|requeue|purge`: the dead letters with their reasons, and sending them back.
use super::{BrokerArgs, MAX_FIELD_CHARS, printable, printable_json};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lapin::Channel;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
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
    /// Send dead letters back to the lane they came from (all, or the given batch ids). Letters a
    /// worker rejected as invalid are skipped unless --include-invalid.
    Requeue {
        batch_ids: Vec<String>,
        #[arg(long)]
        all: bool,
        /// Also requeue letters a worker rejected as invalid (`x-sdbatch-error` header): unless
        /// the workers' limits changed, they come straight back.
        #[arg(long)]
        include_invalid: bool,
    },
    /// Delete every dead letter.
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

/// One dead letter as read from the queue (unacked until we decide).
pub(super) struct DeadLetter {
    msg: BasicGetMessage,
    pub(super) batch_id: String,
    pub(super) reason: String,
    pub(super) detail: String,
    /// A worker judged the message itself invalid (`x-sdbatch-error`), as opposed to the broker
    /// dead-lettering it after failed deliveries.
    invalid: bool,
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
    let invalid = props
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key("x-sdbatch-error"));
    DeadLetter {
        msg,
        batch_id,
        reason,
        detail,
        invalid,
    }
}

/// Lines of a dead letter's body `show` prints at most, and characters per line.
const MAX_BODY_LINES: usize = 1000;
const MAX_BODY_LINE_CHARS: usize = 1024;
/// Header tables nest (x-death is an array of tables); deeper levels print as `…`.
const MAX_HEADER_DEPTH: usize = 3;

/// A header value as text: strings as they are, `[a, b]` arrays, `{k: v}` tables, numbers as
/// lapin's Debug prints them. The result still goes through `printable`.
fn render_header(value: &AMQPValue, depth: usize) -> String {
    match value {
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ByteArray(b) => format!("<{} bytes>", b.len()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) if depth >= MAX_HEADER_DEPTH => {
            "…".to_owned()
        }
        AMQPValue::FieldArray(a) => {
            let items: Vec<String> = a
                .as_slice()
                .iter()
                .map(|v| render_header(v, depth + 1))
                .collect();
            format!("[{}]", items.join(", "))
        }
        AMQPValue::FieldTable(t) => {
            let entries: Vec<String> = t
                .inner()
                .iter()
                .map(|(k, v)| format!("{}: {}", k.as_str(), render_header(v, depth + 1)))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        other => format!("{other:?}"),
    }
}

/// The body for `show`: pretty JSON when it is JSON, else the text; escaped line by line and
/// capped (it is producer text of any size).
fn render_body(body: &[u8]) -> String {
    // serde_json escapes C0 controls in strings but not DEL or C1 ones (U+009B is a CSI).
    let (text, escape): (String, fn(&str, usize) -> String) =
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => (
                serde_json::to_string_pretty(&v).unwrap_or_default(),
                printable_json,
            ),
            Err(_) => (String::from_utf8_lossy(body).into_owned(), printable),
        };
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<String> = lines
        .iter()
        .take(MAX_BODY_LINES)
        .map(|l| escape(l, MAX_BODY_LINE_CHARS))
        .collect();
    if lines.len() > MAX_BODY_LINES {
        out.push(format!("… ({} more lines)", lines.len() - MAX_BODY_LINES));
    }
    out.join("\n")
}

/// Reads up to `limit` dead letters without acking them: closing the channel returns the rest.
pub(super) async fn read_all(
    channel: &Channel,
    queue_name: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
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
            // Every field is producer- or worker-supplied text: escaped and capped.
            for l in &letters {
                println!(
                    "{:<40} {:<22} {}",
                    printable(&l.batch_id, MAX_FIELD_CHARS),
                    printable(&l.reason, MAX_FIELD_CHARS),
                    printable(&l.detail, MAX_FIELD_CHARS)
                );
            }
            println!("{} dead letter(s) in {dead}", letters.len());
        }
        DlqCommand::Show { batch_id } => {
            let letters = read_all(&channel, dead, usize::MAX).await?;
            let Some(l) = letters.iter().find(|l| l.batch_id == batch_id) else {
                bail!(
                    "no dead letter with batch_id {} in {dead}",
                    printable(&batch_id, MAX_FIELD_CHARS)
                );
            };
            println!(
                "batch_id: {}\nreason:   {}\ndetail:   {}",
                printable(&l.batch_id, MAX_FIELD_CHARS),
                printable(&l.reason, MAX_FIELD_CHARS),
                printable(&l.detail, MAX_FIELD_CHARS)
            );
            if let Some(headers) = l.msg.delivery.properties.headers() {
                for (k, v) in headers.inner() {
                    println!(
                        "header {}: {}",
                        printable(k.as_str(), MAX_FIELD_CHARS),
                        printable(&render_header(v, 0), MAX_FIELD_CHARS)
                    );
                }
            }
            println!("{}", render_body(&l.msg.delivery.data));
        }
        DlqCommand::Requeue {
            batch_ids,
            all,
            include_invalid,
        } => {
            if batch_ids.is_empty() && !all {
                bail!("name the batch ids to requeue, or pass --all");
            }
            let publisher = Publisher::new(&conn).await?;
            let letters = read_all(&channel, dead, usize::MAX).await?;
            let mut sent = 0;
            let mut skipped = 0;
            for l in letters {
                if !all && !batch_ids.contains(&l.batch_id) {
                    continue;
                }
                // A worker's verdict on the message itself: sent back unchanged it is
                // dead-lettered again at once, unless the workers' limits have changed since
                // (what --include-invalid is for). Unacked, it stays in the dead-letter queue.
                if l.invalid && !include_invalid {
                    println!(
                        "skipped {}: a worker rejected it as invalid ({})",
                        printable(&l.batch_id, MAX_FIELD_CHARS),
                        printable(&l.reason, MAX_FIELD_CHARS)
                    );
                    skipped += 1;
                    continue;
                }
                // Back to its own lane: read before the headers that say so are dropped.
                let lane = queue::dead_letter_lane(&l.msg.delivery.properties, &topology);
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
                        topology.queue(lane),
                        &l.msg.delivery.data,
                        Some(headers),
                        true,
                    )
                    .await?;
                l.msg.delivery.acker.ack(BasicAckOptions::default()).await?;
                println!(
                    "requeued {} ({} lane)",
                    printable(&l.batch_id, MAX_FIELD_CHARS),
                    lane.as_str()
                );
                sent += 1;
            }
            println!(
                "{sent} dead letter(s) sent back to {} / {}",
                topology.jobs_queue, topology.jobs_high_queue
            );
            if skipped > 0 {
                println!(
                    "{skipped} dead letter(s) skipped: rejected by a worker as invalid \
                     (x-sdbatch-error header), they would come straight back; pass \
                     --include-invalid to requeue them anyway"
                );
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_escaped_and_capped() {
        // JSON: serde_json escapes ESC and newlines itself, but not the 8-bit CSI (U+009B).
        let body = br#"{"batch_id": "a\u001b[31m\n\u009b2J", "prompt": "a \"cozy\" room"}"#;
        let text = render_body(body);
        assert!(!text.contains(['\x1b', '\u{9b}']), "{text:?}");
        assert!(text.contains(r#""a\u001b[31m\n\u{9b}2J""#), "{text}");
        assert!(text.contains(r#""a \"cozy\" room""#), "{text}");
        // Not JSON: the raw text, escaped; long lines and many lines cut.
        let text = render_body("bad\x1b[2J\r".as_bytes());
        assert_eq!(text, r"bad\u{1b}[2J\r");
        let text = render_body("x".repeat(5000).as_bytes());
        assert_eq!(text, format!("{}…", "x".repeat(MAX_BODY_LINE_CHARS)));
        let text = render_body("line\n".repeat(MAX_BODY_LINES + 5).as_bytes());
        assert_eq!(text.lines().count(), MAX_BODY_LINES + 1);
        assert!(text.ends_with("… (5 more lines)"), "{text}");
    }

    #[test]
    fn header_values_render_nested_and_bounded() {
        let table: FieldTable = [("count".into(), AMQPValue::LongLongInt(2))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let value = AMQPValue::FieldArray(vec![AMQPValue::FieldTable(table)].into());
        assert_eq!(render_header(&value, 0), "[{count: LongLongInt(2)}]");
        let mut deep = AMQPValue::Boolean(true);
        for _ in 0..10 {
            deep = AMQPValue::FieldArray(vec![deep].into());
        }
        assert_eq!(render_header(&deep, 0), "[[[…]]]");
    }
}
