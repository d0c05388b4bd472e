"""Plumbing: errors, files, flags, devices and processes, images, layouts, metrics, pictures, the report.

Imports only itself (tests/test_layout.py checks it), so any part of the project can use it.
"""
