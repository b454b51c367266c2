"""Searches over the compression catalog (auto: the best model within a budget)."""
