"""The planner: request and worker state, scheduling policies, and the process that runs them."""
