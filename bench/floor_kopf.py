"""Floor (c): kopf's own admission path — `kopf.WebhookServer` and an `on.mutate` handler — with nothing of ours.

Run as a script (not a module of the package) so that a separate virtualenv holding only `pip install kopf`
can run it too: it imports kopf, the standard library and, when installed, uvloop. It logs in with the kubeconfig
in $KUBECONFIG (kopf needs a cluster to discover resources before it serves webhooks).

    python bench/floor_kopf.py --port P --cert F --key F [--mode annotate|noop] [--style tuned|defaults]

`annotate` sets one annotation (the floor for stepcache's reviews, which always return a patch); `noop` changes
nothing (the floor for a webhook registered in kube-apiserver). `tuned` is what stepcache does through kopf's
public API — an `async def` handler, uvloop, kopf's per-handler logging off; `defaults` is kopf as its
documentation starts: a `def` handler (run in a thread pool), asyncio's loop, kopf logging at INFO.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import kopf

HANDLER_ID = "mutate-pods"
ANNOTATION = "bench.stepcache.dev/touched"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--mode", choices=("annotate", "noop"), default="annotate")
    parser.add_argument("--style", choices=("tuned", "defaults"), default="tuned")
    args = parser.parse_args(argv)

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.enabled = False
        settings.admission.managed = None
        settings.admission.server = kopf.WebhookServer(
            addr="127.0.0.1", port=args.port, certfile=args.cert, pkeyfile=args.key
        )

    if args.style == "tuned":

        @kopf.on.mutate("v1", "pods", id=HANDLER_ID, operations=["CREATE"], persistent=True, side_effects=False)
        async def mutate_async(patch: kopf.Patch, **_: Any) -> None:
            if args.mode == "annotate":
                patch.metadata.annotations[ANNOTATION] = "true"

    else:

        @kopf.on.mutate("v1", "pods", id=HANDLER_ID, operations=["CREATE"], persistent=True, side_effects=False)
        def mutate_sync(patch: kopf.Patch, **_: Any) -> None:
            if args.mode == "annotate":
                patch.metadata.annotations[ANNOTATION] = "true"

    if args.style == "tuned":
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    else:
        kopf.configure(verbose=False)
    runner = asyncio.run
    if args.style == "tuned":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    runner(kopf.operator(clusterwide=True, standalone=True))


if __name__ == "__main__":
    main()
