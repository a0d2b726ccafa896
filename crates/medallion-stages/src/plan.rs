//! A DataFusion SQL transform planned once and executed per batch. Planning per batch costs
//! milliseconds; a reused physical plan costs microseconds (see INFRA measurements).

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};

/// The table name a transform's SQL reads from.
pub const INPUT_TABLE: &str = "input";

/// Hands the next batch to the plan's scan.
#[derive(Debug)]
struct Slot {
    schema: SchemaRef,
    next: Arc<Mutex<Option<RecordBatch>>>,
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.next.lock().ok().and_then(|mut slot| slot.take());
        let stream = futures::stream::iter(batch.map(Ok));
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// A physical plan over table `input` of a fixed schema.
pub struct BatchPlan {
    plan: Arc<dyn ExecutionPlan>,
    next: Arc<Mutex<Option<RecordBatch>>>,
    task: Arc<TaskContext>,
    input_schema: SchemaRef,
}

impl std::fmt::Debug for BatchPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPlan").finish_non_exhaustive()
    }
}

impl BatchPlan {
    /// Plans `sql` once over a table `input` with `input_schema`.
    pub async fn new(sql: &str, input_schema: SchemaRef) -> Result<Self> {
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(8_192);
        let ctx = SessionContext::new_with_config(config);
        let next = Arc::new(Mutex::new(None));
        let table = StreamingTable::try_new(
            input_schema.clone(),
            vec![Arc::new(Slot {
                schema: input_schema.clone(),
                next: next.clone(),
            })],
        )?;
        ctx.register_table(INPUT_TABLE, Arc::new(table))?;
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        Ok(Self {
            plan,
            next,
            task: ctx.task_ctx(),
            input_schema,
        })
    }

    pub fn output_schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// Runs the plan over `batch`.
    pub async fn run(&self, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
        if batch.schema() != self.input_schema {
            return Err(DataFusionError::Execution(format!(
                "batch schema differs from the planned input schema: {:?}",
                batch.schema()
            )));
        }
        *self
            .next
            .lock()
            .map_err(|_| DataFusionError::Execution("input slot poisoned".into()))? = Some(batch);
        let plan = reset_plan_states(self.plan.clone())?;
        collect(plan, self.task.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    #[tokio::test]
    async fn a_plan_is_reused_across_batches() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let plan = BatchPlan::new("SELECT x * 2 AS y FROM input WHERE x > 1", schema.clone())
            .await
            .expect("plans");
        for round in 0..3i64 {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![1, 2, 3 + round]))],
            )
            .expect("batch");
            let out = plan.run(batch).await.expect("runs");
            let values: Vec<i64> = out
                .iter()
                .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
                .collect();
            assert_eq!(values, vec![4, 6 + 2 * round]);
        }
    }
}
