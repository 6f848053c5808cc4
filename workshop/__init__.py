"""The workshop's commands for every OS: python -m workshop --help."""
