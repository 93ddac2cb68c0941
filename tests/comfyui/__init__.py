"""Tests against a real ComfyUI server (see conftest.py). A package: its conftest must not shadow tests/conftest.py."""
