"""Vertical federated learning with an encrypted interaction layer."""
