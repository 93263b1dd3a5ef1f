"""Searchers: RLlib, Optuna and the classic baselines (arrive with the search issue)."""
