"""Helpers shared by the test files and the processes they start, imported as `helpers`: under
pytest, tests/ is on sys.path as the folder of tests/conftest.py; a child process gets it on
PYTHONPATH (helpers.processes.env_importing)."""
