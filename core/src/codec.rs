//! datafusion-proto extension codecs.
//!
//! - [`QuiverPhysicalCodec`] carries Quiver's shuffle operators inside physical plans
//!   sent from the scheduler to executors.
//! - [`RemoteTable`] and [`RemoteTableCodec`] let a client build logical plans over
//!   tables it only knows by name and schema; the scheduler swaps in the real table.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::TableReference;
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, Expr, Extension, LogicalPlan};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::from_proto::parse_protobuf_partitioning;
use datafusion_proto::physical_plan::to_proto::serialize_partitioning;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::Partitioning as PartitioningProto;
use prost::Message;
use quiver_proto::{
    ParquetCommitNode, ParquetWriteNode, QuiverPlanNode, RecursiveQueryNode, RemoteTableNode,
    ReplicateNode, ShuffleReaderNode, ShuffleWriterNode, WorkTableNode, quiver_plan_node::Node,
};

use crate::guard::catch_decoder_panic;
use crate::ipc::{schema_from_bytes, schema_to_bytes};
use crate::recursive::{RecursiveQueryExec, WorkTableExec, decode_recursive_query};
use crate::replicate::ReplicateExec;
use crate::shuffle::{ReadMode, ShuffleReaderExec, ShuffleWriterExec};
use crate::single_value::{SINGLE_VALUE, single_value};
use crate::write::snapshot::KnownCommits;
use crate::write::{ParquetCommitExec, ParquetWriteExec};

fn decode_error(what: &str, error: impl fmt::Display) -> DataFusionError {
    DataFusionError::Internal(format!("cannot decode {what}: {error}"))
}

fn encode_sink(sink: &ParquetSink) -> Result<Vec<u8>> {
    Ok(datafusion_proto::protobuf::ParquetSink::try_from(sink)?.encode_to_vec())
}

fn decode_sink(bytes: &[u8]) -> Result<Arc<ParquetSink>> {
    let proto = datafusion_proto::protobuf::ParquetSink::decode(bytes)
        .map_err(|e| decode_error("Parquet sink", e))?;
    let sink = ParquetSink::try_from(&proto)?;
    // datafusion-proto 55 encodes the files' key-value metadata but does not
    // decode it.
    let metadata = proto
        .parquet_options
        .map(|options| options.key_value_metadata)
        .unwrap_or_default();
    Ok(Arc::new(if metadata.is_empty() {
        sink
    } else {
        crate::decode_repairs::with_key_value_metadata(&sink, metadata)
    }))
}

fn single_input<'a>(
    inputs: &'a [Arc<dyn ExecutionPlan>],
    what: &str,
) -> Result<&'a Arc<dyn ExecutionPlan>> {
    match inputs {
        [input] => Ok(input),
        _ => Err(decode_error(what, "expected exactly one input")),
    }
}

/// Encodes and decodes Quiver's operators: the shuffle writer and reader,
/// the distributed Parquet write and commit, and the replication of a
/// `NOT IN` subquery to every task; DataFusion's operators of recursive
/// CTEs, which datafusion-proto does not encode; and Quiver's aggregate functions, which
/// plans name and executors find here rather than in their registry.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuiverPhysicalCodec;

impl QuiverPhysicalCodec {
    /// A partitioning as datafusion-proto bytes; empty for none.
    fn encode_partitioning(
        &self,
        partitioning: Option<&Partitioning>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Vec<u8>> {
        partitioning.map_or(Ok(Vec::new()), |partitioning| {
            Ok(serialize_partitioning(partitioning, self, proto_converter)?.encode_to_vec())
        })
    }

    /// The partitioning that `bytes` encode over `schema`; none for empty bytes.
    fn decode_partitioning(
        &self,
        bytes: &[u8],
        schema: &Schema,
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
        what: &str,
    ) -> Result<Option<Partitioning>> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let proto = PartitioningProto::decode(bytes).map_err(|e| decode_error(what, e))?;
        let decode_ctx = PhysicalPlanDecodeContext::new(ctx, self);
        parse_protobuf_partitioning(Some(&proto), &decode_ctx, schema, proto_converter)
    }
}

