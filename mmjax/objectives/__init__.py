"""Losses, each a pure function of model outputs and a batch."""
