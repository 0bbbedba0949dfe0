"""Command-line entry points. Parsing, exit codes and presentation only; logic lives in the core modules."""
