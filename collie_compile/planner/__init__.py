"""The planner: the ILP search over layouts, per-op sharding, and the Plan it returns."""
