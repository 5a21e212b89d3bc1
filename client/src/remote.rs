//! The client's view of the cluster's catalog, and the query planner that sends
//! DataFrame plans to the cluster instead of running them locally.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion_proto::bytes::logical_plan_to_bytes_with_extension_codec;
use futures::TryStreamExt;
use quiver_core::codec::{RemoteTable, RemoteTableCodec};
use quiver_core::config::settings_to_send;
use quiver_core::ipc::schema_from_bytes;
use quiver_core::shuffle::FlightClientPool;
use quiver_proto::scheduler_service_client::SchedulerServiceClient;
use quiver_proto::{GetTableRequest, Setting, submit_job_request::Query};
use tonic::transport::Channel;

/// Whether `plan` scans a table that the cluster's catalog does not hold, such
/// as a table function's (`range()`), which a client-built plan cannot name.
pub fn scans_client_tables(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && source_as_provider(&scan.source)
                .is_ok_and(|table| table.downcast_ref::<RemoteTable>().is_none())
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// The cluster's catalog, looked up table by table over gRPC.
#[derive(Debug)]
pub struct RemoteCatalog {
    schema: Arc<RemoteSchema>,
}

impl RemoteCatalog {
    pub fn new(client: SchedulerServiceClient<Channel>) -> Self {
        Self {
            schema: Arc::new(RemoteSchema { client }),
        }
    }
}

impl CatalogProvider for RemoteCatalog {
    fn schema_names(&self) -> Vec<String> {
        vec!["public".into()]
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        (name == "public").then(|| Arc::clone(&self.schema) as Arc<dyn SchemaProvider>)
    }
}

#[derive(Debug)]
struct RemoteSchema {
    client: SchedulerServiceClient<Channel>,
}

#[async_trait]
impl SchemaProvider for RemoteSchema {
    fn table_names(&self) -> Vec<String> {
        // Listing needs a round trip; SHOW TABLES runs on the cluster instead.
        Vec::new()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let response = self
            .client
            .clone()
            .get_table(GetTableRequest {
                name: name.to_owned(),
            })
            .await
            .map_err(|status| DataFusionError::External(Box::new(crate::Error::Rpc(status))))?
            .into_inner();
        if !response.found {
            return Ok(None);
        }
        let schema = schema_from_bytes(&response.schema).map_err(DataFusionError::from)?;
        Ok(Some(Arc::new(RemoteTable::new(name, schema))))
    }

    fn table_exist(&self, _name: &str) -> bool {
        // Unknown without a round trip; `table` gives the real answer.
        false
    }
}

/// Plans every query as one [`DistributedQueryExec`] that runs it on the cluster.
pub struct DistributedQueryPlanner {
    client: SchedulerServiceClient<Channel>,
    pool: FlightClientPool,
}

impl DistributedQueryPlanner {
    pub fn new(client: SchedulerServiceClient<Channel>, pool: FlightClientPool) -> Self {
        Self { client, pool }
    }
}

impl fmt::Debug for DistributedQueryPlanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DistributedQueryPlanner")
    }
}

#[async_trait]
impl QueryPlanner for DistributedQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan =
            logical_plan_to_bytes_with_extension_codec(logical_plan, &RemoteTableCodec::default())?;
        let schema: SchemaRef = Arc::new(logical_plan.schema().as_arrow().clone());
        Ok(Arc::new(DistributedQueryExec::new(
            self.client.clone(),
            self.pool.clone(),
            plan.to_vec(),
            settings_to_send(session.config_options()),
            schema,
        )))
    }
}

/// Runs a logical plan on the cluster and streams its result as one partition.
#[derive(Debug)]
pub struct DistributedQueryExec {
    client: SchedulerServiceClient<Channel>,
    pool: FlightClientPool,
    plan: Vec<u8>,
    settings: Vec<Setting>,
    properties: Arc<PlanProperties>,
}

impl DistributedQueryExec {
    fn new(
        client: SchedulerServiceClient<Channel>,
        pool: FlightClientPool,
        plan: Vec<u8>,
        settings: Vec<Setting>,
        schema: SchemaRef,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            client,
            pool,
            plan,
            settings,
            properties,
        }
    }
}

impl DisplayAs for DistributedQueryExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "DistributedQueryExec")
    }
}

impl ExecutionPlan for DistributedQueryExec {
    fn name(&self) -> &str {
        "DistributedQueryExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "DistributedQueryExec has one partition, asked for {partition}"
            )));
        }
        let job = crate::job::execute(
            self.client.clone(),
            self.pool.clone(),
            Query::LogicalPlan(self.plan.clone()),
            self.settings.clone(),
            |_| {},
        );
        let batches =
            futures::stream::once(async move { job.await.map_err(DataFusionError::from) })
                .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            batches,
        )))
    }
}
