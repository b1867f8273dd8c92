"""Scoring: the live path from readings to served forecasts, and its offline replay.

grid.py assembles streamed readings into grid steps; serving.py scores each
step with the serving rule; replay.py runs a stored grid through the same
forward rule and drift feed for the report.
"""
