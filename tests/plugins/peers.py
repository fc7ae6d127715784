"""Pytest fixtures: peers (see the module owner)."""
