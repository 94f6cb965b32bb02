#!/usr/bin/env python3
"""Which distributions a run imports that the GPU image lacks: what bench/device/wheels.txt must bring.

Runs COMMAND (a Python script and its arguments) with `python -X importtime`, maps every imported top-level
module to its distribution (importlib.metadata.packages_distributions, in this environment), and prints,
one per line as NAME==VERSION, those not in bench/device/image_packages.txt; then the ones the image has,
for a look at the versions that differ. Run it here in the rehearsal's environment (the kit's wheels and the
image stand-in in front of .venv, as make device-rehearsal sets them), for each kind of run the device
script makes: a union of the outputs is the kit.

  PYTHONPATH=... python bench/device/needed_wheels.py run_param_swap.py --demo --max-new-tokens 4
"""

import importlib.metadata as metadata
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", *sys.argv[1:]], capture_output=True, text=True)
    modules = {m.group(1).strip().split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \| (.+)$",
                                                                    proc.stderr, re.M)}
    owners = metadata.packages_distributions()
    dists = {canonical(d) for m in modules for d in owners.get(m, [])}
    with open(os.path.join(HERE, "image_packages.txt")) as f:
        image = {canonical(line.strip()) for line in f if line.strip() and not line.startswith("#")}
    for name in sorted(dists - image):
        print(f"{name}=={metadata.version(name)}")
    print(f"# on the image already ({len(dists & image)}): " + ", ".join(
        f"{n} {metadata.version(n)}" for n in sorted(dists & image)), file=sys.stderr)
    print(f"# the run exited {proc.returncode}", file=sys.stderr)


if __name__ == "__main__":
    main()
