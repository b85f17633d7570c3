"""Runtime layer: smallpond, DuckDB-based distributed data processing on local disk or 3FS."""
