"""Hugging Face models: presets, configs, building, probing, attention."""
