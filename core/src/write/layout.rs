//! Where a write job's files go, staged and committed.
//!
//! ```text
//! <table>/_temporary/<job>/p<partition>-a<attempt>/<col=value/...>/part-<job>-<partition>-<n>.parquet   staged
//! <table>/_temporary/<job>/_uploads/p<partition>-a<attempt>-<n>.json                                      an upload in progress
//! <table>/<col=value/...>/part-<job>-<partition>-<n>.parquet                                            committed
//! <table>/_manifests/<job>.json                                                                          each commit's manifest
//! <table>/_manifests/<job>.replaces                                                                      the files an overwrite replaces, until they are gone
//! <table>/_manifests/z_folded-<job>-<unique>.json                                                        finished manifests, folded into one (see super::fold)
//! <table>/_manifests/order/<n>.claim                                                                     an overwrite's place in the table's order (see super::order)
//! ```
//!
//! Every attempt writes under its own staging folder, so a retried or killed
//! attempt never touches another's files. Staged files and manifests live in
//! sub-folders that are not `col=value` folders, which DataFusion's listing
//! skips, so readers never see them. (A `_SUCCESS` file next to the data, as
//! Spark writes, would be read as data by tables declared with their columns,
//! and breaks DataFusion's partition inference.) Committed names carry the
//! job id, which makes a repeated commit step idempotent and tells this
//! job's files from older ones.

use object_store::path::Path;

/// The folder of every write job's staged files.
pub const STAGING_FOLDER: &str = "_temporary";
/// The folder, inside a job's staging folder, of its uploads in progress.
pub const UPLOADS_FOLDER: &str = "_uploads";
/// The folder of the commits' manifests.
pub const MANIFEST_FOLDER: &str = "_manifests";
/// How long a job may have been committing, or left its staging folder
/// untouched, before it counts as abandoned with its cluster: its claim is
/// pruned, and a later commit settles its write.
pub const ABANDONED_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// A commit does not use staged files older than this: by
/// [`ABANDONED_AFTER`], another commit may take the write as abandoned and
/// delete them while this one moves them in. The other half of that day
/// covers the skew between the hosts' clocks and the longest a commit may
/// act ([`MAX_COMMIT_TIMEOUT_SECS`]), during which its `_committing` marker
/// is the folder's newest file.
pub const STALE_STAGING_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(12);

/// The longest time to act that the scheduler may give a commit (see
/// [`super::permission`]), in seconds: well inside [`STALE_STAGING_AFTER`].
pub const MAX_COMMIT_TIMEOUT_SECS: u64 = 6 * 3600;

/// The staging folder of one job under `table`.
pub fn job_staging(table: &Path, job_id: &str) -> Path {
    table.clone().join(STAGING_FOLDER).join(job_id)
}

/// The marker that keeps a committing job's staging folder listed (on
/// object stores a folder vanishes with its last file); its age tells how
/// long the commit has been going.
pub fn committing_marker(table: &Path, job_id: &str) -> Path {
    job_staging(table, job_id).join("_committing")
}

/// The staging folder of one task attempt.
pub fn attempt_staging(table: &Path, job_id: &str, partition: usize, attempt: u32) -> Path {
    job_staging(table, job_id).join(format!("p{partition}-a{attempt}"))
}

/// The records of one job's uploads in progress (see [`crate::storage::upload`]).
pub fn upload_records(table: &Path, job_id: &str) -> Path {
    job_staging(table, job_id).join(UPLOADS_FOLDER)
}

/// The record of the `n`th upload of one task attempt.
pub fn upload_record(table: &Path, job_id: &str, partition: usize, attempt: u32, n: usize) -> Path {
    upload_records(table, job_id).join(format!("p{partition}-a{attempt}-{n}.json"))
}

/// Where write tasks copy file lists too large to come back with their
/// status: the staging folder of the table at `table_url`, as a durable
/// shuffle location (see [`crate::shuffle::durable`]). A job's copies so
/// land in its own staging folder (`_temporary/<job>/<stage>/...`), their
/// uploads are recorded beside its files' (`_temporary/<job>/_uploads/`),
/// and both go with that folder when the commit or settling deletes it.
pub fn file_lists_location(table_url: &str) -> String {
    format!("{}/{STAGING_FOLDER}", table_url.trim_end_matches('/'))
}

/// The manifest of one write job: what it committed.
pub fn manifest(table: &Path, job_id: &str) -> Path {
    table
        .clone()
        .join(MANIFEST_FOLDER)
        .join(format!("{job_id}.json"))
}

/// The files that the overwrite of one job replaces, listed before its
/// manifest is written and deleted once they are gone, so that readers
/// stop reading them at the commit point (see [`super::snapshot`]). Not a
/// `.json` name: it is not a manifest.
pub fn replaced_list(table: &Path, job_id: &str) -> Path {
    table
        .clone()
        .join(MANIFEST_FOLDER)
        .join(format!("{job_id}{REPLACED_LIST_SUFFIX}"))
}

/// The ending of [`replaced_list`] names.
pub const REPLACED_LIST_SUFFIX: &str = ".replaces";

/// Length of the job ids that the scheduler hands out: 16 hex digits.
const JOB_ID_LENGTH: usize = 16;

