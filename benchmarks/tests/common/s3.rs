//! A real S3-compatible server for the tests: `moto` in server mode, on a
//! free loopback port, stopped when dropped.
//!
//! `moto_server` is taken from `QUIVER_MOTO_SERVER`, else from `PATH` if it
//! is recent enough, else installed from PyPI into a virtualenv in the temp
//! folder on first use, so that the tests run on a fresh machine with only
//! Python.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

/// Credentials the tests use. moto accepts any; the secret is distinctive so
/// that tests can check it never shows.
pub const ACCESS_KEY: &str = "quiver-test-key";
pub const SECRET_KEY: &str = "quiver-secret-Z9x7Q";
pub const REGION: &str = "us-east-1";
/// The account that moto's IAM users and roles belong to.
const ACCOUNT: &str = "123456789012";

pub struct S3Server {
    _server: super::ServerProcess,
    port: u16,
    /// Whether moto checks requests once the set-up's are done.
    checks_requests: bool,
}

/// An access key and its secret.
#[derive(Debug, Clone)]
pub struct S3Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl S3Credentials {
    /// The credentials that an S3 server without IAM accepts.
    pub fn any() -> Self {
        Self {
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
        }
    }
}

impl S3Server {
    /// Starts moto and waits until it answers.
    pub fn start() -> Self {
        Self::start_authorizing_after(None)
    }

    /// Starts moto so that, once it has created `bucket` and one IAM user
    /// per `(name, actions)` allowed those S3 actions (`s3:GetObject`, ...)
    /// on every resource, it authenticates and authorizes every request as
    /// AWS does. Returns the users' credentials, in order.
    pub fn start_with_users(bucket: &str, users: &[(&str, &[&str])]) -> (Self, Vec<S3Credentials>) {
        let (server, credentials, _) = Self::start_with_users_and_roles(bucket, users, &[]);
        (server, credentials)
    }

    /// As [`Self::start_with_users`], with IAM roles too, each allowed its
    /// actions on every resource and assumable by those users (moto checks
    /// a role's trust policy); returns the roles' ARNs as well.
    pub fn start_with_users_and_roles(
        bucket: &str,
        users: &[(&str, &[&str])],
        roles: &[(&str, &[&str])],
    ) -> (Self, Vec<S3Credentials>, Vec<String>) {
        // moto leaves this many requests unchecked: the set-up's.
        let setup_requests = 1 + 3 * users.len() + 2 * roles.len();
        let server = Self::start_authorizing_after(Some(setup_requests));
        server.create_bucket(bucket);
        let credentials = users
            .iter()
            .map(|(name, actions)| server.create_user(name, actions))
            .collect();
        let trusted: Vec<String> = users
            .iter()
            .map(|(name, _)| format!("arn:aws:iam::{ACCOUNT}:user/{name}"))
            .collect();
        let arns = roles
            .iter()
            .map(|(name, actions)| server.create_role(name, actions, &trusted))
            .collect();
        (server, credentials, arns)
    }

    fn start_authorizing_after(setup_requests: Option<usize>) -> Self {
        let port = super::processes::free_port();
        let mut command = Command::new(moto_server());
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(requests) = setup_requests {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", requests.to_string());
        }
        let server = super::ServerProcess::start(
            command,
            port,
            "moto",
            "install it with: pip install 'moto[server]'",
        );
        Self {
            _server: server,
            port,
            checks_requests: setup_requests.is_some(),
        }
    }

    /// Creates an IAM user with an access key, allowed `actions` on every
    /// resource (three IAM requests).
    fn create_user(&self, name: &str, actions: &[&str]) -> S3Credentials {
        self.iam(&format!("Action=CreateUser&UserName={name}"));
        let key = self.iam(&format!("Action=CreateAccessKey&UserName={name}"));
        let credentials = S3Credentials {
            access_key: element(&key, "AccessKeyId"),
            secret_key: element(&key, "SecretAccessKey"),
        };
        let policy = policy_allowing(actions);
        self.iam(&format!(
            "Action=PutUserPolicy&UserName={name}&PolicyName=access&PolicyDocument={policy}"
        ));
        credentials
    }

