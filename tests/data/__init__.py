"""Tests, mirroring the package layout."""
