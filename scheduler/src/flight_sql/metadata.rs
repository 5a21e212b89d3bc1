//! Flight SQL's metadata calls, answered from the shared catalog: catalogs,
//! schemas, tables and table types, and the server's `SqlInfo`.

use arrow::array::RecordBatch;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetTableTypes, CommandGetTables, SqlInfo,
    SqlSupportedTransaction,
};
use datafusion::catalog::CatalogProviderList;
use datafusion::datasource::TableType;
use quiver_core::storage::redacted_error;

/// Every table type the catalog can hold, as Flight SQL names them.
const TABLE_TYPES: [&str; 3] = ["TABLE", "VIEW", "LOCAL TEMPORARY"];

fn table_type_name(table_type: TableType) -> &'static str {
    match table_type {
        TableType::Base => TABLE_TYPES[0],
        TableType::View => TABLE_TYPES[1],
        TableType::Temporary => TABLE_TYPES[2],
    }
}

pub fn catalogs(
    query: CommandGetCatalogs,
    catalogs: &dyn CatalogProviderList,
) -> Result<RecordBatch, FlightError> {
    let mut builder = query.into_builder();
    for name in sorted(catalogs.catalog_names()) {
        builder.append(name);
    }
    builder.build()
}

pub fn schemas(
    query: CommandGetDbSchemas,
    catalogs: &dyn CatalogProviderList,
) -> Result<RecordBatch, FlightError> {
    let mut builder = query.into_builder();
    for catalog_name in sorted(catalogs.catalog_names()) {
        let Some(catalog) = catalogs.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in sorted(catalog.schema_names()) {
            // The builder applies the client's filters.
            builder.append(&catalog_name, schema_name);
        }
    }
    builder.build()
}

pub async fn tables(
    query: CommandGetTables,
    catalogs: &dyn CatalogProviderList,
) -> Result<RecordBatch, FlightError> {
    let wanted_catalog = query.catalog.clone();
    let mut builder = query.into_builder();
    for catalog_name in sorted(catalogs.catalog_names()) {
        // Skip catalogs the client did not ask for before opening their tables.
        if wanted_catalog
            .as_ref()
            .is_some_and(|wanted| wanted != &catalog_name)
        {
            continue;
        }
        let Some(catalog) = catalogs.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in sorted(catalog.schema_names()) {
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            for table_name in sorted(schema.table_names()) {
                let table = match schema.table(&table_name).await {
                    Ok(Some(table)) => table,
                    // Dropped while listing.
                    Ok(None) => continue,
                    // One unreadable table must not hide the others.
                    Err(error) => {
                        let error = redacted_error(&error);
                        tracing::warn!(table = %table_name, %error, "cannot describe a table");
                        continue;
                    }
                };
                builder.append(
                    &catalog_name,
                    &schema_name,
                    &table_name,
                    table_type_name(table.table_type()),
                    &table.schema(),
                )?;
            }
        }
    }
    builder.build()
}

pub fn table_types(query: CommandGetTableTypes) -> Result<RecordBatch, FlightError> {
    let mut builder = query.into_builder();
    for table_type in TABLE_TYPES {
        builder.append(table_type);
    }
    builder.build()
}

/// What the server tells clients about itself.
pub fn server_info() -> Result<SqlInfoData, FlightError> {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "Quiver");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow IPC format version the server speaks.
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.5");
    builder.append(SqlInfo::FlightSqlServerReadOnly, false);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    builder.append(SqlInfo::FlightSqlServerCancel, true);
    builder.append(SqlInfo::SqlDdlCatalog, false);
    builder.append(SqlInfo::SqlDdlSchema, true);
    builder.append(SqlInfo::SqlDdlTable, true);
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    builder.append(SqlInfo::SqlTransactionsSupported, false);
    builder.build()
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort_unstable();
    names
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray};
    use datafusion::prelude::SessionContext;

    use super::*;

    #[tokio::test]
    async fn tables_are_listed_with_their_type_and_filtered() {
        let context = SessionContext::new();
        context
            .sql("CREATE TABLE t AS VALUES (1)")
            .await
            .expect("t");
        context
            .sql("CREATE VIEW v AS SELECT * FROM t")
            .await
            .expect("v");
        let catalogs = std::sync::Arc::clone(context.state().catalog_list());
        let query = CommandGetTables {
            catalog: Some("datafusion".into()),
            db_schema_filter_pattern: Some("public".into()),
            table_name_filter_pattern: None,
            table_types: Vec::new(),
            include_schema: true,
        };
        let batch = tables(query, catalogs.as_ref()).await.expect("tables");
        let names = batch.column_by_name("table_name").expect("names");
        let types = batch.column_by_name("table_type").expect("types");
        let names: Vec<_> = names.as_string::<i32>().iter().flatten().collect();
        let types: Vec<_> = types.as_string::<i32>().iter().flatten().collect();
        assert_eq!(names, ["t", "v"]);
        assert_eq!(types, ["TABLE", "VIEW"]);
        assert!(batch.column_by_name("table_schema").is_some());

        let only_views = CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: Some("%".into()),
            table_types: vec!["VIEW".into()],
            include_schema: false,
        };
        let batch = tables(only_views, catalogs.as_ref()).await.expect("views");
        assert_eq!(batch.num_rows(), 1);
    }

    #[test]
    fn server_info_names_the_server() {
        let info = server_info().expect("info");
        let batch = info
            .record_batch([SqlInfo::FlightSqlServerName as u32])
            .expect("batch");
        assert_eq!(batch.num_rows(), 1);
        assert!(batch.column(1).len() == 1);
    }
}
