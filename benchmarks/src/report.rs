//! Benchmark results: per-query timings of each engine, their statistics, and
//! the markdown table that compares the engines.

use serde::Serialize;

/// Timings of one query on one engine, as written to `--output` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct QueryTiming {
    pub query: usize,
    pub engine: &'static str,
    pub rows: usize,
    pub millis: Vec<f64>,
}

impl QueryTiming {
    /// The median: the upper middle value, as the peers' scripts compute it.
    pub fn median(&self) -> f64 {
        median(&self.millis)
    }

    pub fn min(&self) -> f64 {
        self.millis.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.millis.iter().copied().fold(0.0, f64::max)
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// One row per query: Quiver's and DataFusion's min/median/max and the ratio
/// of the medians, then the totals of the medians.
pub fn markdown_table(timings: &[QueryTiming]) -> String {
    let find = |query: usize, engine: &str| {
        timings
            .iter()
            .find(|t| t.query == query && t.engine == engine)
    };
    let mut queries: Vec<usize> = timings.iter().map(|t| t.query).collect();
    queries.sort_unstable();
    queries.dedup();
    let cell = |timing: Option<&QueryTiming>| {
        timing.map_or_else(
            || "-".to_owned(),
            |t| format!("{:.1} ({:.1}-{:.1})", t.median(), t.min(), t.max()),
        )
    };
    let ratio = |quiver: f64, datafusion: f64| {
        if quiver > 0.0 && datafusion > 0.0 {
            format!("{:.2}x", quiver / datafusion)
        } else {
            "-".to_owned()
        }
    };
    let mut out = String::from(
        "| query | rows | quiver ms, median (min-max) | datafusion ms, median (min-max) | quiver / datafusion |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let (mut quiver_total, mut datafusion_total) = (0.0, 0.0);
    for query in queries {
        let (quiver, datafusion) = (find(query, "quiver"), find(query, "datafusion"));
        let rows = quiver.or(datafusion).map_or(0, |t| t.rows);
        let (q, d) = (
            quiver.map_or(0.0, QueryTiming::median),
            datafusion.map_or(0.0, QueryTiming::median),
        );
        quiver_total += q;
        datafusion_total += d;
        out.push_str(&format!(
            "| Q{query} | {rows} | {} | {} | {} |\n",
            cell(quiver),
            cell(datafusion),
            ratio(q, d)
        ));
    }
    out.push_str(&format!(
        "| **total** | | **{quiver_total:.1}** | **{datafusion_total:.1}** | **{}** |\n",
        ratio(quiver_total, datafusion_total)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_spread_ratios_and_totals() {
        let timing = |query, engine, millis: &[f64]| QueryTiming {
            query,
            engine,
            rows: 4,
            millis: millis.to_vec(),
        };
        let table = markdown_table(&[
            timing(1, "quiver", &[12.0, 10.0, 11.0]),
            timing(1, "datafusion", &[10.0, 10.0, 10.0]),
            timing(2, "quiver", &[5.0]),
        ]);
        assert!(
            table.contains("| Q1 | 4 | 11.0 (10.0-12.0) | 10.0 (10.0-10.0) | 1.10x |"),
            "{table}"
        );
        assert!(
            table.contains("| Q2 | 4 | 5.0 (5.0-5.0) | - | - |"),
            "{table}"
        );
        assert!(
            table.contains("| **total** | | **16.0** | **10.0** | **1.60x** |"),
            "{table}"
        );
    }
}
