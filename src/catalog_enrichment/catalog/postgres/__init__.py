"""The PostgreSQL catalog (``catalog.kind: postgres``): the operational catalog of a marketplace.

* **Connection** only from the environment: ``CATALOG_ENRICH_PG_DSN`` (libpq keywords or a URI),
  else libpq's ``PG*`` variables; never the command line, the config file or a log line (messages
  name host, port, database and user, never the password). Every value travels as a query
  parameter; identifiers come from the config, checked against ``[a-z_][a-z0-9_]*``, and are quoted.
* **Schema**: the job creates and migrates its own tables (attributes, quarantine, run reports, the
  run log) in ``catalog.postgres.db_schema`` from the versioned SQL files in ``migrations/``, each
  applied once, in order, in one transaction, under an advisory lock.
* **Read**: Spark's JDBC source, split into ``read_partitions`` ranges of ``partition_column``
  (bounds read for each run), ``fetch_size`` rows per round trip; the partition filter and the
  incremental window are pushed into the query.
* **Write**: each Spark partition COPYs its values (and its pairs) into a per-run staging
  table (the tasks get a connection string without the password: libpq on the executor reads it from
  ``PGPASSWORD`` / ``PGPASSFILE``, which the job sets from the DSN with
  ``spark.executorEnv.PGPASSWORD``, :mod:`catalog_enrichment.runtime`); then one transaction records
  the run in the run log, keeps the model values it replaces (what a rollback restores), deletes and
  upserts (``INSERT ... ON CONFLICT ... DO UPDATE`` only where the row is the model's), adds the
  quarantine rows and commits; the staging table is dropped. A killed process before the commit
  leaves the tables as they were; a committed run id is never merged again.
* **Lock**: a session advisory lock held by one connection for the whole run; the server releases
  it when the connection ends, so a killed run never leaves the catalog locked.
"""

from __future__ import annotations

from catalog_enrichment.catalog.postgres.connection import PG_DSN_ENV
from catalog_enrichment.catalog.postgres.migrate import migrate
from catalog_enrichment.catalog.postgres.read import Reads
from catalog_enrichment.catalog.postgres.rollback import Rollbacks
from catalog_enrichment.catalog.postgres.write import Writes

__all__ = ["PG_DSN_ENV", "PostgresCatalog", "migrate"]


class PostgresCatalog(Reads, Writes, Rollbacks):
    """The catalog in a PostgreSQL database (see the package docstring): the connection
    (``connection.py``), reads (``read.py``), a run's write (``write.py``) and rollback
    (``rollback.py``)."""

    kind = "postgres"
    reads_snapshot = False
