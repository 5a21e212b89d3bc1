//! Arrow schemas on the wire, as Arrow IPC schema messages.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::convert::try_schema_from_ipc_buffer;
use arrow::ipc::writer::{IpcDataGenerator, IpcWriteOptions};

use crate::error::{Error, Result};
use crate::guard::catch_decoder_panic;

/// Encodes a schema as an Arrow IPC schema message (with the continuation prefix).
pub fn schema_to_bytes(schema: &Schema) -> Vec<u8> {
    let options = IpcWriteOptions::default();
    let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
        schema,
        &mut arrow::ipc::writer::DictionaryTracker::new(false),
        &options,
    );
    let mut out = Vec::with_capacity(encoded.ipc_message.len() + 8);
    out.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
    out.extend_from_slice(&(encoded.ipc_message.len() as u32).to_le_bytes());
    out.extend_from_slice(&encoded.ipc_message);
    out
}

/// Decodes a schema written by [`schema_to_bytes`].
pub fn schema_from_bytes(bytes: &[u8]) -> Result<SchemaRef> {
    catch_decoder_panic(|| try_schema_from_ipc_buffer(bytes))
        .map_err(Error::InvalidSchema)?
        .map(Arc::new)
        .map_err(|e| Error::InvalidSchema(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};

    #[test]
    fn schema_round_trips() {
        let schema = Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Utf8, true),
        ]);
        let decoded = schema_from_bytes(&schema_to_bytes(&schema)).expect("decode");
        assert_eq!(decoded.as_ref(), &schema);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(schema_from_bytes(b"not a schema").is_err());
    }
}