/// Whether `text` has the form of the job ids the scheduler hands out: 16
/// lower-case hex digits.
pub fn is_job_id(text: &str) -> bool {
    text.len() == JOB_ID_LENGTH
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// The job whose commit named the data file `name`, if it has the name that
/// [`file_name`] gives (`part-<16 hex digits>-<partition>-<n>.<ext>`), and
/// not another writer's name that looks alike.
pub fn committing_job(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("part-")?;
    let job_id = rest.get(..JOB_ID_LENGTH)?;
    let rest = rest[JOB_ID_LENGTH..].strip_prefix('-')?;
    let (numbers, extension) = rest.split_once('.')?;
    let (partition, n) = numbers.split_once('-')?;
    let digits = |text: &str, least: usize| {
        text.len() >= least && text.bytes().all(|byte| byte.is_ascii_digit())
    };
    (is_job_id(job_id) && digits(partition, 5) && digits(n, 3) && !extension.is_empty())
        .then_some(job_id)
}

/// The job that the data file `name` says wrote it, if it is named
/// `part-<job>-...` as [`file_name`] names files. Looser than
/// [`committing_job`]: whatever may be a job's file keeps its manifest.
pub fn named_job(name: &str) -> Option<&str> {
    let (job, _) = name.strip_prefix("part-")?.split_once('-')?;
    Some(job)
}

/// The name of the `n`th file that `partition` writes into one partition folder.
pub fn file_name(job_id: &str, partition: usize, n: usize, extension: &str) -> String {
    let extension = extension.trim_start_matches('.');
    format!("part-{job_id}-{partition:05}-{n:03}.{extension}")
}

/// Whether the file at `path` was committed by `job_id`.
pub fn written_by(path: &Path, job_id: &str) -> bool {
    path.filename()
        .is_some_and(|name| name.starts_with(&format!("part-{job_id}-")))
}

/// Whether `path` (below `table`) is staging or bookkeeping, not table data.
pub fn is_bookkeeping(table: &Path, path: &Path) -> bool {
    let Some(mut parts) = path.prefix_match(table) else {
        return true;
    };
    parts.any(|part| {
        let part = part.as_ref();
        part == STAGING_FOLDER || part == MANIFEST_FOLDER
    })
}

/// `path` relative to `table`, or `None` if it is not below it.
pub fn relative_to(table: &Path, path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .prefix_match(table)?
        .map(|part| part.as_ref().to_owned())
        .collect();
    Some(parts.join("/"))
}

/// Appends an encoded relative path (`a=1/part-x.parquet`) to `base`.
pub fn join(base: &Path, relative: &str) -> Result<Path, object_store::path::Error> {
    if relative.is_empty() {
        return Ok(base.clone());
    }
    Path::parse(format!("{base}/{relative}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_and_committed_paths() {
        let table = Path::from("warehouse/sales");
        let staged = attempt_staging(&table, "job-1", 3, 2);
        assert_eq!(staged.as_ref(), "warehouse/sales/_temporary/job-1/p3-a2");
        let name = file_name("job-1", 3, 0, ".parquet");
        assert_eq!(name, "part-job-1-00003-000.parquet");
        let committed = join(&table, &format!("region=EU/{name}")).expect("valid path");
        assert_eq!(
            committed.as_ref(),
            "warehouse/sales/region=EU/part-job-1-00003-000.parquet"
        );
        assert!(written_by(&committed, "job-1"));
        assert!(!written_by(&committed, "job-2"));
        assert!(is_bookkeeping(
            &table,
            &join(&staged, &name).expect("valid path")
        ));
        assert!(is_bookkeeping(&table, &manifest(&table, "job-1")));
        let record = upload_record(&table, "job-1", 3, 2, 7);
        assert_eq!(
            record.as_ref(),
            "warehouse/sales/_temporary/job-1/_uploads/p3-a2-7.json"
        );
        assert!(record.prefix_matches(&upload_records(&table, "job-1")));
        assert!(is_bookkeeping(&table, &record));
        assert!(!is_bookkeeping(&table, &committed));
        assert_eq!(
            relative_to(&table, &committed).as_deref(),
            Some("region=EU/part-job-1-00003-000.parquet")
        );
    }

    #[test]
    fn committing_jobs_are_read_from_quiver_names_only() {
        let job = "15f2f92419f04bdb";
        assert_eq!(committing_job(&file_name(job, 3, 0, "parquet")), Some(job));
        assert_eq!(
            committing_job(&file_name(job, 123_456, 1_000, ".parquet")),
            Some(job)
        );
        for other in [
            // Spark, Hive, DuckDB and hand-made names.
            "part-00000-5a1c7d0e-8f4b-4c1e-9a0b-1d2e3f4a5b6c-c000.snappy.parquet",
            "000000_0",
            "data_0.parquet",
            "part-15f2f92419f04bdb.parquet",
            "part-15F2F92419F04BDB-00000-000.parquet",
            "part-15f2f92419f04bdb-0000-000.parquet",
            "part-15f2f92419f04bdb-00000-000",
            "part-ü5f2f92419f04bd-00000-000.parquet",
        ] {
            assert_eq!(committing_job(other), None, "{other}");
        }
    }
}
