#!/usr/bin/env python
"""Train I-JEPA with Stochastic Positional Embeddings (StoP).

    python train.py                                         # embedded default: vit_tiny, synthetic, CPU, < 1 min
    torchrun --nproc_per_node=8 train.py --model vit_h --data /path/to/imagenet   # the ViT-H/14 recipe, FSDP2
    python train.py --config configs/vit_b16_224.yaml --data /path/to/imagenet --resume
    torchrun --nproc_per_node=1 train.py --model vit_h --batch-size 64 --benchmark 20   # one JSON line

Every key of stop_kernels.training.config.TrainConfig is a flag (--noise-std 0.2, --batch-size 64 …);
see docs/training.md.
"""
import logging
import os
import sys
import time

from stop_kernels.training.checkpoint import CheckpointError
from stop_kernels.training.config import ConfigError, parse_config
from stop_kernels.training.loop import TrainingDiverged, TrainingOutOfMemory, train
from stop_kernels.training.metrics import LogWriteError


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.WARNING if rank else logging.INFO,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        train(cfg)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"train.py: training diverged: {e}", file=sys.stderr, flush=True)
        return 1
    except (TrainingOutOfMemory, CheckpointError, LogWriteError) as e:
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


FAILED_EXIT_GRACE_S = 3.0


def exit_worker(code: int) -> None:
    """Leave a torchrun worker (several ranks) without the interpreter's teardown. The run is over and
    everything is written and closed (checkpoints atomically, logs closed, the process group destroyed), but
    the teardown's C++ static destructors of the collective backend aborted a rank now and then after a
    complete run ("terminate called without an active exception", SIGABRT with no Python frame left, so the
    launcher reported a failure): 1 of 20 two-rank runs under load on two CPU cores before, none of about 50
    after. One process alone exits normally.

    A rank that fails waits ``FAILED_EXIT_GRACE_S`` first. torchrun stops every other worker as soon as one exits
    with an error, and an error the ranks agreed on (a checkpoint that failed on one rank, a path one node does not
    see) is reported by each of them: the rank that reached its exit first got the others killed before they
    printed theirs (seen in CI under load: one of the two messages missing). Peers that are stuck in a collective
    instead are stopped that much later."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if code != 0:
            time.sleep(FAILED_EXIT_GRACE_S)
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_worker(main())
