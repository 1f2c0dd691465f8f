"""A Hydra sweeper that launches an explicit list of jobs (``cocoef sweep``'s plan).

Hydra's basic sweeper launches the full cross product of its arguments. ``cocoef sweep`` plans
the jobs itself (see :func:`cocoef_cli.sweep.plan`: baseline arms keep their own values,
duplicate configs run once, finished jobs are skipped) and hands this sweeper the result: the
sweep's constant overrides as Hydra's arguments (recorded once, in ``multirun.yaml``) and, in
``jobs_file`` (``OUT/sweep.json``), the swept overrides of each job to launch. Job ``i`` runs
with ``arguments + launch[i]`` through the configured launcher (joblib, submitit, ray, ...), in
batches of ``max_batch_size``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf


class ListSweeper(BasicSweeper):
    """Launch the jobs listed in ``jobs_file`` (its ``launch`` list of override lists)."""

    def __init__(self, jobs_file: str, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)  # params: already expanded by the plan
        self.jobs_file = jobs_file

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        jobs = json.loads(Path(self.jobs_file).read_text())["launch"]
        self.overrides = list(self.split_overrides_to_chunks([[*arguments, *job] for job in jobs], self.max_batch_size))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, first = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # re-raises a job's exception, as the basic sweeper does
            first += len(batch)
            returns.append(results)
        return returns
