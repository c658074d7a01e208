"""Helpers shared by the test files (imported as `helpers`: pytest puts tests/ on sys.path)."""
