"""Benchmarks: dafast against the peer a user would otherwise pick, in the same run.

Each benchmark sets extra_info["role"] to "dafast", "peer" or "baseline" and shares a group
with its competitors; bench/compare.py turns a saved run into dafast/peer time ratios and
checks them against a saved baseline run.
"""

import platform

import torch

import dafast


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["dafast"] = dafast.__version__
    machine_info["dafast_build"] = dafast.build_info()
    machine_info["threads"] = torch.get_num_threads()
    machine_info["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else platform.processor() or platform.machine())
