"""The cost model: hardware, a model's profile, memory and time of a layout."""
