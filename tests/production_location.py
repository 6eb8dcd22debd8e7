"""The code location the production tests serve: ``alignment_pipelines.definitions`` as deployed, with two
speed knobs for a 2-core test machine.

Everything that decides behaviour is the deployed module's: the same assets, checks, inbox sensor, automation
conditions, schedules, jobs and production resources (`build_definitions()` reads
``ALIGNMENT_PIPELINES_DEPLOYMENT`` as the deployed code location does). What differs is only how fast it goes:

- the automation sensor ticks every ``AUTOMATION_INTERVAL_ENV`` seconds (10) instead of every 30, so the test
  waits seconds, not half-minutes, between the stages of the retrain loop;
- a run executes its steps in the run worker's process (the in-process executor) instead of one new Python
  process per step, which on two cores saves a few seconds of imports per step. Training still runs out of
  process, through Pipes, as deployed.

If definitions.py reads these from the environment one day, the tests can serve it directly.
"""

from __future__ import annotations

import os

import dagster as dg

from alignment_pipelines import definitions as deployed

AUTOMATION_INTERVAL_ENV = "ALIGNMENT_PIPELINES_TEST_AUTOMATION_INTERVAL"


def _faster(defs: dg.Definitions, seconds: int) -> dg.Definitions:
    sensors = []
    for sensor in defs.sensors or []:
        if isinstance(sensor, dg.AutomationConditionSensorDefinition):
            sensor = dg.AutomationConditionSensorDefinition(
                sensor.name, target=sensor.asset_selection, minimum_interval_seconds=seconds,
                default_status=sensor.default_status, description=sensor.description)
        sensors.append(sensor)
    return dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, sensors=sensors,
                          schedules=defs.schedules, jobs=defs.jobs, resources=defs.resources,
                          executor=dg.in_process_executor, loggers=defs.loggers)


defs = _faster(deployed.build_definitions(), int(os.environ.get(AUTOMATION_INTERVAL_ENV, "10")))
