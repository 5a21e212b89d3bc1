//! A tree of inner equi-joins, flattened into its inputs and the conditions
//! that join them, and put back together in its original nesting over
//! replaced inputs. Join reordering (`join_order.rs`) and aggregation before
//! joins (`eager_aggregation.rs`) both rewrite such trees.

use std::sync::Arc;

use datafusion::common::{DFSchemaRef, NullEquality};
use datafusion::error::Result;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{
    Expr, Join, JoinConstraint, JoinType, LogicalPlan, Operator, Projection, binary_expr,
};

/// The most inputs one tree is collected with: sets of inputs are bit masks.
const MAX_INPUTS: usize = 64;

/// A set of a tree's inputs, one bit each.
pub(crate) type Inputs = u64;

pub(crate) fn is_subset(inputs: Inputs, of: Inputs) -> bool {
    inputs & !of == 0
}

/// How the original joins nest, over input numbers.
pub(crate) enum Shape {
    Input(usize),
    Join(Box<Shape>, Box<Shape>),
}

/// A join condition and the inputs it reads.
pub(crate) enum Condition {
    /// A pair of join keys, `left = right`.
    Keys {
        left: Expr,
        right: Expr,
        left_inputs: Inputs,
        right_inputs: Inputs,
    },
    /// One conjunct of a join's filter.
    Filter { expr: Expr, inputs: Inputs },
}

impl Condition {
    pub(crate) fn inputs(&self) -> Inputs {
        match self {
            Condition::Keys {
                left_inputs,
                right_inputs,
                ..
            } => left_inputs | right_inputs,
            Condition::Filter { inputs, .. } => *inputs,
        }
    }

    pub(crate) fn expr(&self) -> Expr {
        match self {
            Condition::Keys { left, right, .. } => {
                binary_expr(left.clone(), Operator::Eq, right.clone())
            }
            Condition::Filter { expr, .. } => expr.clone(),
        }
    }

    /// The two sides of a pair of keys, each with the inputs it reads.
    pub(crate) fn key_sides(&self) -> Option<[(&Expr, Inputs); 2]> {
        match self {
            Condition::Keys {
                left,
                right,
                left_inputs,
                right_inputs,
            } => Some([(left, *left_inputs), (right, *right_inputs)]),
            Condition::Filter { .. } => None,
        }
    }

    /// The sides of a pair of keys of which one reads only `inputs` and the
    /// other none of them: that one first.
    pub(crate) fn sides_from(&self, inputs: Inputs) -> Option<[(&Expr, Inputs); 2]> {
        let [left, right] = self.key_sides()?;
        let reads_only_inputs =
            |own: Inputs, other: Inputs| is_subset(own, inputs) && other & inputs == 0;
        if reads_only_inputs(left.1, right.1) {
            Some([left, right])
        } else if reads_only_inputs(right.1, left.1) {
            Some([right, left])
        } else {
            None
        }
    }

    /// The other side of a pair of keys of which one side reads only
    /// `inputs` and the other none of them.
    pub(crate) fn keys_to(&self, inputs: Inputs) -> Option<Inputs> {
        let [_, other] = self.sides_from(inputs)?;
        Some(other.1)
    }

    /// The key paired with `key` in a pair of keys, and the inputs it reads.
    pub(crate) fn paired_with(&self, key: &Expr) -> Option<(&Expr, Inputs)> {
        let [left, right] = self.key_sides()?;
        if left.0 == key {
            Some(right)
        } else if right.0 == key {
            Some(left)
        } else {
            None
        }
    }
}

/// A tree of inner equi-joins, flattened into its inputs and conditions.
pub(crate) struct JoinTree {
    pub(crate) inputs: Vec<LogicalPlan>,
    pub(crate) shape: Shape,
    pub(crate) conditions: Vec<Condition>,
    /// The columns the tree gives its parent, in order.
    pub(crate) output: DFSchemaRef,
}

