"""``Driver``: run a low-level ``LogicalPlan`` from a script (smallpond's ``execution.driver.Driver``).

    driver = Driver()
    driver.add_argument("-i", "--input_paths", nargs="+")
    args = driver.get_arguments()
    driver.run(my_pipeline(args.input_paths, 4))

``get_arguments()`` parses the script's own options plus the session settings (``--job_id``,
``--data_root``, ``--num_executors``, ``--executor``, ``--ray_address``, ``--max_retries``,
``--fault_inject_prob``); ``run(plan)`` executes every task of the plan and returns the root's datasets.
"""

from __future__ import annotations

import argparse
from typing import Any

from openinfra.smallpond.dataset import DataSet
from openinfra.smallpond.node import LogicalPlan
from openinfra.smallpond.optimizer import optimize
from openinfra.smallpond.planner import Planner

__all__ = ["Driver"]


class Driver:
    """Command-line front end for low-level plans."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(description="run a smallpond logical plan")
        g = self.parser.add_argument_group("smallpond")
        g.add_argument("--job_id", default=None, help="job id; the same id resumes a job (env SP_JOBID)")
        g.add_argument("--data_root", default=None, help="where intermediate data goes (env SP_DATA_ROOT)")
        g.add_argument("--num_executors", type=int, default=None, help="parallel tasks (env SP_NUM_EXECUTORS)")
        g.add_argument("--executor", choices=["local", "ray"], default=None, help="executor (env SP_EXECUTOR)")
        g.add_argument("--ray_address", default=None, help="Ray cluster address (env RAY_ADDRESS)")
        g.add_argument("--max_retries", type=int, default=None, help="retries per task (env SP_MAX_RETRIES)")
        g.add_argument("--fault_inject_prob", type=float, default=None, help="fail tasks at random (testing)")
        self._args: argparse.Namespace | None = None
        self._session_keys = ("job_id", "data_root", "num_executors", "executor", "ray_address", "max_retries",
                              "fault_inject_prob")

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        self.parser.add_argument(*args, **kwargs)

    def get_arguments(self, argv: list[str] | None = None) -> argparse.Namespace:
        self._args = self.parser.parse_args(argv)
        return self._args

    def run(self, plan: LogicalPlan, **session_kwargs: Any) -> list[DataSet]:
        """Execute ``plan``; session settings come from the parsed arguments, then ``session_kwargs``."""
        from openinfra.smallpond.session import Session

        if not isinstance(plan, LogicalPlan):
            raise TypeError(f"run: plan must be a LogicalPlan, got {type(plan).__name__}")
        args = self._args if self._args is not None else self.get_arguments([])
        settings = {k: getattr(args, k) for k in self._session_keys if getattr(args, k, None) is not None}
        settings.update(session_kwargs)
        settings.setdefault("remove_output_root", False)  # a low-level plan's outputs live in the job dir
        session = Session(**settings)
        session._ctx = plan.ctx
        try:
            tasks = Planner().visit(optimize(plan).root_node)
            result = session._run(tasks, description=repr(plan.root_node))
            self.stats = session.stats
            self.job_root = session.job_root
            return result
        finally:
            session.shutdown()
