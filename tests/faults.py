"""Test-only fault injection, kept out of linearize: SIGKILL a process right after the checkpoint of a
given step is on disk (the harshest interruption a job can see).

In a process: `kill_after_checkpoint(step)` before training. As a launcher script (also under
torchrun): `python tests/faults.py STEP ARGS...` installs it, then runs `linearize ARGS...`."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def kill_after_checkpoint(step: int) -> None:
    """Wraps the save of both engines: once `step_<step>` is written (on every rank), SIGKILL."""
    from linearize.train.distributed import DeepSpeedEngine
    from linearize.train.engine import Engine

    for engine in (Engine, DeepSpeedEngine):
        engine.save = _killing(engine.save, step)


def _killing(save, step: int):
    def save_then_kill(self, stage_dir, schedule_state, state, *args, **kwargs):
        path = save(self, stage_dir, schedule_state, state, *args, **kwargs)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    return save_then_kill


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    kill_after_checkpoint(int(sys.argv[1]))
    from stages.cli import main

    raise SystemExit(main(sys.argv[2:]))
