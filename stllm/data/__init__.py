"""Data: CityData, loaders, windows, scalers, graph construction, synthetic cities."""
from stllm.data.city import CityData, DataError

__all__ = ["CityData", "DataError"]
