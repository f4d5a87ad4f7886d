"""stepcache's benchmarks: what the webhook adds to pod creation, measured against floors in the same run.

The webhook sits in the path of every pod creation in an opted-in namespace, so its latency and throughput are the
product's speed. These machines are small (2 cores) and shared, so absolute figures drift from run to run: every
benchmark here runs its floors side by side with stepcache in one invocation, interleaved in rounds, and reports
ratios to them. Benchmarks are never timed tests; `python -m bench` (`make bench`) runs them all.

Modules:
- `admission`: the webhook alone over HTTPS, against a bare aiohttp server, the same with one SELECT, and kopf.
- `apiserver`: pod CREATEs through a real kube-apiserver, without a webhook, with kopf's and with stepcache's.
- `recorder`: Succeeded pods → rows and labels (lag and rows/s); `memory`: operator RSS with 10k pods.
- `profile`: py-spy on the hit path, and the local experiment on kopf's `Patch.as_json_patch`.
"""
