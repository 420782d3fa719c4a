//! Static checks of the image's definition: hadolint must pass, the image must build what the rest
//! of the project expects, and deploy/ must name it as the build tags it. The image itself is built
//! and run by scripts/image-test.sh (buildah; scripts/test.sh runs it).
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn hadolint_passes() {
    let out = Command::new("bash")
        .arg(root().join("scripts/lint-dockerfile.sh"))
        .output()
        .expect("run scripts/lint-dockerfile.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "hadolint:\n{text}");
}

#[test]
fn image_uses_the_pinned_torch_and_runs_as_non_root() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let requirements =
        std::fs::read_to_string(root().join("scripts/requirements-fixtures.txt")).unwrap();
    assert!(requirements.lines().any(|l| l == "torch==2.11.0"));
    // The build installs exactly the torch line of the pinned requirements.
    assert!(dockerfile.contains("grep '^torch==' scripts/requirements-fixtures.txt"));
    assert!(dockerfile.contains("USER 10001:10001"));
    assert!(dockerfile.contains("HEALTHCHECK"));
    assert!(dockerfile.contains("cargo build --release --locked"));
}

/// The build commands, the compose file and the Kubernetes manifests name the image alike:
/// `sdbatch:<version in Cargo.toml>` (in Kubernetes behind a registry's name).
#[test]
fn deploy_names_the_image_as_the_build_tags_it() {
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let cargo = read("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("version in Cargo.toml");
    let tag = format!("sdbatch:{version}");
    for (file, wanted) in [
        ("README.md", format!("docker build -t {tag} .")),
        (
            "README.md",
            format!("buildah bud --format docker -t {tag} ."),
        ),
        ("deploy/README.md", format!("docker build -t {tag} .")),
        (
            "deploy/README.md",
            format!("buildah bud --format docker -t {tag} ."),
        ),
        ("Dockerfile", format!("docker build -t {tag} .")),
        ("deploy/docker-compose.yml", format!("image: {tag}\n")),
        (
            "deploy/k8s/deployment.yaml",
            format!("image: registry.example.com/{tag} "),
        ),
        (
            "deploy/k8s/kustomization.yaml",
            format!("newTag: {version}\n"),
        ),
    ] {
        assert!(read(file).contains(&wanted), "{file} lacks `{wanted}`");
    }
    // The image test tags its build with the same name (read from Cargo.toml).
    assert!(read("scripts/image-test.sh").contains("image=\"localhost/sdbatch:$version\""));
}

/// The HEALTHCHECK follows the metrics address the worker reads from its environment.
#[test]
fn healthcheck_reads_the_workers_metrics_address() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let worker = std::fs::read_to_string(root().join("src/cli/worker.rs")).unwrap();
    assert!(worker.contains("env = \"SDBATCH_METRICS_ADDR\""));
    let healthcheck = dockerfile
        .split("\nHEALTHCHECK ")
        .nth(1)
        .expect("a HEALTHCHECK instruction");
    assert!(healthcheck.contains("${SDBATCH_METRICS_ADDR:-0.0.0.0:9090}"));
    assert!(dockerfile.contains("EXPOSE 9090"));
}
