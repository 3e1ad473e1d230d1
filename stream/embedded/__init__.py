"""Launchers for the embedded (single-machine) servers: the real binaries, started locally."""
