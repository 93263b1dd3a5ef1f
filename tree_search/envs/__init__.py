"""Gymnasium environments in which an episode builds one tree (arrives with the environments issue)."""
