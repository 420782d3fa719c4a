//! Webhook signatures: HMAC-SHA256 over `"{timestamp}.{body}"` with the worker's secret, sent as
//! `Sdbatch-Signature: t=<unix seconds>,v1=<lowercase hex>` (the scheme Stripe uses, so receivers
//! know it). The timestamp is signed with the body, so a receiver that refuses old timestamps
//! (5 minutes is usual) cannot be sent a captured request again later. Every attempt is signed
//! anew with its own timestamp. docs/webhooks.md has verification snippets.
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "sdbatch-signature";
/// Shortest secret accepted, in bytes (`openssl rand -hex 32` gives 64).
pub const MIN_SECRET_BYTES: usize = 16;

/// The worker's signing secret. Never printed: `Debug` shows only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret from a file's or variable's text, without surrounding whitespace (a trailing
    /// newline is not part of it). At least [`MIN_SECRET_BYTES`].
    pub fn from_text(text: &str) -> Result<Self, String> {
        let s = text.trim();
        if s.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the webhook secret must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand \
                 -hex 32`)"
            ));
        }
        Ok(Secret(Arc::from(s.as_bytes())))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn mac(secret: &Secret, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// HMAC-SHA256 of `"{timestamp}.{body}"`, lowercase hex.
pub fn signature(secret: &Secret, timestamp: u64, body: &[u8]) -> String {
    hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
}

/// The `Sdbatch-Signature` header value: `t=<timestamp>,v1=<signature>`.
pub fn header_value(secret: &Secret, timestamp: u64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", signature(secret, timestamp, body))
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed signature header (expected t=<unix seconds>,v1=<hex>)")]
    Malformed,
    #[error("the signature's timestamp is {0} s away from now, beyond the tolerance")]
    Stale(u64),
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// What a receiver does: checks `header` (several `v1=` are accepted, any may match) against
/// `body` and the secret, and that its timestamp is within `tolerance` of `now` (Unix seconds).
/// Comparison is constant-time.
pub fn verify(
    secret: &Secret,
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) if timestamp.is_none() => {
                timestamp = Some(t.parse::<u64>().map_err(|_| VerifyError::Malformed)?)
            }
            Some(("t", _)) => return Err(VerifyError::Malformed),
            Some(("v1", sig)) => candidates.push(sig),
            // Other schemes (a later `v2`) are for other verifiers.
            Some(_) => {}
            None => return Err(VerifyError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::Malformed)?;
    if candidates.is_empty() {
        return Err(VerifyError::Malformed);
    }
    let skew = now.abs_diff(timestamp);
    if skew > tolerance.as_secs() {
        return Err(VerifyError::Stale(skew));
    }
    let expected = mac(secret, timestamp, body);
    let matches = candidates.iter().any(|sig| {
        hex::decode(sig).is_ok_and(|bytes| expected.clone().verify_slice(&bytes).is_ok())
    });
    if matches {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_text("whsec_test_0123456789abcdef\n").unwrap()
    }

    /// Computed independently with Python's hmac:
    /// `hmac.new(b"whsec_test_0123456789abcdef", b"1700000000." + body, "sha256").hexdigest()`,
    /// and with `openssl dgst -sha256 -hmac` (the docs' snippets).
    #[test]
    fn known_vector() {
        let body = br#"{"event":"batch.completed","batch_id":"b1"}"#;
        assert_eq!(
            signature(&secret(), 1_700_000_000, body),
            "4d6fdecee07d8282f764475db0df3c35e1f1c87bf555d9502080d0fe992d4a9e"
        );
    }

    #[test]
    fn header_round_trip_and_refusals() {
        let s = secret();
        let body = b"{\"x\":1}";
        let h = header_value(&s, 1000, body);
        assert!(h.starts_with("t=1000,v1="), "{h}");
        let tol = Duration::from_secs(300);
        assert_eq!(verify(&s, &h, body, 1000, tol), Ok(()));
        assert_eq!(verify(&s, &h, body, 1299, tol), Ok(()));
        assert_eq!(
            verify(&s, &h, body, 1301, tol),
            Err(VerifyError::Stale(301))
        );
        assert_eq!(
            verify(&s, &h, b"{\"x\":2}", 1000, tol),
            Err(VerifyError::Mismatch)
        );
        let other = Secret::from_text("another-secret-of-16+").unwrap();
        assert_eq!(
            verify(&other, &h, body, 1000, tol),
            Err(VerifyError::Mismatch)
        );
        // The timestamp is signed: moving it breaks the signature.
        let moved = h.replacen("t=1000", "t=1001", 1);
        assert_eq!(
            verify(&s, &moved, body, 1000, tol),
            Err(VerifyError::Mismatch)
        );
        // Rotation: any of several v1 may match.
        let two = format!(
            "t=1000,v1={},v1={}",
            "00".repeat(32),
            signature(&s, 1000, body)
        );
        assert_eq!(verify(&s, &two, body, 1000, tol), Ok(()));
        for bad in [
            "",
            "v1=ab",
            "t=1000",
            "t=x,v1=ab",
            "t=1,t=1,v1=ab",
            "garbage",
        ] {
            assert_eq!(
                verify(&s, bad, body, 1000, tol),
                Err(VerifyError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            verify(&s, "t=1000,v1=zz", body, 1000, tol),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn secrets_are_trimmed_bounded_below_and_never_printed() {
        assert!(Secret::from_text("short\n").is_err());
        assert!(Secret::from_text("   ").is_err());
        let s = Secret::from_text("  0123456789abcdef  \n").unwrap();
        assert_eq!(s.bytes(), b"0123456789abcdef");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
