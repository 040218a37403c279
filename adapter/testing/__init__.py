"""Test doubles shipped with the package for demos and tests. NOT production code."""
