"""Command-line tools that prepare inputs (model fixtures, data)."""
