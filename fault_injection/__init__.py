"""Fault injection for wbcache: crash points, kill -9 torture, power loss and corruption tools.

Imports only the public API (DESIGN.md, layout).
"""