impl PhysicalExtensionCodec for QuiverPhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let node = QuiverPlanNode::decode(buf).map_err(|e| decode_error("Quiver plan node", e))?;
        match node.node {
            Some(Node::ParquetWrite(write)) => Ok(Arc::new(ParquetWriteExec::new(
                Arc::clone(single_input(inputs, "Parquet write")?),
                decode_sink(&write.sink)?,
                write.job_id,
            ))),
            Some(Node::ParquetCommit(commit)) => {
                let exec = ParquetCommitExec::new(
                    Arc::clone(single_input(inputs, "Parquet commit")?),
                    decode_sink(&commit.sink)?,
                    commit.job_id,
                );
                Ok(Arc::new(match commit.known_commits {
                    Some(known) => exec.with_known_commits(KnownCommits::of(known.manifests)),
                    None => exec,
                }))
            }
            Some(Node::ShuffleWriter(writer)) => {
                let input = single_input(inputs, "shuffle writer")?;
                let partitioning = self.decode_partitioning(
                    &writer.partitioning,
                    &input.schema(),
                    ctx,
                    proto_converter,
                    "shuffle writer partitioning",
                )?;
                Ok(Arc::new(ShuffleWriterExec::new(
                    writer.job_id,
                    writer.stage_id,
                    Arc::clone(input),
                    partitioning,
                )))
            }
            Some(Node::ShuffleReader(reader)) => {
                let mode = match reader.mode() {
                    quiver_proto::ReadMode::Hash => ReadMode::Hash,
                    quiver_proto::ReadMode::PerMap => ReadMode::PerMap,
                    quiver_proto::ReadMode::Unspecified => {
                        return Err(decode_error("shuffle reader", "read mode is not set"));
                    }
                };
                let schema = schema_from_bytes(&reader.schema)?;
                let hashed_on = self.decode_partitioning(
                    &reader.partitioning,
                    &schema,
                    ctx,
                    proto_converter,
                    "shuffle reader partitioning",
                )?;
                let decoded = ShuffleReaderExec::new(
                    reader.job_id,
                    reader.stage_id,
                    mode,
                    reader.partition_count as usize,
                    EquivalenceProperties::new(schema),
                );
                Ok(Arc::new(match hashed_on {
                    Some(Partitioning::Hash(exprs, _)) => decoded.with_hash_partitioning(exprs)?,
                    Some(_) => {
                        return Err(decode_error(
                            "shuffle reader partitioning",
                            "not a hash partitioning",
                        ));
                    }
                    None => decoded,
                }))
            }
            Some(Node::Replicate(replicate)) => Ok(Arc::new(ReplicateExec::try_new(
                Arc::clone(single_input(inputs, "replicate")?),
                replicate.partitions as usize,
            )?)),
            Some(Node::RecursiveQuery(query)) => {
                let [static_term, recursive_term] = inputs else {
                    return Err(decode_error(
                        "recursive query",
                        "expected a static and a recursive term",
                    ));
                };
                Ok(Arc::new(decode_recursive_query(
                    query.name,
                    schema_from_bytes(&query.schema)?,
                    Arc::clone(static_term),
                    Arc::clone(recursive_term),
                    query.is_distinct,
                )?))
            }
            Some(Node::ScanCompression(compression)) => crate::decode_repairs::with_compression(
                single_input(inputs, "scan compression")?,
                &compression,
            ),
            Some(Node::EmptyGroupingSets(sets)) => crate::decode_repairs::with_empty_grouping_sets(
                single_input(inputs, "empty grouping sets")?,
                &sets,
            ),
            Some(Node::ParquetMetadata(metadata)) => {
                crate::decode_repairs::with_parquet_sink_metadata(
                    single_input(inputs, "Parquet metadata")?,
                    metadata.entries,
                )
            }
            Some(Node::FileSinkOptions(lost)) => crate::decode_repairs::with_file_sink_options(
                single_input(inputs, "sink options")?,
                lost,
            ),
            Some(Node::WorkTable(read)) => Ok(Arc::new(WorkTableExec::new(
                read.name,
                schema_from_bytes(&read.schema)?,
                None,
            )?)),
            None => Err(decode_error("Quiver plan node", "empty node")),
        }
    }

    fn try_decode_udaf(&self, name: &str, _buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        quiver_aggregate_function(name)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let node = if let Some(writer) = node.downcast_ref::<ShuffleWriterExec>() {
            Node::ShuffleWriter(ShuffleWriterNode {
                job_id: writer.job_id().to_owned(),
                stage_id: writer.stage_id(),
                partitioning: self.encode_partitioning(writer.partitioning(), proto_converter)?,
            })
        } else if let Some(write) = node.downcast_ref::<ParquetWriteExec>() {
            Node::ParquetWrite(ParquetWriteNode {
                job_id: write.job_id().to_owned(),
                sink: encode_sink(write.sink())?,
            })
        } else if let Some(commit) = node.downcast_ref::<ParquetCommitExec>() {
            Node::ParquetCommit(ParquetCommitNode {
                job_id: commit.job_id().to_owned(),
                sink: encode_sink(commit.sink())?,
                known_commits: commit
                    .known_commits()
                    .map(|known| quiver_proto::KnownCommits {
                        manifests: known.manifests.clone(),
                    }),
            })
        } else if let Some(reader) = node.downcast_ref::<ShuffleReaderExec>() {
            let mode = match reader.mode() {
                ReadMode::Hash => quiver_proto::ReadMode::Hash,
                ReadMode::PerMap => quiver_proto::ReadMode::PerMap,
            };
            Node::ShuffleReader(ShuffleReaderNode {
                job_id: reader.job_id().to_owned(),
                stage_id: reader.stage_id(),
                mode: mode.into(),
                partition_count: reader.partition_count() as u32,
                schema: schema_to_bytes(&reader.schema()),
                partitioning: self.encode_partitioning(
                    reader
                        .hash_exprs()
                        .map(|exprs| Partitioning::Hash(exprs.to_vec(), reader.partition_count()))
                        .as_ref(),
                    proto_converter,
                )?,
            })
        } else if let Some(replicate) = node.downcast_ref::<ReplicateExec>() {
            Node::Replicate(ReplicateNode {
                partitions: replicate.partitions() as u32,
            })
        } else if let Some(query) = node.downcast_ref::<RecursiveQueryExec>() {
            Node::RecursiveQuery(RecursiveQueryNode {
                name: query.name().to_owned(),
                schema: schema_to_bytes(&query.schema()),
                is_distinct: query.is_distinct(),
            })
        } else if let Some(read) = node.downcast_ref::<WorkTableExec>() {
            Node::WorkTable(WorkTableNode {
                name: read.name().to_owned(),
                schema: schema_to_bytes(&read.schema()),
            })
        } else {
            return Err(DataFusionError::Internal(format!(
                "Quiver cannot serialize operator {}",
                node.name()
            )));
        };
        QuiverPlanNode { node: Some(node) }
            .encode(buf)
            .map_err(|e| DataFusionError::Internal(format!("cannot encode plan node: {e}")))
    }
}

