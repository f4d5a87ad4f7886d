"""Put on PYTHONPATH (with the repository root) of an operator process to run it with one experimental change.

BENCH_KOPF_PATHS_PATCH=1: kopf builds JSON patches from the patched paths only (bench/kopf_patch.py).
BENCH_GC_FREEZE=1: `gc.freeze()` once the operator has started, so collections skip what start-up allocated.
Experiments of the benchmarks, end to end; never used by stepcache itself.
"""

import os

if os.environ.get("BENCH_KOPF_PATHS_PATCH") == "1":
    from bench import kopf_patch

    kopf_patch.install()

if os.environ.get("BENCH_GC_FREEZE") == "1":
    import gc
    import threading
    import time

    def _freeze_after_start() -> None:
        time.sleep(float(os.environ.get("BENCH_GC_FREEZE_AFTER", "10")))
        gc.collect()
        gc.freeze()

    threading.Thread(target=_freeze_after_start, name="bench-gc-freeze", daemon=True).start()
