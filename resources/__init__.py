"""Dagster resources: the data root, MLflow, the base model, the judge and the training launcher.

A field annotated ``Bound[T]`` is infrastructure: it is set in code when the resources are built for a deployment
(``alignment_pipelines/definitions.py``, from the deployment's environment) and is not part of the resource's run
config. A run config (the launchpad's, or one that any page reaching the UI sends) that names it is refused by
Dagster as an unexpected config entry, before the run starts: the data root, the tracking URI, the worker's image,
interpreter and secrets cannot be redirected by a run.
"""

import dagster as dg

Bound = dg.ResourceDependency
