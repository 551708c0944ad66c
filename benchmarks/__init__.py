import os

# The profiler (peak-memory counting) logs its start / stop and, without a GPU, a failed device query on every use:
# nothing a reader of the report can act on. Kineto reads the level when first used, so setting it here suffices.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
