//! A cluster of real processes: `quiver-scheduler` and `quiver-executor`
//! binaries on loopback, which a test can kill, pause, drain and restart.
//!
//! The binaries come from the same target folder as the test; `cargo build
//! --workspace --bins` (which `.ci/run` does) puts them there. Each process
//! logs to a file under the cluster's work dir, printed when a test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use quiver_client::QuiverContext;

pub fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("test path");
    let dir = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Extra flags of the cluster's processes, and environment variables of all.
#[derive(Debug, Clone, Default)]
pub struct ClusterArgs {
    pub scheduler: Vec<String>,
    pub executor: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Environment variables of the executors only, over `env`.
    pub executor_env: Vec<(String, String)>,
}

pub struct ProcessCluster {
    work: tempfile::TempDir,
    port: u16,
    args: ClusterArgs,
    scheduler: Option<Child>,
    scheduler_starts: usize,
    executors: Vec<Option<Child>>,
    executor_starts: Vec<usize>,
}

impl ProcessCluster {
    /// Starts a scheduler and `executors` executors of 2 slots each.
    pub fn start(executors: usize, args: ClusterArgs) -> Self {
        let mut cluster = Self {
            work: tempfile::tempdir().expect("work dir"),
            port: free_port(),
            args,
            scheduler: None,
            scheduler_starts: 0,
            executors: (0..executors).map(|_| None).collect(),
            executor_starts: vec![0; executors],
        };
        cluster.start_scheduler();
        for index in 0..executors {
            cluster.start_executor(index);
        }
        cluster
    }

    pub fn url(&self) -> String {
        format!("quiver://127.0.0.1:{}", self.port)
    }

    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    fn log(&self, name: &str, start: usize) -> std::fs::File {
        let dir = self.work.path().join("logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        std::fs::File::create(dir.join(format!("{name}.{start}.log"))).expect("log file")
    }

    /// The whole log of executor `index` since its last start.
    pub fn executor_log(&self, index: usize) -> String {
        let name = format!("executor-{index}.{}.log", self.executor_starts[index]);
        std::fs::read_to_string(self.work.path().join("logs").join(name)).unwrap_or_default()
    }

    /// The whole log of the scheduler since its last start.
    pub fn scheduler_log(&self) -> String {
        let name = format!("scheduler.{}.log", self.scheduler_starts);
        std::fs::read_to_string(self.work.path().join("logs").join(name)).unwrap_or_default()
    }

    /// The environment of the processes started from now on (over which
    /// `executor_env` still goes for executors).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.args.env = env;
    }

    /// The extra flags of the schedulers started from now on.
    pub fn set_scheduler_args(&mut self, args: Vec<String>) {
        self.args.scheduler = args;
    }

    pub fn start_scheduler(&mut self) {
        assert!(self.scheduler.is_none(), "the scheduler is running");
        self.scheduler_starts += 1;
        let log = self.log("scheduler", self.scheduler_starts);
        let child = Command::new(binary("quiver-scheduler"))
            .arg("--state-dir")
            .arg(self.work.path().join("scheduler-state"))
            .args([
                "--port",
                &self.port.to_string(),
                "--default-partitions",
                "4",
            ])
            .args(&self.args.scheduler)
            .envs(self.args.env.iter().cloned())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start scheduler");
        self.scheduler = Some(child);
    }

    /// Starts (or restarts) executor `index`, with id `executor-<index>`.
    pub fn start_executor(&mut self, index: usize) {
        assert!(
            self.executors[index].is_none(),
            "executor {index} is running"
        );
        self.executor_starts[index] += 1;
        let log = self.log(&format!("executor-{index}"), self.executor_starts[index]);
        let child = Command::new(binary("quiver-executor"))
            .args([
                "--scheduler-url",
                &format!("http://127.0.0.1:{}", self.port),
            ])
            .args(["--flight-port", "0", "--slots", "2"])
            .args(["--executor-id", &format!("executor-{index}")])
            .arg("--work-dir")
            .arg(self.work.path().join("executors"))
            .args(&self.args.executor)
            .envs(self.args.env.iter().cloned())
            .envs(self.args.executor_env.iter().cloned())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start executor");
        self.executors[index] = Some(child);
    }

    pub fn executor_pid(&self, index: usize) -> Option<u32> {
        self.executors[index].as_ref().map(Child::id)
    }

    /// Sends `signal` (`KILL`, `TERM`, `STOP`, `CONT`) to executor `index`.
    pub fn signal_executor(&self, index: usize, signal: &str) {
        let pid = self.executor_pid(index).expect("executor is running");
        send_signal(pid, signal);
    }

    /// Kills executor `index` at once and reaps it.
    pub fn kill_executor(&mut self, index: usize) {
        if let Some(mut child) = self.executors[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for executor `index` to exit on its own, for at most `timeout`.
    pub fn wait_executor(&mut self, index: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.executor_exited(index) {
                return Some(status);
            }
            if self.executors[index].is_none() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status of executor `index` if it has exited, without
    /// waiting; it then counts as stopped.
    pub fn executor_exited(&mut self, index: usize) -> Option<ExitStatus> {
        let status = self.executors[index].as_mut()?.try_wait().ok()??;
        self.executors[index] = None;
        Some(status)
    }

    /// Sends the scheduler SIGTERM and waits for it to exit, for at most
    /// `timeout`; `None` if it is still running then (it is left running).
    pub fn stop_scheduler(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.scheduler.as_mut()?;
        send_signal(child.id(), "TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.scheduler = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill_scheduler(&mut self) {
        if let Some(mut child) = self.scheduler.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Connects once `executors` executors have registered.
    pub async fn connect(&self, executors: usize) -> QuiverContext {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(context) = QuiverContext::connect(&self.url()).await
                && let Ok(list) = context.executors().await
                && list.iter().filter(|e| !e.draining).count() >= executors
            {
                return context;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up with {executors} executors\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The tail of every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let dir = self.work.path().join("logs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .collect();
        files.sort();
        for file in files {
            let content = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            text.push_str(&format!(
                "--- {} ---\n{}\n",
                file.display(),
                tail.join("\n")
            ));
        }
        text
    }

    /// Job folders left in the executors' shuffle storage.
    pub fn shuffle_job_dirs(&self) -> Vec<PathBuf> {
        let root = self.work.path().join("executors").join("shuffle");
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|owner| {
                std::fs::read_dir(owner.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|job| job.path())
            .collect()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        let children = self
            .executors
            .iter_mut()
            .chain(std::iter::once(&mut self.scheduler));
        for child in children.flatten() {
            // A paused process must be resumed to die cleanly.
            send_signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}
