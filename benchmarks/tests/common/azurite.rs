//! A real Azure Blob Storage server for the tests: Azurite, Microsoft's own
//! emulator (npm), on a free loopback port, stopped when dropped.
//!
//! `azurite-blob` is taken from `QUIVER_AZURITE`, else from `PATH`, else
//! installed with npm into the temp folder on first use. Containers are
//! created with Microsoft's Python SDK (`azure-storage-blob`), which signs
//! the request as Azure requires; it is installed the same way as moto.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::azure::MicrosoftAzureBuilder;

/// Azurite's fixed development account, as documented by Microsoft.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct AzuriteServer {
    _server: super::ServerProcess,
    port: u16,
    _data: tempfile::TempDir,
}

impl AzuriteServer {
    /// Starts Azurite's blob service and waits until it answers.
    pub fn start() -> Self {
        let port = super::processes::free_port();
        let data = tempfile::tempdir().expect("azurite folder");
        let mut command = Command::new(azurite_blob());
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(data.path())
            .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"]);
        let server = super::ServerProcess::start(
            command,
            port,
            "azurite",
            "install it with: npm install -g azurite",
        );
        Self {
            _server: server,
            port,
            _data: data,
        }
    }

    /// The account's blob endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Creates a container with Microsoft's SDK: a signed request.
    pub fn create_container(&self, container: &str) {
        self.run_sdk(
            "service.create_container(sys.argv[2])",
            container,
            &format!("creating container {container}"),
        );
    }

    /// Blobs of `container` that hold uncommitted blocks: uploads neither
    /// completed nor aborted, which no plain listing shows.
    pub fn blobs_with_uncommitted_blocks(&self, container: &str) -> usize {
        let output = self.run_sdk(
            "client = service.get_container_client(sys.argv[2])\n\
             print(sum(1 for blob in client.list_blobs(include=['uncommittedblobs'])\n\
                 if client.get_blob_client(blob.name).get_block_list('uncommitted')[1]))",
            container,
            &format!("listing the uncommitted blocks of {container}"),
        );
        output.trim().parse().expect("a count of blobs")
    }

    /// Runs `code` with Microsoft's Python SDK, `service` a client of the
    /// account and `sys.argv[2]` the container; returns what it printed.
    fn run_sdk(&self, code: &str, container: &str, what: &str) -> String {
        let python = super::python::python_importing(
            &["azure.storage.blob"],
            "quiver-azure-venv",
            &["azure-storage-blob>=12"],
        );
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={};",
            self.endpoint()
        );
        let script = format!(
            "import sys\n\
             from azure.storage.blob import BlobServiceClient\n\
             service = BlobServiceClient.from_connection_string(sys.argv[1])\n\
             {code}\n"
        );
        let output = Command::new(python)
            .args(["-c", &script, &connection, container])
            .output()
            .expect("run python with the Azure SDK");
        assert!(
            output.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `OPTIONS (...)` for a table or `COPY` on this server.
    pub fn sql_options(&self) -> String {
        format!(
            "OPTIONS ('azure.account_name' '{ACCOUNT}', 'azure.access_key' '{ACCOUNT_KEY}', \
             'azure.endpoint' '{}', 'azure.allow_http' 'true')",
            self.endpoint()
        )
    }

    /// A client of `container`, for the tests' own uploads and checks.
    pub fn store(&self, container: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            MicrosoftAzureBuilder::new()
                .with_account(ACCOUNT)
                .with_access_key(ACCOUNT_KEY)
                .with_container_name(container)
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .build()
                .expect("Azure client"),
        )
    }

    /// Uploads every file below `dir` to `container` under `prefix`.
    pub async fn upload_dir(&self, container: &str, dir: &Path, prefix: &str) {
        super::upload_dir(&self.store(container), dir, prefix).await;
    }
}

/// Where `azurite-blob` is, installing it with npm if it is nowhere.
fn azurite_blob() -> PathBuf {
    if let Ok(program) = std::env::var("QUIVER_AZURITE")
        && !program.is_empty()
    {
        return PathBuf::from(program);
    }
    let on_path = Command::new("azurite-blob")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if on_path {
        return PathBuf::from("azurite-blob");
    }
    let prefix = std::env::temp_dir().join("quiver-azurite");
    super::install_once(&prefix, || {
        let status = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg("azurite@3")
            .status()
            .expect("run npm to install azurite");
        assert!(status.success(), "installing azurite with npm failed");
    });
    prefix
        .join("node_modules")
        .join(".bin")
        .join("azurite-blob")
}
