"""Job types: what a job does (`log`, `sleep`, `embed`), its input schema, and the registry."""
