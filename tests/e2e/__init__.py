"""End-to-end tests: stepcache against a real control plane (hack/cluster) and the process kubelet."""
