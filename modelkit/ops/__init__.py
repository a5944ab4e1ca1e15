"""One module per verb: open, inspect, load, export, verify, diff, compare, watch."""
