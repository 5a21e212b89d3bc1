//! S3 credentials from an AWS profile's `credential_process`: a command that
//! prints them, as the AWS CLI and SDKs run it for tools that fetch keys
//! from a vault, a single sign-on or a hardware key.
//!
//! The command runs through the shell, with no input, and prints one JSON
//! object: `{"Version": 1, "AccessKeyId": ..., "SecretAccessKey": ...,
//! "SessionToken": ..., "Expiration": "2026-12-06T10:00:00Z"}`; the token
//! and the expiration may be absent. What it prints is kept until shortly
//! before it expires ([`super::expiring_credentials`]). A command that
//! fails, hangs past a minute or prints anything else fails the request
//! with an error that names the profile, the command's status and its
//! standard error, and never the command line (which may hold a token) nor
//! what it printed on its standard output: the keys.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use object_store::aws::AwsCredential;
use serde::Deserialize;

use super::expiring_credentials::{Expiring, FetchCredentials, parse_expiration};

/// How long the command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the command's standard error an error shows.
const SHOWN_STDERR: usize = 500;

/// The command of a profile's `credential_process`.
pub struct CredentialProcess {
    /// The profile that names it, to name it in errors.
    profile: String,
    command: String,
}

/// What the command prints, in the AWS SDKs' format.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessOutput {
    version: u32,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    expiration: Option<String>,
}

impl std::fmt::Debug for CredentialProcess {
    /// Without the command line, which may hold a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialProcess")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl CredentialProcess {
    pub fn new(profile: impl Into<String>, command: impl Into<String>) -> Self {
        Self {
            profile: profile.into(),
            command: command.into(),
        }
    }

    fn error(&self, message: impl Into<String>) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: format!(
                "the credential_process of the AWS profile '{}' {}",
                self.profile,
                message.into()
            )
            .into(),
        }
    }
}

#[async_trait]
impl FetchCredentials for CredentialProcess {
    async fn fetch(&self) -> object_store::Result<Expiring> {
        let command = self.command.clone();
        let run = tokio::task::spawn_blocking(move || run_command(&command, COMMAND_TIMEOUT));
        let (status, stdout, stderr) = run
            .await
            .map_err(|e| self.error(format!("could not be waited for: {e}")))?
            .map_err(|e| self.error(e))?;
        if !status.success() {
            let stderr = String::from_utf8_lossy(&stderr);
            let stderr: String = stderr.trim().chars().take(SHOWN_STDERR).collect();
            return Err(self.error(format!("failed ({status}): {stderr}")));
        }
        // serde's message could quote the keys: name only where it failed.
        let output: ProcessOutput = serde_json::from_slice(&stdout).map_err(|e| {
            self.error(format!(
                "printed no credentials: expected a JSON object with Version 1, AccessKeyId \
                 and SecretAccessKey (error at line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        if output.version != 1 {
            return Err(self.error(format!(
                "printed credentials of Version {}; only Version 1 is known",
                output.version
            )));
        }
        let expires = output
            .expiration
            .as_deref()
            .map(parse_expiration)
            .transpose()
            .map_err(|e| self.error(format!("printed an Expiration that {e}")))?;
        Ok(Expiring {
            credential: Arc::new(AwsCredential {
                key_id: output.access_key_id,
                secret_key: output.secret_access_key,
                token: output.session_token,
            }),
            expires,
        })
    }
}

/// Runs `command` through the shell and returns its status, standard output
/// and standard error; kills it, and what it started, after `timeout`.
fn run_command(command: &str, timeout: Duration) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), String> {
    let mut child = shell(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start: {e}"))?;
    // Read on threads of their own, so that a command that prints much does
    // not block on a full pipe while it is waited for.
    let (sender, outputs) = std::sync::mpsc::channel();
    let read = |pipe: Option<Box<dyn Read + Send>>, stream: usize| {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = sender.send((stream, bytes));
        });
    };
    read(child.stdout.take().map(|pipe| Box::new(pipe) as _), 0);
    read(child.stderr.take().map(|pipe| Box::new(pipe) as _), 1);
    let deadline = Instant::now() + timeout;
    let late = || format!("did not finish within {} s", timeout.as_secs());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                kill_all(&mut child);
                return Err(late());
            }
            Err(e) => return Err(format!("could not be waited for: {e}")),
        }
    };
    // A process that the command left running may hold its output open.
    let mut printed = [Vec::new(), Vec::new()];
    for _ in 0..printed.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match outputs.recv_timeout(left) {
            Ok((stream, bytes)) => printed[stream] = bytes,
            Err(_) => {
                kill_all(&mut child);
                return Err(late());
            }
        }
    }
    let [stdout, stderr] = printed;
    Ok((status, stdout, stderr))
}

