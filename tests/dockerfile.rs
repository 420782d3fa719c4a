//! No Docker engine runs here, so the image is checked statically: hadolint must pass, and the
//! image must build what the rest of the project expects.
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
