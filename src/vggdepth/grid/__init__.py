"""The grid: every (variant, seed) run of the study whose checkpoints are not finished, trained concurrently.

The grid's unit of work is a group: one run, or several runs of one shape (same blocks, batch norm and batch size)
trained fused as one network (vggdepth.fused), on CUDA with its step a CUDA graph (`runtime.cuda_graphs`). On CUDA
every run of one shape that resumes from the same epoch joins one group (`grid.runs_per_group` caps it); on a CPU a
group is one run. Every run in a group keeps its own folder, checkpoints, MLflow run and resume, as a run alone does.

One driver (the `grid` stage) plans the groups and hands them to slots of the packing: long-lived Ray actors on this
machine (a local instance bound to 127.0.0.1) or a cluster, or, with `grid.backend: processes`, a plain process per
group on this machine (no Ray: a rented GPU machine without it). Each slot trains its group in a temporary folder;
after every epoch the runs' new checkpoints and tables travel to a `Recorder` on the driver's node, which writes them
into `runs/<variant>-s<seed>/` (each file through a temporary name) and sends the epoch to MLflow. So workers need
neither the repository, the DVC cache nor the tracking store, and the driver's folder always holds every run up to
its last finished epoch: a killed driver, re-run, resumes each run from there. A deadline (the GPU lease's budget)
stops each run after its last epoch that fits. `python -m vggdepth plan` shows what a grid would do, changing
nothing.

The per-run `train@<variant>-<seed>` stages that DVC runs next find their runs finished and only restore the
outputs from the checkpoints, which is how DVC records them (and how a single run is still trained alone).
"""

from vggdepth.grid.driver import GridResult, finish, grid_record, run_grid
from vggdepth.grid.plan import (
    GridError,
    Packing,
    PlannedRun,
    choose_packing,
    group_runs,
    local_resources,
    makespan,
    plan,
    plan_runs,
    probe_throughput,
    thread_choices,
)
from vggdepth.grid.workers import Deadline, Recorder, TimeUp, train_group

__all__ = [
    "Deadline",
    "GridError",
    "GridResult",
    "Packing",
    "PlannedRun",
    "Recorder",
    "TimeUp",
    "choose_packing",
    "finish",
    "grid_record",
    "group_runs",
    "local_resources",
    "makespan",
    "plan",
    "plan_runs",
    "probe_throughput",
    "run_grid",
    "thread_choices",
    "train_group",
]
