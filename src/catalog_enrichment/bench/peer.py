"""The plain MLflow path, as a process of its own: the baseline of ``bench throughput --peer``.

What a data engineer writes with MLflow's standard Spark integration and nothing else: a default
SparkSession, ``mlflow.pyfunc.spark_udf`` on the registered model (``env_manager="local"``: the
running environment), the products read, one score array per product written to Parquet. No
validation, no decisions, no MERGE, no run report.

    python -m catalog_enrichment.bench.peer --model-uri models:/catalog-enrichment/1 \\
        --products PATH --out PATH [--master local[2]]

The tracking and registry stores come from ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# the model signature's inputs (registry._signature): MLflow passes the model only these, and a
# lexical fusion reads the category, a product without image bytes its image_uri
INPUT_COLUMNS = ("product_id", "title", "description", "image", "category", "image_uri")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catalog_enrichment.bench.peer", description=__doc__)
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--products", required=True, help="products table (Delta or Parquet)")
    parser.add_argument("--out", required=True, help="Parquet folder for the scores")
    parser.add_argument("--master", default="local[*]")
    args = parser.parse_args(argv)

    import mlflow
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from catalog_enrichment.catalog.products import read_products
    from catalog_enrichment.contracts import load_contract

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    running = SparkSession.getActiveSession()  # called in a process whose session is up: use it
    spark = running or SparkSession.builder.master(args.master).appName("mlflow-spark-udf").getOrCreate()
    if running is None:
        spark.sparkContext.setLogLevel("ERROR")
    scores = mlflow.pyfunc.spark_udf(spark, args.model_uri, result_type="array<double>", env_manager="local")
    products = read_products(spark, args.products, load_contract("products"))
    products.select("product_id", scores(F.struct(*INPUT_COLUMNS)).alias("scores")).write.mode(
        "overwrite"
    ).parquet(args.out)
    if running is None:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
