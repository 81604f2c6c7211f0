"""Graph rewrite passes: each a function GraphModule -> GraphModule."""
