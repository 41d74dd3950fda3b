"""A client for Afterward's HTTP API: submit jobs, follow them, search the index."""

from afterward_client.client import AfterwardError, Client

__all__ = ["AfterwardError", "Client"]
