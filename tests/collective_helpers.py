"""A callback that records every torch.distributed call a training run makes, with the step and
the code that made it, for tests/test_distributed.py (on PYTHONPATH through the tests folder).
DDP's gradient all-reduce runs inside its C++ reducer and is not seen: the Python-level
collectives are the ones a callback or Lightning adds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "broadcast_object_list",
               "gather", "gather_object", "reduce", "scatter")


def _origin() -> str:
    """``file:function`` of the nearest caller in scalelong or in Lightning's loops, callbacks or
    trainer (not in the helpers between: Lightning's strategies, lightning_fabric, torch)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/scalelong/" in name or "/pytorch_lightning/loops/" in name or "/pytorch_lightning/trainer/" in name:
            return f"{Path(name).name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class CountCollectives(pl.Callback):
    """From the start of training to its end, every ``torch.distributed`` collective is listed as
    ``[step, name, origin]`` in ``<run dir>/collectives_rank<R>.json``."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.calls, self._real = [], {}
        for name in COLLECTIVES:
            real = getattr(dist, name)
            self._real[name] = real

            def counted(*args, _name=name, _real=real, **kwargs):
                self.calls.append([trainer.global_step, _name, _origin()])
                return _real(*args, **kwargs)

            setattr(dist, name, counted)

    def on_train_end(self, trainer, pl_module) -> None:
        for name, real in self._real.items():
            setattr(dist, name, real)
        path = Path(trainer.default_root_dir) / f"collectives_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.calls))
