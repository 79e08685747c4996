"""Starting the ranks of a training: which process is the main one, and the ``accelerate launch`` re-launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from segmentation.exit_codes import children_exit_code, collect_exit_codes


def inside_launch() -> bool:
    """Whether this process is one rank of a multi-process launch (``accelerate launch``, ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Whether this process is global rank 0 (the only one that talks to the tracking server)."""
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(num_processes: int, module_argv: list[str], cpu: bool) -> int:
    """Run ``python -m <module_argv>`` under ``accelerate launch`` with ``num_processes`` ranks; the exit code the
    failed ranks recorded (``accelerate launch`` itself exits 1 whatever failed; :mod:`segmentation.exit_codes`).

    On a machine without CUDA (or with ``cpu``) the ranks are gloo CPU processes: ``--cpu --num_processes N`` would
    start one process, ``--multi_gpu`` with ``ACCELERATE_USE_CPU`` gives N.
    """
    with socket.socket() as sock:  # a free rendezvous port, so that concurrent trainings do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    cmd += ["--num_processes", str(num_processes), "--main_process_port", str(port), "--dynamo_backend", "no"]
    if cpu or not torch.cuda.is_available():
        cmd += ["--mixed_precision", "no"]
        env["ACCELERATE_USE_CPU"] = "true"
    with collect_exit_codes(env) as codes:
        launched = subprocess.run([*cmd, "-m", *module_argv], env=env, check=False).returncode
        return children_exit_code(codes, launched)
