//! Store error texts without what a store echoes of a request's credentials.
//!
//! S3, and GCS's XML API, answer a signature they refuse with the request as
//! they saw it: the access key id, the string to sign, the canonical request
//! (whose headers include `x-amz-security-token`, a session token) and the
//! signature. object_store puts that body in its error message, which would
//! then reach logs, the job history and clients. A signed URL in a message
//! carries the same things as query parameters, and a location may be
//! written with a password (`http://user:password@host/`), which Quiver
//! refuses but the statement's text still holds. [`redact_store_echoes`]
//! blanks them wherever an error or a statement becomes text that leaves
//! the process.
//!
//! A store may also echo a credential where no rule above looks (inside a
//! `<Message>`, in a header it quotes). So the secrets this process was
//! given, by store options, the environment or a credential source, are
//! remembered ([`remember_secret`]) and blanked wherever they appear.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{LazyLock, PoisonError, RwLock};

/// XML elements of an error body that echo the request's credentials.
const ECHOED_ELEMENTS: &[&str] = &[
    "AWSAccessKeyId",
    "StringToSign",
    "StringToSignBytes",
    "SignatureProvided",
    "CanonicalRequest",
    "CanonicalRequestBytes",
    "GoogleAccessId",
    // S3's ExpiredToken and InvalidToken answers: the session token.
    "Token-0",
    // Azure's refused signature: the signature and the string signed.
    "AuthenticationErrorDetail",
];

/// Query parameters of a signed URL that carry credentials, compared
/// without regard to case.
const SIGNED_QUERY_PARAMETERS: &[&str] = &[
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-security-token",
    "x-goog-credential",
    "x-goog-signature",
    "awsaccesskeyid",
    "signature",
    "sig",
];

const REDACTED: &str = "***";

/// Environment variables whose values are credentials of a store.
const SECRET_VARIABLES: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_CLIENT_SECRET",
    "AWS_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
];

/// Values shorter than this are not remembered: blanking a short word
/// everywhere would blank ordinary text, and real credentials are long.
const SHORTEST_REMEMBERED: usize = 8;
/// How many secrets given to this process (by store options, the
/// environment) are remembered; the least recently given go first, only
/// past as many stores as no cluster configures.
const MOST_LASTING: usize = 1024;
/// How many credentials that expire are remembered. They are fetched again
/// every hour or so for the life of the process, and kept apart, so that
/// they never push out a lasting secret; an old one has expired.
const MOST_EXPIRING: usize = 64;

#[derive(Default)]
struct Remembered {
    lasting: VecDeque<String>,
    expiring: VecDeque<String>,
}

static REMEMBERED: LazyLock<RwLock<Remembered>> = LazyLock::new(Default::default);

/// Remembers `secret`, given to this process, so that
/// [`redact_store_echoes`] blanks it wherever it appears.
pub fn remember_secret(secret: &str) {
    remember(secret, |remembered| (&mut remembered.lasting, MOST_LASTING));
}

/// Remembers `secret`, a credential that expires, as [`remember_secret`].
pub fn remember_expiring_secret(secret: &str) {
    remember(secret, |remembered| {
        (&mut remembered.expiring, MOST_EXPIRING)
    });
}

fn remember(secret: &str, kind: impl FnOnce(&mut Remembered) -> (&mut VecDeque<String>, usize)) {
    let secret = secret.trim();
    if secret.chars().count() < SHORTEST_REMEMBERED {
        return;
    }
    let mut remembered = REMEMBERED.write().unwrap_or_else(PoisonError::into_inner);
    let (secrets, most) = kind(&mut remembered);
    // Given again, it is the newest.
    if let Some(at) = secrets.iter().position(|known| known == secret) {
        secrets.remove(at);
    } else if secrets.len() == most {
        secrets.pop_front();
    }
    secrets.push_back(secret.to_owned());
}

/// Remembers the store credentials of this process's environment.
pub fn remember_environment_secrets() {
    for name in SECRET_VARIABLES {
        if let Ok(value) = std::env::var(name) {
            remember_secret(&value);
        }
    }
}

/// Byte ranges of every remembered secret in `text`.
fn remembered_spans(text: &str) -> Vec<(usize, usize)> {
    let remembered = REMEMBERED.read().unwrap_or_else(PoisonError::into_inner);
    remembered
        .lasting
        .iter()
        .chain(&remembered.expiring)
        .flat_map(|secret| {
            text.match_indices(secret.as_str())
                .map(|(at, found)| (at, at + found.len()))
        })
        .collect()
}

