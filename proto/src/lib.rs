//! Quiver's wire protocol: the gRPC service between clients, the scheduler and
//! executors, plus the Flight ticket of the shuffle data plane.
//!
//! - `proto/quiver.proto` is the single source of truth; `build.rs` compiles it
//!   with protox, so building needs no system `protoc`.
//! - [`PROTOCOL_VERSION`] is sent by executors when they register; the scheduler
//!   refuses a mismatch.

/// Version of the scheduler/executor protocol. Bump it on any incompatible change.
///
/// 2: a commit may carry the table's known commits (`ParquetCommitNode`),
/// which an executor of version 1 would ignore, committing unchecked.
///
/// 3: commits fold finished manifests into folded files
/// (`quiver_core::write::fold`), which a scheduler or executor of version 2
/// does not read: it would hide the folded writes from readers, and its
/// settling would roll back a write whose manifest a newer commit folded.
/// Write tasks may be told to copy their file lists into the table's
/// staging folder (`LaunchTask.large_output_location`), which version 2
/// ignores.
///
/// 4: a commit asks the scheduler's permission before it changes the table
/// (`CommitRequest`, `CommitAnswer`); the scheduler then does not end the
/// job until the commit reports. An executor of version 3 would commit
/// unasked, and could be cancelled after writing its manifest.
///
/// 5: a guarded commit carries only the jobs whose manifests were listed
/// when it was planned (`KnownCommits`), not every committed job's id; an
/// executor of version 4 would read it as unguarded and commit unchecked.
///
/// 6: an allowed commit may act only for the time its `CommitAnswer` gives
/// (`act_for_millis`), after which the scheduler takes it as failed and
/// settles the write with another attempt; an executor of version 5 would
/// act on past it.
pub const PROTOCOL_VERSION: u32 = 6;

/// Generated messages and services of package `quiver.v1`.
#[allow(clippy::all, clippy::clone_on_ref_ptr, unused_qualifications)]
pub mod v1 {
    tonic::include_proto!("quiver.v1");
}

pub use v1::*;
