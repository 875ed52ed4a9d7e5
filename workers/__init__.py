"""The Ray side of robust-ensembles: lease jobs from the Postgres queue and run them with Ray Train / Tune.

The top layer: it may import ``service/`` (never the other way), so the ``robust-ensembles`` entry point,
the composition root of every command, is :mod:`workers.main`.
"""