/// `text` with the content of every echoed credential element, the value
/// of every signed query parameter and every URL's password replaced by `***`. Borrowed when there
/// is nothing to blank, which is nearly always.
pub fn redact_store_echoes(text: &str) -> Cow<'_, str> {
    let mut spans: Vec<(usize, usize)> = echoed_element_spans(text)
        .chain(signed_parameter_spans(text))
        .chain(url_password_spans(text))
        .chain(remembered_spans(text))
        .filter(|(start, end)| start < end)
        .collect();
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    spans.sort_unstable();
    let mut redacted = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in spans {
        // Spans may nest (a signed URL inside a canonical request).
        if end <= copied {
            continue;
        }
        let start = start.max(copied);
        redacted.push_str(&text[copied..start]);
        redacted.push_str(REDACTED);
        copied = end;
    }
    redacted.push_str(&text[copied..]);
    Cow::Owned(redacted)
}

/// An error's text for a log line or a report, echoes blanked.
pub fn redacted_error(error: &dyn std::fmt::Display) -> String {
    redact_store_echoes(&error.to_string()).into_owned()
}

/// Byte ranges of the contents of [`ECHOED_ELEMENTS`]; an element left
/// open runs to the end of the text.
fn echoed_element_spans(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    ECHOED_ELEMENTS.iter().flat_map(move |name| {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        text.match_indices(&open)
            .map(|(at, _)| at + open.len())
            .map(|start| {
                let end = text[start..]
                    .find(&close)
                    .map_or(text.len(), |offset| start + offset);
                (start, end)
            })
            .collect::<Vec<_>>()
    })
}

/// Byte ranges of the values of [`SIGNED_QUERY_PARAMETERS`] after a `?` or `&`.
fn signed_parameter_spans(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    text.char_indices()
        .filter(|&(_, c)| c == '?' || c == '&')
        .filter_map(move |(at, _)| {
            let rest = &text[at + 1..];
            let name_len = rest.find('=')?;
            let name = &rest[..name_len];
            if !SIGNED_QUERY_PARAMETERS
                .iter()
                .any(|known| name.eq_ignore_ascii_case(known))
            {
                return None;
            }
            let start = at + 1 + name_len + 1;
            let len = text[start..]
                .find(|c: char| matches!(c, '&' | '<' | '"' | '\'' | ')') || c.is_whitespace())
                .unwrap_or(text.len() - start);
            Some((start, start + len))
        })
}

/// Whether `text` holds a URL with a password (`scheme://user:password@host`),
/// as [`redact_store_echoes`] finds them: also one that a URL parser cannot
/// read, because the password holds a `/`.
pub fn holds_url_password(text: &str) -> bool {
    url_password_spans(text).next().is_some()
}

