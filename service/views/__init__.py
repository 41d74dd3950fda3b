"""HTTP routes, one module per blueprint."""
