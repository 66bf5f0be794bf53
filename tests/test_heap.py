"""mcpgw.heap: the garbage collector's settings once the gateway's service tree starts."""

from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from mcpgw import heap


class SettleTests(SynchronousTestCase):
    def setUp(self) -> None:
        thresholds = gc.get_threshold()

        def restore() -> None:
            gc.unfreeze()
            gc.set_threshold(*thresholds)

        self.addCleanup(restore)

    def test_startup_objects_frozen_and_young_collections_spaced(self) -> None:
        """What startup made is never walked again, and a young collection waits for YOUNG
        allocations, not Python's 700: the full collections that stopped the reactor 22-46 ms
        each (docs/performance.md, "Garbage collection")."""
        gc.unfreeze()
        kept = [object() for _ in range(10)]  # (startup's objects: alive, never freed)
        heap.Settle().startService()
        self.assertGreater(gc.get_freeze_count(), len(kept))
        self.assertEqual(gc.get_threshold(), (heap.YOUNG, heap.OLDER, heap.OLDER))
        self.assertGreater(heap.YOUNG, 700)

    def test_the_gateway_service_tree_settles_last(self) -> None:
        """tap.makeService puts Settle after every other service: it runs once all is built and listening."""
        import json
        import shutil
        import tempfile
        from pathlib import Path

        from mcpgw import tap
        from tests.gateway_process import fixture_server

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        config = Path(folder) / "gateway.json"
        config.write_text(json.dumps({"host": "127.0.0.1", "mcpServers": {"fx": fixture_server()}}))
        options = tap.Options()
        options.parseOptions(["--config", str(config), "--listen", "tcp:0"])
        options.parent = {"nodaemon": True, "logfile": None}  # type: ignore[assignment]
        top = tap.makeService(options)
        self.assertIsInstance(list(top)[-1], heap.Settle)
