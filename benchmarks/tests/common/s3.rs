//! A real S3-compatible server for the tests: `moto` in server mode, on a
//! free loopback port, stopped when dropped.
//!
//! `moto_server` is taken from `QUIVER_MOTO_SERVER`, else from `PATH`, else
//! installed from PyPI into a virtualenv in the temp folder on first use, so
//! that the tests run on a fresh machine with only Python.

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

pub struct S3Server {
    _server: super::ServerProcess,
    port: u16,
}

impl S3Server {
    /// Starts moto and waits until it answers.
    pub fn start() -> Self {
        let port = super::processes::free_port();
        let mut command = Command::new(moto_server());
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let server = super::ServerProcess::start(
            command,
            port,
            "moto",
            "install it with: pip install 'moto[server]'",
        );
        Self {
            _server: server,
            port,
        }
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

    /// Multipart uploads started in `bucket` and neither completed nor
    /// aborted (S3 `ListMultipartUploads`).
    pub fn unfinished_uploads(&self, bucket: &str) -> usize {
        let response = self.unsigned_request("GET", &format!("/{bucket}?uploads"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "ListMultipartUploads {bucket} failed: {response}"
        );
        response.matches("<Upload>").count()
    }

    /// A bare request, which moto accepts without a signature.
    fn unsigned_request(&self, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("send a request to moto");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read moto's response");
        response
    }

    /// The store options that reach this server, as a statement names them.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws.access_key_id", ACCESS_KEY.to_owned()),
            ("aws.secret_access_key", SECRET_KEY.to_owned()),
            ("aws.region", REGION.to_owned()),
            ("aws.endpoint", self.endpoint()),
            ("aws.allow_http", "true".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// `OPTIONS (...)` for a table or `COPY` on this server.
    pub fn sql_options(&self) -> String {
        let pairs: Vec<String> = self
            .options()
            .iter()
            .map(|(key, value)| format!("'{key}' '{value}'"))
            .collect();
        format!("OPTIONS ({})", pairs.join(", "))
    }

    /// A client of `bucket`, for the tests' own uploads and checks.
    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
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
    let on_path = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if on_path {
        return "moto_server".into();
    }
    let venv = super::python::venv("quiver-moto-venv", &["moto[server]>=5,<6"]);
    venv.join("bin").join("moto_server").display().to_string()
}
