//! Shuffle: how map outputs are written, stored, located and read back.
//!
//! - [`layout`]: where a map output lives on an executor's disk, and its offset index.
//! - [`writer`]: [`ShuffleWriterExec`], the root of every stage; it splits its
//!   input into output partitions and writes them into one file per map task.
//! - [`reader`]: [`ShuffleReaderExec`], the leaf that stands for an input stage
//!   and streams the map outputs it is bound to.
//! - [`fetch`]: opens one output partition of a map output, from local disk
//!   or from another executor over Arrow Flight.
//! - [`durable`]: map outputs copied to object storage.
//! - [`serve`]: an on-disk partition as Flight data, without decoding it.
//! - [`wait_time`]: the wait-time metrics of shuffle writes and reads.

pub mod durable;
pub mod fetch;
pub mod layout;
pub mod reader;
pub mod serve;
pub mod wait_time;
pub mod writer;

pub use fetch::{FlightClientPool, ShuffleEnv};
pub use layout::MapOutputId;
pub use reader::{ReadMode, ShuffleReaderExec};
pub use writer::ShuffleWriterExec;
