//! Repairs of what datafusion-proto 55 loses or changes in a stage plan on
//! its way to an executor.
//!
//! - A CSV sink's unset date, time and timestamp formats are sent as empty
//!   strings and come back as *empty formats*, so `COPY ... STORED AS CSV`
//!   and `INSERT INTO` a CSV table wrote every `DATE`, `TIME` and zone-less
//!   `TIMESTAMP` value as an empty field, silently. An empty format writes
//!   nothing, so no statement means one: [`repair_decoded`] reads it back
//!   as unset.
//! - A file scan's compression is not sent at all, so executors read gzip
//!   CSV or JSON files as plain text. [`StagePlanConverter`] wraps such a
//!   scan, as it encodes it, in an extension node that names the
//!   compression, and Quiver's codec puts it back as it decodes the node
//!   ([`with_compression`]).
//! - An aggregate's grouping sets are sent as flags, one per grouping column
//!   and set, so sets of no columns (`GROUP BY GROUPING SETS (())`) are lost
//!   and the aggregate returned no rows. Their count travels the same way
//!   ([`with_empty_grouping_sets`]).
//! - A Parquet sink's key-value metadata (`format.metadata::owner`) is
//!   encoded but not decoded, so files lost it: Quiver's codec puts it back
//!   in the sinks of its distributed writes, and DataFusion's own sink (a
//!   single-file `COPY`) gets it the same way as a compression
//!   ([`with_key_value_metadata`]).
//! - A CSV sink's format of timestamps with a time zone, and a CSV or JSON
//!   sink's compression level, are not encoded, so files were written with
//!   the defaults. They travel the same way ([`with_file_sink_options`]).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::csv::WriterBuilder;
use arrow::datatypes::Schema;
use datafusion::common::file_options::csv_writer::CsvWriterOptions;
use datafusion::common::parsers::CompressionTypeVariant;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::file_format::csv::CsvSink;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::json::JsonSink;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder, FileSink};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, PhysicalGroupBy};
use datafusion_proto::physical_plan::to_proto::serialize_physical_expr_with_converter;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalPlanNodeExt,
    PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::{
    PhysicalExprNode, PhysicalExtensionNode, PhysicalPlanNode, physical_plan_node::PhysicalPlanType,
};
use prost::Message;
use quiver_proto::{
    EmptyGroupingSetsNode, FileSinkOptionsNode, ParquetMetadataNode, QuiverPlanNode,
    ScanCompressionNode, quiver_plan_node::Node,
};

/// Encodes stage plans as datafusion-proto's default converter does, but
/// wraps a node that it would not encode whole (see the module
/// documentation) in an extension node that carries what it would lose.
#[derive(Debug, Default, Clone, Copy)]
pub struct StagePlanConverter;

impl PhysicalProtoConverterExtension for StagePlanConverter {
    fn proto_to_execution_plan(
        &self,
        proto: &PhysicalPlanNode,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.default_proto_to_execution_plan(proto, ctx)
    }

