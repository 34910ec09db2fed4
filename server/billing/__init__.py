"""Prices and the cost of each call (see `prices` for the table, `cost` for the arithmetic)."""
