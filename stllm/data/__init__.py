"""Data: CityData, loaders, windows, scalers, graph construction, synthetic cities."""
from stllm.data.city import CityData, DataError
from stllm.data.registry import load

__all__ = ["CityData", "DataError", "load"]
