"""GPU temperature and memory through NVML (nvidia-ml-py), for the router and for metrics; nothing on a CPU."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NVML_CACHE_S = 5.0
GIB = 2**30


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU as NVML saw it: the router reads `text`, metrics read the numbers."""

    index: int
    temperature_c: int
    memory_used_bytes: int
    memory_total_bytes: int

    @property
    def text(self) -> str:
        used, total = self.memory_used_bytes / GIB, self.memory_total_bytes / GIB
        return f"GPU{self.index} {self.temperature_c}°C {used:.1f}/{total:.1f} GiB"


class GpuProbe:
    """GPU temperature and memory through NVML (nvidia-ml-py) when installed; cached because the router asks often."""

    def __init__(self) -> None:
        self._initialised = False
        self._cache: dict[int, tuple[float, GpuReading | None]] = {}

    def read(self, index: int) -> GpuReading | None:
        now = time.monotonic()
        cached = self._cache.get(index)
        if cached is None or now - cached[0] > NVML_CACHE_S:
            cached = (now, self._query(index))
            self._cache[index] = cached
        return cached[1]

    def describe(self, index: int) -> str | None:
        reading = self.read(index)
        return reading.text if reading else None

    def _query(self, index: int) -> GpuReading | None:
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
        return GpuReading(index, int(temperature), int(memory.used), int(memory.total))