impl JoinTree {
    /// The tree rooted at `plan`, if it has at least `min_inputs` inputs and
    /// its conditions each read known inputs.
    pub(crate) fn collect(plan: &LogicalPlan, min_inputs: usize) -> Option<Self> {
        let mut inputs = Vec::new();
        let mut raw_conditions = Vec::new();
        let shape = walk(plan, &mut inputs, &mut raw_conditions);
        if inputs.len() < min_inputs || inputs.len() > MAX_INPUTS {
            return None;
        }
        let read_by = |expr: &Expr| inputs_read(&inputs, expr);
        let mut conditions = Vec::new();
        for raw in raw_conditions {
            conditions.push(match raw {
                RawCondition::Keys(left, right) => {
                    let (left_inputs, right_inputs) = (read_by(&left)?, read_by(&right)?);
                    if left_inputs == 0 || right_inputs == 0 {
                        return None;
                    }
                    Condition::Keys {
                        left,
                        right,
                        left_inputs,
                        right_inputs,
                    }
                }
                RawCondition::Filter(expr) => Condition::Filter {
                    inputs: read_by(&expr)?,
                    expr,
                },
            });
        }
        Some(Self {
            inputs,
            shape,
            conditions,
            output: Arc::clone(plan.schema()),
        })
    }

    /// The inputs joined with some of `seed` by pairs of keys that read only
    /// inputs `within`, and `seed`'s first input itself. `None` when `seed`
    /// is empty or not all `within`.
    pub(crate) fn component(&self, seed: Inputs, within: Inputs) -> Option<Inputs> {
        if seed == 0 || !is_subset(seed, within) {
            return None;
        }
        let mut found = seed & seed.wrapping_neg();
        loop {
            let grown = self
                .conditions
                .iter()
                .filter(|condition| matches!(condition, Condition::Keys { .. }))
                .map(Condition::inputs)
                .filter(|inputs| is_subset(*inputs, within) && inputs & found != 0)
                .fold(found, |found, inputs| found | inputs);
            if grown == found {
                return Some(found);
            }
            found = grown;
        }
    }

    /// Every input of the tree.
    pub(crate) fn all_inputs(&self) -> Inputs {
        match self.inputs.len() {
            MAX_INPUTS => Inputs::MAX,
            count => (1 << count) - 1,
        }
    }

    /// The inputs `expr` reads, if each of its columns is one input's.
    pub(crate) fn read_by(&self, expr: &Expr) -> Option<Inputs> {
        inputs_read(&self.inputs, expr)
    }

    /// The original nesting over the inputs that `take` gives, each with the
    /// inputs it stands for: an input it gives nothing for loses its place,
    /// and one standing for several joins where the first of them was.
    pub(crate) fn rebuild(
        &self,
        shape: &Shape,
        take: &mut dyn FnMut(usize) -> Option<(LogicalPlan, Inputs)>,
        placed: &mut [bool],
    ) -> Result<Option<(LogicalPlan, Inputs)>> {
        match shape {
            Shape::Input(number) => Ok(take(*number)),
            Shape::Join(left, right) => {
                let left = self.rebuild(left, take, placed)?;
                let right = self.rebuild(right, take, placed)?;
                match (left, right) {
                    (Some(left), Some(right)) => {
                        let members = left.1 | right.1;
                        Ok(self
                            .join_plans(left, right, placed)?
                            .map(|plan| (plan, members)))
                    }
                    (side, None) | (None, side) => Ok(side),
                }
            }
        }
    }

    /// An inner join of two plans over disjoint inputs, on the conditions not
    /// yet placed that read only those inputs. `None` when no pair of keys
    /// spans the two.
    pub(crate) fn join_plans(
        &self,
        (left, left_inputs): (LogicalPlan, Inputs),
        (right, right_inputs): (LogicalPlan, Inputs),
        placed: &mut [bool],
    ) -> Result<Option<LogicalPlan>> {
        let both = left_inputs | right_inputs;
        let mut on = Vec::new();
        let mut filters = Vec::new();
        let mut placing = Vec::new();
        for (number, condition) in self.conditions.iter().enumerate() {
            if placed[number] || !is_subset(condition.inputs(), both) {
                continue;
            }
            placing.push(number);
            // A pair of keys whose one side reads only the left plan reads
            // only the right one on its other side: the condition is within both.
            match condition.sides_from(left_inputs) {
                Some([(left_key, _), (right_key, _)]) => {
                    on.push((left_key.clone(), right_key.clone()));
                }
                None => filters.push(condition.expr()),
            }
        }
        if on.is_empty() {
            return Ok(None);
        }
        for number in placing {
            placed[number] = true;
        }
        Ok(Some(equi_join(
            left,
            right,
            on,
            conjunction(filters),
            JoinType::Inner,
        )?))
    }
}

