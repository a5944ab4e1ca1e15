"""Presentation built from tables: text and Styler tables, figures, W&B runs, static widgets."""
