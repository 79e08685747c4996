"""Sweep workers sharing one sqlite Optuna storage claim each waiting trial exactly once.

Each worker here is a thread with its own storage (its own engine and connections), as separate worker processes
have; sqlite ignores ``SELECT ... FOR UPDATE``, which is what Optuna relies on to hand a waiting trial to one worker.
"""

from __future__ import annotations

import threading
from collections import Counter

from segmentation.mlops.sweep import open_study
from segmentation.training.search_space import load_search_space

WORKERS, ROUNDS = 6, 4


def test_each_enqueued_trial_is_claimed_by_one_worker_on_sqlite(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("params:\n  train.lr: {type: categorical, choices: [0.01, 0.02]}\n")
    space = load_search_space(space_file)
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = open_study("claims", storage, space, 60, 120, tracking)
    for _ in range(WORKERS * ROUNDS // 2):  # every round, half the workers race for the waiting trials
        first.enqueue_trial({"train.lr": 0.01})
    studies = [open_study("claims", storage, space, 60, 120, tracking) for _ in range(WORKERS)]
    barrier = threading.Barrier(WORKERS)
    claimed: list[int] = []
    errors: list[BaseException] = []

    def work(study) -> None:
        try:
            for _ in range(ROUNDS):
                barrier.wait()
                claimed.append(study.ask().number)
        except BaseException as exc:  # reported below, with the claims made so far
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(study,), daemon=True) for study in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker is still waiting after 120 s"
    assert not errors, errors
    twice = {number: count for number, count in Counter(claimed).items() if count > 1}
    assert not twice, f"trials handed to more than one worker (trial number: workers): {twice}"
    assert len(claimed) == WORKERS * ROUNDS
