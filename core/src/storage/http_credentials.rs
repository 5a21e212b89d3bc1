//! Credentials for HTTP(S) locations, given as statement options: a user
//! name and password (`http.username`, `http.password`: basic
//! authentication) or a token (`http.bearer_token`). They go in the
//! `Authorization` header of every request, marked sensitive so that no
//! log of the client shows it. A location's URL may not hold them: it
//! shows wherever the location does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};

/// The credential options of the `http` provider, without their prefix.
pub const CREDENTIAL_OPTIONS: [&str; 3] = ["username", "password", "bearer_token"];

/// Whether `name` (without its `http.` prefix) is a credential option.
pub fn is_credential_option(name: &str) -> bool {
    CREDENTIAL_OPTIONS.contains(&name.to_ascii_lowercase().as_str())
}

/// The headers that carry the credentials among `options` (an `http`
/// location's, without their prefix), if any. The error says what is
/// wrong without repeating a value.
pub fn authorization(options: &[(&str, &str)]) -> Result<Option<HeaderMap>, &'static str> {
    let find = |wanted: &str| {
        options
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| *value)
    };
    let (username, password, token) = (find("username"), find("password"), find("bearer_token"));
    let value = match (username, password, token) {
        (None, None, None) => return Ok(None),
        (None, None, Some("")) => return Err("'http.bearer_token' must not be empty"),
        (None, None, Some(token)) => format!("Bearer {token}"),
        (_, _, Some(_)) => {
            return Err(
                "give either 'http.username' and 'http.password' or 'http.bearer_token', not both",
            );
        }
        (None, Some(_), None) => return Err("'http.password' needs 'http.username'"),
        (Some(""), _, None) => return Err("'http.username' must not be empty"),
        (Some(username), password, None) => {
            if username.contains(':') {
                return Err(
                    "'http.username' must not hold ':', which basic authentication cannot carry",
                );
            }
            let pair = STANDARD.encode(format!("{username}:{}", password.unwrap_or_default()));
            // A server may echo the header in an error: blanked there too.
            super::echoes::remember_secret(&pair);
            format!("Basic {pair}")
        }
    };
    let mut header = HeaderValue::from_str(&value)
        .map_err(|_| "an HTTP credential option holds a character that a header cannot")?;
    header.set_sensitive(true);
    Ok(Some(HeaderMap::from_iter([(AUTHORIZATION, header)])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(options: &[(&str, &str)]) -> Result<Option<String>, &'static str> {
        authorization(options).map(|headers| {
            headers.map(|headers| {
                let value = &headers[AUTHORIZATION];
                assert!(value.is_sensitive());
                value.to_str().expect("text").to_owned()
            })
        })
    }

    #[test]
    fn credentials_become_an_authorization_header() {
        assert_eq!(header(&[]), Ok(None));
        assert_eq!(
            header(&[("username", "alice"), ("password", "s3cret")]),
            Ok(Some(format!("Basic {}", STANDARD.encode("alice:s3cret"))))
        );
        assert_eq!(
            header(&[("Username", "alice")]),
            Ok(Some(format!("Basic {}", STANDARD.encode("alice:"))))
        );
        assert_eq!(
            header(&[("bearer_token", "t0ken")]),
            Ok(Some("Bearer t0ken".to_owned()))
        );
        for wrong in [
            &[("username", "alice"), ("bearer_token", "t")][..],
            &[("password", "s3cret"), ("bearer_token", "t")],
            &[("password", "s3cret")],
            &[("username", "a:b"), ("password", "s3cret")],
            &[("bearer_token", "line\nbreak")],
            &[("bearer_token", "")],
            &[("username", ""), ("password", "s3cret")],
        ] {
            let error = header(wrong).expect_err("refused");
            assert!(
                !error.contains("s3cret") && !error.contains("line"),
                "{error}"
            );
        }
    }
}