/// The aggregate function of Quiver's that plans name `name`. Quiver adds
/// these to plans itself, so decoders find them here rather than in their
/// registry.
fn quiver_aggregate_function(name: &str) -> Result<Arc<AggregateUDF>> {
    match name {
        SINGLE_VALUE => Ok(single_value()),
        _ => Err(DataFusionError::Plan(format!(
            "aggregate function '{name}' is not registered"
        ))),
    }
}

/// A table the client knows only by name and schema. It cannot be scanned where
/// it is built; the scheduler replaces it with the table of that name in its catalog.
#[derive(Debug)]
pub struct RemoteTable {
    name: String,
    schema: SchemaRef,
}

impl RemoteTable {
    pub fn new(name: impl Into<String>, schema: SchemaRef) -> Self {
        Self {
            name: name.into(),
            schema,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

#[async_trait]
impl TableProvider for RemoteTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Plan(format!(
            "table {} lives on the Quiver cluster and can only be scanned there",
            self.name
        )))
    }
}

/// Resolves a table name to the scheduler's table provider.
pub trait TableResolver: Send + Sync + fmt::Debug {
    fn resolve(&self, name: &TableReference) -> Result<Arc<dyn TableProvider>>;
}

/// Encodes [`RemoteTable`] scans by name; decodes them through a [`TableResolver`],
/// and Quiver's aggregate functions by name.
#[derive(Debug, Default)]
pub struct RemoteTableCodec {
    resolver: Option<Arc<dyn TableResolver>>,
}

