"""oneDNN's caches of compiled kernels, bounded for engines that run for hours.

Both engines compute their CPU linear layers with oneDNN (torch's prepacked `mkldnn` linear,
vLLM's CPU GEMMs), which compiles a kernel for every new input shape and keeps it in two caches
of 1024 entries each: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and PyTorch's
ideep computation cache (`LRU_CACHE_CAPACITY`). An engine sees a new shape with nearly every
batch (rows x context length), so a generate actor's heap grew with every unit until both
caches were full: 373 -> 502 MB of live heap over 20k rows of a 1-layer model
(`mallinfo2`), most of the growth `bench_data_plane memory` measured between a 100k-row and a
1M-row file. A step of either engine uses one kernel per weight shape (four per layer kind and
the output layer), so 64 entries keep every kernel a batch reuses: the same engine speed
measured (`glm-infill bench`), the heap flat.

The capacities are read when oneDNN first compiles a kernel in the process, so they are set
before an engine loads; a value the user set is kept (ideep crashes on 0: use 1 or more).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KERNEL_CACHE_CAPACITY = "64"


def bound_kernel_caches(environ: MutableMapping[str, str] = os.environ) -> None:
    """Cap oneDNN's kernel caches at `KERNEL_CACHE_CAPACITY` entries unless already set."""
    for name in KERNEL_CACHES:
        environ.setdefault(name, KERNEL_CACHE_CAPACITY)
