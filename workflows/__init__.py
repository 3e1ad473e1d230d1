"""Workflows built on the model, the index and the stream runtime: publish a log, replay it against the
offline evaluation, the end-to-end demo, export + index glue, and rolling a new model version."""
