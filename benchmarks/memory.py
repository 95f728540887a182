"""Peak memory of a run, above what was held before it, for benchmarks with a memory column."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def peak_cuda(run: Callable[[], object]) -> int:
    """The peak of what the CUDA allocator held while ``run`` ran, above what it held before."""
    gc.collect()  # no tensor of an earlier run freed inside the window
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def peak_cpu(run: Callable[[], object]) -> int:
    """The peak of CPU memory allocated by torch while ``run`` ran, above what it held before: from the
    allocation events of torch's profiler, each of which carries the allocator's running total."""
    gc.collect()  # no tensor of an earlier run freed inside the window
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiled:
        run()
    totals, nodes = [], list(profiled.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            totals.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    if not totals:
        return 0
    totals.sort()
    before = totals[0][1] - totals[0][2]  # the running total just before the first event
    return max(total for _, total, _ in totals) - before
