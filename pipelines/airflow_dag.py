"""Daily preprocessing on Amazon EMR: an Airflow DAG that runs the ncf Spark job for each day's partition.

The contract with the stack (`pipelines/template.yaml`): one data bucket (Airflow Variable `ncf_data_bucket`,
the stack output `DataBucket`) holds the raw logs under `raw/dt=YYYY-MM-DD/`; this job reads the 30 daily
partitions ending on the run's logical date `{{ ds }}` and writes `preprocessed/dt={{ ds }}/`, `manifest.json`
last. The stack watches `preprocessed/*/manifest.json` and starts a retrain on that partition.

Two ways to run the step, chosen per run by the DAG param `cluster` (default: Variable `ncf_emr_mode`,
else `per_batch`):

- `per_batch`: a cluster for this run alone, as `aws emr create-cluster` does: `emr_job_flow.json`
  (Spark, on-demand primary and core, a spot task group, the bootstrap that installs ncf) with the step
  inside, `ActionOnFailure: TERMINATE_CLUSTER` and `KeepJobFlowAliveWhenNoSteps: false`. The cluster is
  terminated afterwards even when the step failed or the sensor timed out (`all_done`).
- `existing`: the step is added to the running cluster in Variable `ncf_emr_cluster_id` with
  `ActionOnFailure: CANCEL_AND_WAIT`, so a failure cancels the steps queued after it and keeps the cluster.

Either way a FAILED or CANCELLED step fails its sensor, and the `fail_run` task (trigger rule `one_failed`)
fails the run: without it the run would end green whenever the clean-up task after the failure succeeded.

The bootstrap (`emr_bootstrap.sh`, uploaded beside the wheel to `s3://{ncf_code_bucket}/ncf/emr/`) installs
the wheel `s3://{ncf_code_bucket}/ncf/wheels/ncf-{ncf_version}-py3-none-any.whl` into `/opt/ncf/venv`: the
Spark workers import `ncf.data.split` for the negative sampler. Needs `apache-airflow-providers-amazon`.
"""
import datetime as dt
import json
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import DAG, Param, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models.param import Param
from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator, EmrCreateJobFlowOperator
from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor

HERE = Path(__file__).parent
STEPS = json.loads((HERE / "emr_step.json").read_text())  # templated: {{ ds }} and {{ var.value.* }} are filled per run
JOB_FLOW = json.loads((HERE / "emr_job_flow.json").read_text())
# One step definition for both modes; only what a failure does differs.
JOB_FLOW["Steps"] = [{**s, "ActionOnFailure": "TERMINATE_CLUSTER"} for s in STEPS]
CLUSTER = "{{ var.value.ncf_emr_cluster_id }}"
AWS = "aws_default"
FAILED = ["FAILED", "CANCELLED", "INTERRUPTED"]  # step states that fail the sensor

with DAG(
    dag_id="ncf_preprocess_daily",
    description="ncf preprocessing on EMR (Spark), one partition per day",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,  # runs of the same output root one at a time
    default_args={"retries": 0},  # a retry would rerun a whole cluster; rerun the day by hand instead
    params={
        "cluster": Param("", type="string", enum=["", "per_batch", "existing"]),  # "": Variable ncf_emr_mode, else per_batch
        "service_role": Param("EMR_DefaultRole", type="string"),
        "job_flow_role": Param("EMR_EC2_DefaultRole", type="string"),
    },
    tags=["ncf", "preprocess", "emr"],
) as dag:

    @task.branch(task_id="choose_cluster")
    def choose_cluster(params=None):
        "The first task of the chosen mode."
        from airflow.models import Variable
        mode = params["cluster"] or Variable.get("ncf_emr_mode", default_var="per_batch")
        if mode not in ("per_batch", "existing"): raise ValueError(f"cluster must be 'per_batch' or 'existing', got {mode!r}")
        return "create_cluster" if mode == "per_batch" else "add_step"

    # -- a cluster per batch -------------------------------------------------------------------------
    create_cluster = EmrCreateJobFlowOperator(task_id="create_cluster", job_flow_overrides=JOB_FLOW, aws_conn_id=AWS)

    @task(task_id="batch_step_id")
    def batch_step_id(cluster_id: str) -> str:
        "The id of the step submitted with the cluster (RunJobFlow does not return it)."
        from airflow.providers.amazon.aws.hooks.emr import EmrHook
        return EmrHook(aws_conn_id=AWS).conn.list_steps(ClusterId=cluster_id)["Steps"][-1]["Id"]

    step_id = batch_step_id(create_cluster.output)
    wait_batch = EmrStepSensor(task_id="wait_for_batch_step", job_flow_id=create_cluster.output, step_id=step_id,
                               failed_states=FAILED, aws_conn_id=AWS, poke_interval=60, timeout=6 * 60 * 60, mode="reschedule")

    @task(task_id="terminate_cluster", trigger_rule="all_done")
    def terminate_cluster(ti=None):
        "Terminate this run's cluster whatever happened to its step; nothing to do when none was created."
        from airflow.exceptions import AirflowSkipException
        from airflow.providers.amazon.aws.hooks.emr import EmrHook
        cluster_id = ti.xcom_pull(task_ids="create_cluster")
        if not cluster_id: raise AirflowSkipException("no cluster was created in this run")
        EmrHook(aws_conn_id=AWS).conn.terminate_job_flows(JobFlowIds=[cluster_id])

    terminate = terminate_cluster()

    # -- an existing cluster -------------------------------------------------------------------------
    add_step = EmrAddStepsOperator(task_id="add_step", job_flow_id=CLUSTER, steps=STEPS, aws_conn_id=AWS)
    wait_existing = EmrStepSensor(task_id="wait_for_step", job_flow_id=CLUSTER,
                                  step_id="{{ task_instance.xcom_pull(task_ids='add_step')[0] }}", failed_states=FAILED,
                                  aws_conn_id=AWS, poke_interval=60, timeout=6 * 60 * 60, mode="reschedule")

    @task(task_id="fail_run", trigger_rule="one_failed", retries=0)
    def fail_run():
        "Fail the run when any task before it failed (the clean-up after a failure may have succeeded)."
        from airflow.exceptions import AirflowFailException
        raise AirflowFailException("the EMR preprocessing step or its cluster failed; see the failed task's log")

    choose = choose_cluster()
    choose >> [create_cluster, add_step]
    step_id >> wait_batch >> terminate
    add_step >> wait_existing
    [create_cluster, step_id, wait_batch, terminate, wait_existing] >> fail_run()
