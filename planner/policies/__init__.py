"""Scheduling policies: pure functions of planner state and the clock. `slos` is the product;
the others are the baselines it is measured against. `registry` builds them by name."""
