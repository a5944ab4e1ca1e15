"""Benchmarks: evaluation engines, executors, paired statistics, tasks, code grading."""
