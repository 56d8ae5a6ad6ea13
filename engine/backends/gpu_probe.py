"""GPU temperature and memory through NVML (nvidia-ml-py) for the router's view of local health; nothing on a CPU."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("engine.backends.local")

NVML_CACHE_S = 5.0


class GpuProbe:
    """GPU temperature and memory through NVML (nvidia-ml-py) when installed; cached because the router asks often."""

    def __init__(self) -> None:
        self._initialised = False
        self._cache: dict[int, tuple[float, str | None]] = {}

    def describe(self, index: int) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(index)
        if cached is None or now - cached[0] > NVML_CACHE_S:
            cached = (now, self._query(index))
            self._cache[index] = cached
        return cached[1]

    def _query(self, index: int) -> str | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            if not self._initialised:
                pynvml.nvmlInit()
                self._initialised = True
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            temperature = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError as exc:
            log.debug("NVML: %s", exc)
            return None
        return f"GPU{index} {temperature}°C {memory.used / 2**30:.1f}/{memory.total / 2**30:.1f} GiB"
