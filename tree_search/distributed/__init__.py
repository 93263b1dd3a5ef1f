"""Reward evaluation on a Ray cluster: evaluator actors (`ray_evaluator`) and the one request channel (`ray_channel`).

The only package that imports Ray at module level; the rest of tree_search imports it here, when a search uses Ray.
"""
