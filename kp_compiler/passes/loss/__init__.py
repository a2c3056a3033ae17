"""Passes over a training step's loss."""
