"""Worker processes: the loop that executes the planner's batch orders on an engine.

The loop is role-agnostic; prefill-only and decode-only workers reuse it with their own
engines. Today every worker is colocated: it runs prefill chunks and decode steps alike.
"""
