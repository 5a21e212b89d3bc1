//! S3 credentials of a role that an AWS profile assumes (`role_arn` with a
//! `source_profile`), as the AWS CLI and SDKs assume it: STS `AssumeRole`,
//! signed with the source profile's credentials.
//!
//! The temporary credentials are kept until shortly before they expire
//! ([`super::expiring_credentials`]) and asked for again then. A refusal
//! names the role, the STS endpoint and STS's error code and message; the
//! request's keys never appear. A request that fails on its way or with a
//! server error is tried again a few times first.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::header::CONTENT_TYPE;
use object_store::ClientOptions;
use object_store::aws::{AwsAuthorizer, AwsCredential, AwsCredentialProvider};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use serde::Deserialize;

use super::expiring_credentials::{Expiring, FetchCredentials, parse_expiration};

/// The STS API version of `AssumeRole`.
const STS_VERSION: &str = "2011-06-15";
/// How many times a request that failed on its way or with a server error
/// is sent in all.
const ATTEMPTS: u32 = 3;
/// How much of an answer that is not STS's error format an error shows.
const SHOWN_BODY: usize = 200;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The role that a profile assumes, as its settings give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSettings {
    pub role_arn: String,
    /// `role_session_name`; Quiver names the session when it is not given.
    pub session_name: Option<String>,
    pub external_id: Option<String>,
    /// `duration_seconds`; STS's default (an hour) when not given.
    pub duration_seconds: Option<u32>,
}

/// Assumes one role through one STS endpoint.
#[derive(Debug)]
pub struct AssumeRole {
    role: RoleSettings,
    /// The credentials that ask STS: the source profile's.
    source: AwsCredentialProvider,
    /// The STS endpoint, `https://sts.<region>.amazonaws.com` by default.
    endpoint: String,
    /// The region that requests are signed for.
    region: String,
    client: HttpClient,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResponse {
    assume_role_result: AssumeRoleResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

/// STS's refusal: `<Error>` in AWS's answers, inside `<Errors>` in
/// some compatible servers'.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorResponse {
    error: Option<StsError>,
    errors: Option<Errors>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Errors {
    error: StsError,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    code: String,
    message: Option<String>,
}

impl AssumeRole {
    pub fn new(
        role: RoleSettings,
        source: AwsCredentialProvider,
        endpoint: String,
        region: String,
    ) -> object_store::Result<Self> {
        let options = ClientOptions::new()
            .with_allow_http(endpoint.starts_with("http://"))
            .with_timeout(REQUEST_TIMEOUT);
        let client = ReqwestConnector::default().connect(&options)?;
        Ok(Self {
            role,
            source,
            endpoint,
            region,
            client,
        })
    }

    fn error(&self, message: impl Into<String>) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: format!(
                "assuming the AWS role {} through {} failed: {}",
                self.role.role_arn,
                self.endpoint,
                message.into()
            )
            .into(),
        }
    }

    /// The form of the `AssumeRole` request.
    fn form(&self) -> String {
        let session_name = self.role.session_name.clone().unwrap_or_else(|| {
            let millis = chrono::Utc::now().timestamp_millis();
            format!("quiver-{millis}")
        });
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("Action", "AssumeRole")
            .append_pair("Version", STS_VERSION)
            .append_pair("RoleArn", &self.role.role_arn)
            .append_pair("RoleSessionName", &session_name);
        if let Some(external_id) = &self.role.external_id {
            form.append_pair("ExternalId", external_id);
        }
        if let Some(seconds) = self.role.duration_seconds {
            form.append_pair("DurationSeconds", &seconds.to_string());
        }
        form.finish()
    }

    /// Sends one signed `AssumeRole` request; returns the status and body.
    async fn send(
        &self,
        source: &AwsCredential,
        form: &str,
    ) -> Result<(http::StatusCode, bytes::Bytes), String> {
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(&self.endpoint)
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(HttpRequestBody::from(form.to_owned()))
            .map_err(|e| format!("the request could not be made: {e}"))?;
        AwsAuthorizer::new(source, "sts", &self.region).authorize(&mut request, None);
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, body))
    }
}

