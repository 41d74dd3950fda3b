"""Development entry points: `make run` and the embedded Redis."""