/// The inputs `expr` reads, if each of its columns is one input's.
fn inputs_read(inputs: &[LogicalPlan], expr: &Expr) -> Option<Inputs> {
    let mut read = 0;
    for column in expr.column_refs() {
        let mut owners = inputs
            .iter()
            .enumerate()
            .filter(|(_, input)| input.schema().has_column(column));
        let (owner, _) = owners.next()?;
        if owners.next().is_some() {
            return None;
        }
        read |= 1 << owner;
    }
    Some(read)
}

/// A join that belongs to a tree: inner, on keys, with nulls matching nothing.
pub(crate) fn is_inner_equi_join(join: &Join) -> bool {
    join.join_type == JoinType::Inner
        && join.join_constraint == JoinConstraint::On
        && join.null_equality == NullEquality::NullEqualsNothing
        && !join.null_aware
        && !join.on.is_empty()
}

/// A projection that only selects columns, as the optimizer puts between
/// joins to drop the ones no longer needed.
pub(crate) fn is_column_selection(projection: &Projection) -> bool {
    projection
        .expr
        .iter()
        .all(|expr| matches!(expr, Expr::Column(_)))
}

/// A join of `left` and `right` on the pairs of keys `on`, nulls matching
/// nothing, as the tree's joins are.
pub(crate) fn equi_join(
    left: LogicalPlan,
    right: LogicalPlan,
    on: Vec<(Expr, Expr)>,
    filter: Option<Expr>,
    join_type: JoinType,
) -> Result<LogicalPlan> {
    Ok(LogicalPlan::Join(Join::try_new(
        Arc::new(left),
        Arc::new(right),
        on,
        filter,
        join_type,
        JoinConstraint::On,
        NullEquality::NullEqualsNothing,
        false,
    )?))
}

/// Conditions as a tree's joins hold them, before they are matched to inputs.
enum RawCondition {
    Keys(Expr, Expr),
    Filter(Expr),
}

/// Flattens the tree under `plan` into `inputs` and `conditions`.
fn walk(
    plan: &LogicalPlan,
    inputs: &mut Vec<LogicalPlan>,
    conditions: &mut Vec<RawCondition>,
) -> Shape {
    match plan {
        LogicalPlan::Join(join) if is_inner_equi_join(join) => {
            let left = walk(&join.left, inputs, conditions);
            let right = walk(&join.right, inputs, conditions);
            for (left, right) in &join.on {
                conditions.push(RawCondition::Keys(left.clone(), right.clone()));
            }
            if let Some(filter) = &join.filter {
                for conjunct in split_conjunction(filter) {
                    conditions.push(RawCondition::Filter(conjunct.clone()));
                }
            }
            Shape::Join(Box::new(left), Box::new(right))
        }
        LogicalPlan::Projection(projection)
            if is_column_selection(projection)
                && matches!(projection.input.as_ref(), LogicalPlan::Join(join) if is_inner_equi_join(join)) =>
        {
            walk(&projection.input, inputs, conditions)
        }
        _ => {
            inputs.push(plan.clone());
            Shape::Input(inputs.len() - 1)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::execution::TaskContext;
    use datafusion::execution::session_state::SessionState;
    use datafusion::physical_plan::collect;

    use super::*;

    /// The answer of `plan`, run in one process, as a text table with its
    /// rows sorted: plans that hash in other places give other orders.
    pub(crate) async fn answer(state: &SessionState, plan: LogicalPlan) -> String {
        let physical = state
            .query_planner()
            .create_physical_plan(&plan, state)
            .await
            .expect("physical plan");
        let batches = collect(physical, Arc::new(TaskContext::from(state)))
            .await
            .expect("run");
        let table = pretty_format_batches(&batches).expect("format").to_string();
        let mut lines: Vec<&str> = table.lines().collect();
        // Three lines of header above the rows, and a rule below.
        if lines.len() > 4 {
            let rows = lines.len() - 1;
            lines[3..rows].sort_unstable();
        }
        lines.join("\n")
    }

    /// The names of the tables `plan` scans, sorted.
    pub(crate) fn scanned_tables(plan: &LogicalPlan) -> Vec<String> {
        let mut tables = Vec::new();
        plan.apply(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                tables.push(scan.table_name.table().to_owned());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        tables.sort();
        tables
    }
}
