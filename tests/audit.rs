//! Dependency audit: Cargo.lock against the RustSec advisory database, offline, with cargo-audit
//! (`scripts/audit.sh`, which installs the pinned version once into `~/.cache/sdbatch`).
//!
//! The database is a snapshot: `SDBATCH_ADVISORY_DB`, else `../shared/advisory-db` beside the
//! repository. Without one the tests say so and pass, except in CI (`CI` set), where they fail.
//! What the audit allows, and why, is in `.cargo/audit.toml`; anything else fails: every
//! vulnerability, and every unmaintained/unsound/yanked warning not listed there.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The advisory database, or `None` (after saying why) when the tests should be skipped.
fn advisory_db() -> Option<PathBuf> {
    let db = std::env::var_os("SDBATCH_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/advisory-db"));
    if db.join("crates").is_dir() {
        return Some(db);
    }
    let why = format!(
        "no RustSec advisory database at {} (set SDBATCH_ADVISORY_DB to a copy of the advisory-db \
         repository, or put one at ../shared/advisory-db)",
        db.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: dependency audit: {why}");
    None
}

struct Audit {
    ok: bool,
    report: Value,
    stderr: String,
}

/// `scripts/audit.sh --json ARGS` against `db`; the JSON report.
fn audit(db: &Path, args: &[&str]) -> Audit {
    let out = Command::new("bash")
        .arg(repo().join("scripts/audit.sh"))
        .arg("--json")
        .args(args)
        .env("SDBATCH_ADVISORY_DB", db)
        .current_dir(repo())
        .output()
        .expect("run scripts/audit.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "cargo-audit did not report (exit {:?}, {e}):\n{stdout}\n{stderr}",
            out.status.code()
        )
    });
    Audit {
        ok: out.status.success(),
        report,
        stderr,
    }
}

/// "ID crate version: title" for each vulnerability and warning of a report.
fn findings(report: &Value) -> Vec<String> {
    let vulnerabilities = report["vulnerabilities"]["list"].as_array().cloned();
    let warnings = report["warnings"]
        .as_object()
        .map(|kinds| kinds.values().flat_map(|v| v.as_array().cloned()).flatten());
    vulnerabilities
        .into_iter()
        .flatten()
        .chain(warnings.into_iter().flatten())
        .map(|f| {
            let kind = f["kind"].as_str().unwrap_or("vulnerability");
            format!(
                "{} {} {} {}: {}",
                f["advisory"]["id"].as_str().unwrap_or("-"),
                kind,
                f["package"]["name"].as_str().unwrap_or("?"),
                f["package"]["version"].as_str().unwrap_or("?"),
                f["advisory"]["title"].as_str().unwrap_or(""),
            )
        })
        .collect()
}

#[test]
fn the_lock_file_has_no_known_vulnerability_or_unlisted_warning() {
    let Some(db) = advisory_db() else { return };
    let run = audit(&db, &[]);
    let found = findings(&run.report);
    assert!(
        run.ok && found.is_empty(),
        "cargo audit of Cargo.lock against {} failed. Upgrade the crate (`cargo update -p NAME`, \
         `cargo tree -i NAME` shows who pulls it in), or, for a warning we accept, add the \
         advisory with its reason to .cargo/audit.toml:\n  {}\n{}",
        db.display(),
        found.join("\n  "),
        run.stderr
    );
    assert_eq!(run.report["vulnerabilities"]["found"], false);
    // The snapshot was read: an empty or wrong folder would find nothing, and pass.
    assert!(
        run.report["database"]["advisory-count"].as_u64() > Some(500),
        "{}",
        run.report["database"]
    );
}

/// The audit can fail: a lock file with h2 0.3.27 (what aws-sdk-s3's default features pulled in)
/// is reported with RUSTSEC-2026-0258, and an unmaintained crate not allowed in
/// .cargo/audit.toml fails too.
#[test]
fn a_vulnerable_lock_file_fails_the_audit() {
    let Some(db) = advisory_db() else { return };
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("Cargo.lock");
    let registry = concat!("registry+https://github.com/", "rust-lang/crates.io-index");
    std::fs::write(
        &lock,
        format!(
            r#"version = 4

[[package]]
name = "audit-fixture"
version = "0.1.0"
dependencies = [
 "h2",
 "instant",
]

[[package]]
name = "h2"
version = "0.3.27"
source = "{registry}"

[[package]]
name = "instant"
version = "0.1.13"
source = "{registry}"
"#
        ),
    )
    .unwrap();
    // --no-yanked: the fixture's crates need not be in the local index cache.
    let run = audit(&db, &["--no-yanked", "--file", lock.to_str().unwrap()]);
    let found = findings(&run.report);
    assert!(
        !run.ok,
        "the audit passed a vulnerable lock file: {found:?}"
    );
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("RUSTSEC-2026-0258 vulnerability h2 0.3.27")),
        "h2 0.3.27 not reported as RUSTSEC-2026-0258: {found:?}\n{}",
        run.stderr
    );
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("RUSTSEC-2024-0384 unmaintained instant 0.1.13")),
        "instant 0.1.13 (unmaintained) not reported: {found:?}"
    );
}
