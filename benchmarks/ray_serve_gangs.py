"""Ray Serve: two DP=2 EP gangs, one loses a rank under load; in-place heal vs gang restart.

The same as ``vllm-elastic-ft ray-drill`` (see ``vllm_elastic_ft/ray_serve/drill.py``):
prints a timeline and a table (lost requests, fence/rebuild/interruption times, gang B's
requests/s before and after the fault) and writes JSON.

    python benchmarks/ray_serve_gangs.py [--modes in_engine gang_restart] [--out runs/ray-drill]
"""

import argparse

from vllm_elastic_ft.ray_serve.drill import add_arguments, run_ray_drill
from vllm_elastic_ft.testing.tiny_moe import build_tiny_moe

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run_ray_drill(parser.parse_args(), str(build_tiny_moe())))
