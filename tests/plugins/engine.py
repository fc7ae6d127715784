"""Pytest fixtures: engine (see the module owner)."""
