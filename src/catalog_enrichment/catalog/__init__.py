"""Sources and sinks of the catalog: the embedded lakehouse (Delta / Parquet), PostgreSQL later."""
