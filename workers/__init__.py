"""The Ray side of robust-ensembles: lease jobs from the Postgres queue and run them with Ray Train / Tune."""
