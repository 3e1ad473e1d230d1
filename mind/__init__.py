"""MIND: Multi-Interest Network with Dynamic Routing, and its offline side."""

__version__ = "0.1.0"
