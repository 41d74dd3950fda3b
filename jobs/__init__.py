"""What workers run: job types, their schemas and the RQ worker classes."""
