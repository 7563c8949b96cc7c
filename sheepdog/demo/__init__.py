"""`sheepdog demo`: the whole system on one machine with only Redis running.

Starts the provider simulator (unless SHEEPDOG_OPENAI_BASE_URL and a key are set), a stream
worker, a batch worker, beat and the HTTP front door as child processes in their own process
groups, runs a mixed workload (live streams, one answer through the front door, the nightly
documents job, plain low-priority prompts through the batch path) and prints the cost report.
Every child is stopped on exit, error or Ctrl-C.

The modules, in the order the demo uses them: `services` (Redis, database, provider, the
children's environment), `processes` (the children), `front_door`, `workload`, `report`; `run`
ties them together.
"""

from sheepdog.demo.run import run_demo

__all__ = ["run_demo"]
