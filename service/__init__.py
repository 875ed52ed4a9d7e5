"""robust-ensembles service: the REST API (FastAPI), the Postgres job queue, settings and the CLI commands.

It never imports ``workers/`` (which imports it): the ``robust-ensembles`` entry point that adds the
``worker`` command is :mod:`workers.main`.

Nothing in this package imports torch at import time: the API starts fast and loads torch only
where a request needs it (spec validation of a method's hyperparameters, ``GET /v1/methods``).
"""

__version__ = "0.1.0"
