"""The local control plane used by the end-to-end tests and the demo: real Kubernetes, a process kubelet."""
