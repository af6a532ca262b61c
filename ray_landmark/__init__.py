"""ray_landmark: the Google Landmark Recognition and Retrieval 2021 winning method on Ray."""

import os
import sys

# Ray reads these once, when it is imported, so they are set here, before any module imports Ray. Ray's scheduler
# warnings reach the console whatever log_to_driver says; when the output is a log file, not a terminal, keep them
# free of colour codes and of the deduplicator's coloured "[repeated Nx]" suffix. A user's own setting wins.
if not sys.stdout.isatty():
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
