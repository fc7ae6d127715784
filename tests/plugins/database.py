"""Pytest fixtures: database (see the module owner)."""
