//! The producer-side commands against hostile or careless input (issue 9): `--help` with secrets
//! in the environment.
mod common;

use common::broker::amqp_url;
use std::process::{Command, Output};

fn sdbatch(args: &[String], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_does_not_print_environment_values() {
    let env = [
        ("AMQP_URL", "amqp://u:s3cret@h/"),
        ("S3_ENDPOINT", "http://key:s3cret@h/"),
        ("SDBATCH_STORAGE_URL", "s3cret"),
        ("SDBATCH_QUEUE_PREFIX", "s3cret"),
    ];
    for command in [
        &["worker", "--help"][..],
        &["submit", "--help"],
        &["dlq", "--help"],
        &["dlq", "requeue", "--help"],
        &["topology", "--help"],
        &["bench", "--help"],
    ] {
        let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
        let o = sdbatch(&args, &env);
        assert!(o.status.success(), "{command:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(
            !out.contains("s3cret"),
            "{command:?} printed a value:\n{out}"
        );
    }
    // The variables are still named, only their values hidden.
    let o = sdbatch(&["submit".into(), "--help".into()], &env);
    assert!(stdout(&o).contains("AMQP_URL"), "{}", stdout(&o));
}
