//! Runs TPC-H queries on Quiver or on single-node DataFusion over the same files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use quiver_client::QuiverContext;

/// An engine that runs SQL.
#[derive(Clone)]
pub enum Engine {
    Quiver(QuiverContext),
    DataFusion(SessionContext),
}

/// Single-node DataFusion with `partitions` target partitions.
pub fn datafusion_engine(partitions: usize) -> Engine {
    let config = SessionConfig::new().with_target_partitions(partitions.max(1));
    Engine::DataFusion(SessionContext::new_with_config(config))
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Engine {
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Quiver(_) => "quiver",
            Engine::DataFusion(_) => "datafusion",
        }
    }

    /// Registers each (name, folder) as a Parquet table.
    pub async fn register_tables(&self, tables: &[(String, PathBuf)]) -> Result<(), String> {
        for (name, dir) in tables {
            let location = format!("{}/", dir.display());
            match self {
                Engine::Quiver(ctx) => ctx
                    .register_parquet(name, &location)
                    .await
                    .map_err(|e| format!("register {name}: {e}"))?,
                Engine::DataFusion(ctx) => ctx
                    .register_parquet(name, &location, ParquetReadOptions::default())
                    .await
                    .map_err(|e| format!("register {name}: {e}"))?,
            }
        }
        Ok(())
    }

    /// Runs one statement and collects its result.
    pub async fn run(&self, sql: &str) -> Result<Vec<RecordBatch>, String> {
        match self {
            Engine::Quiver(ctx) => {
                let frame = ctx.sql(sql).await.map_err(|e| e.to_string())?;
                frame.collect().await.map_err(|e| e.to_string())
            }
            Engine::DataFusion(ctx) => {
                let frame = ctx.sql(sql).await.map_err(|e| e.to_string())?;
                frame.collect().await.map_err(|e| e.to_string())
            }
        }
    }

    /// Runs one statement and returns its result and how long it took.
    pub async fn timed(&self, sql: &str) -> Result<(Vec<RecordBatch>, Duration), String> {
        let started = Instant::now();
        let batches = self.run(sql).await?;
        Ok((batches, started.elapsed()))
    }
}
