"""Daily preprocessing on Amazon EMR: an Airflow DAG that runs the ncf Spark job for each day's partition.

Each run adds the step of `emr_step.json` (spark-submit of `ncf/cli/spark.py`) to a running EMR cluster and
waits for it. `{{ ds }}` is the run's logical date: a daily run starts once its day is over, reads the
30 daily log partitions ending that day and writes `s3://ncf-data/preprocessed/dt={{ ds }}/`.

The cluster id comes from the Airflow Variable `ncf_emr_cluster_id`; its nodes have ncf installed in
`/opt/ncf/venv` by a bootstrap action (`pip install ncf[spark]`), because the Spark workers import
`ncf.data.split` for the negative sampler. Needs `apache-airflow-providers-amazon`.
"""
import datetime as dt
import json
from pathlib import Path

from airflow import DAG
from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator
from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor

STEPS = json.loads((Path(__file__).parent / "emr_step.json").read_text())  # templated: {{ ds }} is filled per run
CLUSTER = "{{ var.value.ncf_emr_cluster_id }}"

with DAG(
    dag_id="ncf_preprocess_daily",
    description="ncf preprocessing on EMR (Spark), one partition per day",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,  # runs of the same output root one at a time
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
    tags=["ncf", "preprocess", "emr"],
) as dag:
    add_step = EmrAddStepsOperator(
        task_id="add_preprocess_step",
        job_flow_id=CLUSTER,
        steps=STEPS,
        aws_conn_id="aws_default",
    )
    wait_for_step = EmrStepSensor(
        task_id="wait_for_preprocess_step",
        job_flow_id=CLUSTER,
        step_id="{{ task_instance.xcom_pull(task_ids='add_preprocess_step')[0] }}",
        aws_conn_id="aws_default",
        poke_interval=60,
        timeout=6 * 60 * 60,
        mode="reschedule",  # free the worker slot between pokes
    )
    add_step >> wait_for_step