    /// Creates an IAM role that the principals `trusted` may assume,
    /// allowed `actions` on every resource (two IAM requests); returns its
    /// ARN.
    fn create_role(&self, name: &str, actions: &[&str], trusted: &[String]) -> String {
        let trust = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"AWS": trusted},
                "Action": "sts:AssumeRole",
            }],
        })
        .to_string();
        let trust: String = url::form_urlencoded::byte_serialize(trust.as_bytes()).collect();
        let role = self.iam(&format!(
            "Action=CreateRole&RoleName={name}&AssumeRolePolicyDocument={trust}"
        ));
        let policy = policy_allowing(actions);
        self.iam(&format!(
            "Action=PutRolePolicy&RoleName={name}&PolicyName=access&PolicyDocument={policy}"
        ));
        element(&role, "Arn")
    }

    /// Sends one IAM request, of the set-up; returns the response.
    fn iam(&self, form: &str) -> String {
        let response = self.unchecked_iam(form);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "IAM {form} failed: {response}"
        );
        response
    }

    /// Sends one IAM request without a valid signature: moto answers it
    /// only while it leaves requests unchecked.
    fn unchecked_iam(&self, form: &str) -> String {
        self.request(
            "POST",
            "/",
            // moto routes by the service its credential scope names.
            &[
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=setup/20260101/us-east-1/iam/aws4_request, \
                     SignedHeaders=host, Signature=0",
                ),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &format!("{form}&Version=2010-05-08"),
        )
    }

    /// Replaces what the IAM user `name` may do with `actions`, at once for
    /// the keys it has. moto checks every request once the set-up's are
    /// done, so it is told to leave one more unchecked (its `reset-auth`);
    /// a request of another client may take that one first, so this tries
    /// until its own goes through.
    pub fn set_user_actions(&self, name: &str, actions: &[&str]) {
        let policy = policy_allowing(actions);
        let form = format!(
            "Action=PutUserPolicy&UserName={name}&PolicyName=access&PolicyDocument={policy}"
        );
        let response = self.unchecked(|| self.unchecked_iam(&form));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "IAM {form} failed: {response}"
        );
    }

    /// The response to `request`, which moto answers only while it leaves
    /// requests unchecked. On a server that checks them, moto is told to
    /// leave one more unchecked (its `reset-auth`); a request of another
    /// client may take that one first, so this tries until `request` is
    /// answered.
    fn unchecked(&self, request: impl Fn() -> String) -> String {
        if !self.checks_requests {
            return request();
        }
        let mut response = String::new();
        for _ in 0..100 {
            let reset = self.request("POST", "/moto-api/reset-auth", &[], "1");
            assert!(reset.starts_with("HTTP/1.1 200"), "reset-auth: {reset}");
            response = request();
            if response.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        response
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (S3 `CreateBucket`, a bare PUT).
    pub fn create_bucket(&self, bucket: &str) {
        let response = self.unsigned_request("PUT", &format!("/{bucket}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "CreateBucket {bucket} failed: {response}"
        );
    }

    /// Deletes an empty bucket (S3 `DeleteBucket`, a bare DELETE).
    pub fn delete_bucket(&self, bucket: &str) {
        let response = self.unsigned_request("DELETE", &format!("/{bucket}"));
        assert!(
            response.starts_with("HTTP/1.1 204"),
            "DeleteBucket {bucket} failed: {response}"
        );
    }

    /// Multipart uploads started in `bucket` and neither completed nor
    /// aborted (S3 `ListMultipartUploads`).
    pub fn unfinished_uploads(&self, bucket: &str) -> usize {
        let response =
            self.unchecked(|| self.unsigned_request("GET", &format!("/{bucket}?uploads")));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "ListMultipartUploads {bucket} failed: {response}"
        );
        response.matches("<Upload>").count()
    }

    /// A bare request, which moto accepts without a signature.
    fn unsigned_request(&self, method: &str, path: &str) -> String {
        self.request(method, path, &[], "")
    }

    /// A request with `headers` and `body`, unsigned unless a header signs it.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        let headers: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .expect("send a request to moto");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read moto's response");
        response
    }

    /// The environment variables that make a process reach this server as
    /// `credentials`, with no statement options.
    pub fn env_as(&self, credentials: &S3Credentials) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", credentials.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", credentials.secret_key.clone()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
        .map(|(key, value)| (key.to_owned(), value))
        .to_vec()
    }

    /// The store options that reach this server, as a statement names them.
    pub fn options(&self) -> Vec<(String, String)> {
        self.options_as(&S3Credentials::any())
    }

    /// [`Self::options`] with `credentials`.
    pub fn options_as(&self, credentials: &S3Credentials) -> Vec<(String, String)> {
        [
            ("aws.access_key_id", credentials.access_key.clone()),
            ("aws.secret_access_key", credentials.secret_key.clone()),
            ("aws.region", REGION.to_owned()),
            ("aws.endpoint", self.endpoint()),
            ("aws.allow_http", "true".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// The server's process id, to pause it with a signal.
    pub fn pid(&self) -> u32 {
        self._server.pid()
    }

    /// `OPTIONS (...)` for a table or `COPY` on this server.
    pub fn sql_options(&self) -> String {
        self.sql_options_as(&S3Credentials::any())
    }

    /// [`Self::sql_options`] with `credentials`.
    pub fn sql_options_as(&self, credentials: &S3Credentials) -> String {
        let pairs: Vec<String> = self
            .options_as(credentials)
            .iter()
            .map(|(key, value)| format!("'{key}' '{value}'"))
            .collect();
        format!("OPTIONS ({})", pairs.join(", "))
    }

    /// A client of `bucket`, for the tests' own uploads and checks.
    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        self.store_as(bucket, &S3Credentials::any())
    }

    /// [`Self::store`] with `credentials`.
    pub fn store_as(&self, bucket: &str, credentials: &S3Credentials) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_access_key_id(&credentials.access_key)
                .with_secret_access_key(&credentials.secret_key)
                .with_region(REGION)
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .build()
                .expect("S3 client"),
        )
    }

    /// Uploads every file below `dir` to `bucket` under `prefix`.
    pub async fn upload_dir(&self, bucket: &str, dir: &Path, prefix: &str) {
        super::upload_dir(&self.store(bucket), dir, prefix).await;
    }
}

