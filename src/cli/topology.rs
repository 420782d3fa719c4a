//! `sdbatch topology`: declares the exchanges and queues (idempotent) and prints them.
use super::BrokerArgs;
use anyhow::Result;
use clap::Args;
use sdbatch::queue;

#[derive(Args, Debug)]
pub struct TopologyArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
}

pub async fn run(args: TopologyArgs) -> Result<()> {
    let t = args.broker.topology();
    let conn = queue::connect(&args.broker.amqp_url, "sdbatch topology").await?;
    let channel = conn.create_channel().await?;
    queue::declare(&channel, &t).await?;
    let _ = conn.close(200, "done".into()).await;
    println!(
        "broker:          {}",
        queue::redact_url(&args.broker.amqp_url)
    );
    println!(
        "jobs exchange:   {} (direct) -> quorum queue {} (x-delivery-limit {})",
        t.jobs_exchange, t.jobs_queue, t.delivery_limit
    );
    println!(
        "high lane:       {} (direct) -> quorum queue {} (same arguments; workers take it first)",
        t.jobs_exchange, t.jobs_high_queue
    );
    println!(
        "dead letters:    {} (direct) -> quorum queue {}",
        t.dead_exchange, t.dead_queue
    );
    println!(
        "events exchange: {} (topic: batch.completed, batch.failed, batch.progress, batch.cancelled)",
        t.events_exchange
    );
    println!(
        "control:         {} (fanout: sdbatch cancel -> every connected worker)",
        t.control_exchange
    );
    Ok(())
}
