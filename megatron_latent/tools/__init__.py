"""The command-line tools (console entry points in setup.py; shells in the checkout's tools/)."""
