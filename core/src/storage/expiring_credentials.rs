//! S3 credentials that expire, kept until shortly before they do: those
//! that a profile's `credential_process` prints and those that STS gives
//! for an assumed role.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use object_store::CredentialProvider;
use object_store::aws::AwsCredential;
use tokio::sync::Mutex;
use tracing::warn;

/// How long before they expire credentials are fetched again, as the SDKs do.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// How long credentials that still work are used after a fetch failed,
/// before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Credentials and when they expire; never, when not said.
#[derive(Debug, Clone)]
pub struct Expiring {
    pub credential: Arc<AwsCredential>,
    pub expires: Option<DateTime<Utc>>,
}

/// A way to get credentials afresh.
#[async_trait]
pub trait FetchCredentials: fmt::Debug + Send + Sync + 'static {
    async fn fetch(&self) -> object_store::Result<Expiring>;
}

/// A credential provider that fetches with `F` and keeps what it got until
/// five minutes before it expires. If fetching again fails then, it keeps
/// using what it has until that expires, trying again every 30 seconds, as
/// the SDKs do.
#[derive(Debug)]
pub struct Refreshing<F> {
    fetcher: F,
    current: Mutex<Option<Held>>,
}

#[derive(Debug)]
struct Held {
    credential: Arc<AwsCredential>,
    /// When to fetch again; never when they do not expire.
    refresh_at: Option<Instant>,
    expires_at: Option<Instant>,
}

impl<F> Refreshing<F> {
    pub fn new(fetcher: F) -> Self {
        Self {
            fetcher,
            current: Mutex::new(None),
        }
    }
}

#[async_trait]
impl<F: FetchCredentials> CredentialProvider for Refreshing<F> {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        // Held while fetching, so that concurrent requests fetch once.
        let mut current = self.current.lock().await;
        let now = Instant::now();
        if let Some(held) = current.as_mut() {
            if held.refresh_at.is_none_or(|refresh_at| now < refresh_at) {
                return Ok(Arc::clone(&held.credential));
            }
            match self.fetcher.fetch().await {
                Ok(fetched) => *held = Held::new(fetched),
                Err(error) if held.expires_at.is_none_or(|expires_at| now < expires_at) => {
                    let error = super::redacted_error(&error);
                    warn!(%error, "could not renew credentials; using those held until they \
                        expire");
                    held.refresh_at = Some(now + RETRY_AFTER);
                }
                Err(error) => return Err(error),
            }
            return Ok(Arc::clone(&held.credential));
        }
        let held = Held::new(self.fetcher.fetch().await?);
        let credential = Arc::clone(&held.credential);
        *current = Some(held);
        Ok(credential)
    }
}

impl Held {
    fn new(fetched: Expiring) -> Self {
        remember_credential(&fetched.credential);
        let left = fetched
            .expires
            .map(|expires| (expires - Utc::now()).to_std().unwrap_or_default());
        let now = Instant::now();
        Self {
            credential: fetched.credential,
            // Credentials that expire within the margin are used once.
            refresh_at: left.map(|left| now + left.saturating_sub(REFRESH_MARGIN)),
            expires_at: left.map(|left| now + left),
        }
    }
}

/// Remembers the secret parts of `credential`, to be blanked in any text
/// that leaves the process (see [`super::echoes`]).
pub fn remember_credential(credential: &AwsCredential) {
    super::echoes::remember_expiring_secret(&credential.secret_key);
    if let Some(token) = &credential.token {
        super::echoes::remember_expiring_secret(token);
    }
}

/// Parses an expiration time as AWS writes them (RFC 3339).
pub fn parse_expiration(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|e| format!("'{text}' is not an RFC 3339 time: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Gives credentials expiring `expires_in` from now (never when
    /// `None`), counting its fetches; fails from the fetch `fails_from` on.
    #[derive(Debug)]
    struct Counting {
        expires_in: Option<chrono::Duration>,
        fetches: Arc<AtomicUsize>,
        fails_from: usize,
    }

    #[async_trait]
    impl FetchCredentials for Counting {
        async fn fetch(&self) -> object_store::Result<Expiring> {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst);
            if n >= self.fails_from {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: "the vault is sealed".into(),
                });
            }
            Ok(Expiring {
                credential: Arc::new(AwsCredential {
                    key_id: format!("AKIA{n}"),
                    secret_key: "secret".into(),
                    token: None,
                }),
                expires: self.expires_in.map(|left| Utc::now() + left),
            })
        }
    }

    async fn fetches_for_three_requests(expires_in: Option<chrono::Duration>) -> usize {
        let fetches = Arc::new(AtomicUsize::new(0));
        let provider = Refreshing::new(Counting {
            expires_in,
            fetches: Arc::clone(&fetches),
            fails_from: usize::MAX,
        });
        for _ in 0..3 {
            provider.get_credential().await.expect("credentials");
        }
        fetches.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn credentials_are_kept_until_they_are_about_to_expire() {
        assert_eq!(fetches_for_three_requests(None).await, 1, "no expiration");
        let hour = Some(chrono::Duration::hours(1));
        assert_eq!(fetches_for_three_requests(hour).await, 1);
        let soon = Some(chrono::Duration::minutes(2));
        assert_eq!(
            fetches_for_three_requests(soon).await,
            3,
            "within the margin"
        );
    }

    #[tokio::test]
    async fn credentials_that_still_work_serve_while_renewing_them_fails() {
        let provider = |expires_in| {
            Refreshing::new(Counting {
                expires_in: Some(expires_in),
                fetches: Arc::new(AtomicUsize::new(0)),
                fails_from: 1,
            })
        };
        // Within the margin, the renewal fails: the held ones still serve.
        let renewing = provider(chrono::Duration::minutes(2));
        let first = renewing.get_credential().await.expect("fetched");
        let again = renewing.get_credential().await.expect("still valid");
        assert_eq!(first.key_id, again.key_id);
        // Expired, they do not.
        let expired = provider(chrono::Duration::seconds(-1));
        expired.get_credential().await.expect("fetched");
        let error = expired.get_credential().await.expect_err("expired");
        assert!(error.to_string().contains("the vault is sealed"), "{error}");
    }

    #[test]
    fn expirations_are_read_as_aws_writes_them() {
        let parsed = parse_expiration("2026-12-06T11:00:00Z").expect("parses");
        assert_eq!(parsed.to_rfc3339(), "2026-12-06T11:00:00+00:00");
        assert!(parse_expiration("2026-12-06T11:00:00.123+01:00").is_ok());
        let error = parse_expiration("tomorrow").expect_err("refused");
        assert!(error.contains("'tomorrow'"), "{error}");
    }
}