impl RemoteTableCodec {
    /// The scheduler's codec, which resolves names in its catalog.
    pub fn with_resolver(resolver: Arc<dyn TableResolver>) -> Self {
        Self {
            resolver: Some(resolver),
        }
    }
}

impl LogicalExtensionCodec for RemoteTableCodec {
    fn try_decode(
        &self,
        _buf: &[u8],
        _inputs: &[LogicalPlan],
        _ctx: &TaskContext,
    ) -> Result<Extension> {
        Err(DataFusionError::NotImplemented(
            "Quiver plans carry no logical extension nodes".into(),
        ))
    }

    fn try_encode(&self, node: &Extension, _buf: &mut Vec<u8>) -> Result<()> {
        Err(DataFusionError::NotImplemented(format!(
            "Quiver cannot send logical extension node {}",
            node.node.name()
        )))
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        _schema: SchemaRef,
        _ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        let node = RemoteTableNode::decode(buf).map_err(|e| decode_error("table reference", e))?;
        let resolver = self.resolver.as_ref().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "no catalog to resolve table {} ({table_ref})",
                node.name
            ))
        })?;
        resolver.resolve(&TableReference::from(node.name.as_str()))
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let name = match node.downcast_ref::<RemoteTable>() {
            Some(remote) => remote.name().to_owned(),
            None => {
                return Err(DataFusionError::NotImplemented(format!(
                    "table {table_ref} is local to the client; register it on the cluster instead"
                )));
            }
        };
        RemoteTableNode { name }
            .encode(buf)
            .map_err(|e| DataFusionError::Internal(format!("cannot encode table reference: {e}")))
    }

    fn try_decode_udaf(&self, name: &str, _buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        quiver_aggregate_function(name)
    }
}

/// Decodes a stage plan from bytes that came over the network. A malformed
/// plan is an error; so is one that makes the decoder panic, which
/// datafusion-proto can do on some malformed input.
pub fn decode_physical_plan(bytes: &[u8], context: &TaskContext) -> Result<Arc<dyn ExecutionPlan>> {
    let plan = without_panics("stage plan", || {
        datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            bytes,
            context,
            &QuiverPhysicalCodec,
        )
    })?;
    let plan = crate::decode_repairs::repair_decoded(plan)?;
    crate::nested_aggregates::with_measured_nested_aggregates(plan)
}

/// Decodes a client-built logical plan, with the same guarantees as
/// [`decode_physical_plan`].
pub fn decode_logical_plan(
    bytes: &[u8],
    context: &TaskContext,
    codec: &RemoteTableCodec,
) -> Result<LogicalPlan> {
    without_panics("logical plan", || {
        datafusion_proto::bytes::logical_plan_from_bytes_with_extension_codec(bytes, context, codec)
    })
}

fn without_panics<T>(what: &str, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_decoder_panic(decode).unwrap_or_else(|reason| {
        Err(DataFusionError::Plan(format!(
            "malformed {what}: the decoder failed ({reason})"
        )))
    })
}