    fn execution_plan_to_proto(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<PhysicalPlanNode> {
        let mut buf = Vec::new();
        let encoded = if codec.try_encode(Arc::clone(plan), &mut buf, self).is_ok() {
            // One of Quiver's nodes. datafusion-proto would encode its
            // children without this converter: encode them here.
            let inputs = plan
                .children()
                .into_iter()
                .map(|child| self.execution_plan_to_proto(child, codec))
                .collect::<Result<_>>()?;
            extension_node(buf, inputs)
        } else {
            PhysicalPlanNode::try_from_physical_plan_with_converter(Arc::clone(plan), codec, self)?
        };
        let Some(lost) = lost_in_encoding(plan) else {
            return Ok(encoded);
        };
        let node = QuiverPlanNode { node: Some(lost) };
        Ok(extension_node(node.encode_to_vec(), vec![encoded]))
    }

    fn proto_to_physical_expr(
        &self,
        proto: &PhysicalExprNode,
        input_schema: &Schema,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        self.default_proto_to_physical_expr(proto, input_schema, ctx)
    }

    fn physical_expr_to_proto(
        &self,
        expr: &Arc<dyn PhysicalExpr>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<PhysicalExprNode> {
        serialize_physical_expr_with_converter(expr, codec, self)
    }
}

/// An extension node of Quiver's, encoded as `node`, over `inputs`.
fn extension_node(node: Vec<u8>, inputs: Vec<PhysicalPlanNode>) -> PhysicalPlanNode {
    PhysicalPlanNode {
        physical_plan_type: Some(PhysicalPlanType::Extension(PhysicalExtensionNode {
            node,
            inputs,
        })),
    }
}

/// What datafusion-proto would not encode of `plan`, as the node that
/// carries it.
fn lost_in_encoding(plan: &Arc<dyn ExecutionPlan>) -> Option<Node> {
    if let Some(config) = scan_config(plan) {
        let compression = *config.file_compression_type.get_variant();
        return (compression != CompressionTypeVariant::UNCOMPRESSED).then(|| {
            Node::ScanCompression(ScanCompressionNode {
                compression: compression.to_string(),
            })
        });
    }
    if let Some(write) = plan.downcast_ref::<DataSinkExec>() {
        return lost_sink_options(write.sink());
    }
    let grouping = plan.downcast_ref::<AggregateExec>()?.group_expr();
    (!grouping.is_single() && grouping.is_empty()).then(|| {
        Node::EmptyGroupingSets(EmptyGroupingSetsNode {
            sets: grouping.groups().len() as u32,
        })
    })
}

/// What datafusion-proto would not encode of the options of DataFusion's
/// own sink `sink`, as the node that carries them.
fn lost_sink_options(sink: &dyn DataSink) -> Option<Node> {
    if let Some(parquet) = sink.downcast_ref::<ParquetSink>() {
        let entries: HashMap<String, String> = parquet
            .parquet_options()
            .key_value_metadata
            .iter()
            .filter_map(|(key, value)| Some((key.clone(), value.clone()?)))
            .collect();
        return (!entries.is_empty())
            .then_some(Node::ParquetMetadata(ParquetMetadataNode { entries }));
    }
    let lost = if let Some(csv) = sink.downcast_ref::<CsvSink>() {
        let options = csv.writer_options();
        FileSinkOptionsNode {
            timestamp_tz_format: options
                .writer_options
                .timestamp_tz_format()
                .map(str::to_owned),
            compression_level: options.compression_level,
        }
    } else {
        FileSinkOptionsNode {
            timestamp_tz_format: None,
            compression_level: sink
                .downcast_ref::<JsonSink>()?
                .writer_options()
                .compression_level,
        }
    };
    (lost != FileSinkOptionsNode::default()).then_some(Node::FileSinkOptions(lost))
}

/// The most grouping sets of no columns an aggregate is decoded with;
/// a statement would have to repeat `()` as often.
const MAX_GROUPING_SETS: u32 = 4096;

/// The decoded aggregate `aggregate` with `sets` grouping sets of no columns.
pub fn with_empty_grouping_sets(
    aggregate: &Arc<dyn ExecutionPlan>,
    sets: &EmptyGroupingSetsNode,
) -> Result<Arc<dyn ExecutionPlan>> {
    let decoded = aggregate
        .downcast_ref::<AggregateExec>()
        .filter(|decoded| decoded.group_expr().is_empty())
        .ok_or_else(|| {
            DataFusionError::Internal(format!(
                "empty grouping sets name no aggregate without grouping columns but {}",
                aggregate.name()
            ))
        })?;
    // The count comes off the wire: a corrupted one must not allocate without bound.
    if sets.sets > MAX_GROUPING_SETS {
        return Err(DataFusionError::Plan(format!(
            "an aggregate of {} grouping sets; at most {MAX_GROUPING_SETS} are decoded",
            sets.sets
        )));
    }
    let grouping = PhysicalGroupBy::new(vec![], vec![], vec![vec![]; sets.sets as usize], true);
    let repaired = AggregateExec::try_new(
        *decoded.mode(),
        grouping,
        decoded.aggr_expr().to_vec(),
        decoded.filter_expr().to_vec(),
        Arc::clone(decoded.input()),
        decoded.input_schema(),
    )?
    .with_limit_options(decoded.limit_options());
    Ok(Arc::new(repaired))
}

/// `sink` writing files with the key-value metadata `entries`.
pub fn with_key_value_metadata(
    sink: &ParquetSink,
    entries: HashMap<String, String>,
) -> ParquetSink {
    let mut options = sink.parquet_options().clone();
    options
        .key_value_metadata
        .extend(entries.into_iter().map(|(key, value)| (key, Some(value))));
    ParquetSink::new(sink.config().clone(), options)
}

/// The decoded write `write`, through DataFusion's Parquet sink, writing
/// files with the key-value metadata `entries`.
pub fn with_parquet_sink_metadata(
    write: &Arc<dyn ExecutionPlan>,
    entries: HashMap<String, String>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let decoded = write.downcast_ref::<DataSinkExec>();
    let sink = decoded.and_then(|decoded| decoded.sink().downcast_ref::<ParquetSink>());
    let (Some(decoded), Some(sink)) = (decoded, sink) else {
        return Err(DataFusionError::Internal(format!(
            "Parquet metadata names no Parquet write but {}",
            write.name()
        )));
    };
    Ok(through(
        decoded,
        Arc::new(with_key_value_metadata(sink, entries)),
    ))
}

/// The decoded write `write`, through DataFusion's CSV or JSON sink, with
/// the options in `lost` that the encoding dropped.
pub fn with_file_sink_options(
    write: &Arc<dyn ExecutionPlan>,
    lost: FileSinkOptionsNode,
) -> Result<Arc<dyn ExecutionPlan>> {
    let decoded = write.downcast_ref::<DataSinkExec>().ok_or_else(|| {
        DataFusionError::Internal(format!("sink options name no write but {}", write.name()))
    })?;
    let sink = decoded.sink();
    let repaired: Arc<dyn DataSink> = if let Some(csv) = sink.downcast_ref::<CsvSink>() {
        let mut options = csv.writer_options().clone();
        if let Some(format) = lost.timestamp_tz_format {
            options.writer_options = options.writer_options.with_timestamp_tz_format(format);
        }
        options.compression_level = lost.compression_level.or(options.compression_level);
        Arc::new(CsvSink::new(csv.config().clone(), options))
    } else if let Some(json) = sink.downcast_ref::<JsonSink>() {
        let mut options = json.writer_options().clone();
        options.compression_level = lost.compression_level.or(options.compression_level);
        Arc::new(JsonSink::new(json.config().clone(), options))
    } else {
        return Err(DataFusionError::Internal(
            "sink options name no CSV or JSON sink".to_owned(),
        ));
    };
    Ok(through(decoded, repaired))
}

/// `write` writing through `sink` instead.
fn through(write: &DataSinkExec, sink: Arc<dyn DataSink>) -> Arc<dyn ExecutionPlan> {
    Arc::new(DataSinkExec::new(
        Arc::clone(write.input()),
        sink,
        write.sort_order().clone(),
    ))
}

/// The file scan configuration of `plan`, if it is a file scan.
fn scan_config(plan: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    plan.downcast_ref::<DataSourceExec>()?
        .data_source()
        .downcast_ref::<FileScanConfig>()
}

/// The decoded file scan `scan` reading files compressed with `compression`.
pub fn with_compression(
    scan: &Arc<dyn ExecutionPlan>,
    compression: &ScanCompressionNode,
) -> Result<Arc<dyn ExecutionPlan>> {
    let variant: CompressionTypeVariant = compression.compression.parse()?;
    let config = scan_config(scan).ok_or_else(|| {
        DataFusionError::Internal(format!(
            "a scan compression names no file scan but {}",
            scan.name()
        ))
    })?;
    let config = FileScanConfigBuilder::from(config.clone())
        .with_file_compression_type(FileCompressionType::from(variant))
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

/// `plan`, decoded, with what the encoding changed put back.
pub fn repair_decoded(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(write) = node.downcast_ref::<DataSinkExec>() else {
            return Ok(Transformed::no(node));
        };
        let Some(sink) = write.sink().downcast_ref::<CsvSink>() else {
            return Ok(Transformed::no(node));
        };
        let options = sink.writer_options();
        let Some(builder) = without_empty_formats(&options.writer_options) else {
            return Ok(Transformed::no(node));
        };
        let repaired = CsvSink::new(
            sink.config().clone(),
            CsvWriterOptions {
                writer_options: builder,
                ..options.clone()
            },
        );
        Ok(Transformed::yes(through(write, Arc::new(repaired))))
    })
    .map(|transformed| transformed.data)
}

/// `builder` with its empty formats unset, or `None` if it has none.
fn without_empty_formats(builder: &WriterBuilder) -> Option<WriterBuilder> {
    let formats = [
        builder.date_format(),
        builder.datetime_format(),
        builder.time_format(),
        builder.timestamp_format(),
        builder.timestamp_tz_format(),
    ];
    if !formats.contains(&Some("")) {
        return None;
    }
    // A builder's formats can be set but not unset: copy everything else.
    let mut repaired = WriterBuilder::new()
        .with_header(builder.header())
        .with_delimiter(builder.delimiter())
        .with_quote(builder.quote())
        .with_escape(builder.escape())
        .with_double_quote(builder.double_quote())
        .with_null(builder.null().to_owned())
        .with_ignore_leading_whitespace(builder.ignore_leading_whitespace())
        .with_ignore_trailing_whitespace(builder.ignore_trailing_whitespace())
        .with_quote_style(builder.quote_style())
        .with_line_terminator(builder.line_terminator().clone());
    let kept = |format: Option<&str>| {
        format
            .filter(|format| !format.is_empty())
            .map(str::to_owned)
    };
    if let Some(format) = kept(builder.date_format()) {
        repaired = repaired.with_date_format(format);
    }
    if let Some(format) = kept(builder.datetime_format()) {
        repaired = repaired.with_datetime_format(format);
    }
    if let Some(format) = kept(builder.time_format()) {
        repaired = repaired.with_time_format(format);
    }
    if let Some(format) = kept(builder.timestamp_format()) {
        repaired = repaired.with_timestamp_format(format);
    }
    if let Some(format) = kept(builder.timestamp_tz_format()) {
        repaired = repaired.with_timestamp_tz_format(format);
    }
    Some(repaired)
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;
    use datafusion_proto::bytes::physical_plan_to_bytes_with_proto_converter;

    use super::*;
    use crate::codec::{QuiverPhysicalCodec, decode_physical_plan};

    /// The grouping sets of each aggregate in `plan`, top down.
    fn grouping_sets(plan: &Arc<dyn ExecutionPlan>) -> Vec<usize> {
        let mut sets = Vec::new();
        plan.apply(|node| {
            if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
                sets.push(aggregate.group_expr().groups().len());
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
        .expect("walk");
        sets
    }

    #[tokio::test]
    async fn grouping_sets_of_no_columns_survive_the_encoding() -> Result<()> {
        let context = SessionContext::new();
        let frame = context
            .sql("SELECT count(*) FROM (VALUES (1), (2)) t(x) GROUP BY GROUPING SETS ((), ())")
            .await?;
        // The partial aggregate right under a shuffle writer, as in the
        // stage that computes it.
        let mut partial = None;
        frame.create_physical_plan().await?.apply(|node| {
            if node.downcast_ref::<AggregateExec>().is_some() {
                partial = Some(Arc::clone(node));
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })?;
        let partial = partial.expect("an aggregate");
        let plan: Arc<dyn ExecutionPlan> = Arc::new(crate::shuffle::ShuffleWriterExec::new(
            "job", 1, partial, None,
        ));
        let bytes = physical_plan_to_bytes_with_proto_converter(
            Arc::clone(&plan),
            &QuiverPhysicalCodec,
            &StagePlanConverter,
        )?;
        let decoded = decode_physical_plan(&bytes, &context.task_ctx())?;
        assert_eq!(grouping_sets(&decoded), grouping_sets(&plan));

        // A corrupted count is refused, not allocated.
        let mut aggregate = None;
        decoded.apply(|node| {
            if node.downcast_ref::<AggregateExec>().is_some() {
                aggregate = Some(Arc::clone(node));
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })?;
        let corrupted = EmptyGroupingSetsNode { sets: u32::MAX };
        let error = with_empty_grouping_sets(&aggregate.expect("an aggregate"), &corrupted)
            .expect_err("too many sets");
        assert!(error.to_string().contains("at most 4096"), "{error}");
        Ok(())
    }

    #[tokio::test]
    async fn options_of_csv_and_json_sinks_survive_the_encoding() -> Result<()> {
        let context = SessionContext::new();
        let folder = tempfile::tempdir().expect("temporary folder");
        for (format, options) in [("CSV", "'format.timestamp_tz_format' '%z', "), ("JSON", "")] {
            let copy = format!(
                "COPY (SELECT 1 AS x) TO '{}/out.{format}.gz' STORED AS {format} OPTIONS \
                 ({options}'format.compression' 'gzip', 'format.compression_level' '3')",
                folder.path().display()
            );
            let plan = context.sql(&copy).await?.create_physical_plan().await?;
            let bytes = physical_plan_to_bytes_with_proto_converter(
                plan,
                &QuiverPhysicalCodec,
                &StagePlanConverter,
            )?;
            let decoded = decode_physical_plan(&bytes, &context.task_ctx())?;
            let sink = decoded
                .downcast_ref::<DataSinkExec>()
                .expect("a write")
                .sink();
            let (level, zoned) = match sink.downcast_ref::<CsvSink>() {
                Some(csv) => {
                    let options = csv.writer_options();
                    (
                        options.compression_level,
                        options.writer_options.timestamp_tz_format(),
                    )
                }
                None => {
                    let json = sink.downcast_ref::<JsonSink>().expect("a JSON sink");
                    (json.writer_options().compression_level, None)
                }
            };
            assert_eq!(level, Some(3), "{format}");
            assert_eq!(zoned, (format == "CSV").then_some("%z"), "{format}");
        }

        // Only a write through DataFusion's CSV or JSON sink takes them.
        let scan: Arc<dyn ExecutionPlan> = Arc::new(
            datafusion::physical_plan::empty::EmptyExec::new(Arc::new(Schema::empty())),
        );
        let error =
            with_file_sink_options(&scan, FileSinkOptionsNode::default()).expect_err("not a write");
        assert!(
            error.to_string().contains("no write but EmptyExec"),
            "{error}"
        );
        Ok(())
    }

    #[test]
    fn empty_formats_are_unset_and_the_rest_is_kept() {
        let sent = WriterBuilder::new()
            .with_delimiter(b';')
            .with_null("NA".to_owned())
            .with_date_format(String::new())
            .with_timestamp_format("%Y".to_owned());
        let repaired = without_empty_formats(&sent).expect("an empty format");
        assert_eq!(repaired.date_format(), None);
        assert_eq!(repaired.timestamp_format(), Some("%Y"));
        assert_eq!((repaired.delimiter(), repaired.null()), (b';', "NA"));
        assert!(without_empty_formats(&repaired).is_none());
    }
}