/// Where `moto_server` is, installing it if it is nowhere.
fn moto_server() -> String {
    if let Ok(program) = std::env::var("QUIVER_MOTO_SERVER")
        && !program.is_empty()
    {
        return program;
    }
    // 5.2.6 or later: older ones reject correctly signed listings with a
    // prefix once IAM checks are on. One on the path is taken if `python3`
    // has it at that version (as `.ci/run` checks); else the tests' own.
    let on_path = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let recent = || {
        Command::new("python3")
            .args([
                "-c",
                "import moto, sys; \
                 sys.exit(tuple(map(int, moto.__version__.split('.')[:3])) < (5, 2, 6))",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if on_path && recent() {
        return "moto_server".into();
    }
    let venv = super::python::venv("quiver-moto-5.2.6-venv", &["moto[server]>=5.2.6,<6"]);
    venv.join("bin").join("moto_server").display().to_string()
}

/// The text of the first `<tag>` element of an XML response.
fn element(response: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = response.find(&open).expect("the element") + open.len();
    let end = start + response[start..].find('<').expect("its end");
    response[start..end].to_owned()
}

/// An IAM policy that allows `actions` on every resource, form-encoded.
fn policy_allowing(actions: &[&str]) -> String {
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
    })
    .to_string();
    url::form_urlencoded::byte_serialize(policy.as_bytes()).collect()
}
