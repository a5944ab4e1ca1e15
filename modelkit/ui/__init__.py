"""Thin views over the public functions: the CLI, the notebook runner, widgets, the demo."""
