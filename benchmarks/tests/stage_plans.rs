//! Snapshots of the stage plans of the 22 TPC-H queries, so that a planner
//! change shows in review.

mod common;

use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_proto::submit_job_request::Query;
use quiver_scheduler::planner::{Planned, Planner};
use quiver_scheduler::stages::display_stages;

#[tokio::test]
async fn tpch_stage_plans() {
    let store = quiver_scheduler::store::StateStore::in_memory().expect("store");
    let planner = Planner::new(4, store, "/tmp/quiver-warehouse/".into()).expect("planner");
    let tables = common::tpch_tables();
    for (name, dir) in &tables {
        let sql = format!(
            "CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{}/'",
            dir.display()
        );
        planner
            .plan("ddl", Query::Sql(sql), &[])
            .await
            .expect("register table");
    }
    // Paths are replaced so that the snapshots do not depend on the machine.
    let data_dir = tables[0]
        .1
        .parent()
        .map(|p| p.display().to_string())
        .expect("tables live in a folder");
    for number in 1..=QUERY_COUNT {
        let sql = query(number).expect("query exists").to_owned();
        let planned = planner
            .plan("job", Query::Sql(sql), &[])
            .await
            .unwrap_or_else(|e| panic!("Q{number} does not plan: {e}"));
        let Planned::Stages(job) = planned else {
            panic!("Q{number} should run on executors");
        };
        // DataFusion prints paths without their leading slash.
        let rendered =
            display_stages(&job.stages).replace(data_dir.trim_start_matches('/'), "<data>");
        insta::assert_snapshot!(format!("q{number:02}"), rendered);
    }
}
