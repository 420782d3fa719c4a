//! The deployment material in deploy/: `scripts/validate-manifests.sh` accepts the real files and
//! rejects broken copies, naming the file and line; and what the manifests tell the worker is what
//! `sdbatch worker` understands (its TOML parser, its environment variables, the queue KEDA
//! watches).
//!
//! The validator installs its npm packages once into `~/.cache/sdbatch/manifest-validator` (Node.js
//! and the npm registry are needed the first time; the schemas ship inside the packages).
use sdbatch::config::FileConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

struct Run {
    ok: bool,
    out: String,
}

/// Runs the validator on `deploy` (default: the repository's deploy/).
fn validate(deploy: Option<&Path>) -> Run {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/validate-manifests.sh"));
    if let Some(dir) = deploy {
        cmd.arg(dir);
    }
    let o = cmd.output().expect("run scripts/validate-manifests.sh");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // 2: the validator could not run at all (no node, npm ci failed), which proves nothing.
    assert_ne!(
        o.status.code(),
        Some(2),
        "the validator did not run:\n{out}"
    );
    Run {
        ok: o.status.success(),
        out,
    }
}

/// deploy/k8s and deploy/docker-compose.yml copied into a temporary folder.
fn copy_of_deploy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("k8s")).unwrap();
    for entry in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join("k8s").join(entry.file_name())).unwrap();
    }
    std::fs::copy(
        repo().join("deploy/docker-compose.yml"),
        dir.path().join("docker-compose.yml"),
    )
    .unwrap();
    dir
}

/// Replaces the one occurrence of `from` in `file` (relative to the copy) by `to`, and returns
/// the 1-based line where the replacement starts.
fn inject(dir: &Path, file: &str, from: &str, to: &str) -> usize {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.matches(from).count(),
        1,
        "{file} should contain `{from}` exactly once"
    );
    let at = text.find(from).unwrap();
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    text[..at].matches('\n').count() + 1
}

/// The run failed, with a FAIL line for `file` and an error `file:line: ...message...`.
fn assert_reports(run: &Run, file: &str, line: usize, message: &str) {
    assert!(
        !run.ok,
        "the validator accepted a broken copy:\n{}",
        run.out
    );
    assert!(
        run.out
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains(file)),
        "no FAIL line for {file}:\n{}",
        run.out
    );
    let at = format!("{file}:{line}: ");
    assert!(
        run.out
            .lines()
            .any(|l| l.contains(&at) && l.contains(message)),
        "no `{at}...{message}`:\n{}",
        run.out
    );
}

#[test]
fn the_real_manifests_pass() {
    let run = validate(None);
    assert!(run.ok, "{}", run.out);
    for file in [
        "k8s/deployment.yaml",
        "k8s/keda-scaledobject.yaml",
        "k8s/keda-triggerauth.yaml",
        "k8s/kustomization.yaml",
        "docker-compose.yml",
    ] {
        assert!(
            run.out
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(file)),
            "{file} not validated:\n{}",
            run.out
        );
    }
    assert!(run.out.contains(" 0 failed"), "{}", run.out);
}

#[test]
fn a_string_replica_count_fails_naming_the_deployment() {
    let dir = copy_of_deploy();
    let line = inject(
        dir.path(),
        "k8s/deployment.yaml",
        "  revisionHistoryLimit: 5\n",
        "  replicas: \"two\"\n  revisionHistoryLimit: 5\n",
    );
    let run = validate(Some(dir.path()));
    assert_reports(
        &run,
        "k8s/deployment.yaml",
        line,
        "/spec/replicas: must be integer",
    );
}

