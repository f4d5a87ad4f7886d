"""End-to-end tests: stepcache against a real control plane (tests/cluster) and the process kubelet."""
