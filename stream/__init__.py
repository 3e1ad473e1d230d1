"""Streaming side of MIND Stream: the serving adapters, the worker and the embedded servers."""
