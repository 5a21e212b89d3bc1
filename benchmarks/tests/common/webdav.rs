//! An HTTP file server for the tests: WsgiDAV, a WebDAV server from PyPI, on a
//! free loopback port, sharing one folder read-only, stopped when dropped.
//!
//! object_store's HTTP store reads with ranged GETs and lists folders with
//! WebDAV's PROPFIND, which a plain static file server does not answer.

use std::path::Path;
use std::process::Command;

pub struct WebDavServer {
    _server: super::ServerProcess,
    port: u16,
    _config: tempfile::TempDir,
}

impl WebDavServer {
    /// Shares `root` read-only and waits until the server answers.
    pub fn start(root: &Path) -> Self {
        Self::start_for(root, None)
    }

    /// Shares `root` read-only with `user` only, who gives a user name and
    /// password (HTTP basic authentication).
    pub fn start_with_user(root: &Path, user: &str, password: &str) -> Self {
        Self::start_for(root, Some((user, password)))
    }

    fn start_for(root: &Path, user: Option<(&str, &str)>) -> Self {
        let port = super::processes::free_port();
        let python = super::python::python_importing(
            &["wsgidav", "cheroot"],
            "quiver-webdav-venv",
            &["wsgidav>=4,<5", "cheroot>=10"],
        );
        let config_dir = tempfile::tempdir().expect("webdav folder");
        let config = config_dir.path().join("wsgidav.json");
        let settings = serde_json::json!({
            "host": "127.0.0.1",
            "port": port,
            "server": "cheroot",
            "verbose": 0,
            "provider_mapping": {"/": {"root": root, "readonly": true}},
            "simple_dc": {"user_mapping": {"*": match user {
                None => serde_json::json!(true),
                Some((name, password)) => serde_json::json!({name: {"password": password}}),
            }}},
            "http_authenticator": {
                "domain_controller": null,
                "accept_basic": true,
                "accept_digest": false,
                "default_to_digest": false,
            },
            "dir_browser": {"enable": false},
        });
        std::fs::write(&config, settings.to_string()).expect("write wsgidav config");
        let mut command = Command::new(python);
        command
            .args(["-m", "wsgidav.server.server_cli", "-c"])
            .arg(&config);
        let server = super::ServerProcess::start(
            command,
            port,
            "wsgidav",
            "install it with: pip install wsgidav cheroot",
        );
        Self {
            _server: server,
            port,
            _config: config_dir,
        }
    }

    /// The URL of the shared folder.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
