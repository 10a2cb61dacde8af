"""What a MoLink node tells its operator: Prometheus metrics and the head's view of its pipeline.

* :mod:`~molink.telemetry.metrics`: every ``molink_*`` metric, in MoLink's own registry.
* :mod:`~molink.telemetry.engine_metrics`: the head's engine process reports those metrics to the
  API server process, which serves them beside vLLM's on one ``/metrics``.
"""
