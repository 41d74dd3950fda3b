"""The HTTP server the web process runs under: gunicorn, with a worker that slow clients cannot stall."""
