"""Worker processes: the one loop that executes the planner's batch orders on an engine,
whatever the worker's role (prefill, decode or colocated)."""