/// Kills the command and every process it started (its process group).
fn kill_all(child: &mut std::process::Child) {
    // The crate has no unsafe code for kill(2): the `kill` command.
    #[cfg(unix)]
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(unix)]
fn shell(command: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut shell = Command::new("sh");
    // A group of its own, so that a timeout kills what it started too.
    shell.arg("-c").arg(command).process_group(0);
    shell
}

#[cfg(windows)]
fn shell(command: &str) -> Command {
    use std::os::windows::process::CommandExt;
    let mut shell = Command::new("cmd.exe");
    // Passed as written: cmd.exe does not follow the quoting that `arg` adds.
    shell.arg("/C").raw_arg(command);
    shell
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    /// A command that prints `json`.
    fn printing(folder: &std::path::Path, json: &str) -> CredentialProcess {
        let output = folder.join("output.json");
        std::fs::write(&output, json).expect("write");
        CredentialProcess::new("vault", format!("cat '{}'", output.display()))
    }

    #[tokio::test]
    async fn the_printed_credentials_and_expiration_are_read() {
        let folder = tempfile::tempdir().expect("temp folder");
        let lasting = printing(
            folder.path(),
            r#"{"Version": 1, "AccessKeyId": "AKIAPROCESS", "SecretAccessKey": "s3cret",
                "SessionToken": "token"}"#,
        );
        let fetched = lasting.fetch().await.expect("credentials");
        let credential = &fetched.credential;
        assert_eq!(
            (credential.key_id.as_str(), credential.secret_key.as_str()),
            ("AKIAPROCESS", "s3cret")
        );
        assert_eq!(credential.token.as_deref(), Some("token"));
        assert_eq!(fetched.expires, None);

        let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        let hourly = printing(
            folder.path(),
            &format!(
                r#"{{"Version": 1, "AccessKeyId": "AKIA3", "SecretAccessKey": "s",
                    "Expiration": "{later}"}}"#
            ),
        );
        let expires = hourly.fetch().await.expect("credentials").expires;
        assert_eq!(expires.map(|time| time.to_rfc3339()), Some(later));
    }

    #[tokio::test]
    async fn a_failing_command_is_named_and_its_output_is_not_shown() {
        let failing = CredentialProcess::new(
            "vault",
            "echo 'no session: run login' >&2; exit 3 # --token T0KEN",
        );
        let error = failing.fetch().await.expect_err("fails").to_string();
        assert!(
            error.contains("credential_process of the AWS profile 'vault' failed")
                && error.contains("exit status: 3")
                && error.contains("no session: run login")
                && !error.contains("T0KEN"),
            "{error}"
        );

        let folder = tempfile::tempdir().expect("temp folder");
        let garbled = printing(
            folder.path(),
            r#"{"Version": 1, "AccessKeyId": "AKIALEAK", "SecretAccessKey": 7}"#,
        );
        let error = garbled.fetch().await.expect_err("fails").to_string();
        assert!(error.contains("printed no credentials"), "{error}");
        assert!(!error.contains("AKIALEAK"), "{error}");

        let unknown = printing(
            folder.path(),
            r#"{"Version": 2, "AccessKeyId": "A", "SecretAccessKey": "s"}"#,
        );
        let error = unknown.fetch().await.expect_err("fails").to_string();
        assert!(error.contains("Version 2"), "{error}");
    }

    #[test]
    fn a_hanging_command_is_killed() {
        let error = run_command("sleep 30", Duration::from_millis(200)).expect_err("times out");
        assert!(error.contains("did not finish"), "{error}");
        // One that exits but leaves a process holding its output.
        let error =
            run_command("sleep 30 & echo {}", Duration::from_millis(300)).expect_err("times out");
        assert!(error.contains("did not finish"), "{error}");
    }
}
