# Sourced by ray-head.sh and ray-worker.sh: the environment every node of a dml cluster starts with.
# A value already set by the caller wins.
#
# RAY_worker_niceness=0: Ray starts its worker processes at nice 15, so on a busy node the training and
#   backfill workers yield their cores to everything else (the driver, Ray's daemons); on a dml node the
#   workers are the job (Ray Train with 1 worker runs at 0.95x plain PyTorch at nice 0, 0.80x at nice 15).
# RAY_preload_python_modules=torch: every worker here runs torch; importing it (1-2 s) while the worker
#   idles, not when a task or actor starts, makes backfill and training actors start faster.
# The raylet reads both at `ray start`, which is why they are set here and not in the run config
# (tasks/ray_runtime.py sets the same for the in-process Ray of a local run).
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
export RAY_preload_python_modules="${RAY_preload_python_modules:-torch}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_DISABLE_DOCKER_CPU_WARNING="${RAY_DISABLE_DOCKER_CPU_WARNING:-1}"
# a busy machine can take more than the default 30 s to start a node's agents
export RAY_agent_register_timeout_ms="${RAY_agent_register_timeout_ms:-120000}"
export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}"
# the `ray` beside this environment's Python (a venv's bin dir), else the one on PATH
RAY_BIN="${RAY_BIN:-$(command -v ray || true)}"
if [ -z "$RAY_BIN" ]; then
  echo "ray-env.sh: the ray command is not installed (pip install 'ray[train]')" >&2
  exit 127
fi