/// Byte ranges of the passwords in URLs (`scheme://user:password@host`).
/// A password may hold a `/` (AWS secret keys often do), which URL parsers
/// take for the end of the host, and then for no password at all. So the
/// user information runs from a user name (no `/` or `@` in it) to the
/// last `@` before the next `/`, wherever the first `/` lies; but a `:`
/// followed by digits and a `/` is a port, and an `@` after it is in the
/// path.
fn url_password_spans(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    text.match_indices("://")
        .filter_map(move |(at, separator)| {
            let start = at + separator.len();
            let url_len = text[start..]
                .find(|c: char| matches!(c, '\'' | '"' | ')' | '<' | '>') || c.is_whitespace())
                .unwrap_or(text.len() - start);
            let url = &text[start..start + url_len];
            let colon = url.find(':')?;
            if url[..colon].contains(['/', '@']) {
                return None;
            }
            let first_at = colon + url[colon..].find('@')?;
            let after_colon = &url[colon + 1..first_at];
            if let Some(slash) = after_colon.find('/')
                && after_colon[..slash]
                    .bytes()
                    .all(|byte| byte.is_ascii_digit())
            {
                return None;
            }
            let host_end = url[first_at..]
                .find('/')
                .map_or(url.len(), |offset| first_at + offset);
            let last_at = url[..host_end].rfind('@')?;
            Some((start + colon + 1, start + last_at))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_secret_is_blanked_wherever_a_store_echoes_it() {
        let token = "FwoGZXIvYXdzEJr//////////wEaDremembered0token";
        remember_secret(token);
        remember_secret("short");
        let answer = format!(
            "403 Forbidden: <Error><Code>InvalidToken</Code><Message>The provided token \
             {token} is malformed</Message></Error> (x-amz-security-token: {token})"
        );
        let redacted = redact_store_echoes(&answer);
        assert!(!redacted.contains(token), "{redacted}");
        assert_eq!(redacted.matches(REDACTED).count(), 2, "{redacted}");
        let plain = "a short word stays: short";
        assert_eq!(redact_store_echoes(plain), plain);
    }

    /// Credentials fetched again and again (every hour, for weeks) push out
    /// the oldest of their own kind only, never a secret given by a store
    /// option.
    #[test]
    fn expiring_credentials_never_push_out_a_lasting_secret() {
        let lasting = "option-secret-kept-for-good";
        remember_secret(lasting);
        for hour in 0..(MOST_LASTING + MOST_EXPIRING) {
            remember_expiring_secret(&format!("expiring-token-{hour:05}"));
        }
        let text = format!("echoed {lasting} and expiring-token-00000 and expiring-token-01087");
        assert_eq!(
            redact_store_echoes(&text),
            "echoed *** and expiring-token-00000 and ***"
        );
    }

    /// The body that S3 documents for a refused signature, as object_store
    /// puts it in its error message.
    const REFUSED_SIGNATURE: &str = "Error performing PUT https://lake.s3.amazonaws.com/out/part-0.parquet \
        in 41ms - Server returned non-2xx status code: 403 Forbidden: \
        <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SignatureDoesNotMatch</Code>\
        <Message>The request signature we calculated does not match the signature you provided.</Message>\
        <AWSAccessKeyId>AKIAIOSFODNN7EXAMPLE</AWSAccessKeyId>\
        <StringToSign>AWS4-HMAC-SHA256\n20261205T010203Z\n20261205/us-east-1/s3/aws4_request\nabc</StringToSign>\
        <SignatureProvided>fe5f80f77d5fa3beca038a248ff027</SignatureProvided>\
        <StringToSignBytes>41 57 53 34</StringToSignBytes>\
        <CanonicalRequest>PUT\n/out/part-0.parquet\n\nhost:lake.s3.amazonaws.com\n\
        x-amz-security-token:FwoGZXIvYXdzEXAMPLETOKEN\n\nhost;x-amz-security-token\nUNSIGNED-PAYLOAD</CanonicalRequest>\
        <CanonicalRequestBytes>50 55 54</CanonicalRequestBytes>\
        <RequestId>4442587FB7D0A2F9</RequestId></Error>";

    #[test]
    fn echoed_credentials_are_blanked_and_the_rest_kept() {
        let redacted = redact_store_echoes(REFUSED_SIGNATURE);
        for echoed in [
            "AKIAIOSFODNN7EXAMPLE",
            "FwoGZXIvYXdzEXAMPLETOKEN",
            "fe5f80f77d5fa3beca038a248ff027",
            "aws4_request",
            "41 57 53 34",
        ] {
            assert!(!redacted.contains(echoed), "{echoed} shows in {redacted}");
        }
        for kept in [
            "SignatureDoesNotMatch",
            "https://lake.s3.amazonaws.com/out/part-0.parquet",
            "403 Forbidden",
            "<AWSAccessKeyId>***</AWSAccessKeyId>",
            "<RequestId>4442587FB7D0A2F9</RequestId>",
        ] {
            assert!(redacted.contains(kept), "{kept} is missing from {redacted}");
        }
    }

    #[test]
    fn signed_url_parameters_are_blanked() {
        let text = "error sending request for url (https://acct.blob.core.windows.net/box/a.parquet\
            ?sv=2022-11-02&sig=c2VjcmV0%3D&se=2027) and \
            https://lake.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F20261205&X-Amz-Security-Token=tok \
            then";
        let redacted = redact_store_echoes(text);
        assert_eq!(
            redacted,
            "error sending request for url (https://acct.blob.core.windows.net/box/a.parquet\
            ?sv=2022-11-02&sig=***&se=2027) and \
            https://lake.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Security-Token=*** \
            then"
        );
    }

    #[test]
    fn url_passwords_are_blanked() {
        assert_eq!(
            redact_store_echoes(
                "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 'http://alice:Top:S3cret@host:8080/x/'"
            ),
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 'http://alice:***@host:8080/x/'"
        );
        // A password with a `/`, which URL parsers do not read as one (the
        // refusal of such a location must not repeat it), and one with `@`.
        assert_eq!(
            redact_store_echoes("cannot read the table at 's3://AKIAEX:wJalr/XUtn@lake/t/'"),
            "cannot read the table at 's3://AKIAEX:***@lake/t/'"
        );
        assert_eq!(
            redact_store_echoes("s3://k:a/b@c@lake/t@x/"),
            "s3://k:***@lake/t@x/"
        );
        assert!(holds_url_password("s3://AKIAEX:wJalr/XUtn@lake/t/"));
        // A user name alone (Azure's container) is kept, and so is a port
        // before a path with an `@`, or a path with a `:` and an `@`.
        let container = "abfss://lake@acct.dfs.core.windows.net/x/ and http://host:80/a@b \
                         and s3://lake/a:b@c/";
        assert!(matches!(redact_store_echoes(container), Cow::Borrowed(_)));
        assert!(!holds_url_password(container));
    }

    #[test]
    fn plain_messages_pass_unchanged() {
        for text in [
            "Object at location out/x.parquet not found",
            "the value a&b=c is fine, and so is ?x=1",
            "<Error><Code>NoSuchBucket</Code></Error>",
            "",
        ] {
            assert!(
                matches!(redact_store_echoes(text), Cow::Borrowed(_)),
                "{text}"
            );
        }
        // An element cut off by a truncated message is blanked to the end.
        assert_eq!(
            redact_store_echoes("<StringToSign>AWS4-HMAC"),
            "<StringToSign>***"
        );
    }
}
