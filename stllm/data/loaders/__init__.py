"""One loader per on-disk family; each returns a CityData. `stllm.data.load` picks the right one."""
from stllm.data.loaders.bayarea import load_bayarea
from stllm.data.loaders.beijing import load_beijing
from stllm.data.loaders.byo import load_byo
from stllm.data.loaders.losloop import load_losloop
from stllm.data.loaders.melbourne import load_melbourne
from stllm.data.loaders.nyc import load_nyc
from stllm.data.loaders.standard import load_dcrnn, load_pems

__all__ = ["load_bayarea", "load_beijing", "load_byo", "load_dcrnn", "load_losloop", "load_melbourne", "load_nyc",
           "load_pems"]
