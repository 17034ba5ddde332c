"""Tokens, prices, cost bounds and the session ledger."""