#[async_trait]
impl FetchCredentials for AssumeRole {
    async fn fetch(&self) -> object_store::Result<Expiring> {
        let source = self.source.get_credential().await?;
        let form = self.form();
        let mut attempt = 1;
        let (status, body) = loop {
            match self.send(&source, &form).await {
                Ok((status, _)) if status.is_server_error() && attempt < ATTEMPTS => {}
                Ok(answer) => break answer,
                Err(_) if attempt < ATTEMPTS => {}
                Err(e) => return Err(self.error(e)),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            attempt += 1;
        };
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(self.error(refusal(status, &text)));
        }
        let response: AssumeRoleResponse = quick_xml::de::from_str(&text).map_err(|_| {
            self.error("STS answered without credentials (no AssumeRoleResult/Credentials)")
        })?;
        let credentials = response.assume_role_result.credentials;
        let expires = parse_expiration(&credentials.expiration)
            .map_err(|e| self.error(format!("STS gave an Expiration that {e}")))?;
        Ok(Expiring {
            credential: Arc::new(AwsCredential {
                key_id: credentials.access_key_id,
                secret_key: credentials.secret_access_key,
                token: Some(credentials.session_token),
            }),
            expires: Some(expires),
        })
    }
}

/// What STS said when it refused: its error code and message.
fn refusal(status: http::StatusCode, text: &str) -> String {
    let response = quick_xml::de::from_str::<ErrorResponse>(text).ok();
    match response.and_then(|response| response.error.or(response.errors.map(|e| e.error))) {
        Some(StsError {
            code,
            message: Some(message),
        }) => format!("{status}: {code}: {message}"),
        Some(StsError {
            code,
            message: None,
        }) => format!("{status}: {code}"),
        // Not STS's error format (a proxy's page, say): its start.
        None => {
            let start: String = text.trim().chars().take(SHOWN_BODY).collect();
            format!("{status}: {start}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_gives_stss_code_and_message() {
        let text = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>Sender</Type>
    <Code>AccessDenied</Code>
    <Message>User: arn:aws:iam::123456789012:user/base is not authorized to perform: sts:AssumeRole</Message>
  </Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>"#;
        assert_eq!(
            refusal(http::StatusCode::FORBIDDEN, text),
            "403 Forbidden: AccessDenied: User: arn:aws:iam::123456789012:user/base is not \
             authorized to perform: sts:AssumeRole"
        );
        let nested = "<ErrorResponse><Errors><Error><Code>AccessDenied</Code>\
                      <Type>Sender</Type></Error></Errors></ErrorResponse>";
        assert_eq!(
            refusal(http::StatusCode::FORBIDDEN, nested),
            "403 Forbidden: AccessDenied"
        );
        assert_eq!(
            refusal(http::StatusCode::BAD_GATEWAY, "<html>proxy</html>"),
            "502 Bad Gateway: <html>proxy</html>"
        );
    }

    #[test]
    fn the_request_names_the_role_and_what_the_profile_asks() {
        let role = RoleSettings {
            role_arn: "arn:aws:iam::123456789012:role/lake admin".into(),
            session_name: Some("nightly".into()),
            external_id: Some("ext-1".into()),
            duration_seconds: Some(900),
        };
        let source: AwsCredentialProvider =
            Arc::new(object_store::StaticCredentialProvider::new(AwsCredential {
                key_id: "AKIA".into(),
                secret_key: "secret".into(),
                token: None,
            }));
        let assume = AssumeRole::new(
            role,
            source,
            "https://sts.eu-west-1.amazonaws.com".into(),
            "eu-west-1".into(),
        )
        .expect("client");
        assert_eq!(
            assume.form(),
            "Action=AssumeRole&Version=2011-06-15\
             &RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Flake+admin\
             &RoleSessionName=nightly&ExternalId=ext-1&DurationSeconds=900"
        );
    }
}
