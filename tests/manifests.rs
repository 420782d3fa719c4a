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
        "k8s/networkpolicy.yaml",
        "k8s/secret.example.yaml",
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

/// The line of the first occurrence of `text` in `file` of the copy (1-based).
fn line_of(dir: &Path, file: &str, text: &str) -> usize {
    let content = std::fs::read_to_string(dir.join(file)).unwrap();
    let at = content
        .find(text)
        .unwrap_or_else(|| panic!("{file} has no `{text}`"));
    content[..at].matches('\n').count() + 1
}

/// Issue 9: the stack must not come up reachable from everywhere with well-known credentials,
/// and `kubectl apply -k` must not create Secrets from example values.
#[test]
fn unsafe_defaults_are_reported_with_their_file_and_line() {
    let dir = copy_of_deploy();
    let d = dir.path();
    let port = inject(
        d,
        "docker-compose.yml",
        "\"127.0.0.1:15672:15672\"",
        "\"15672:15672\"",
    );
    let literal = inject(
        d,
        "docker-compose.yml",
        "RABBITMQ_DEFAULT_PASS: ${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD in deploy/.env (see deploy/.env.example)}",
        "RABBITMQ_DEFAULT_PASS: guest",
    );
    // A default is a fixed password too, only better hidden.
    let default = inject(
        d,
        "docker-compose.yml",
        "characters.\n      MINIO_ROOT_PASSWORD: ${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD in deploy/.env (see deploy/.env.example)}",
        "characters.\n      MINIO_ROOT_PASSWORD: ${MINIO_ROOT_PASSWORD:-sdbatch-secret}",
    ) + 1;
    let url = inject(
        d,
        "docker-compose.yml",
        "AMQP_URL: amqp://${RABBITMQ_USER:?set RABBITMQ_USER in deploy/.env}:${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD in deploy/.env}@",
        "AMQP_URL: amqp://guest:guest@",
    );
    let example = inject(
        d,
        "k8s/kustomization.yaml",
        "  - pdb.yaml\n",
        "  - pdb.yaml\n  - secret.example.yaml\n",
    ) + 1;

    let run = validate(Some(d));
    assert_reports(
        &run,
        "docker-compose.yml",
        port,
        "\"15672:15672\" is published on all interfaces; bind it to 127.0.0.1",
    );
    assert_reports(
        &run,
        "docker-compose.yml",
        literal,
        "RABBITMQ_DEFAULT_PASS: a credential must come from a required variable",
    );
    assert_reports(
        &run,
        "docker-compose.yml",
        default,
        "MINIO_ROOT_PASSWORD: a credential must come from a required variable",
    );
    assert_reports(
        &run,
        "docker-compose.yml",
        url,
        "AMQP_URL: credentials in a URL must come from required variables",
    );
    assert_reports(&run, "docker-compose.yml", url, "guest/guest");
    assert_reports(
        &run,
        "k8s/kustomization.yaml",
        example,
        "secret.example.yaml holds example values and must not be applied",
    );
}

#[test]
fn network_policy_mistakes_are_reported_with_their_file_and_line() {
    // Schema and the rules on what the policy lets through.
    let dir = copy_of_deploy();
    let d = dir.path();
    const NP: &str = "k8s/networkpolicy.yaml";
    let field = inject(d, NP, "        - ipBlock:", "        - ipblock:");
    let port = inject(d, NP, "        - port: 9090\n", "        - port: 9091\n");
    inject(d, NP, "protocol: UDP", "protocol: TCP");
    let egress = line_of(d, NP, "  egress:");
    let run = validate(Some(d));
    assert_reports(
        &run,
        NP,
        field,
        "unknown field \"ipblock\"; did you mean \"ipBlock\"?",
    );
    assert_reports(
        &run,
        NP,
        port,
        "ingress port 9091/TCP is not a container port of the selected pods",
    );
    assert_reports(&run, NP, egress, "DNS (port 53/UDP) is not allowed");

    // A selector that misses the worker's labels protects nothing.
    let dir = copy_of_deploy();
    let d = dir.path();
    let selector = inject(
        d,
        NP,
        "  podSelector:\n    matchLabels:\n      app.kubernetes.io/name: sdbatch\n",
        "  podSelector:\n    matchLabels:\n      app.kubernetes.io/name: sdbatch-worker\n",
    );
    let labels = line_of(d, "k8s/deployment.yaml", "    metadata:\n      labels:") + 1;
    let run = validate(Some(d));
    assert_reports(
        &run,
        NP,
        selector,
        "podSelector selects the pods of no Deployment in namespace sdbatch",
    );
    assert_reports(
        &run,
        "k8s/deployment.yaml",
        labels,
        "no NetworkPolicy with policyTypes Egress selects the worker pods",
    );
}

/// The variables deploy/docker-compose.yml requires (`${NAME:?message}`) are the ones
/// deploy/.env.example lists, without values for the passwords; deploy/.env is ignored by git.
#[test]
fn the_env_example_matches_what_compose_requires() {
    let compose = read("deploy/docker-compose.yml");
    let mut required: Vec<&str> = compose
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once(":?").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    required.sort_unstable();
    required.dedup();
    assert!(required.len() >= 4, "{required:?}");

    let example = read("deploy/.env.example");
    let mut listed = Vec::new();
    for line in example.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if name.contains("PASSWORD") || name.contains("SECRET") {
            assert_eq!(
                value.trim(),
                "",
                "deploy/.env.example sets {name}: leave passwords empty, so that each stack gets its own"
            );
        }
        listed.push(name.trim());
    }
    listed.sort_unstable();
    assert_eq!(
        listed, required,
        "deploy/.env.example should list exactly the variables docker-compose.yml requires"
    );

    let ignored = Command::new("git")
        .args(["check-ignore", "-q", "deploy/.env"])
        .current_dir(repo())
        .status()
        .expect("run git check-ignore");
    assert!(ignored.success(), "deploy/.env is not ignored by git");
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
    // KEDA watches the queues the workers consume, both lanes summed (and not the DLQ).
    let prefix = cfg.queue_prefix.as_deref().unwrap_or("sdbatch");
    let scaled = |key| yaml_value("deploy/k8s/keda-scaledobject.yaml", "triggers", key);
    let escaped = prefix.replace('.', "\\.");
    assert_eq!(scaled("queueName"), format!("^{escaped}\\.jobs(\\.high)?$"));
    assert_eq!(scaled("useRegex"), "true");
    assert_eq!(scaled("operation"), "sum");
    // The regex names exactly the worker's two lanes.
    let topology = sdbatch::queue::Topology::with_prefix(prefix);
    assert_eq!(
        (topology.jobs_queue, topology.jobs_high_queue),
        (format!("{prefix}.jobs"), format!("{prefix}.jobs.high"))
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