#[test]
fn each_kind_of_mistake_is_reported_with_its_file_and_line() {
    let dir = copy_of_deploy();
    let d = dir.path();
    // KEDA trigger metadata are strings: an unquoted number is the classic slip.
    let value = inject(d, "k8s/keda-scaledobject.yaml", "value: \"8\"", "value: 8");
    // A misspelt field: the Kubernetes schemas allow unknown fields, the validator does not.
    let probe = inject(
        d,
        "k8s/deployment.yaml",
        "          readinessProbe:",
        "          readinesProbe:",
    );
    let pdb = inject(
        d,
        "k8s/pdb.yaml",
        "  maxUnavailable: 1",
        "  maxUnavailabel: 1",
    );
    // ConfigMap values are strings.
    let cm = inject(
        d,
        "k8s/configmap.yaml",
        "  RUST_LOG: info",
        "  SDBATCH_PREFETCH: 8\n  RUST_LOG: info",
    );
    // sdbatch's own rules: the worker's grace period must fit in the pod's, and the manifest
    // list must be complete.
    let grace = inject(
        d,
        "k8s/deployment.yaml",
        "terminationGracePeriodSeconds: 900",
        "terminationGracePeriodSeconds: 300",
    );
    inject(d, "k8s/kustomization.yaml", "  - pdb.yaml\n", "");
    let kust = inject(d, "k8s/kustomization.yaml", "resources:", "resources:");
    // Compose: an unknown depends_on condition, an unknown service key.
    let cond = inject(
        d,
        "docker-compose.yml",
        "condition: service_completed_successfully",
        "condition: service_completed",
    );
    let key = inject(
        d,
        "docker-compose.yml",
        "    restart: unless-stopped",
        "    restrat: unless-stopped",
    );

    let run = validate(Some(d));
    assert_reports(
        &run,
        "k8s/keda-scaledobject.yaml",
        value,
        "/spec/triggers/0/metadata/value: must be string",
    );
    assert_reports(
        &run,
        "k8s/deployment.yaml",
        probe,
        "unknown field \"readinesProbe\"; did you mean \"readinessProbe\"?",
    );
    assert_reports(
        &run,
        "k8s/pdb.yaml",
        pdb,
        "unknown field \"maxUnavailabel\"",
    );
    assert_reports(
        &run,
        "k8s/configmap.yaml",
        cm,
        "/data/SDBATCH_PREFETCH: must be string",
    );
    assert_reports(
        &run,
        "k8s/deployment.yaml",
        grace,
        "terminationGracePeriodSeconds (300) must exceed",
    );
    assert_reports(
        &run,
        "k8s/kustomization.yaml",
        kust,
        "pdb.yaml is not listed",
    );
    assert_reports(&run, "docker-compose.yml", cond, "must be equal to one of");
    assert_reports(
        &run,
        "docker-compose.yml",
        key,
        "must NOT have additional properties \"restrat\"",
    );
}

/// The `worker.toml` block of deploy/k8s/configmap.yaml, dedented.
fn worker_toml() -> String {
    let text = read("deploy/k8s/configmap.yaml");
    let mut lines = text.lines().skip_while(|l| l.trim() != "worker.toml: |");
    let key = lines
        .next()
        .expect("configmap.yaml has a `worker.toml: |` entry");
    let indent = key.len() - key.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let strip = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    block
        .iter()
        .map(|l| l.get(strip..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of the first `key: value` line after the line `after:` of a YAML file, unquoted.
fn yaml_value(rel: &str, after: &str, key: &str) -> String {
    let text = read(rel);
    let prefix = format!("{key}:");
    let line = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != format!("{after}:"))
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{rel} has no `{key}:` after `{after}:`"));
    line[prefix.len()..]
        .split(" #")
        .next()
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string()
}

#[test]
fn the_configmap_worker_toml_loads_and_matches_the_scaler() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, worker_toml()).unwrap();
    let cfg = FileConfig::load(&path).unwrap_or_else(|e| panic!("configmap worker.toml: {e}"));

    // KEDA's messages-per-pod is the prefetch: one pod per `prefetch` messages in the queue.
    let value: u16 = yaml_value("deploy/k8s/keda-scaledobject.yaml", "triggers", "value")
        .parse()
        .unwrap();
    assert_eq!(
        Some(value),
        cfg.prefetch,
        "keda-scaledobject.yaml `value` should equal worker.toml `prefetch`"
    );
    // KEDA watches the queue the workers consume.
    let prefix = cfg.queue_prefix.as_deref().unwrap_or("sdbatch");
    assert_eq!(
        yaml_value("deploy/k8s/keda-scaledobject.yaml", "triggers", "queueName"),
        format!("{prefix}.jobs")
    );
}

/// Every variable the deploy files set for the worker (`SDBATCH_*`, `AMQP_URL`, `S3_*`,
/// `AWS_REGION`; the AWS credentials go through the AWS chain instead) is one `sdbatch worker`
/// reads: clap ignores unknown variables, so a misspelt one would silently do nothing.
#[test]
fn the_environment_the_manifests_set_is_read_by_the_worker() {
    let help = Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(["worker", "--help"])
        .output()
        .expect("run sdbatch worker --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);

    let is_worker_var = |n: &str| {
        n.starts_with("SDBATCH_") || n.starts_with("S3_") || n == "AMQP_URL" || n == "AWS_REGION"
    };
    let mut checked = 0;
    for rel in [
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/deployment.yaml",
        "deploy/docker-compose.yml",
    ] {
        for line in read(rel).lines() {
            let line = line.trim_start().trim_start_matches("- ");
            if line.starts_with('#') {
                continue;
            }
            // `NAME: value` (ConfigMap data, compose environment) or `name: NAME` (env list).
            let name = match line.split_once(':') {
                Some(("name", v)) => v.trim(),
                Some((k, _)) => k.trim(),
                None => continue,
            };
            if is_worker_var(name) {
                // `[env: NAME]`: the CLI hides the values (they can hold secrets).
                assert!(
                    help.contains(&format!("[env: {name}]")),
                    "{rel} sets {name}, which `sdbatch worker` does not read"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} variables found");
}
