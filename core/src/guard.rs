//! Decoding untrusted bytes without panicking.
//!
//! Arrow's IPC reader and datafusion-proto panic on some malformed input
//! instead of returning an error (the fuzz targets in `core/tests/decoders.rs`
//! found such cases). Every decoder fed from the network or from disk runs
//! through [`catch_decoder_panic`], so that bad bytes are an error for the
//! caller and never take a scheduler, an executor or a client down.

/// Runs `decode`; a panic becomes `Err` with the panic's message.
pub fn catch_decoder_panic<T>(decode: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the decoder panicked".to_owned())
    })
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
