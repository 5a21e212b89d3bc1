//! Decoding untrusted bytes without panicking.
//!
//! Arrow's IPC reader and datafusion-proto panic on some malformed input
//! instead of returning an error (the fuzz targets in `core/tests/decoders.rs`
//! found such cases). Every decoder fed from the network or from disk runs
//! through [`catch_decoder_panic`], so that bad bytes are an error for the
//! caller and never take a scheduler, an executor or a client down; so does
//! the scheduler's planning, which reads files' footers
//! ([`catch_future_panic`]).

/// Runs `decode`; a panic becomes `Err` with the panic's message.
pub fn catch_decoder_panic<T>(decode: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).map_err(panic_message)
}

/// Runs `future`; a panic in it becomes `Err` with the panic's message.
/// For work that reads untrusted bytes through a library that may panic on
/// them: the Parquet reader does on some malformed footers.
pub async fn catch_future_panic<F: Future>(future: F) -> Result<F::Output, String> {
    futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(future))
        .await
        .map_err(panic_message)
}

/// The message of a caught panic.
pub fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(catch_decoder_panic(|| 7), Ok(7));
        let caught = catch_decoder_panic(|| -> u8 { panic!("bad bit width {}", 14) });
        assert_eq!(caught, Err("bad bit width 14".to_owned()));
    }
}
