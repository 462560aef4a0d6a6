"""Real servers for the tests: the gateway on a free port (in a thread, or as a process)."""
