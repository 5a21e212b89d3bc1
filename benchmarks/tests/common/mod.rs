#![allow(dead_code)] // each test binary uses a different part of this module
//! Shared setup of the TPC-H integration tests: one data set per test binary,
//! generated once into the target folder and reused across runs.

use std::path::PathBuf;

use quiver_benchmarks::datagen;

/// Scale factor of the tests: small enough for CI, large enough for several
/// row groups and non-trivial joins.
pub const SCALE_FACTOR: f64 = 0.01;

/// The TPC-H tables at [`SCALE_FACTOR`], generated on first use.
pub fn tpch_tables() -> Vec<(String, PathBuf)> {
    let dir = std::env::var_os("QUIVER_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("quiver-test-data"))
        .join(format!("tpch-sf{SCALE_FACTOR}"));
    datagen::generate(SCALE_FACTOR, 3, &dir).expect("generate TPC-H data")
}

use quiver_client::{QuiverContext, StandaloneCluster, StandaloneOptions};

/// Starts an embedded cluster and connects to it once every executor is up.
pub async fn start_cluster(options: StandaloneOptions) -> (StandaloneCluster, QuiverContext) {
    let executors = options.executors;
    let cluster = StandaloneCluster::start(options)
        .await
        .expect("start cluster");
    let context = cluster
        .connect(executors)
        .await
        .expect("connect to cluster");
    (cluster, context)
}

/// Single-node DataFusion with `partitions` target partitions over `tables`:
/// the reference every Quiver answer is compared with.
pub async fn reference_engine(
    tables: &[(String, PathBuf)],
    partitions: usize,
) -> quiver_benchmarks::runner::Engine {
    let engine = quiver_benchmarks::runner::datafusion_engine(partitions);
    engine
        .register_tables(tables)
        .await
        .expect("register on datafusion");
    engine
}

/// Uploads every file below `dir` to `store` under `prefix`.
pub async fn upload_dir(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    dir: &std::path::Path,
    prefix: &str,
) {
    use object_store::ObjectStoreExt;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("read data folder") {
            let path = entry.expect("folder entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(dir)
                .expect("below the data folder")
                .to_string_lossy()
                .replace('\\', "/");
            let bytes = std::fs::read(&path).expect("read data file");
            store
                .put(
                    &object_store::path::Path::from(format!("{prefix}/{relative}")),
                    object_store::PutPayload::from(bytes),
                )
                .await
                .expect("upload data file");
        }
    }
}

/// A server the tests start (moto, Azurite, ...), killed when dropped.
pub struct ServerProcess {
    child: std::process::Child,
    pub port: u16,
}

impl ServerProcess {
    /// Spawns `command`, its output discarded, and waits until it listens on
    /// `port`. A spawn failure panics with `hint` (how to install it).
    pub fn start(mut command: std::process::Command, port: u16, what: &str, hint: &str) -> Self {
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({e}); {hint}"));
        let server = Self { child, port };
        wait_for_port(port, what);
        server
    }
}

impl ServerProcess {
    /// The server's process id, to pause it with a signal.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a server listens on `port` of loopback.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs `install` into `dir` once per machine. Tests run in parallel
/// processes: the one that creates the folder installs, the others wait for
/// it to be marked ready.
pub fn install_once(dir: &std::path::Path, install: impl FnOnce()) {
    let ready = dir.join(".ready");
    if std::fs::create_dir(dir).is_ok() {
        install();
        std::fs::write(&ready, b"").expect("mark the install ready");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was installed into {} in 10 minutes",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

pub mod azurite;
pub mod gcs;
pub mod processes;
pub mod python;
pub mod s3;
pub mod webdav;

/// Leaves table `table` of the default schema in `store` (a stopped
/// scheduler's state) as the `CREATE TABLE AS` job `job_id` leaves it when
/// its scheduler stops before registering it: out of the catalog, and
/// pending, with the statement that registers it.
pub fn leave_table_pending(store: &quiver_scheduler::store::StateStore, table: &str, job_id: &str) {
    let key = format!("table:datafusion.public.{table}");
    let entry = store
        .catalog_entry(&key)
        .expect("read the catalog")
        .expect("the table was registered");
    store.remove_catalog_entries(|k| k == key).expect("remove");
    store
        .put_pending_table(&quiver_proto::PendingTable {
            job_id: job_id.to_owned(),
            statements: vec![entry.sql],
            managed_key: key,
            settings: Vec::new(),
        })
        .expect("store the pending table");
}
